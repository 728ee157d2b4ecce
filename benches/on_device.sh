#!/usr/bin/env bash
# What one device call runs (see benches/README.md): unpack the binaries shipped in .devbin/ (and
# a previous build's in .devbin/base/, compared in the same call),
# run the GPU test binary, then the harness for the configs given (and with WATCH=1 the hot-reload
# measurement, benches/watch_gpu.sh). Logs and results go to $OUT.
set -uo pipefail
mkdir -p /tmp/qs
for f in .devbin/*.xz; do
  b=/tmp/qs/$(basename "$f" .xz)
  xz -dc "$f" > "$b" && chmod +x "$b"
done
# A second build's binaries in .devbin/base/ (the previous build): the harness runs them after
# this build's on each config (benches/gpu.sh, BASE).
if compgen -G ".devbin/base/*.xz" > /dev/null; then
  mkdir -p /tmp/qs-base
  for f in .devbin/base/*.xz; do
    b=/tmp/qs-base/$(basename "$f" .xz)
    xz -dc "$f" > "$b" && chmod +x "$b"
  done
  export BASE=/tmp/qs-base
fi
# Python packages the device lacks (TRL and its needs for the DPO peer), carried as wheels.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv,noheader
if [ -x /tmp/qs/gpu ] && [ "${SKIP_TESTS:-0}" != 1 ]; then
  /tmp/qs/gpu --test-threads=1 > "${OUT:-/tmp}/gpu-tests.log" 2>&1
  echo "gpu tests: exit $?"; grep -E "^test |test result|panicked" "${OUT:-/tmp}/gpu-tests.log" | tail -12
fi
BIN=/tmp/qs PEER=.devbin bash benches/gpu.sh "$@"
if [ "${WATCH:-0}" = 1 ]; then   # hot reload: memory over edit-and-re-run cycles
  BIN=/tmp/qs PEER=.devbin bash benches/watch_gpu.sh 4 > "${OUT:-/tmp}/watch.log" 2>&1
  tail -12 "${OUT:-/tmp}/watch.log"; cp /tmp/qsbench/watch/err.log "${OUT:-/tmp}/watch-err.log"
fi
cp /tmp/qsbench/results.jsonl "${OUT:-/tmp}/" 2>/dev/null
for f in /tmp/qsbench/*.err; do tail -20 "$f" > "${OUT:-/tmp}/$(basename "$f")"; done 2>/dev/null
true
