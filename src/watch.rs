//! File watching shared by config and plugin hot reload.
//!
//! Directories are watched, not files: editors and `cp`/`mv` replace a file by writing a
//! temporary one and renaming it over, which a watch on the old inode never sees. Events are
//! only hints; after a quiet period the caller re-reads the files and compares content.
//!
//! Some changes raise no event for the file's name at all: a Kubernetes ConfigMap or Secret
//! volume swaps a `..data` symlink the file points through, a deploy renames a whole
//! directory over the watched one, a file changes while courier starts (before any watch).
//! So each watched file is also looked at every second ([`POLL`]) — where it resolves to,
//! its size, times and inode — and sent when that changed since the first look. (Files that
//! may have changed before a watch began are for the caller to send once itself: it
//! compares content, so one that did not change costs one read. Or, where a look was taken
//! when the file was read, the caller hands that look over as the first
//! ([`watch_files_since`]), and only a file changed since then is sent.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

/// How long files must be quiet before they are re-read.
pub const QUIET: Duration = Duration::from_millis(250);

/// Watches the directories of `files` and sends each watched file that an event touches.
/// A directory that does not exist (yet) cannot be watched: the files in it are returned,
/// and the caller looks for the directory from time to time ([`appeared`]) instead of giving
/// up on every other file.
pub fn watch_files(
    files: &[PathBuf],
    tx: mpsc::UnboundedSender<PathBuf>,
) -> notify::Result<(Watch, Vec<PathBuf>)> {
    watch_files_since(files, &[], tx)
}

/// [`watch_files`], where `read` gives, for some of the files, the look taken when they
/// were last read: the poller starts from it instead of a look of its own, so that a file
/// changed between that read and this watch is sent at the first poll.
pub fn watch_files_since(
    files: &[PathBuf],
    read: &[(PathBuf, Option<Look>)],
    tx: mpsc::UnboundedSender<PathBuf>,
) -> notify::Result<(Watch, Vec<PathBuf>)> {
    use notify::Watcher;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let first: Vec<Option<Look>> = files
            .iter()
            .map(|f| match read.iter().find(|(p, _)| p == f) {
                Some((_, l)) => l.clone(),
                None => look(f),
            })
            .collect();
        let (files, tx, stop) = (files.to_vec(), tx.clone(), stop.clone());
        std::thread::Builder::new()
            .name("courier-watch-poll".into())
            .spawn(move || poll(&files, first, &tx, &stop))
            .map_err(|e| notify::Error::generic(&format!("cannot start the file poller: {e}")))?;
    }
    let stopper = Stop(stop);
    // (canonical directory, file name) → the path as configured.
    let watched: Vec<(PathBuf, std::ffi::OsString, PathBuf)> = files
        .iter()
        .filter_map(|f| Some((canonical_dir(f), f.file_name()?.to_os_string(), f.clone())))
        .collect();
    let dirs: BTreeSet<PathBuf> = watched.iter().map(|(d, _, _)| d.clone()).collect();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        // Opening or reading a file changes nothing, and courier reads the files it watches
        // when they change: a read reported as a change would reload them again and again.
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        for p in &event.paths {
            let (Some(name), Some(dir)) = (p.file_name(), p.parent()) else {
                continue;
            };
            for (wdir, wname, original) in &watched {
                if name == wname && (dir == wdir || canonical(dir) == *wdir) {
                    let _ = tx.send(original.clone());
                }
            }
        }
    })?;
    let mut unwatched = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            unwatched.extend(files.iter().filter(|f| canonical_dir(f) == d).cloned());
            continue;
        }
        watcher.watch(&d, notify::RecursiveMode::NonRecursive)?;
    }
    Ok((
        Watch {
            _watcher: watcher,
            _poller: stopper,
        },
        unwatched,
    ))
}

/// Watching files: for as long as this lives.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    _poller: Stop,
}

/// Stops the poller when dropped.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How often watched files are looked at without an event.
pub const POLL: Duration = Duration::from_secs(1);

