//! The running application: the shared state every stage and handler reaches through one
//! `Arc<App>`, and bearer-token authentication.

use std::path::Path;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, KeyConfig};
use crate::model::Scope;
use crate::observe::Metrics;
use crate::scheduler::Scheduler;
use crate::store::Store;

pub struct App {
    /// The active configuration; swapped whole, read per use.
    pub config: ArcSwap<Config>,
    pub store: Store,
    pub metrics: Metrics,
    /// The delivery client; rebuilt when `allow_private_networks` changes.
    pub client: ArcSwap<crate::deliver::client::Outbound>,
    /// What the config hot reload has done.
    pub reload_status: std::sync::Mutex<crate::reload::Status>,
    /// Held for a whole reload (read, validate, load plugins, apply), so that a watch event,
    /// `SIGHUP` and a plugin-triggered retry never interleave and apply out of order.
    pub reloading: std::sync::Mutex<()>,
    /// The address the listener is bound to (the port chosen when `listen` asked for 0).
    pub addr: std::net::SocketAddr,
    pub scheduler: Scheduler,
    /// Every endpoint deliveries may go to (config file and endpoint API).
    pub endpoints: crate::endpoints::Registry,
    pub plugins: crate::plugins::Plugins,
    pub workflows: crate::workflows::Workflows,
    pub hub: crate::hub::Hub,
    /// Channel sockets open at once, at most `server.max_connections` (an upgraded socket
    /// leaves the listener's count, so it is counted here).
    pub sockets: std::sync::Arc<tokio::sync::Semaphore>,
    /// Delivery attempts in flight across all endpoints (`delivery.max_attempts_in_flight`,
    /// fewer under a low open-file limit): an attempt waits for one before it sends.
    pub attempts: std::sync::Arc<tokio::sync::Semaphore>,
    /// How many slots `attempts` has in all.
    pub attempt_slots: usize,
    /// Cancelled on SIGINT/SIGTERM: stop taking work, let in-flight attempts finish.
    pub shutdown: CancellationToken,
    /// Every worker and attempt task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The secret that makes each channel's watch token (see [`watch_token`]).
    pub watch_secret: WatchSecret,
    /// The data dir courier opened at start (a reload does not move it).
    pub data_dir: std::path::PathBuf,
    /// Held while a backup is made (`GET /v1/backup`): one at a time.
    pub backup_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The secret each channel's watch token is made with: kept in the data dir, so that
/// tokens handed out before a restart keep working after it.
#[derive(Clone)]
pub struct WatchSecret([u8; 32]);

/// The file in the data dir that keeps the watch secret.
pub const WATCH_SECRET_FILE: &str = "watch.key";

/// Reads the data dir's watch secret, making it on first start.
pub fn watch_secret(data_dir: &Path) -> std::io::Result<WatchSecret> {
    let path = data_dir.join(WATCH_SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            if let Some(bytes) = hex::decode(t.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
            {
                keep_private(&path);
                return Ok(WatchSecret(bytes));
            }
            // Cut short or damaged: a new one (watch tokens handed out before stop working).
            tracing::warn!(path = %path.display(), "the watch secret file is damaged; making a new one (watch tokens handed out before no longer work)");
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let bytes: [u8; 32] = rand::random();
    write_private(&path, &hex::encode(bytes))?;
    Ok(WatchSecret(bytes))
}

type WatchMac = hmac::Hmac<sha2::Sha256>;

fn watch_mac(secret: &WatchSecret, channel_id: &str) -> WatchMac {
    use hmac::Mac;
    let mut mac = WatchMac::new_from_slice(&secret.0).expect("HMAC takes any key length");
    mac.update(b"courier channel watch v1\0");
    mac.update(channel_id.as_bytes());
    mac
}

/// A channel's watch token: it lets its holder read that one channel (`GET
/// /v1/channels/{id}` and its WebSocket) and nothing else, so that a browser watching its
/// own request needs no API key, which would let it ingest events and open requests too.
pub fn watch_token(secret: &WatchSecret, channel_id: &str) -> String {
    use hmac::Mac;
    format!(
        "cw_{}",
        hex::encode(watch_mac(secret, channel_id).finalize().into_bytes())
    )
}

/// Whether `token` is `channel_id`'s watch token (compared in constant time).
pub fn is_watch_token(secret: &WatchSecret, channel_id: &str, token: Option<&str>) -> bool {
    use hmac::Mac;
    let Some(given) = token
        .and_then(|t| t.strip_prefix("cw_"))
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    watch_mac(secret, channel_id).verify_slice(&given).is_ok()
}

/// A caller that presented a valid token.
#[derive(Debug, Clone)]
pub struct Caller {
    /// A stable, non-secret id of the key (for scoping idempotency keys).
    pub key_id: std::sync::Arc<str>,
    /// What the key is limited to, if its entry limits it.
    pub reach: Option<std::sync::Arc<crate::config::Reach>>,
}

impl Caller {
    /// Whether the key may send events to the endpoint `name`.
    pub fn may_send_to(&self, name: &str) -> bool {
        self.reach.as_ref().is_none_or(|r| r.endpoint(name))
    }

    /// Whether the key may open, watch or call back channels of the workflow `name` (under
    /// the running configuration, which says where its webhooks go).
    pub fn may_use_workflow(&self, config: &crate::config::Config, name: &str) -> bool {
        self.reach
            .as_ref()
            .is_none_or(|r| r.workflow(name, config.workflow(name).map(|w| w.endpoint.as_str())))
    }
}

/// Why a request was not authorised.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing bearer token (send Authorization: Bearer <token>)")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("this token lacks the `{0}` scope")]
    Forbidden(&'static str),
}

/// A non-secret id for a token: the first 16 hex digits of its SHA-256.
pub fn key_id(token: &str) -> String {
    hex::encode(&Sha256::digest(token.as_bytes())[..8])
}

/// Checks `token` against the configured keys in constant time (every key is compared, so
/// timing reveals neither which key matched nor how much of a token was right).
pub fn authorize(
    keys: &[KeyConfig],
    token: Option<&str>,
    scope: Scope,
) -> Result<Caller, AuthError> {
    let token = token.ok_or(AuthError::Missing)?;
    let mut found: Option<&KeyConfig> = None;
    for k in keys {
        // Equal lengths are compared in constant time; a length mismatch reveals only that.
        if k.token.len() == token.len() && bool::from(k.token.as_bytes().ct_eq(token.as_bytes())) {
            found = Some(k);
        }
    }
    let key = found.ok_or(AuthError::Invalid)?;
    if !key.scopes.contains(&scope) {
        return Err(AuthError::Forbidden(scope.as_str()));
    }
    Ok(Caller {
        key_id: key.id.clone(),
        reach: key.reach.clone(),
    })
}

/// The file in the data dir that keeps the generated key.
pub const GENERATED_KEY_FILE: &str = "admin.key";

/// With no `[[keys]]`, courier never runs open: it creates one all-scopes key in the data
/// dir on first start, prints it once, and uses it from then on.
pub fn ensure_key(config: &mut Config, data_dir: &Path) -> std::io::Result<Option<String>> {
    if !config.keys.is_empty() {
        return Ok(None);
    }
    let path = data_dir.join(GENERATED_KEY_FILE);
    let (token, created) = match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 16 => {
            keep_private(&path);
            (t.trim().to_string(), false)
        }
        // A file that cannot be read is not taken for a missing one: replacing it would
        // lock out whoever holds the key it keeps.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        found => {
            if found.is_ok() {
                tracing::warn!(path = %path.display(), "the generated key file holds no usable key (empty or cut short); replacing it with a new key");
            }
            let bytes: [u8; 24] = rand::random();
            let token = format!("ck_{}", hex::encode(bytes));
            write_private(&path, &token)?;
            (token, true)
        }
    };
    config
        .keys
        .push(KeyConfig::new(token.clone(), Scope::ALL.to_vec()));
    Ok(created.then_some(token))
}

/// Writes a secret file readable by courier's user only, whole or not at all: into a
/// temporary file that is flushed and renamed over `path`, then the directory flushed, so
/// that a power cut right after a first start can lose neither the printed admin key (a new
/// one would be made, never shown) nor the watch secret (tokens handed out would stop
/// working), nor leave half a file.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    // A file left there keeps its mode through `open`: made private all the same.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // As the journal does: a file system that does not flush directories is warned about,
    // not a reason to fail a start whose key file is already in place.
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot flush the data directory; a secret file just written may not survive a power cut");
    }
    Ok(())
}

