//! A coarse GPU-time profile for engine work, off unless `QSCRIPT_PROFILE=1`: each span
//! synchronizes the device when it starts and ends and adds the wall time to a table, so the
//! table tells where a step's device time goes (the synchronizations slow the run down; use it to
//! find what to fix, never to report speed). `report()` prints the table. The same spans are
//! spans of the GPU timeline under `QSCRIPT_TRACE` (`device::trace`), which times them without
//! synchronizing.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use candle_core::Device;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("QSCRIPT_PROFILE").is_ok_and(|v| v == "1"))
}

fn table() -> &'static Mutex<BTreeMap<&'static str, (f64, u64)>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, (f64, u64)>>> = OnceLock::new();
    T.get_or_init(Mutex::default)
}

/// A running span; its time is recorded when it is dropped. With `QSCRIPT_TRACE` it is also a
/// span of the GPU timeline (`device::trace`), which synchronizes nothing.
pub struct Span {
    name: &'static str,
    /// With `QSCRIPT_PROFILE=1`: the device and when the span started.
    timed: Option<(Device, Instant)>,
    _trace: crate::device::trace::Span,
}

/// Starts span `name` on `device`.
pub fn span(name: &'static str, device: &Device) -> Span {
    let trace = crate::device::trace::span(|| name.to_string(), device);
    let timed = enabled().then(|| {
        let _ = device.synchronize();
        (device.clone(), Instant::now())
    });
    Span {
        name,
        timed,
        _trace: trace,
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some((device, start)) = self.timed.take() else {
            return;
        };
        let _ = device.synchronize();
        let dt = start.elapsed().as_secs_f64();
        if let Ok(mut t) = table().lock() {
            let e = t.entry(self.name).or_insert((0.0, 0));
            e.0 += dt;
            e.1 += 1;
        }
    }
}

/// The table so far (`name: total ms over calls`), empty when profiling is off; then clears it.
pub fn report() -> String {
    let Ok(mut t) = table().lock() else {
        return String::new();
    };
    let total: f64 = t.values().map(|v| v.0).sum();
    let mut out = String::new();
    for (name, (secs, calls)) in t.iter() {
        out.push_str(&format!(
            "{name:24} {:9.1} ms {:5.1}% {calls:6} calls\n",
            secs * 1e3,
            100.0 * secs / total.max(1e-12)
        ));
    }
    t.clear();
    out
}
