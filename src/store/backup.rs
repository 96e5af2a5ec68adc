//! Online backup: a consistent copy of the whole database in a file of its own, made while
//! courier runs.
//!
//! Why a copy and not the files: the database file changes under a copier (a commit may
//! land between two reads of it), and the ingest journal beside it belongs to it. A read
//! transaction is one consistent snapshot, so every table is copied from one into a new
//! database, which then stands alone: everything acknowledged before the backup began is in
//! it (the caller waits for the writer to catch up with the journal first), nothing needs a
//! journal to be read, and it gets a journal id of its own, so that journal files left
//! beside it when it is restored — which hold events acknowledged after the backup, or none
//! — read as empty instead of being taken for a continuation it lost.

use std::path::Path;

use redb::{
    Database, Key, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    Value, WriteTransaction,
};

use super::tables::*;
use super::{Store, StoreError};

/// What a backup holds, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// Rows copied, all tables together.
    pub rows: u64,
    /// Tables copied.
    pub tables: usize,
}

/// The cache of the database a backup is written to.
const BACKUP_CACHE: usize = 16 << 20;

/// The [`META`] keys that describe the file's place in its journal, not what it holds.
const JOURNAL_KEYS: [&str; 2] = [JOURNAL_ID, JOURNAL_SEQ];

impl Store {
    /// Writes a consistent copy of the database to `dest` (a new file; an existing one is
    /// an error) and makes it durable. Call [`Store::settle`] first for a copy that holds
    /// every event acknowledged so far. Blocking: run it off the async runtime. The
    /// database may grow while it runs (pages the snapshot holds are not reused until it
    /// ends). `stop` is asked every few hundred rows: once it says so, the backup ends with
    /// [`StoreError::Closed`] (a shutdown must not wait for a copy of the whole database).
    pub fn backup_to(
        &self,
        dest: &Path,
        stop: &dyn Fn() -> bool,
    ) -> Result<BackupSummary, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let at = |e: &dyn std::fmt::Display| StoreError::Db(format!("{}: {e}", dest.display()));
        let from = self.db.begin_read()?;
        // It holds payloads, secrets and URL passwords: for courier's user only.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| at(&e))?;
        let backend = redb::backends::FileBackend::new(file).map_err(|e| at(&e))?;
        // A small cache: the copy is written once, in order, and must not take memory in
        // proportion to the database (redb writes pages out when its cache is full).
        let to_db = Database::builder()
            .set_cache_size(BACKUP_CACHE)
            .create_with_backend(backend)
            .map_err(|e| at(&e))?;
        let to = to_db.begin_write()?;
        let summary = copy_all(&from, &to, stop)?;
        to.commit()?;
        drop(to_db);
        Ok(summary)
    }
}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Where the files it replaced were kept (the database and its journal files, renamed
    /// with a `.before-restore-<ms>` suffix), to go back or delete.
    pub kept: Vec<std::path::PathBuf>,
}

/// Checks that `backup` is a courier database this build can open: a redb file with a
/// record format no newer than this build's. Returns its format. Opened read-only, so a
/// backup kept read-only can be checked; one that needs a repair (a copy of a database that
/// was not closed cleanly) is opened, and repaired, for writing instead: [`restore`] checks
/// its own copy, never the file it was given.
pub fn check_backup(backup: &Path) -> Result<u64, StoreError> {
    let at = |e: &dyn std::fmt::Display| StoreError::Db(format!("{}: {e}", backup.display()));
    let format = match redb::ReadOnlyDatabase::open(backup) {
        Ok(db) => format_of(&db),
        Err(_) => format_of(&Database::open(backup).map_err(|e| at(&e))?),
    };
    let Some(format) = format.map_err(|e| at(&e))? else {
        return Err(at(&"not a courier database (it records no format)"));
    };
    if format > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    Ok(format)
}

fn format_of(db: &impl ReadableDatabase) -> Result<Option<u64>, StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    Ok(meta.get(FORMAT)?.map(|v| v.value()))
}

