//! File watching shared by config and plugin hot reload.
//!
//! Directories are watched, not files: editors and `cp`/`mv` replace a file by writing a
//! temporary one and renaming it over, which a watch on the old inode never sees. Events are
//! only hints; after a quiet period the caller re-reads the files and compares content.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
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
) -> notify::Result<(notify::RecommendedWatcher, Vec<PathBuf>)> {
    use notify::Watcher;
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
    Ok((watcher, unwatched))
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
