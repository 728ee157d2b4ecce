#!/usr/bin/env bash
# Installs the CUDA 13.0 build toolchain from PyPI wheels, so that the `cuda` feature builds on a
# machine without a GPU or a system CUDA (CI, laptops), with the cuDNN 9 and cudnn-frontend headers
# the attention shim compiles against (headers only: cuDNN itself is loaded at run time from where
# the user has it). Idempotent; prints what to `source`.
#
#   bash scripts/cuda-toolchain.sh --headers  # only the cuDNN and cudnn-frontend headers, next to a
#                                             # system CUDA toolkit
#   bash scripts/cuda-toolchain.sh --lint   # nvcc and headers: enough for `cargo clippy --features cuda`
#   bash scripts/cuda-toolchain.sh          # also cuBLAS/cuRAND/cudart link libraries and a libcuda
#                                           # stub, for `cargo build --features cuda`
#   source "$(bash scripts/cuda-toolchain.sh --env)"
#
# 13.0 is what torch 2.11 (cu130) pins and the GPU machines carry: a newer nvcc writes PTX that
# driver 580 cannot load. The stub only satisfies the linker; on a GPU machine the driver's real
# libcuda.so.1 is loaded. A machine with a CUDA toolkit installed needs none of this.
set -euo pipefail
PREFIX=${QSCRIPT_CUDA_PREFIX:-${HOME:-/root}/.cache/qscript-cuda13}
ROOT=$PREFIX/nvidia/cu13
ENV_FILE=$PREFIX/env.sh
mode=${1:-full}

write_env() {
  if [ "$mode" = --headers ]; then
    echo "export QSCRIPT_CUDNN_INCLUDE=\"$PREFIX/cudnn/include:$PREFIX/cudnn-frontend/include\"" > "$ENV_FILE"
    return
  fi
  cat > "$ENV_FILE" <<EOF
export PATH="$ROOT/bin:\$PATH"   # cudarc's build script asks \`nvcc --version\`
export CUDA_ROOT="$ROOT"          # where cudarc finds the link libraries
export QSCRIPT_CUDNN_INCLUDE="$PREFIX/cudnn/include:$PREFIX/cudnn-frontend/include"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}   # no GPU to ask: H100/H200
EOF
}

case $mode in
  --env) [ -f "$ENV_FILE" ] || write_env; echo "$ENV_FILE"; exit 0 ;;
  --headers) parts= ;;
  --lint) parts=nvcc,cudart,cccl,crt,nvvm,nvrtc ;;   # nvrtc.h: the frontend headers include it
  full) parts=nvcc,cudart,cccl,crt,nvvm,cublas,curand,nvrtc ;;
  *) echo "usage: $0 [--headers | --lint | --env]" >&2; exit 2 ;;
esac

stamp=$PREFIX/.installed-${mode#--}
mkdir -p "$PREFIX"
if [ -n "$parts" ] && [ ! -f "$stamp" ] && [ ! -f "$PREFIX/.installed-full" ]; then
  python3 -m pip install --quiet --no-cache-dir --upgrade --target "$PREFIX" \
    "cuda-toolkit[$parts]==13.0.2"
  touch "$stamp"
fi

# Headers of cuDNN 9.19 and cudnn-frontend 1.32 out of their wheels (the wheels themselves are not
# kept: cuDNN's carries 360 MB of libraries that only a GPU machine needs).
headers() {  # headers NAME REQUIREMENT PATH-IN-WHEEL HEADER [pip options]
  local dest=$PREFIX/$1/include
  [ -f "$dest/$4" ] && return
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --dest "$tmp" "${@:5}" "$2"
  python3 - "$tmp"/*.whl "$3" "$tmp/include" <<'PY'
import sys, zipfile, os
whl, inner, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith(inner) and not n.endswith("/"):
            out = os.path.join(dest, n[len(inner):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as f:
                f.write(z.read(n))
PY
  if [ ! -f "$tmp/include/$4" ]; then
    echo "$2: no $3$4 in the wheel" >&2; rm -rf "$tmp"; exit 1
  fi
  rm -rf "$dest" && mkdir -p "$(dirname "$dest")" && mv "$tmp/include" "$dest"
  rm -rf "$tmp"
}
headers cudnn "nvidia-cudnn-cu13==9.19.0.56" nvidia/cudnn/include/ cudnn.h
headers cudnn-frontend "nvidia-cudnn-frontend==1.32.0" include/ cudnn_frontend.h \
  --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64

if [ "$mode" = full ]; then
  # The wheels carry only versioned sonames; the linker looks for the plain names.
  (cd "$ROOT/lib"
   for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
   ln -sf libcurand.so.10 libcurand.so)
  ln -sfn lib "$ROOT/lib64"
  if [ ! -f "$ROOT/lib/stubs/libcuda.so" ]; then
    # Every driver entry point cuda.h declares, returning CUDA_ERROR_STUB_LIBRARY (34), and
    # those cudarc loads by name: its source comes from cargo's registry (fetched first on a
    # fresh machine, where no build has put it there yet).
    registry=${CARGO_HOME:-${HOME:-/root}/.cargo}/registry/src
    if ! compgen -G "$registry/*/cudarc-0.19.*/src/driver/sys/mod.rs" > /dev/null; then
      (cd "$(dirname "$0")/.." && cargo fetch --quiet) || echo "cargo fetch failed: the stub has cuda.h's entry points only" >&2
    fi
    mkdir -p "$ROOT/lib/stubs"
    src=$(mktemp --suffix=.c)
    {
      echo 'int cuGetErrorString(int e, const char **s) { (void)e; *s = "no NVIDIA driver (libcuda stub)"; return 0; }'
      echo 'int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
      for api in "" -D__CUDA_API_VERSION_INTERNAL; do
        gcc -E -P $api -I"$ROOT/include" "$ROOT/include/cuda.h"
        # and the entry points cudarc loads by name that cuda.h declares under other macros
        cat "$registry"/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null |
          grep -oP 'load::<_F>\("\K(cu\w+)' | sed 's/.*/CUresult &(/'
      done | grep -oP '\bCUresult\s+\K(cu\w+)(?=\s*\()' | sort -u |
        grep -vx -e cuGetErrorString -e cuGetErrorName | sed 's/.*/int &(void) { return 34; }/'
    } > "$src"
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$src"
    ln -sf libcuda.so "$ROOT/lib/stubs/libcuda.so.1"
    rm -f "$src"
  fi
fi
write_env
if [ "$mode" = --headers ]; then
  echo "cuDNN and cudnn-frontend headers in $PREFIX; next: source $ENV_FILE"
  exit 0
fi
"$ROOT/bin/nvcc" --version | tail -1
echo "CUDA build toolchain ($mode) in $ROOT; next: source $ENV_FILE"
