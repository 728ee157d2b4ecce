//! Where the NVIDIA libraries the engine loads at run time are looked for: cuDNN (attention,
//! `nn/cuda/sdpa.rs`) and NCCL (`crate::dist::nccl`).

/// Where an NVIDIA library the engine loads at run time may be, in the order tried: the path in
/// `env` (e.g. `QSCRIPT_CUDNN`), the dynamic loader's own search for `soname` (LD_LIBRARY_PATH, the
/// ld.so cache: a system install), then pip wheels (`nvidia/<wheel>/lib/<soname>`, as torch
/// installs them) in the usual Python environments.
pub fn library_candidates(env: &str, soname: &str, wheel: &str) -> Vec<std::path::PathBuf> {
    use std::path::PathBuf;
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(env) {
        out.push(PathBuf::from(p));
    }
    out.push(PathBuf::from(soname));
    let mut roots: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local"));
    }
    roots.extend(["/usr/local", "/usr"].map(PathBuf::from));
    if let Ok(opt) = std::fs::read_dir("/opt") {
        for e in opt.flatten() {
            roots.push(e.path());
            roots.push(e.path().join(".venv"));
        }
    }
    for root in roots {
        let Ok(libs) = std::fs::read_dir(root.join("lib")) else {
            continue;
        };
        for py in libs.flatten() {
            if py.file_name().to_string_lossy().starts_with("python3") {
                for site in ["site-packages", "dist-packages"] {
                    let lib = py
                        .path()
                        .join(site)
                        .join("nvidia")
                        .join(wheel)
                        .join("lib")
                        .join(soname);
                    if lib.is_file() {
                        out.push(lib);
                    }
                }
            }
        }
    }
    out
}