/// Puts `backup` in place of the database at `db_path`, with courier stopped. The files it
/// replaces — the database and its two journal files — are kept under new names, not
/// deleted (a restore over the wrong data dir can be undone). It holds the data dir's lock
/// from start to end ([`super::lock`]), so it is refused while a courier runs there and no
/// courier can start there before it is done. The backup is copied in first, checked there
/// (a database this build can open; one that needs a repair is repaired in the copy, never
/// in the file given), given the owner of the data dir's files (a restore run as root must
/// not leave a database courier's user cannot open) and flushed; the old files get their
/// new names as links, and only then does the copy take the database's name, in one rename.
/// So a restore that fails or is cut short at any point leaves a whole database under
/// `courier.redb` — the old one, or the backup — and never an empty place a start would
/// fill with a new database.
pub fn restore(db_path: &Path, backup: &Path) -> Result<Restored, StoreError> {
    let dir = match db_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let _lock = super::lock::acquire(db_path)?;
    let mut staged = db_path.as_os_str().to_owned();
    staged.push(".restoring");
    let staged = std::path::PathBuf::from(staged);
    let _ = std::fs::remove_file(&staged);
    let suffix = format!(".before-restore-{}", crate::model::now_ms());
    let mut kept = Vec::new();
    let done = stage(db_path, dir, backup, &staged).and_then(|()| {
        let journal = db_path.with_extension("journal");
        let second = super::journal::second_path(&journal);
        for old in [db_path, second.as_path(), journal.as_path()] {
            if old.exists() {
                let mut aside = old.as_os_str().to_owned();
                aside.push(&suffix);
                let aside = std::path::PathBuf::from(aside);
                std::fs::hard_link(old, &aside).map_err(|e| io_at(old, e))?;
                kept.push(aside);
            }
        }
        sync_dir(dir)?;
        std::fs::rename(&staged, db_path).map_err(|e| io_at(db_path, e))?;
        // The journal files' old names go: kept under the new ones, and the restored
        // database, with a journal id of its own, would take them for another database's.
        for old in [second, journal] {
            if old.exists() {
                std::fs::remove_file(&old).map_err(|e| io_at(&old, e))?;
            }
        }
        sync_dir(dir)
    });
    if let Err(e) = done {
        // Until the rename, nothing but the copy and the links was made: they go.
        if staged.exists() {
            let _ = std::fs::remove_file(&staged);
            for aside in &kept {
                let _ = std::fs::remove_file(aside);
            }
        }
        return Err(e);
    }
    Ok(Restored { kept })
}

/// Copies `backup` to `staged`, checks it, gives it the owner of the data dir's files and
/// flushes it.
fn stage(db_path: &Path, dir: &Path, backup: &Path, staged: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut from = std::fs::File::open(backup).map_err(|e| io_at(backup, e))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(staged)
        .map_err(|e| io_at(staged, e))?;
    std::io::copy(&mut from, &mut to).map_err(|e| io_at(staged, e))?;
    check_backup(staged).map_err(|e| match e {
        StoreError::NewerFormat { .. } => e,
        e => StoreError::Db(format!(
            "{} is not a courier database this build can open ({e})",
            backup.display()
        )),
    })?;
    let owner = std::fs::metadata(db_path)
        .or_else(|_| std::fs::metadata(dir))
        .map_err(|e| io_at(dir, e))?;
    let made = to.metadata().map_err(|e| io_at(staged, e))?;
    if made.uid() != owner.uid() {
        std::os::unix::fs::fchown(&to, Some(owner.uid()), Some(owner.gid())).map_err(|e| {
            StoreError::Db(format!(
                "the data dir's files belong to user {}, and the restored database could not be given to that user ({e}): run the restore as that user, or as root",
                owner.uid()
            ))
        })?;
    } else if made.gid() != owner.gid() {
        // Its owner reads it whatever its group: a group it cannot be given is no matter.
        let _ = std::os::unix::fs::fchown(&to, None, Some(owner.gid()));
    }
    to.sync_all().map_err(|e| io_at(staged, e))
}

fn io_at(what: &Path, e: std::io::Error) -> StoreError {
    StoreError::Db(format!("{}: {e}", what.display()))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_at(dir, e))
}

