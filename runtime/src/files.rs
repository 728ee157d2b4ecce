//! The text and JSON files users give (recipes' data, `config.json`, `tokenizer_config.json`,
//! `trainer_state.json`, ...), read through the sandbox's check of the opened file, with errors
//! that name the file and the line.

use crate::{Error, Result};

/// A text file as a string: UTF-8 (an invalid byte is an error naming its line and column), a
/// leading byte-order mark dropped.
pub fn read_text(path: &std::path::Path) -> Result<String> {
    text_of(path, crate::sandbox::read(path)?)
}

/// `bytes` read from `path` as text (see [`read_text`]).
pub fn text_of(path: &std::path::Path, bytes: Vec<u8>) -> Result<String> {
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let good = &e.as_bytes()[..at];
            let line = good.split(|&b| b == b'\n').count();
            let col = at - good.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
            return Err(Error::InvalidArgument(format!(
                "`{}`: line {line}, column {col}: not UTF-8 text (byte {:#04x}); save the file as UTF-8",
                path.display(),
                e.as_bytes()[at]
            )));
        }
    };
    Ok(match text.strip_prefix('\u{feff}') {
        Some(t) => t.to_string(),
        None => text,
    })
}

/// The largest JSON config file read (`config.json`, `trainer_state.json` with a long
/// `log_history`, `dataset_info.json`, ...): real ones are kilobytes to a few megabytes.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// Reads a JSON config file (`config.json`, `adapter_config.json`, ...) into `T`; a read error names
/// the file, a parse error names the file with serde's line and column. A file over
/// [`MAX_CONFIG_BYTES`] is refused before it is read (parsed, it would take several times that).
pub fn read_config<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let f = crate::sandbox::open(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!(
                "{} is larger than a config file can be ({} at most)",
                crate::bytes::human(len as f64),
                crate::bytes::human(MAX_CONFIG_BYTES as f64)
            ),
        });
    }
    drop(f);
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// A config file larger than any real one is refused by its size, naming the file.
    #[test]
    fn an_oversized_config_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(super::MAX_CONFIG_BYTES + 1).unwrap();
        let e = super::read_config::<serde_json::Value>(&p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.json") && e.contains("larger than a config file"),
            "{e}"
        );
    }
}