/// What a look at a file tells without reading it: where it resolves to (through
/// symlinks), and its size, modification and change times and inode there.
#[derive(PartialEq, Eq, Clone, Debug)]
pub struct Look {
    resolved: PathBuf,
    len: u64,
    modified: Option<std::time::SystemTime>,
    changed: (i64, i64),
    inode: (u64, u64),
}

pub fn look(f: &Path) -> Option<Look> {
    use std::os::unix::fs::MetadataExt;
    let resolved = f.canonicalize().ok()?;
    let m = std::fs::metadata(&resolved).ok()?;
    Some(Look {
        resolved,
        len: m.len(),
        modified: m.modified().ok(),
        changed: (m.ctime(), m.ctime_nsec()),
        inode: (m.dev(), m.ino()),
    })
}

/// Looks at `files` every [`POLL`] until `stop`, sending each whose look changed since the
/// last (at first, since `seen`).
fn poll(
    files: &[PathBuf],
    mut seen: Vec<Option<Look>>,
    tx: &mpsc::UnboundedSender<PathBuf>,
    stop: &AtomicBool,
) {
    loop {
        std::thread::sleep(POLL);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        for (f, last) in files.iter().zip(seen.iter_mut()) {
            let now = look(f);
            if now != *last && tx.send(f.clone()).is_err() {
                return;
            }
            *last = now;
        }
    }
}

/// How often directories that did not exist are looked for.
pub const MISSING_DIR_POLL: Duration = Duration::from_secs(1);

/// Those of `files` whose directory exists now.
pub fn appeared(files: &[PathBuf]) -> Vec<PathBuf> {
    files
        .iter()
        .filter(|f| canonical_dir(f).is_dir())
        .cloned()
        .collect()
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

fn canonical_dir(f: &Path) -> PathBuf {
    canonical(
        f.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

/// Receives the next batch of changed files: waits for one, then until `QUIET` passes with
/// no further event. `None` when the channel closed.
pub async fn next_batch(rx: &mut mpsc::UnboundedReceiver<PathBuf>) -> Option<BTreeSet<PathBuf>> {
    let mut batch = BTreeSet::new();
    batch.insert(rx.recv().await?);
    loop {
        match tokio::time::timeout(QUIET, rx.recv()).await {
            Ok(Some(p)) => {
                batch.insert(p);
            }
            Ok(None) => return Some(batch),
            Err(_) => return Some(batch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits up to `wait` for a path on `rx`.
    fn received(rx: &mut mpsc::UnboundedReceiver<PathBuf>, wait: Duration) -> Option<PathBuf> {
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until {
            if let Ok(p) = rx.try_recv() {
                return Some(p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A file changed after it was read but before its watch began (no event of the watch
    /// will ever tell) is sent when the watch starts from the look taken at the read; one
    /// that did not change is not.
    #[test]
    fn a_change_between_the_read_and_the_watch_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (changed, same) = (
            dir.path().join("changed.wasm"),
            dir.path().join("same.wasm"),
        );
        std::fs::write(&changed, b"broken").unwrap();
        std::fs::write(&same, b"broken").unwrap();
        let read = vec![
            (changed.clone(), look(&changed)),
            (same.clone(), look(&same)),
        ];
        std::fs::write(&changed, b"fixed, and longer").unwrap();

        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_watch, unwatched) =
            watch_files_since(std::slice::from_ref(&changed), &read, tx).unwrap();
        assert!(unwatched.is_empty());
        assert_eq!(received(&mut rx, POLL * 4), Some(changed.clone()));

        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_watch, _) = watch_files_since(std::slice::from_ref(&same), &read, tx).unwrap();
        assert_eq!(received(&mut rx, POLL * 3), None);

        // Without the look at the read, the watch starts from the file as it is now.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_watch, _) = watch_files(std::slice::from_ref(&changed), tx).unwrap();
        assert_eq!(received(&mut rx, POLL * 3), None);
    }
}
