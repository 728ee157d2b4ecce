//! With feature `cuda`, compiles `src/nn/cuda/kernels.cu` to PTX with `nvcc` (found on `PATH`, or
//! `NVCC`); the PTX is embedded in the library and loaded once per device at run time.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/nn/cuda/kernels.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.ptx");
    // PTX for the oldest architecture we support runs on every newer one (the driver JITs it once).
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            "-o",
        ])
        .arg(&out)
        .arg("src/nn/cuda/kernels.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{nvcc}` failed ({s}) compiling src/nn/cuda/kernels.cu"),
        Err(e) => panic!(
            "the `cuda` feature needs `nvcc` on PATH (or NVCC=...): {e}; see README.md, \"GPU build\""
        ),
    }
}