/// Copies every table of the snapshot `from` into `to`, [`META`] without its journal keys
/// (so the copy makes a journal id of its own when first opened). A table this build does
/// not know is an error: a backup that left one out would lose it without a word.
fn copy_all(
    from: &ReadTransaction,
    to: &WriteTransaction,
    stop: &dyn Fn() -> bool,
) -> Result<BackupSummary, StoreError> {
    let names: Vec<String> = from.list_tables()?.map(|t| t.name().to_string()).collect();
    let mut rows = 0;
    for name in &names {
        rows += match name.as_str() {
            n if n == EVENTS.name() => copy(from, to, stop, EVENTS)?,
            n if n == DELIVERIES.name() => copy(from, to, stop, DELIVERIES)?,
            n if n == ATTEMPTS.name() => copy(from, to, stop, ATTEMPTS)?,
            n if n == QUEUE.name() => copy(from, to, stop, QUEUE)?,
            n if n == PENDING.name() => copy(from, to, stop, PENDING)?,
            n if n == BY_STATUS.name() => copy(from, to, stop, BY_STATUS)?,
            n if n == DEAD_BY_ENDPOINT.name() => copy(from, to, stop, DEAD_BY_ENDPOINT)?,
            n if n == COUNTS.name() => copy(from, to, stop, COUNTS)?,
            n if n == UNROUTED.name() => copy(from, to, stop, UNROUTED)?,
            n if n == IDEMPOTENCY.name() => copy(from, to, stop, IDEMPOTENCY)?,
            n if n == IDEMPOTENCY_AGE.name() => copy(from, to, stop, IDEMPOTENCY_AGE)?,
            n if n == ATTEMPT_LOG.name() => copy(from, to, stop, ATTEMPT_LOG)?,
            n if n == ROLLUPS.name() => copy(from, to, stop, ROLLUPS)?,
            n if n == CHANNELS.name() => copy(from, to, stop, CHANNELS)?,
            n if n == CHANNELS_DONE.name() => copy(from, to, stop, CHANNELS_DONE)?,
            n if n == TIMERS.name() => copy(from, to, stop, TIMERS)?,
            n if n == UPSTREAM_TIMERS.name() => copy(from, to, stop, UPSTREAM_TIMERS)?,
            n if n == ENDPOINTS.name() => copy(from, to, stop, ENDPOINTS)?,
            n if n == META.name() => copy_meta(from, to)?,
            other => {
                return Err(StoreError::Db(format!(
                    "the database has a table this build does not know (`{other}`): no backup was made"
                )));
            }
        };
    }
    Ok(BackupSummary {
        rows,
        tables: names.len(),
    })
}

/// Rows copied between two looks at `stop` (a row may be a whole 1 MiB event).
const STOP_EVERY: u64 = 256;

fn copy<K: Key + 'static, V: Value + 'static>(
    from: &ReadTransaction,
    to: &WriteTransaction,
    stop: &dyn Fn() -> bool,
    def: TableDefinition<K, V>,
) -> Result<u64, StoreError> {
    let src = from.open_table(def)?;
    let mut dst = to.open_table(def)?;
    let mut n = 0;
    for row in src.iter()? {
        let (k, v) = row?;
        dst.insert(k.value(), v.value())?;
        n += 1;
        if n % STOP_EVERY == 0 && stop() {
            return Err(StoreError::Closed);
        }
    }
    Ok(n)
}

fn copy_meta(from: &ReadTransaction, to: &WriteTransaction) -> Result<u64, StoreError> {
    let src = from.open_table(META)?;
    let mut dst = to.open_table(META)?;
    let mut n = 0;
    for row in src.iter()? {
        let (k, v) = row?;
        if !JOURNAL_KEYS.contains(&k.value()) {
            dst.insert(k.value(), v.value())?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table a store makes is one a backup copies (a new table left out of
    /// [`copy_all`] fails here rather than in an operator's restore).
    #[test]
    fn a_backup_copies_every_table_a_store_has() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("courier.redb"), true).unwrap();
        let dest = dir.path().join("backup.redb");
        let summary = store.backup_to(&dest, &|| false).unwrap();
        let made: Vec<String> = {
            let txn = store.db.begin_read().unwrap();
            txn.list_tables()
                .unwrap()
                .map(|t| t.name().to_string())
                .collect()
        };
        assert_eq!(summary.tables, made.len());
        // An existing file is never written over.
        let err = store.backup_to(&dest, &|| false).unwrap_err();
        assert!(err.to_string().contains("backup.redb"), "{err}");
        // The copy stands alone, without the source's journal keys.
        let copy = Database::open(&dest).unwrap();
        let txn = copy.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert!(meta.get(JOURNAL_ID).unwrap().is_none());
        assert!(meta.get(FORMAT).unwrap().is_some());
    }

    /// A backup from a newer courier is refused before anything in the data dir changes.
    #[test]
    fn a_restore_refuses_a_newer_format_and_leaves_the_data_dir_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("courier.redb");
        let store = Store::open(&db_path, true).unwrap();
        let dest = dir.path().join("backup.redb");
        store.backup_to(&dest, &|| false).unwrap();
        {
            let db = Database::open(&dest).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(FORMAT, FORMAT_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = check_backup(&dest).unwrap_err();
        assert!(matches!(err, StoreError::NewerFormat { .. }), "{err}");
        drop(store);
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let target = other.join("courier.redb");
        std::fs::write(&target, b"keep me").unwrap();
        assert!(restore(&target, &dest).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        let left: Vec<String> = std::fs::read_dir(&other)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "courier.lock")
            .collect();
        assert_eq!(left, ["courier.redb"]);
    }
}