/// Makes an existing secret file readable by courier's user only, should it have been
/// found with a wider mode (copied in, or made by hand), and says so.
fn keep_private(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
                Ok(()) => {
                    tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "a secret file was readable by others; made readable by courier's user only")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), error = %e, "a secret file is readable by others and cannot be made private")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch secret is kept: the same data dir gives the same channel tokens after a
    /// restart; a token verifies for its own channel only.
    #[test]
    fn watch_tokens_outlive_a_restart_and_fit_one_channel() {
        let dir = tempfile::tempdir().unwrap();
        let first = watch_secret(dir.path()).unwrap();
        let token = watch_token(&first, "ch-1");
        let again = watch_secret(dir.path()).unwrap();
        assert_eq!(watch_token(&again, "ch-1"), token);
        assert!(is_watch_token(&again, "ch-1", Some(&token)));
        assert!(!is_watch_token(&again, "ch-2", Some(&token)));
        assert!(!is_watch_token(&again, "ch-1", Some("cw_00")));
        assert!(!is_watch_token(&again, "ch-1", None));
        let other = tempfile::tempdir().unwrap();
        let elsewhere = watch_secret(other.path()).unwrap();
        assert!(!is_watch_token(&elsewhere, "ch-1", Some(&token)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(WATCH_SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    /// A key file cut short is replaced by a private one; one that cannot be read is not
    /// replaced (its key may be in use) but refused.
    #[cfg(unix)]
    #[test]
    fn a_generated_key_file_cut_short_is_replaced_privately_and_an_unreadable_one_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(GENERATED_KEY_FILE);
        std::fs::write(&path, "short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut config = Config::defaults();
        let made = ensure_key(&mut config, dir.path()).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), made);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Read again at the next start: the same key, made private again if it was widened,
        // and no file left over from writing it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut again = Config::defaults();
        assert_eq!(ensure_key(&mut again, dir.path()).unwrap(), None);
        assert_eq!(again.keys[0].token, made);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // The watch secret likewise.
        let secret = watch_secret(dir.path()).unwrap();
        let watch = dir.path().join(WATCH_SECRET_FILE);
        std::fs::set_permissions(&watch, std::fs::Permissions::from_mode(0o644)).unwrap();
        let token = watch_token(&watch_secret(dir.path()).unwrap(), "c");
        assert_eq!(token, watch_token(&secret, "c"));
        let mode = std::fs::metadata(&watch).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A directory where the file should be cannot be read as one: an error, not a key.
        let odd = tempfile::tempdir().unwrap();
        std::fs::create_dir(odd.path().join(GENERATED_KEY_FILE)).unwrap();
        assert!(ensure_key(&mut Config::defaults(), odd.path()).is_err());
        assert!(odd.path().join(GENERATED_KEY_FILE).is_dir());
    }

    #[test]
    fn scopes_are_enforced() {
        let keys = vec![
            KeyConfig::new("ingest-only-token-0001".into(), vec![Scope::Ingest]),
            KeyConfig::new("admin-token-000000001".into(), vec![Scope::Admin]),
        ];
        assert!(authorize(&keys, Some("ingest-only-token-0001"), Scope::Ingest).is_ok());
        assert_eq!(
            authorize(&keys, Some("ingest-only-token-0001"), Scope::Admin).unwrap_err(),
            AuthError::Forbidden("admin")
        );
        assert_eq!(
            authorize(&keys, Some("nope"), Scope::Admin).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            authorize(&keys, None, Scope::Admin).unwrap_err(),
            AuthError::Missing
        );
    }
}
