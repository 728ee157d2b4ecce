//! Byte counts as messages show them.

/// A size as accelerate and the CLI write it: `"20GiB"`, `"500MB"`, `"1.5 TB"`, or bytes (`"1024"`,
/// `"12B"`); `Err(())` for anything else (the caller names the option).
#[allow(clippy::result_unit_err)]
pub fn parse_size(s: &str) -> Result<u64, ()> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.trim().parse().map_err(|_| ())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => return Err(()),
    };
    let bytes = num * mult;
    if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
        return Err(());
    }
    Ok(bytes as u64)
}

/// `1.25 GiB`, `512.00 MiB`, `3.10 PiB`, `12 B`.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes;
    let mut k = 0;
    while v >= 1024.0 && k + 1 < UNITS.len() {
        v /= 1024.0;
        k += 1;
    }
    if k == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[k])
    }
}
