//! `courier backup --out FILE`: saves a running courier's online backup (`GET /v1/backup`).
//!
//! Why the care: a backup is only worth something if it is whole. The download goes to
//! `FILE.part`, is flushed to disk, opened as a database and checked before it takes its
//! name (never over an existing file), so that a `FILE` that exists is a complete backup.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::client::Api;

/// What was saved.
pub struct Saved {
    pub bytes: u64,
    /// Rows the backup holds, as courier counted them (`None` from an older courier).
    pub rows: Option<u64>,
}

/// Downloads the backup into `out` (`-`: standard output, unchecked).
pub async fn save(api: &Api, out: &Path) -> anyhow::Result<Saved> {
    if out == Path::new("-") {
        let mut stdout = tokio::io::stdout();
        let (bytes, headers) = api.download(&["v1", "backup"], &mut stdout).await?;
        return Ok(Saved {
            bytes,
            rows: rows(&headers),
        });
    }
    if out.exists() {
        bail!("{} exists; a backup never replaces a file", out.display());
    }
    let mut part = out.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)
    };
    let file = match file {
        Ok(f) => f,
        // Not this run's to remove: another backup to the same FILE, or one interrupted.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} exists: another backup to {} is under way, or one was interrupted (remove it then)",
            part.display(),
            out.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", part.display())),
    };
    let result = download_checked(api, file, &part, out).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

async fn download_checked(
    api: &Api,
    file: std::fs::File,
    part: &Path,
    out: &Path,
) -> anyhow::Result<Saved> {
    let mut file = tokio::fs::File::from_std(file);
    let (bytes, headers) = api.download(&["v1", "backup"], &mut file).await?;
    file.sync_all()
        .await
        .with_context(|| format!("cannot flush {} to disk", part.display()))?;
    drop(file);
    check(part).with_context(|| {
        format!(
            "the downloaded backup does not open as a courier database ({})",
            part.display()
        )
    })?;
    // A hard link fails if `out` appeared meanwhile: nothing is ever written over.
    std::fs::hard_link(part, out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::remove_file(part).with_context(|| format!("cannot remove {}", part.display()))?;
    if let Some(dir) = out.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot flush the directory {}", dir.display()))?;
    }
    Ok(Saved {
        bytes,
        rows: rows(&headers),
    })
}

/// Opens the file as a courier database, as a restore would (a backup from a newer courier,
/// which this build could not restore, is whole all the same).
fn check(path: &Path) -> anyhow::Result<()> {
    match crate::store::check_backup(path) {
        Ok(_) | Err(crate::store::StoreError::NewerFormat { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn rows(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers
        .get(crate::api::backup::ROWS_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
