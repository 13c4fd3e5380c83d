//! An exclusive lock on a data directory, held for the life of the daemon,
//! so that two daemons never write one store (which would interleave their
//! appends and destroy it).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

/// The lock file's name inside the data directory.
pub const LOCK_FILE_NAME: &str = "lock";

/// Holds the lock until dropped (or the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir`, without waiting.
    ///
    /// # Errors
    /// A message for the operator if another process holds it or the lock
    /// file cannot be opened.
    pub fn acquire(dir: &Path) -> Result<DirLock, String> {
        let path = dir.join(LOCK_FILE_NAME);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(format!(
                "{} is in use by another running daemon (it holds {})",
                dir.display(),
                path.display()
            )),
            Err(TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}
