//! The data dir's lock: one courier (or one `courier restore`) at a time.
//!
//! Why a file of its own as well as the database's lock: a restore works on the files
//! around the database — it renames the database and its journal files aside — and must keep
//! a courier from opening them meanwhile, for all the time it takes; the database's own lock
//! can only be held by opening the database, which repairs one left by a crash (writing to
//! the very file a restore keeps aside to undo it).

use std::fs::File;
use std::path::{Path, PathBuf};

use super::StoreError;

/// Held while the data dir is in use: released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// The lock file beside the database `db_path`: `courier.lock`.
pub fn path(db_path: &Path) -> PathBuf {
    db_path.with_extension("lock")
}

/// Takes the lock beside the database `db_path`, or says who holds it.
pub fn acquire(db_path: &Path) -> Result<DirLock, StoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = path(db_path);
    // Read-only (a lock needs no more), and made readable by anyone (it holds nothing): a
    // lock file made by a restore run as root must not keep courier's own user out.
    let file = match std::fs::File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .and_then(|made| {
                // As asked, whatever the umask.
                use std::os::unix::fs::PermissionsExt;
                made.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                std::fs::File::open(&path)
            }),
        opened => opened,
    }
    .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            StoreError::Db(format!(
                "the data dir {} is already open in another courier (or a `courier restore`)",
                db_path.parent().unwrap_or(Path::new(".")).display()
            ))
        } else {
            StoreError::Db(format!("{}: cannot lock: {e}", path.display()))
        });
    }
    Ok(DirLock { _file: file })
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("courier.redb");
        let held = super::acquire(&db).unwrap();
        let err = super::acquire(&db).unwrap_err();
        assert!(err.to_string().contains("already open"), "{err}");
        drop(held);
        super::acquire(&db).unwrap();
        // Made readable by anyone, so that one made by root keeps no other user out (the
        // lock is taken on a read-only descriptor).
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(super::path(&db))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
