//! Content hashes of files and directories, used as memo-cache keys: a cached result is reused
//! only while the bytes it was computed from are the same. Files over 64 MiB (checkpoint shards)
//! are fingerprinted by length, modification time and their first and last MiB, so a re-run cell
//! does not read 15 GB to find its cached model.

use std::path::Path;

use crate::{Error, Result};

/// The blake3 hash of a file's bytes, or of every file under a directory (names and bytes, in
/// sorted order), as hex.
pub fn hash_path(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    feed(&mut hasher, path, path)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The most files one key hashes (a checkpoint or tokenizer directory holds tens).
const MAX_FILES: usize = 10_000;

fn feed(hasher: &mut blake3::Hasher, root: &Path, path: &Path) -> Result<()> {
    let mut files = 0usize;
    feed_inner(hasher, root, path, &mut files)
}

fn feed_inner(
    hasher: &mut blake3::Hasher,
    root: &Path,
    path: &Path,
    files: &mut usize,
) -> Result<()> {
    let link = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    // A linked directory is not walked (no loops); a linked file is hashed as the file it names.
    let meta = if link.file_type().is_symlink() {
        std::fs::metadata(path).map_err(|e| Error::io(path, e))?
    } else {
        link.clone()
    };
    if meta.is_dir() && !link.file_type().is_symlink() {
        for entry in crate::sandbox::list_dir(path)? {
            feed_inner(hasher, root, &entry, files)?;
        }
    } else if meta.is_file() {
        *files += 1;
        if *files > MAX_FILES {
            return Err(Error::InvalidArgument(format!(
                "`{}` holds more than {MAX_FILES} files; point at the checkpoint or data itself",
                root.display()
            )));
        }
        let rel = path.strip_prefix(root).unwrap_or(path);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        let mut file = crate::sandbox::open(path)?;
        if meta.len() > BIG {
            fingerprint(hasher, &mut file, &meta).map_err(|e| Error::io(path, e))?;
        } else {
            hasher
                .update_reader(&mut file)
                .map_err(|e| Error::io(path, e))?;
        }
        hasher.update(&[0]);
    } else if !meta.is_dir() {
        // A FIFO, socket or device would block or never end: never opened.
        return Err(Error::InvalidArgument(format!(
            "`{}` is not a regular file",
            path.display()
        )));
    }
    Ok(())
}

/// Files larger than this are fingerprinted instead of hashed in full.
const BIG: u64 = 64 << 20;

fn fingerprint(
    hasher: &mut blake3::Hasher,
    file: &mut std::fs::File,
    meta: &std::fs::Metadata,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    hasher.update(&meta.len().to_le_bytes());
    if let Ok(t) = meta.modified()
        && let Ok(d) = t.duration_since(std::time::UNIX_EPOCH)
    {
        hasher.update(&d.as_nanos().to_le_bytes());
    }
    let mut buf = vec![0u8; 1 << 20];
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
    file.seek(SeekFrom::End(-(1 << 20)))?;
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
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
        // A big file is fingerprinted: a change in its first MiB is seen.
        let big = dir.path().join("big.bin");
        let mut bytes = vec![7u8; (BIG + 1) as usize];
        std::fs::write(&big, &bytes).map_err(|e| Error::io(&big, e))?;
        let b1 = hash_path(&big)?;
        bytes[10] = 8;
        std::fs::write(&big, &bytes).map_err(|e| Error::io(&big, e))?;
        assert_ne!(b1, hash_path(&big)?);
        Ok(())
    }
}
