//! With feature `cuda`, compiles each kernel family's `.cu` ([`FAMILIES`]: the `.rs` + `.cu` pairs
//! under `src/nn/cuda/` and the optimizer's under `src/train/optim/`, with the device helpers of
//! `src/nn/cuda/common.cuh` on the include path) to its own PTX module with `nvcc` (found on
//! `PATH`, or `NVCC`), all at once; each PTX is embedded in the library by its family's launcher
//! and loaded once per device at run time (`src/nn/cuda/launch.rs`, the one launcher). And
//! the cuDNN attention shim `src/nn/cuda/sdpa.cpp` with the C++ compiler, against the CUDA, cuDNN
//! and cudnn-frontend headers (`QSCRIPT_CUDNN_INCLUDE`: `:`-separated directories, as
//! `scripts/cuda-toolchain.sh` sets it); cuDNN itself is loaded at run time.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel families' device code, each compiled to `$OUT_DIR/<file stem>.ptx` (stems unique).
const FAMILIES: &[&str] = &[
    "src/nn/cuda/accumulate.cu",
    "src/nn/cuda/cross_entropy.cu",
    "src/nn/cuda/decode_attn.cu",
    "src/nn/cuda/dequant.cu",
    "src/nn/cuda/dropout.cu",
    "src/nn/cuda/gemv.cu",
    "src/nn/cuda/rms_norm.cu",
    "src/nn/cuda/rope.cu",
    "src/nn/cuda/softmax.cu",
    "src/nn/cuda/swiglu.cu",
    "src/train/optim/adamw.cu",
    "src/train/optim/adamw8.cu",
    "src/train/optim/grad_norm.cu",
];

/// The directory of `common.cuh`, the device helpers every family includes.
const COMMON: &str = "src/nn/cuda";

fn main() {
    for cu in FAMILIES {
        println!("cargo::rerun-if-changed={cu}");
    }
    println!("cargo::rerun-if-changed={COMMON}/common.cuh");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-changed=src/nn/cuda/sdpa.cpp");
    println!("cargo::rerun-if-env-changed=QSCRIPT_CUDNN_INCLUDE");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // PTX for the oldest architecture we support runs on every newer one (the driver JITs it once).
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // Every family at once, then each waited for.
    let runs: Vec<_> = FAMILIES
        .iter()
        .map(|cu| {
            let stem = Path::new(cu).file_stem().expect("a .cu file");
            let out = out_dir.join(stem).with_extension("ptx");
            let child = Command::new(&nvcc)
                .args([
                    "--ptx",
                    "-O3",
                    "-std=c++17",
                    &format!("-arch=compute_{cap}"),
                    "-I",
                    COMMON,
                    "-o",
                ])
                .arg(&out)
                .arg(cu)
                .spawn();
            (cu, child)
        })
        .collect();
    for (cu, child) in runs {
        match child.and_then(|mut c| c.wait()) {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("`{nvcc}` failed ({s}) compiling {cu}"),
            Err(e) => panic!(
                "the `cuda` feature needs `nvcc` on PATH (or NVCC=...): {e}; see README.md, \"GPU build\""
            ),
        }
    }
    #[cfg(feature = "cuda")]
    sdpa_shim(&nvcc);
}

/// The CUDA include directory: `$CUDA_ROOT/include`, else next to `nvcc`.
#[cfg(feature = "cuda")]
fn cuda_include(nvcc: &str) -> Option<PathBuf> {
    if let Some(root) = std::env::var_os("CUDA_ROOT") {
        return Some(PathBuf::from(root).join("include"));
    }
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    out.status.success().then_some(())?;
    let which = Command::new("sh")
        .args(["-c", &format!("command -v {nvcc}")])
        .output()
        .ok()?;
    let bin = PathBuf::from(String::from_utf8_lossy(&which.stdout).trim());
    Some(bin.parent()?.parent()?.join("include"))
}

#[cfg(feature = "cuda")]
fn sdpa_shim(nvcc: &str) {
    let mut dirs: Vec<PathBuf> = std::env::var("QSCRIPT_CUDNN_INCLUDE")
        .map(|v| {
            v.split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.extend(cuda_include(nvcc));
    // The compiler searches /usr/include itself (a system cuDNN); it is only looked at here.
    let has = |f: &str| {
        dirs.iter()
            .chain(std::iter::once(&PathBuf::from("/usr/include")))
            .any(|d| d.join(f).is_file())
    };
    for (file, what) in [
        ("cudnn.h", "the cuDNN 9 headers"),
        ("cudnn_frontend.h", "the cudnn-frontend headers"),
        ("cuda_runtime_api.h", "the CUDA headers"),
    ] {
        assert!(
            has(file),
            "the `cuda` feature needs {what} ({file} not found in {dirs:?}); \
                 `bash scripts/cuda-toolchain.sh` installs them and `source \"$(bash scripts/cuda-toolchain.sh --env)\"` \
                 sets QSCRIPT_CUDNN_INCLUDE; see README.md, \"GPU build\""
        );
    }
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .file("src/nn/cuda/sdpa.cpp")
        .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
        .opt_level(1)
        .warnings(false);
    for d in dirs.iter().filter(|d| d.is_dir()) {
        b.include(d);
    }
    b.compile("qscript_sdpa");
    println!("cargo::rustc-link-lib=dylib=dl");
}
