//! Atomic file writes: every file vqx writes (checkpoints, .npy outputs, plots, CSV, JSON
//! reports) goes to a temporary file in the destination's directory, is synced, then renamed
//! onto the destination, and the directory is synced so the rename itself survives a crash.
//! A failed or interrupted write never leaves a half-written file under the destination's name.
//!
//! ```
//! let dir = std::env::temp_dir().join(format!("vqx-atomic-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("report.json");
//! vqx::atomic::write_atomic(&path, b"{}")?;
//! assert_eq!(std::fs::read(&path).unwrap(), b"{}");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), vqx::Error>(())
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary path next to `path`, unique within this process (a counter) and across processes
/// (the process id), hidden by a leading dot.
pub(crate) fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidArgument(format!("{} does not name a file", path.display()))
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".vqx-tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(path.with_file_name(tmp))
}

/// Syncs the finished temporary file `tmp`, renames it onto `path` and syncs the directory.
/// On error `tmp` is removed and `path` is untouched.
pub(crate) fn publish(tmp: &Path, path: &Path) -> Result<()> {
    let result = std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::rename(tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(tmp);
        return Err(Error::io(path, e));
    }
    // Best effort: not every platform or filesystem lets a directory be opened and synced.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (see the module documentation).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes to `path` atomically through `write`, which gets a buffered writer on the temporary
/// file: for outputs produced piece by piece (JSON lines, CSV). An error from `write` is
/// reported against `path`, and `path` is untouched.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            write(&mut w)?;
            w.flush()
        });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    publish(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vqx-atomic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".vqx-tmp-"))
            .collect()
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = scratch("fail");
        let path = dir.join("out.csv");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("out.csv") && msg.contains("disk on fire"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_replace_and_temporaries_are_unique() {
        let dir = scratch("ok");
        let path = dir.join("x.json");
        write_atomic_with(&path, |w| w.write_all(b"1")).unwrap();
        write_atomic(&path, b"22").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"22");
        assert_ne!(temp_path(&path).unwrap(), temp_path(&path).unwrap());
        assert!(leftovers(&dir).is_empty());
        let err = write_atomic(Path::new("/"), b"x").unwrap_err();
        assert!(err.to_string().contains("does not name a file"), "{err}");
        let err = write_atomic(&dir.join("missing/x.json"), b"x").unwrap_err();
        assert!(err.to_string().contains("missing/x.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
