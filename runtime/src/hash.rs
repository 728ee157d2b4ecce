//! Content hashes of files and directories, used as memo-cache keys: a cached result is reused
//! only while the bytes it was computed from are the same.

use std::path::Path;

use crate::{Error, Result};

/// The blake3 hash of a file's bytes, or of every file under a directory (names and bytes, in
/// sorted order), as hex.
pub fn hash_path(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    feed(&mut hasher, path, path)?;
    Ok(hasher.finalize().to_hex().to_string())
}

fn feed(hasher: &mut blake3::Hasher, root: &Path, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let mut entries = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::io(path, e))?;
        entries.sort();
        for entry in entries {
            feed(hasher, root, &entry)?;
        }
    } else {
        let rel = path.strip_prefix(root).unwrap_or(path);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        hasher
            .update_reader(&mut file)
            .map_err(|e| Error::io(path, e))?;
        hasher.update(&[0]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_follows_content() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let f = dir.path().join("a.txt");
        std::fs::write(&f, "one").map_err(|e| Error::io(&f, e))?;
        let h1 = hash_path(&f)?;
        let d1 = hash_path(dir.path())?;
        std::fs::write(&f, "two").map_err(|e| Error::io(&f, e))?;
        assert_ne!(h1, hash_path(&f)?);
        assert_ne!(d1, hash_path(dir.path())?);
        assert!(hash_path(&dir.path().join("missing")).is_err());
        Ok(())
    }
}
