//! `report_to: "tensorboard"`: the run's logged scalars as a TensorBoard event file, the way HF's
//! `TensorBoardCallback` writes them (`train/loss`, `train/learning_rate`, `train/grad_norm`,
//! `train/epoch`, `eval/loss`, ...) under `logging_dir` (HF's default: `output_dir/runs`). The file
//! is TFRecord-framed `Event` protocol buffers (prost for the encoding, crc32c for the framing's
//! checksums); every run (a resume too) writes its own file, and TensorBoard merges the files of a
//! directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `tensorflow.Event` (the fields used here).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// `brain.Event:2` in the first event of a file.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// The scalars of this step.
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// One per scalar.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// `train/loss`, ...
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The value.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// An open event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// TFRecord's checksum: crc32c, rotated and offset so a CRC of CRCs stays well distributed.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

impl EventWriter {
    /// A new `events.out.tfevents.<seconds>.<host>.qscript` in `dir` (created), starting with the
    /// file-version event.
    pub fn create(dir: &Path) -> Result<Self> {
        crate::sandbox::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains(['/', '\\']))
            .unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.qscript",
            now() as u64,
            std::process::id()
        ));
        let file = crate::sandbox::open_write(&path, crate::sandbox::WriteMode::CreateNew)?;
        let mut w = Self { path, file };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the numeric fields of a logged record (`step` is the step; `eval_*` keys go under
    /// `eval/`, the rest under `train/`, as HF names them).
    pub fn log(&mut self, rec: &serde_json::Value) -> Result<()> {
        let Some(obj) = rec.as_object() else {
            return Ok(());
        };
        let step = obj
            .get("step")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        let value: Vec<SummaryValue> = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| {
                let tag = match k.strip_prefix("eval_") {
                    Some(rest) => format!("eval/{rest}"),
                    None => format!("train/{k}"),
                };
                v.as_f64().map(|x| SummaryValue {
                    tag,
                    simple_value: Some(x as f32),
                })
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time: now(),
            step,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    fn write(&mut self, e: &Event) -> Result<()> {
        let data = prost::Message::encode_to_vec(e);
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Every event of a file, checking each record's framing and checksums (what TensorBoard's
/// reader checks).
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: &str| Error::InvalidArgument(format!("`{}`: {m}", path.display()));
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("truncated record header"))?;
        let len_bytes = &head[..8];
        let crc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if crc != masked_crc(len_bytes) {
            return Err(bad("bad length checksum"));
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(len_bytes);
        let len = usize::try_from(u64::from_le_bytes(len8)).map_err(|_| bad("huge record"))?;
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad("truncated record"))?;
        let tail = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad("truncated record checksum"))?;
        if u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) != masked_crc(data) {
            return Err(bad("bad data checksum"));
        }
        out.push(
            <Event as prost::Message>::decode(data).map_err(|e| bad(&format!("bad event: {e}")))?,
        );
        at += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_with_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.log(&serde_json::json!({"step": 3, "loss": 1.5, "learning_rate": 1e-3, "note": "x"}))
            .unwrap();
        w.log(&serde_json::json!({"step": 3, "eval_loss": 2.25}))
            .unwrap();
        let ev = read_events(w.path()).unwrap();
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        let s = ev[1].summary.as_ref().unwrap();
        assert_eq!(ev[1].step, 3);
        let tags: Vec<(&str, f32)> = s
            .value
            .iter()
            .map(|v| (v.tag.as_str(), v.simple_value.unwrap()))
            .collect();
        assert!(tags.contains(&("train/loss", 1.5)), "{tags:?}");
        assert!(tags.contains(&("train/learning_rate", 1e-3)), "{tags:?}");
        assert_eq!(tags.len(), 2, "strings are not scalars");
        let e = &ev[2].summary.as_ref().unwrap().value[0];
        assert_eq!((e.tag.as_str(), e.simple_value), ("eval/loss", Some(2.25)));
        // The TFRecord checksum of a known vector (crc32c("123456789") = 0xe3069283, masked).
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }
}
