//! `GET /v1/backup`: a consistent copy of the whole database, made while courier runs and
//! streamed back as a database file (see `store::backup`). Restoring it is replacing
//! `courier.redb` with it while courier is stopped.
//!
//! Why through the API: the data dir can only be copied safely while courier is stopped, and
//! an operator should not have to stop deliveries to take a backup.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::RawQuery;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::{ApiError, AppState, require};
use crate::model::{Scope, now_ms};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/backup", get(backup))
}

/// The file a backup is made in before it is sent: in the data dir (on the disk that has
/// room for the database; `/tmp` is often a small memory file system), removed as soon as it
/// is open for sending, so that nothing is left behind however the request ends.
const TMP_PREFIX: &str = "courier.backup-";
const TMP_SUFFIX: &str = ".tmp";

/// The header saying how many rows the backup holds.
pub const ROWS_HEADER: &str = "courier-backup-rows";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

async fn backup(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let NoParams {} = super::query(q.as_deref())?;
    // One at a time, from the copy's start to the end of its download: each holds a
    // snapshot (the database cannot reuse its pages meanwhile), and each copy takes the room
    // of the whole database in the data dir until it is sent (removed from the directory
    // once open, its blocks are freed only when the download ends).
    let Ok(one_at_a_time) = app.backup_lock.clone().try_lock_owned() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "a backup is being made; try again when it is done",
        ));
    };
    // (The API waited for the database to hold every event acknowledged before this
    // request: the snapshot has them all.)
    let started = Instant::now();
    let dir = app.data_dir.clone();
    // (Leftovers first: they take room the check below counts.)
    remove_leftovers(&dir);
    // A copy that filled the disk would stop the database's own writes: not begun without
    // room for one as large as the database file (the copy is as large, measured) and a
    // tenth more, with 64 MiB to spare.
    let needed = std::fs::metadata(dir.join(crate::server::DB_FILE))
        .map_or(0, |m| m.len() + m.len() / 10 + (64 << 20));
    if let Some(free) = free_bytes(&dir)
        && free < needed
    {
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            format!(
                "the data dir has {free} bytes free and a backup is made there first: it needs {needed} (the database file's size, a tenth more and 64 MiB)"
            ),
        ));
    }
    // A client that hangs up while the copy is made ends it (the handler is dropped, and the
    // copy asks every few hundred rows); until it has ended, the copy keeps the
    // lock, so a retry is told to wait rather than start a second copy.
    let abandoned = SetOnDrop(Arc::new(AtomicBool::new(false)));
    let gone = abandoned.0.clone();
    let store_app = app.clone();
    let made = tokio::task::spawn_blocking(move || {
        let path = dir.join(format!("{TMP_PREFIX}{}{TMP_SUFFIX}", now_ms()));
        let stop = || store_app.shutdown.is_cancelled() || gone.load(Ordering::Relaxed);
        let made = store_app.store.backup_to(&path, &stop).and_then(|summary| {
            std::fs::File::open(&path)
                .and_then(|f| Ok((f.metadata()?.len(), f)))
                .map(|(len, f)| (summary, len, f))
                .map_err(|e| crate::store::StoreError::Db(format!("{}: {e}", path.display())))
        });
        let _ = std::fs::remove_file(&path);
        made.map(|m| (m, one_at_a_time))
    })
    .await
    .map_err(|e| ApiError::internal(format!("backup task failed: {e}")))?;
    let ((summary, len, file), one_at_a_time) = made?;
    tracing::info!(
        rows = summary.rows,
        tables = summary.tables,
        bytes = len,
        took_ms = started.elapsed().as_millis() as u64,
        "backup made"
    );
    let chunks =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 * 1024);
    // The lock goes with the download: released when it ends, however it ends.
    let body = Body::from_stream(futures_util::StreamExt::map(chunks, move |chunk| {
        let _held = &one_at_a_time;
        chunk
    }));
    let name = format!(
        "attachment; filename=\"courier-backup-{}.redb\"",
        crate::model::rfc3339(now_ms()).replace(':', "")
    );
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&name).expect("an ASCII file name"),
    );
    h.insert(ROWS_HEADER, HeaderValue::from(summary.rows));
    Ok(resp)
}

/// Sets its flag when dropped: with the request, which tells a copy still being made that
/// nobody waits for it (set after the copy ended, it changes nothing).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The bytes free for courier's user on the file system of `dir` (`None` if it cannot say).
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes the struct given and reads the path, a NUL-terminated string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Removes backup files a courier stopped in the middle of making left behind (they are
/// never needed again: a backup is sent from a file removed once open).
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let leftovers: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(TMP_PREFIX) && n.ends_with(TMP_SUFFIX))
        })
        .collect();
    for p in leftovers {
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove an unfinished backup file");
        }
    }
}
