//! Configuration: the TOML file of DESIGN.md, parsed, resolved and validated in one place.
//!
//! Why one module: every other stage receives an already-valid [`Config`], so none of them
//! re-checks user input. Validation errors name the key at fault (`endpoints[1].url`) because
//! `courier check` and a future hot reload both surface them to an operator.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{RateLimit, Scope};

/// The largest `server.max_body_bytes` accepted.
const MAX_BODY_LIMIT: u64 = 1 << 30;

/// A configuration error that names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Default retry schedule: the delay before each attempt.
pub const DEFAULT_SCHEDULE: &[&str] = &["0s", "5s", "30s", "2m", "10m", "30m", "1h", "2h"];

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub keys: Vec<KeyConfig>,
    pub delivery: DeliveryConfig,
    pub endpoints: Vec<EndpointConfig>,
    pub plugins: Vec<PluginConfig>,
    pub workflows: Vec<WorkflowConfig>,
    /// Where the configuration came from, if a file.
    pub source: Option<PathBuf>,
    /// The SHA-256 (hex) of the file's bytes this configuration was parsed from: what a
    /// reload compares a changed file against (the file itself may have changed since).
    pub source_sha256: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `listen` as the file wrote it (a host name is resolved once, when it is loaded).
    pub listen_text: String,
    pub data_dir: PathBuf,
    pub public_url: String,
    /// `public_url` was not set, and is made from `listen` (with the port bound, for 0).
    pub public_url_defaulted: bool,
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's headers (and stay idle between
    /// requests): see [`crate::listener`].
    pub header_timeout: std::time::Duration,
    /// How long a request's body may take to arrive once its headers have: a body sent a
    /// byte at a time would otherwise hold its connection and its buffer for good.
    pub body_timeout: std::time::Duration,
    /// Connections served at once (see [`crate::listener`]); read at start only.
    pub max_connections: usize,
    /// WebSocket subscribers one channel may have at once: one channel's watchers (or one
    /// client opening sockets in a loop) cannot take every socket `max_connections` allows.
    pub max_channel_subscribers: usize,
    /// Watch the config and plugin files for changes (SIGHUP reloads either way).
    pub watch: bool,
    /// Save the database allocator state with every commit: commits cost more, but opening
    /// the database after a crash takes milliseconds instead of a walk over the whole file.
    pub quick_repair: bool,
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub token: String,
    pub scopes: Vec<Scope>,
    /// The key's non-secret id ([`crate::app::key_id`]), worked out once here rather than
    /// hashed again on every request that presents it.
    pub id: std::sync::Arc<str>,
    /// What the key may reach when its entry limits it (`endpoints`, `workflows`): shared
    /// with every request that presents it, so authorizing costs one reference count.
    pub reach: Option<std::sync::Arc<Reach>>,
}

impl KeyConfig {
    pub fn new(token: String, scopes: Vec<Scope>) -> KeyConfig {
        let id = crate::app::key_id(&token).into();
        KeyConfig {
            token,
            scopes,
            id,
            reach: None,
        }
    }
}

/// The endpoints and workflows a key is limited to (`[[keys]]`' `endpoints` and
/// `workflows`). A key with either list is limited on both sides: without `endpoints` it
/// sends events to no endpoint directly, and without `workflows` it may use the workflows
/// whose endpoint is within `endpoints` (so no list leaves a way around the other). Why it exists: several
/// producers sharing one courier each get a key that can only feed their own endpoints and
/// workflows, so a leaked or misused producer key cannot send webhooks to anyone else's
/// receivers, nor watch or complete anyone else's workflow channels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reach {
    /// Endpoint name patterns (as `event_types`: `*` matches any run of characters).
    pub endpoints: Option<Vec<String>>,
    /// Workflow names.
    pub workflows: Option<Vec<String>>,
}

impl Reach {
    /// Whether events may be sent to the endpoint `name`.
    pub fn endpoint(&self, name: &str) -> bool {
        self.endpoints
            .as_ref()
            .is_some_and(|ps| ps.iter().any(|p| pattern_matches(p, name)))
    }

    /// Whether the workflow `name`, whose webhooks go to `endpoint` (`None`: no such
    /// workflow), may be used.
    pub fn workflow(&self, name: &str, endpoint: Option<&str>) -> bool {
        match &self.workflows {
            Some(ws) => ws.iter().any(|w| w == name),
            None => endpoint.is_some_and(|e| self.endpoint(e)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub timeout: Duration,
    pub schedule: Vec<Duration>,
    pub jitter: f64,
    pub allow_private_networks: bool,
    /// How long an attempt may take to connect (within its `timeout`): a receiver behind a
    /// firewall that drops packets fails in this long, rather than holding one of the
    /// attempt slots all endpoints share for the whole timeout.
    pub connect_timeout: Duration,
    /// How long delivered and dead deliveries are kept.
    pub retention: Duration,
    /// Consecutive failures after which an endpoint's circuit opens.
    pub circuit_failures: u32,
    /// While the circuit is open, one probe attempt at most this often.
    pub circuit_probe_interval: Duration,
    /// Attempts in flight across all endpoints (each endpoint's `max_in_flight` bounds its
    /// own): one event fanned out to thousands of endpoints must not open thousands of
    /// sockets at once. Read at start only.
    pub max_attempts_in_flight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    Unordered,
    Fifo,
}

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub name: String,
    pub url: url::Url,
    pub secrets: Vec<String>,
    /// `None` means every event type.
    pub event_types: Option<Vec<String>>,
    pub ordering: Ordering,
    pub max_in_flight: usize,
    pub rate_limit: Option<RateLimit>,
    pub timeout: Duration,
    pub schedule: Vec<Duration>,
    pub headers: BTreeMap<String, String>,
    pub transforms: Vec<String>,
    pub backoff: Option<String>,
    /// Paused endpoints queue deliveries but send nothing (endpoint API).
    pub paused: bool,
    /// Secrets being rotated out: they keep signing until their expiry (unix ms).
    pub retiring_secrets: Vec<(String, u64)>,
}

impl EndpointConfig {
    /// Why every attempt to this endpoint will be refused, if its URL names a private or
    /// loopback address (or `localhost`) while private networks are not allowed: the SSRF
    /// guard kills each delivery on its first attempt, which is better said before.
    pub fn unreachable_warning(&self, allow_private_networks: bool) -> Option<String> {
        if allow_private_networks {
            return None;
        }
        let local_name = self
            .url
            .host_str()
            .is_some_and(|h| h == "localhost" || h.ends_with(".localhost"));
        let private = crate::deliver::client::check_literal(&self.url, false).is_err();
        (local_name || private).then(|| {
            format!(
                "`{}` is sent to {}, a private or loopback address: with delivery.allow_private_networks = false every attempt is refused (ssrf_blocked) and its deliveries die at once",
                self.name,
                self.url.host_str().unwrap_or_default()
            )
        })
    }

    /// Every secret that signs an attempt made at `now_ms`: the current ones, then those
    /// being rotated out that have not expired.
    pub fn signing_secrets(&self, now_ms: u64) -> Vec<String> {
        let mut out = self.secrets.clone();
        out.extend(
            self.retiring_secrets
                .iter()
                .filter(|(_, until)| *until > now_ms)
                .map(|(s, _)| s.clone()),
        );
        out
    }

    /// Whether this endpoint subscribes to `event_type`.
    pub fn subscribes(&self, event_type: &str) -> bool {
        match &self.event_types {
            None => true,
            Some(patterns) => patterns.iter().any(|p| pattern_matches(p, event_type)),
        }
    }
}

/// `*` matches everything, `order.*` matches `order.` followed by anything, and any other
/// pattern matches exactly. `*` may appear anywhere as a wildcard for any run of characters.
///
/// At most the product of the two lengths whatever the pattern (the greedy two-pointer
/// match, which only ever returns to the last `*`; both are at most 256 characters): a
/// pattern such as `**…**x` is set by an admin client and runs on every ingest's fan-out, so
/// a backtracking matcher, exponential in the stars, would let one endpoint stall ingest for
/// hours.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // The last `*` seen, and where in `name` the run it matches would end next.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            // Let that `*` take one more character, and match the rest after it again.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The longest `event_types` pattern: event types themselves are at most 256 characters.
const MAX_PATTERN: usize = 256;

/// The most `event_types` patterns an endpoint has: each is matched on every ingest.
pub const MAX_PATTERNS: usize = 100;

/// The most signing secrets an endpoint has, retiring ones included: every attempt is signed
/// with each of them.
pub const MAX_SECRETS: usize = 10;

/// The most extra headers an endpoint sends, and the longest value of one.
pub const MAX_HEADERS: usize = 50;
pub const MAX_HEADER_VALUE: usize = 8 * 1024;

/// The longest endpoint URL: receivers' servers commonly refuse longer request lines.
pub const MAX_URL: usize = 8 * 1024;

/// The most transforms in an endpoint's chain.
pub const MAX_TRANSFORMS: usize = 16;

/// The most delays in an endpoint's `schedule`: each is an attempt, and the list is kept
/// with the endpoint.
pub const MAX_SCHEDULE: usize = 50;

/// The longest `tenant` label and `description` of an API endpoint (in bytes): kept in
/// memory with the endpoint and shown in every listing.
pub const MAX_TENANT: usize = 256;
pub const MAX_DESCRIPTION: usize = 1024;

/// Headers an endpoint cannot give although courier does not always set them: they describe
/// the body, which courier sends as it was ingested (a raw ingest's own `content-encoding`
/// goes with its body). Given for every delivery, `content-encoding` would claim an encoding
/// the body does not have. Refused where an endpoint is defined ([`check_limits`]); one
/// stored through the API before the rule has them left out of its requests.
pub const BODY_HEADERS: &[&str] = &["content-encoding"];

/// Refuses an endpoint definition past the limits above, or with an `event_types` pattern
/// over [`MAX_PATTERN`] characters: each is paid for on every ingest or every attempt, and
/// unbounded they let one definition slow or swell the whole server. Checked where an
/// endpoint is defined (the config file, the endpoint API), not when a stored one is loaded:
/// one made before the limits keeps working.
/// Checks a key's `endpoints` and `workflows` lists. They limit what the key may feed, so
/// they make sense only on keys without `admin` (an admin key manages every endpoint and
/// could lift any limit) and only for the scopes they bear on: `endpoints` for `ingest`,
/// `workflows` for `ingest` (opening and watching channels) and `callback`. A list that
/// could not limit anything is an error rather than a false sense of safety.
fn key_reach(
    i: usize,
    scopes: &[Scope],
    endpoints: Option<Vec<String>>,
    workflows: Option<Vec<String>>,
) -> Result<Option<Reach>, ConfigError> {
    if endpoints.is_none() && workflows.is_none() {
        return Ok(None);
    }
    let field = if endpoints.is_some() {
        "endpoints"
    } else {
        "workflows"
    };
    if scopes.contains(&Scope::Admin) {
        return Err(ConfigError::invalid(
            format!("keys[{i}].{field}"),
            "an admin key manages every endpoint and workflow, so it cannot be limited; give the list to a key without `admin`",
        ));
    }
    if endpoints.is_some() && !scopes.contains(&Scope::Ingest) {
        return Err(ConfigError::invalid(
            format!("keys[{i}].endpoints"),
            "limits what the key may ingest to, and the key has no `ingest` scope",
        ));
    }
    for (list, what) in [(&endpoints, "endpoints"), (&workflows, "workflows")] {
        let Some(list) = list else { continue };
        if list.len() > MAX_PATTERNS {
            return Err(ConfigError::invalid(
                format!("keys[{i}].{what}"),
                format!("at most {MAX_PATTERNS} entries ({} given)", list.len()),
            ));
        }
        for (j, p) in list.iter().enumerate() {
            if p.is_empty() || p.len() > MAX_PATTERN {
                return Err(ConfigError::invalid(
                    format!("keys[{i}].{what}[{j}]"),
                    format!("must be 1 to {MAX_PATTERN} characters"),
                ));
            }
        }
    }
    Ok(Some(Reach {
        endpoints,
        workflows,
    }))
}

pub fn check_limits(e: &RawEndpoint, key: &str) -> Result<(), ConfigError> {
    let pre = if key.is_empty() {
        String::new()
    } else {
        format!("{key}.")
    };
    let at_most = |field: &str, n: usize, max: usize, what: &str| {
        if n > max {
            Err(ConfigError::invalid(
                format!("{pre}{field}"),
                format!("at most {max} {what} ({n} given)"),
            ))
        } else {
            Ok(())
        }
    };
    if matches!(e.name.as_str(), "." | "..") {
        // HTTP clients read these as "this" and "the parent" directory in a path, however
        // they are encoded: such an endpoint could be made but never addressed by name.
        return Err(ConfigError::invalid(
            format!("{pre}name"),
            format!("`{}` cannot be named in a URL path", e.name),
        ));
    }
    at_most("url", e.url.len(), MAX_URL, "bytes")?;
    at_most("secrets", e.secrets.len(), MAX_SECRETS, "secrets")?;
    at_most(
        "event_types",
        e.event_types.as_ref().map_or(0, Vec::len),
        MAX_PATTERNS,
        "patterns",
    )?;
    at_most("headers", e.headers.len(), MAX_HEADERS, "headers")?;
    at_most(
        "transforms",
        e.transforms.len(),
        MAX_TRANSFORMS,
        "transforms",
    )?;
    at_most(
        "schedule",
        e.schedule.as_ref().map_or(0, Vec::len),
        MAX_SCHEDULE,
        "delays",
    )?;
    for (j, t) in e.event_types.iter().flatten().enumerate() {
        if t.len() > MAX_PATTERN {
            return Err(ConfigError::invalid(
                format!("{pre}event_types[{j}]"),
                format!("a pattern is at most {MAX_PATTERN} characters"),
            ));
        }
    }
    for (h, v) in &e.headers {
        if BODY_HEADERS.iter().any(|b| b.eq_ignore_ascii_case(h)) {
            return Err(ConfigError::invalid(
                format!("{pre}headers.{h}"),
                "describes the body, which courier sends as it was ingested (a raw ingest's own content-encoding goes with it), so it cannot be given",
            ));
        }
        at_most(&format!("headers.{h}"), v.len(), MAX_HEADER_VALUE, "bytes")?;
    }
    Ok(())
}

/// Refuses an API endpoint's `tenant` or `description` past [`MAX_TENANT`] or
/// [`MAX_DESCRIPTION`] bytes (the config file has neither field).
pub fn check_labels(tenant: Option<&str>, description: Option<&str>) -> Result<(), ConfigError> {
    for (field, value, max) in [
        ("tenant", tenant, MAX_TENANT),
        ("description", description, MAX_DESCRIPTION),
    ] {
        let n = value.map_or(0, str::len);
        if n > max {
            return Err(ConfigError::invalid(
                field,
                format!("at most {max} bytes ({n} given)"),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Transform,
    Backoff,
    Simulator,
}

#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub name: String,
    pub path: PathBuf,
    pub kind: PluginKind,
    pub config: BTreeMap<String, String>,
    pub fuel: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct WorkflowConfig {
    pub name: String,
    pub upstream_url: url::Url,
    pub upstream_timeout: Duration,
    /// Extra upstream tries after a connection error or a 5xx.
    pub upstream_retries: u32,
    pub upstream_retry_delay: Duration,
    /// Extra headers for the upstream request (e.g. an API key).
    pub upstream_headers: BTreeMap<String, String>,
    /// Upstream calls of this workflow running at once; the rest wait their turn, so a burst
    /// of requests (or a restart with many pending channels) does not flood the upstream.
    pub upstream_max_in_flight: usize,
    /// The largest upstream answer read; a larger one fails the channel rather than being
    /// held in memory, stored and delivered.
    pub upstream_max_response: u64,
    pub endpoint: String,
    pub event_name: Option<String>,
    pub callback_timeout: Duration,
    pub simulate: Option<String>,
    pub simulate_delay: Duration,
    /// With `simulate`: whether the webhook to the endpoint is still sent.
    pub simulate_webhook: bool,
}

// ---------------------------------------------------------------------------------------------
// Raw (as written) structures. Unknown keys are rejected so that a typo is an error, not a
// silently ignored setting.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    workflows: Vec<RawWorkflow>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    data_dir: Option<String>,
    public_url: Option<String>,
    max_body_bytes: Option<u64>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    max_connections: Option<u64>,
    max_channel_subscribers: Option<u64>,
    watch: Option<bool>,
    quick_repair: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    token: String,
    #[serde(default)]
    scopes: Vec<String>,
    endpoints: Option<Vec<String>>,
    workflows: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    timeout: Option<String>,
    connect_timeout: Option<String>,
    schedule: Option<Vec<String>>,
    jitter: Option<f64>,
    allow_private_networks: Option<bool>,
    retention: Option<String>,
    circuit_failures: Option<u32>,
    circuit_probe_interval: Option<String>,
    max_attempts_in_flight: Option<u64>,
}

/// One `[[endpoints]]` entry as written (also the body of the endpoint API).
#[derive(Deserialize, serde::Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_types: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Vec<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub transforms: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: String,
    path: String,
    kind: String,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    fuel: Option<u64>,
    memory: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    upstream: RawUpstream,
    endpoint: String,
    event_name: Option<String>,
    callback_timeout: Option<String>,
    simulate: Option<String>,
    simulate_delay: Option<String>,
    simulate_webhook: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: String,
    timeout: Option<String>,
    retries: Option<u32>,
    retry_delay: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    max_in_flight: Option<i64>,
    max_response: Option<String>,
}

// ---------------------------------------------------------------------------------------------

/// Tokens shorter than this are accepted with a warning: easy to guess, but an operator's
/// choice (a local test setup, say), and refusing them would stop the start.
pub const SHORT_TOKEN: usize = 16;

impl Config {
    /// What in this configuration works but is probably a mistake: short tokens, endpoints
    /// without secrets (their deliveries are sent unsigned). `courier check` prints these;
    /// the server logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.key_warnings();
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.secrets.is_empty() {
                out.push(format!(
                    "endpoints[{i}].secrets: `{}` has no secrets; its deliveries are sent unsigned",
                    e.name
                ));
            }
            if let Some(w) = e.unreachable_warning(self.delivery.allow_private_networks) {
                out.push(format!("endpoints[{i}].url: {w}"));
            }
        }
        out
    }

    /// The warnings about `[[keys]]` alone (the endpoints' are logged as they are installed).
    pub fn key_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            if k.token.len() < SHORT_TOKEN {
                out.push(format!(
                    "keys[{i}].token is shorter than {SHORT_TOKEN} characters: easy to guess; use `courier secret` or another long random string"
                ));
            }
        }
        out
    }

    /// The embedded defaults: `courier serve` with no file.
    pub fn defaults() -> Config {
        Self::from_raw(RawConfig::default(), Path::new("."), None, None)
            .expect("embedded defaults are valid")
    }

    /// Reads, resolves and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::load_bytes(path, &bytes)
    }

    /// Parses `bytes`, read from the file at `path`.
    pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Config, ConfigError> {
        Self::load_bytes_running(path, bytes, None)
    }

    /// Like [`Config::load_bytes`], for a reload of `running`: a `listen` written as before
    /// is taken as the address it was resolved to then, without looking the name up again.
    /// Only a restart applies `listen`, so a name that does not resolve at the moment (a DNS
    /// hiccup) must not make the rest of the file unloadable.
    pub fn load_bytes_running(
        path: &Path,
        bytes: &[u8],
        running: Option<&Config>,
    ) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut config = Self::parse_with(
            text,
            base,
            Some(path.to_path_buf()),
            &path.display().to_string(),
            running.map(|c| (c.server.listen_text.as_str(), c.server.listen)),
        )?;
        use sha2::Digest;
        config.source_sha256 = Some(hex::encode(sha2::Sha256::digest(bytes)));
        Ok(config)
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(
        text: &str,
        base: &Path,
        source: Option<PathBuf>,
        origin: &str,
    ) -> Result<Config, ConfigError> {
        Self::parse_with(text, base, source, origin, None)
    }

    /// [`Config::parse`], with `listen` taken as already resolved when it reads `known.0`.
    fn parse_with(
        text: &str,
        base: &Path,
        source: Option<PathBuf>,
        origin: &str,
        known: Option<(&str, SocketAddr)>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: syntax_error(text, &e),
        })?;
        resolve_env(&mut value, "")?;
        let raw: RawConfig =
            RawConfig::deserialize(toml::Value::Table(value.clone())).map_err(|e| {
                entry_at_fault(&value).unwrap_or_else(|| ConfigError::Parse {
                    path: origin.to_string(),
                    message: structural_error(&e.to_string()),
                })
            })?;
        Self::from_raw(raw, base, source, known)
    }

    fn from_raw(
        raw: RawConfig,
        base: &Path,
        source: Option<PathBuf>,
        known: Option<(&str, SocketAddr)>,
    ) -> Result<Config, ConfigError> {
        let s = raw.server;
        let listen_text = s.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        // An address, or a host name and port (`localhost:8080`), resolved once, here.
        let listen: SocketAddr = match listen_text.parse() {
            Ok(a) => a,
            Err(_) if known.is_some_and(|(text, _)| text == listen_text) => {
                known.expect("checked").1
            }
            Err(_) => {
                use std::net::ToSocketAddrs;
                listen_text
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        ConfigError::invalid(
                            "server.listen",
                            format!(
                                "`{listen_text}` is not an address like 127.0.0.1:8080 (or a host name that resolves, with a port)"
                            ),
                        )
                    })?
            }
        };
        if s.data_dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Err(ConfigError::invalid("server.data_dir", "must not be empty"));
        }
        let data_dir = relative_to(base, &s.data_dir.unwrap_or_else(|| "./courier-data".into()));
        let public_url_defaulted = s.public_url.is_none();
        let public_url = s
            .public_url
            .unwrap_or_else(|| format!("http://{listen_text}"));
        let parsed = parse_http_url(&public_url, "server.public_url")?;
        if parsed.query().is_some() || parsed.fragment().is_some() {
            // Callback URLs are this plus `/v1/callback/<id>`.
            return Err(ConfigError::invalid(
                "server.public_url",
                format!("`{public_url}` must not have a query or a fragment"),
            ));
        }

        let max_body_bytes = s.max_body_bytes.unwrap_or(1024 * 1024);
        // A body is held in memory and framed in the ingest journal with a 32-bit length.
        if max_body_bytes == 0 || max_body_bytes > MAX_BODY_LIMIT {
            return Err(ConfigError::invalid(
                "server.max_body_bytes",
                format!("must be between 1 and {MAX_BODY_LIMIT} (1 GiB)"),
            ));
        }
        let server = ServerConfig {
            listen,
            listen_text: listen_text.clone(),
            data_dir,
            public_url: public_url.trim_end_matches('/').to_string(),
            public_url_defaulted,
            max_body_bytes: max_body_bytes as usize,
            header_timeout: server_timeout(s.header_timeout, "server.header_timeout")?
                .unwrap_or(crate::listener::HEADER_TIMEOUT),
            body_timeout: server_timeout(s.body_timeout, "server.body_timeout")?
                .unwrap_or(crate::api::BODY_TIMEOUT),
            max_connections: match s.max_connections {
                None => crate::listener::MAX_CONNECTIONS,
                Some(n @ 1..=1_000_000) => n as usize,
                Some(_) => {
                    return Err(ConfigError::invalid(
                        "server.max_connections",
                        "must be between 1 and 1000000",
                    ));
                }
            },
            max_channel_subscribers: match s.max_channel_subscribers {
                None => 100,
                Some(n @ 1..=1_000_000) => n as usize,
                Some(_) => {
                    return Err(ConfigError::invalid(
                        "server.max_channel_subscribers",
                        "must be between 1 and 1000000",
                    ));
                }
            },
            watch: s.watch.unwrap_or(true),
            quick_repair: s.quick_repair.unwrap_or(true),
        };

        let mut keys = Vec::new();
        for (i, k) in raw.keys.into_iter().enumerate() {
            if k.token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                // A header cannot carry it as written (a trailing newline from a secret file,
                // say): the key would pass here and never authenticate.
                return Err(ConfigError::invalid(
                    format!("keys[{i}].token"),
                    "contains whitespace or control characters (a trailing newline from a secret file?)",
                ));
            }
            if k.token.is_empty() {
                return Err(ConfigError::invalid(format!("keys[{i}].token"), "is empty"));
            }
            if let Some(j) = keys.iter().position(|o: &KeyConfig| o.token == k.token) {
                // Two entries with one token: only one's scopes could ever apply.
                return Err(ConfigError::invalid(
                    format!("keys[{i}].token"),
                    format!("is the same token as keys[{j}]; give each key its own token"),
                ));
            }
            if k.scopes.is_empty() {
                return Err(ConfigError::invalid(
                    format!("keys[{i}].scopes"),
                    "must name at least one of ingest, admin, callback",
                ));
            }
            let mut scopes = Vec::new();
            for (j, sc) in k.scopes.iter().enumerate() {
                scopes.push(Scope::parse(sc).ok_or_else(|| {
                    ConfigError::invalid(
                        format!("keys[{i}].scopes[{j}]"),
                        format!("unknown scope `{sc}` (expected ingest, admin or callback)"),
                    )
                })?);
            }
            let reach = key_reach(i, &scopes, k.endpoints, k.workflows)?;
            let mut key = KeyConfig::new(k.token, scopes);
            key.reach = reach.map(std::sync::Arc::new);
            keys.push(key);
        }

        let d = raw.delivery;
        let timeout =
            opt_duration(d.timeout, "delivery.timeout")?.unwrap_or(Duration::from_secs(30));
        let schedule = match d.schedule {
            Some(list) => parse_schedule(&list, "delivery.schedule")?,
            None => DEFAULT_SCHEDULE
                .iter()
                .map(|s| humantime::parse_duration(s).expect("default schedule"))
                .collect(),
        };
        let jitter = d.jitter.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&jitter) {
            return Err(ConfigError::invalid(
                "delivery.jitter",
                format!("{jitter} is not between 0 and 1"),
            ));
        }
        let delivery = DeliveryConfig {
            timeout,
            schedule,
            jitter,
            allow_private_networks: d.allow_private_networks.unwrap_or(false),
            connect_timeout: positive_duration(d.connect_timeout, "delivery.connect_timeout")?
                .unwrap_or(Duration::from_secs(10)),
            retention: match opt_duration(d.retention, "delivery.retention")? {
                Some(r) if r.is_zero() => {
                    return Err(ConfigError::invalid(
                        "delivery.retention",
                        "must be greater than 0 (finished deliveries and the DLQ are kept this long)",
                    ));
                }
                r => r.unwrap_or(Duration::from_secs(30 * 24 * 3600)),
            },
            circuit_failures: match d.circuit_failures {
                Some(0) => {
                    return Err(ConfigError::invalid(
                        "delivery.circuit_failures",
                        "must be at least 1",
                    ));
                }
                n => n.unwrap_or(10),
            },
            circuit_probe_interval: positive_duration(
                d.circuit_probe_interval,
                "delivery.circuit_probe_interval",
            )?
            .unwrap_or(Duration::from_secs(30)),
            max_attempts_in_flight: match d.max_attempts_in_flight {
                None => 4096,
                Some(n @ 1..=100_000) => n as usize,
                Some(_) => {
                    return Err(ConfigError::invalid(
                        "delivery.max_attempts_in_flight",
                        "must be between 1 and 100000",
                    ));
                }
            },
        };
        if delivery.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "delivery.timeout",
                "must be greater than 0",
            ));
        }

        let mut plugins = Vec::new();
        let mut plugin_names = HashSet::new();
        for (i, p) in raw.plugins.into_iter().enumerate() {
            let key = format!("plugins[{i}]");
            check_name(&p.name, &format!("{key}.name"))?;
            if !plugin_names.insert(p.name.clone()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("duplicate plugin name `{}`", p.name),
                ));
            }
            let kind = match p.kind.as_str() {
                "transform" => PluginKind::Transform,
                "backoff" => PluginKind::Backoff,
                "simulator" => PluginKind::Simulator,
                other => {
                    return Err(ConfigError::invalid(
                        format!("{key}.kind"),
                        format!(
                            "unknown kind `{other}` (expected transform, backoff or simulator)"
                        ),
                    ));
                }
            };
            let config = p
                .config
                .into_iter()
                .map(|(k, v)| {
                    let s = match v {
                        toml::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, s)
                })
                .collect();
            plugins.push(PluginConfig {
                name: p.name,
                path: relative_to(base, &p.path),
                kind,
                config,
                fuel: match p.limits.fuel {
                    Some(0) => {
                        return Err(ConfigError::invalid(
                            format!("{key}.limits.fuel"),
                            "must be greater than 0 (every call would run out at once)",
                        ));
                    }
                    f => f,
                },
                memory_bytes: p
                    .limits
                    .memory
                    .map(|m| {
                        let k = format!("{key}.limits.memory");
                        let n = parse_bytes(&m, &k)?;
                        let max = crate::plugins::host::MAX_MEMORY;
                        if n == 0 || n > max {
                            return Err(ConfigError::invalid(
                                k,
                                format!("`{m}` is not between 1 byte and 256MiB"),
                            ));
                        }
                        Ok(n)
                    })
                    .transpose()?,
                timeout: positive_duration(p.limits.timeout, &format!("{key}.limits.timeout"))?,
            });
        }
        let plugin_kind = |name: &str| plugins.iter().find(|p| p.name == name).map(|p| p.kind);

        let mut endpoints = Vec::new();
        let mut names = HashSet::new();
        for (i, e) in raw.endpoints.into_iter().enumerate() {
            let key = format!("endpoints[{i}]");
            if !names.insert(e.name.clone()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("duplicate endpoint name `{}`", e.name),
                ));
            }
            check_limits(&e, &key)?;
            check_header_names(&e.headers, &format!("{key}.headers"))?;
            endpoints.push(build_endpoint(e, &key, &delivery, &plugins)?);
        }

        let mut workflows = Vec::new();
        let mut wf_names = HashSet::new();
        for (i, w) in raw.workflows.into_iter().enumerate() {
            let key = format!("workflows[{i}]");
            check_name(&w.name, &format!("{key}.name"))?;
            if !wf_names.insert(w.name.clone()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("duplicate workflow name `{}`", w.name),
                ));
            }
            if !names.contains(&w.endpoint) {
                return Err(ConfigError::invalid(
                    format!("{key}.endpoint"),
                    format!("`{}` is not an [[endpoints]] entry", w.endpoint),
                ));
            }
            // The simulator plays the backend's callback, which only the event-driven flow
            // waits for: without `event_name` it would never run.
            if w.event_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                return Err(ConfigError::invalid(
                    format!("{key}.event_name"),
                    "must not be empty (leave it out for the plain async flow)",
                ));
            }
            if w.simulate.is_some() && w.event_name.is_none() {
                return Err(ConfigError::invalid(
                    format!("{key}.simulate"),
                    "a simulator plays the callback of the event-driven flow: set `event_name` too",
                ));
            }
            if let Some(s) = &w.simulate
                && plugin_kind(s) != Some(PluginKind::Simulator)
            {
                return Err(ConfigError::invalid(
                    format!("{key}.simulate"),
                    format!("`{s}` is not a [[plugins]] entry of kind simulator"),
                ));
            }
            workflows.push(WorkflowConfig {
                name: w.name,
                upstream_url: parse_http_url(&w.upstream.url, &format!("{key}.upstream.url"))?,
                upstream_timeout: positive_duration(
                    w.upstream.timeout,
                    &format!("{key}.upstream.timeout"),
                )?
                .unwrap_or(Duration::from_secs(60)),
                upstream_retries: match w.upstream.retries {
                    Some(n) if n > 10 => {
                        return Err(ConfigError::invalid(
                            format!("{key}.upstream.retries"),
                            format!("{n} is more than 10"),
                        ));
                    }
                    n => n.unwrap_or(2),
                },
                upstream_retry_delay: opt_duration(
                    w.upstream.retry_delay,
                    &format!("{key}.upstream.retry_delay"),
                )?
                .unwrap_or(Duration::from_secs(1)),
                // The upstream is the operator's own service: nothing is reserved.
                upstream_headers: {
                    let key = format!("{key}.upstream.headers");
                    check_header_names(&w.upstream.headers, &key)?;
                    http_headers(w.upstream.headers, &key)?
                },
                upstream_max_in_flight: match w.upstream.max_in_flight {
                    None => 32,
                    Some(n) if (1..=10_000).contains(&n) => n as usize,
                    Some(n) => {
                        return Err(ConfigError::invalid(
                            format!("{key}.upstream.max_in_flight"),
                            format!("{n} is not between 1 and 10000"),
                        ));
                    }
                },
                upstream_max_response: match &w.upstream.max_response {
                    None => 4 * 1024 * 1024,
                    Some(m) => {
                        let k = format!("{key}.upstream.max_response");
                        let n = parse_bytes(m, &k)?;
                        if n == 0 || n > MAX_UPSTREAM_RESPONSE {
                            return Err(ConfigError::invalid(
                                k,
                                format!("`{m}` is not between 1 byte and 64MiB"),
                            ));
                        }
                        n
                    }
                },
                endpoint: w.endpoint,
                event_name: w.event_name,
                callback_timeout: positive_duration(
                    w.callback_timeout,
                    &format!("{key}.callback_timeout"),
                )?
                .unwrap_or(Duration::from_secs(300)),
                simulate: w.simulate,
                simulate_delay: opt_duration(w.simulate_delay, &format!("{key}.simulate_delay"))?
                    .unwrap_or(Duration::from_millis(1500)),
                simulate_webhook: w.simulate_webhook.unwrap_or(true),
            });
        }
        // Workflows exist only in this file, so a key's list can be checked against them (a
        // misspelt name would otherwise leave the key able to use none, silently).
        for (i, k) in keys.iter().enumerate() {
            let names = k.reach.as_ref().and_then(|r| r.workflows.as_ref());
            for (j, name) in names.into_iter().flatten().enumerate() {
                if !workflows.iter().any(|w: &WorkflowConfig| &w.name == name) {
                    return Err(ConfigError::invalid(
                        format!("keys[{i}].workflows[{j}]"),
                        format!("no [[workflows]] entry is named `{name}`"),
                    ));
                }
            }
        }

        Ok(Config {
            server,
            keys,
            delivery,
            endpoints,
            plugins,
            workflows,
            source,
            source_sha256: None,
        })
    }

    /// With no `public_url` set and `listen` on port 0, callback URLs would name port 0: the
    /// default becomes the address actually bound.
    pub fn resolve_public_url(&mut self, bound: SocketAddr) {
        let s = &mut self.server;
        if s.listen.port() == 0 && s.public_url_defaulted {
            s.public_url = format!("http://{bound}");
        }
    }

    pub fn endpoint(&self, name: &str) -> Option<&EndpointConfig> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    pub fn workflow(&self, name: &str) -> Option<&WorkflowConfig> {
        self.workflows.iter().find(|w| w.name == name)
    }
}

/// Validates one endpoint entry (from the config file or the endpoint API); errors name
/// `{key}.field`.
pub fn build_endpoint(
    e: RawEndpoint,
    key: &str,
    delivery: &DeliveryConfig,
    plugins: &[PluginConfig],
) -> Result<EndpointConfig, ConfigError> {
    let plugin_kind = |name: &str| plugins.iter().find(|p| p.name == name).map(|p| p.kind);
    // Field names are prefixed with `key.` (config file) or bare (endpoint API).
    let pre = if key.is_empty() {
        String::new()
    } else {
        format!("{key}.")
    };
    check_name(&e.name, &format!("{pre}name"))?;
    let url = parse_http_url(&e.url, &format!("{pre}url"))?;
    for (j, s) in e.secrets.iter().enumerate() {
        crate::deliver::sign::decode_secret(s)
            .map_err(|m| ConfigError::invalid(format!("{pre}secrets[{j}]"), m.to_string()))?;
    }
    if let Some(types) = &e.event_types {
        for (j, t) in types.iter().enumerate() {
            if t.is_empty() || t.chars().any(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    format!("{pre}event_types[{j}]"),
                    format!("`{t}` is not a valid event type pattern"),
                ));
            }
        }
    }
    let ordering = match e.ordering.as_deref() {
        None | Some("unordered") => Ordering::Unordered,
        Some("fifo") => Ordering::Fifo,
        Some(other) => {
            return Err(ConfigError::invalid(
                format!("{pre}ordering"),
                format!("unknown ordering `{other}` (expected unordered or fifo)"),
            ));
        }
    };
    let max_in_flight = match e.max_in_flight {
        None => 32,
        Some(n) if (1..=10_000).contains(&n) => n as usize,
        Some(n) => {
            return Err(ConfigError::invalid(
                format!("{pre}max_in_flight"),
                format!("{n} is not between 1 and 10000"),
            ));
        }
    };
    let rate_limit = e
        .rate_limit
        .map(|r| {
            RateLimit::parse(&r).map_err(|m| ConfigError::invalid(format!("{pre}rate_limit"), m))
        })
        .transpose()?;
    let timeout = opt_duration(e.timeout, &format!("{pre}timeout"))?.unwrap_or(delivery.timeout);
    if timeout.is_zero() {
        return Err(ConfigError::invalid(
            format!("{pre}timeout"),
            "must be greater than 0",
        ));
    }
    let schedule = match e.schedule {
        Some(list) => parse_schedule(&list, &format!("{pre}schedule"))?,
        None => delivery.schedule.clone(),
    };
    for h in e.headers.keys() {
        if RESERVED_HEADERS.contains(&h.to_ascii_lowercase().as_str()) {
            return Err(ConfigError::invalid(
                format!("{pre}headers.{h}"),
                "is set by courier and cannot be overridden",
            ));
        }
    }
    let mut headers = http_headers(e.headers, &format!("{pre}headers"))?;
    // Only an API endpoint stored before the rule can have one ([`BODY_HEADERS`]).
    headers.retain(|h, _| !BODY_HEADERS.contains(&h.as_str()));
    for (j, t) in e.transforms.iter().enumerate() {
        if plugin_kind(t) != Some(PluginKind::Transform) {
            return Err(ConfigError::invalid(
                format!("{pre}transforms[{j}]"),
                format!("`{t}` is not a [[plugins]] entry of kind transform"),
            ));
        }
    }
    if let Some(b) = &e.backoff
        && plugin_kind(b) != Some(PluginKind::Backoff)
    {
        return Err(ConfigError::invalid(
            format!("{pre}backoff"),
            format!("`{b}` is not a [[plugins]] entry of kind backoff"),
        ));
    }
    Ok(EndpointConfig {
        name: e.name,
        url,
        secrets: e.secrets,
        event_types: e.event_types,
        ordering,
        max_in_flight: if ordering == Ordering::Fifo {
            1
        } else {
            max_in_flight
        },
        rate_limit,
        timeout,
        schedule,
        headers,
        transforms: e.transforms,
        backoff: e.backoff,
        paused: false,
        retiring_secrets: Vec::new(),
    })
}

/// Headers courier sets itself on every attempt.
pub const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "mr-signature",
    "mr-timestamp",
    "mr-channel-id",
    "content-type",
    "content-length",
    "host",
    "user-agent",
];

/// `path` resolved against the config file's directory, without `./` noise.
fn relative_to(base: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    let path = match path.strip_prefix(".") {
        Ok(rest) if !rest.as_os_str().is_empty() => rest,
        _ => path,
    };
    if base == Path::new(".") || path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// A TOML syntax error as "line L, column C: what", without the quoted source line (which
/// may hold a token or a secret).
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let message = one_line(e.message());
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// Which entry of an array of tables a structural error (a missing or unknown field, a value
/// of the wrong type) is in: serde's message names the table (`endpoints`), not the entry.
fn entry_at_fault(value: &toml::Table) -> Option<ConfigError> {
    fn check<T: serde::de::DeserializeOwned>(
        value: &toml::Table,
        key: &str,
    ) -> Option<ConfigError> {
        let list = value.get(key)?.as_array()?;
        list.iter().enumerate().find_map(|(i, entry)| {
            T::deserialize(entry.clone()).err().map(|e| {
                ConfigError::invalid(format!("{key}[{i}]"), structural_error(&e.to_string()))
            })
        })
    }
    check::<RawKey>(value, "keys")
        .or_else(|| check::<RawEndpoint>(value, "endpoints"))
        .or_else(|| check::<RawPlugin>(value, "plugins"))
        .or_else(|| check::<RawWorkflow>(value, "workflows"))
}

/// A structural error (a wrong type, a missing field) on one line, without the value at
/// fault: serde quotes a rejected value whole (`invalid type: string "whsec_…", expected a
/// sequence`, or ``integer `1234` ``), and with `env:` already resolved that value may be a
/// signing secret, a token or a credential header, which would then reach the log, `courier
/// check`'s output and `/v1/config/status` (or, from the endpoint API, its error reply).
/// Each is named by its kind instead (`a string`, `an integer`).
pub fn structural_error(s: &str) -> String {
    // serde's `Unexpected` values as it shows them: the opening, the closing delimiter, and
    // what is shown instead.
    const SHOWN: &[(&str, char, &str)] = &[
        ("string \"", '"', "a string"),
        ("integer `", '`', "an integer"),
        ("floating point `", '`', "a floating point number"),
        ("boolean `", '`', "a boolean"),
    ];
    let s = one_line(s);
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some((at, (open, close, kind))) = SHOWN
        .iter()
        .filter_map(|v| rest.find(v.0).map(|at| (at, v)))
        .min_by_key(|(at, _)| *at)
    {
        out.push_str(&rest[..at]);
        out.push_str(kind);
        // Past the closing delimiter (serde escapes quotes inside a string as \").
        let quoted = &rest[at + open.len()..];
        let mut escaped = false;
        let end = quoted
            .char_indices()
            .find(|&(_, c)| {
                let closes = c == *close && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })
            .map_or(quoted.len(), |(i, _)| i + 1);
        rest = &quoted[end..];
    }
    out.push_str(rest);
    out
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_name(name: &str, key: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("`{name}` must be 1-128 characters of letters, digits, '-', '_' or '.'"),
        ))
    }
}

fn parse_http_url(text: &str, key: &str) -> Result<url::Url, ConfigError> {
    // Nor its query, which may carry a key (`?key=`), as listings hide it.
    let shown = match without_password(text).split_once('?') {
        Some((before, _)) => format!("{before}?…"),
        None => without_password(text),
    };
    let url = url::Url::parse(text)
        .map_err(|e| ConfigError::invalid(key, format!("`{shown}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::invalid(
            key,
            format!("`{shown}` must be an http:// or https:// URL with a host"),
        ));
    }
    Ok(url)
}

/// Parses a duration such as "500ms", "5s", "2m", "1h".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like \"500ms\", \"5s\", \"2m\" ({e})"))?;
    // The parser reads a capital `M` as months: `timeout = "5M"` meant as minutes would be
    // five months, and accepted.
    if text
        .split(|c: char| !c.is_ascii_alphabetic())
        .any(|unit| unit == "M")
    {
        return Err(format!(
            "`{text}`: `M` means months here; write `m` for minutes, or `months`"
        ));
    }
    if d > MAX_DURATION {
        return Err(format!(
            "`{text}` is longer than the longest allowed, 10 years"
        ));
    }
    Ok(d)
}

/// The longest duration any setting accepts: far beyond any sensible timeout, delay or
/// retention, and small enough that adding it to a clock or a millisecond timestamp (and
/// jittering it) can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000); // 10 × 365.25 days, as "10y" reads

fn opt_duration(v: Option<String>, key: &str) -> Result<Option<Duration>, ConfigError> {
    v.map(|s| parse_duration(&s).map_err(|m| ConfigError::invalid(key, m)))
        .transpose()
}

/// A time limit on the clients of courier's own API: at least 100 ms, since below that
/// every connection (the operator's too) would be closed before it could send a request.
fn server_timeout(v: Option<String>, key: &str) -> Result<Option<Duration>, ConfigError> {
    match opt_duration(v, key)? {
        Some(d) if d < Duration::from_millis(100) => {
            Err(ConfigError::invalid(key, "must be at least 100ms"))
        }
        d => Ok(d),
    }
}

/// A duration that must not be zero (a zero timeout or interval would fail or spin).
fn positive_duration(v: Option<String>, key: &str) -> Result<Option<Duration>, ConfigError> {
    match opt_duration(v, key)? {
        Some(d) if d.is_zero() => Err(ConfigError::invalid(key, "must be greater than 0")),
        d => Ok(d),
    }
}

/// `text` with the password of a URL in it replaced, for error messages.
fn without_password(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &text[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:…{}", &text[..scheme + 3], &text[at..]),
                None => text.to_string(),
            }
        }
        _ => text.to_string(),
    }
}

fn parse_schedule(list: &[String], key: &str) -> Result<Vec<Duration>, ConfigError> {
    if list.is_empty() {
        return Err(ConfigError::invalid(key, "must list at least one delay"));
    }
    list.iter()
        .enumerate()
        .map(|(i, s)| parse_duration(s).map_err(|m| ConfigError::invalid(format!("{key}[{i}]"), m)))
        .collect()
}

/// The most `upstream.max_response` may allow: the answer is held in memory, stored with
/// its channel and delivered as one webhook.
pub const MAX_UPSTREAM_RESPONSE: u64 = 64 * 1024 * 1024;

/// Parses sizes such as "16MiB", "512KiB", "1GiB", "4096".
pub fn parse_bytes(text: &str, key: &str) -> Result<u64, ConfigError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError::invalid(key, format!("`{text}` is not a size like \"16MiB\"")))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1024,
        "MiB" | "MB" | "M" => 1024 * 1024,
        "GiB" | "GB" | "G" => 1024 * 1024 * 1024,
        _ => {
            return Err(ConfigError::invalid(
                key,
                format!("`{text}` is not a size like \"16MiB\""),
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError::invalid(key, format!("`{text}` is too large")))
}

/// Replaces every string value of the form `env:NAME` with the variable's value.
fn resolve_env(table: &mut toml::Table, prefix: &str) -> Result<(), ConfigError> {
    for (k, v) in table.iter_mut() {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        resolve_value(v, &key)?;
    }
    Ok(())
}

/// The environment variable `name`. Tests give their own variables to the thread that
/// parses ([`tests::with_env`]) instead of changing the process's environment, which other
/// test threads read meanwhile (`setenv` racing `getenv` is undefined behaviour).
fn env_var(name: &str) -> Result<String, std::env::VarError> {
    #[cfg(test)]
    if let Some(v) = tests::FAKE_ENV.with(|e| e.borrow().get(name).cloned()) {
        return Ok(v);
    }
    std::env::var(name)
}

fn resolve_value(v: &mut toml::Value, key: &str) -> Result<(), ConfigError> {
    match v {
        toml::Value::String(s) => {
            if let Some(name) = s.strip_prefix("env:") {
                *s = match env_var(name) {
                    // An empty value would pass where any text does (a header, a plugin's
                    // config) and send an empty credential: a variable set by mistake.
                    Ok(v) if v.is_empty() => {
                        return Err(ConfigError::invalid(
                            key,
                            format!("environment variable {name} is empty"),
                        ));
                    }
                    Ok(v) => v,
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(ConfigError::invalid(
                            key,
                            format!("environment variable {name} is not UTF-8 text"),
                        ));
                    }
                    Err(std::env::VarError::NotPresent) => {
                        return Err(ConfigError::invalid(
                            key,
                            format!("environment variable {name} is not set"),
                        ));
                    }
                };
            }
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                resolve_value(item, &format!("{key}[{i}]"))?;
            }
        }
        toml::Value::Table(t) => resolve_env(t, key)?,
        _ => {}
    }
    Ok(())
}

/// Whether `name: value` can be sent as an HTTP header.
pub fn valid_header(name: &str, value: &str) -> bool {
    reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
        && reqwest::header::HeaderValue::from_str(value).is_ok()
}

/// A configured header table (`{key}.NAME`), validated, with names lowercased.
fn http_headers(
    given: BTreeMap<String, String>,
    key: &str,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut headers = BTreeMap::new();
    for (h, v) in given {
        let name = h.to_ascii_lowercase();
        if !valid_header(&name, &v) {
            return Err(ConfigError::invalid(
                format!("{key}.{h}"),
                "is not a valid HTTP header",
            ));
        }
        headers.insert(name, v);
    }
    Ok(headers)
}

/// Headers that describe the connection or how the body is framed. The HTTP client sets
/// them from what it actually sends: a `transfer-encoding` given by hand would announce an
/// encoding the body does not have, `connection` or `expect` would change the exchange, and
/// over HTTP/2 each of them is a protocol error that fails every attempt. So they cannot be
/// given, and any that reach a request (from an endpoint stored before this rule, or from a
/// transform plugin) are left out of it ([`is_connection_header`]).
pub const CONNECTION_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// Whether `name` (any case) is one of [`CONNECTION_HEADERS`].
pub fn is_connection_header(name: &str) -> bool {
    CONNECTION_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// Refuses a header table that names one header twice in different cases (`X-A` and
/// `x-a` are one header: one value would be dropped without a word), or names one of the
/// [`CONNECTION_HEADERS`]. Applied where headers are given (the config file, the endpoint
/// API), not to endpoints stored before the check existed, which keep the value that sorts
/// last (and whose connection headers are left out of their requests).
pub fn check_header_names(given: &BTreeMap<String, String>, key: &str) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for h in given.keys() {
        if is_connection_header(h) {
            return Err(ConfigError::invalid(
                format!("{key}.{h}"),
                "describes the connection or how the body is framed, which the HTTP client sets",
            ));
        }
        if !seen.insert(h.to_ascii_lowercase()) {
            return Err(ConfigError::invalid(
                format!("{key}.{h}"),
                "names a header already set (header names ignore case)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/courier"), None, "test.toml")
    }

    thread_local! {
        /// Environment variables this thread's config parsing sees (see `env_var`).
        pub(super) static FAKE_ENV: std::cell::RefCell<std::collections::HashMap<String, String>> =
            Default::default();
    }

    /// Runs `f` with `vars` in the environment config parsing sees, on this thread only.
    fn with_env<R>(vars: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
        FAKE_ENV.with(|e| {
            *e.borrow_mut() = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        let r = f();
        FAKE_ENV.with(|e| e.borrow_mut().clear());
        r
    }

    /// The endpoint limits hold in the config file as in the endpoint API.
    #[test]
    fn a_config_endpoint_past_the_limits_is_refused_naming_the_key() {
        let secret = "\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"";
        let secrets = [secret; 11].join(", ");
        let e = parse(&format!(
            "[[endpoints]]\nname = \"a\"\nurl = \"https://example.com/h\"\nsecrets = [{secrets}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("endpoints[0].secrets") && e.contains("at most 10"),
            "{e}"
        );
        let patterns = (0..101)
            .map(|i| format!("\"t.{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let e = parse(&format!(
            "[[endpoints]]\nname = \"a\"\nurl = \"https://example.com/h\"\nevent_types = [{patterns}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("endpoints[0].event_types") && e.contains("at most 100"),
            "{e}"
        );
        let delays = vec!["\"1s\""; MAX_SCHEDULE + 1].join(", ");
        let e = parse(&format!(
            "[[endpoints]]\nname = \"a\"\nurl = \"https://example.com/h\"\nschedule = [{delays}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("endpoints[0].schedule") && e.contains("at most 50 delays"),
            "{e}"
        );
        let delays = vec!["\"1s\""; MAX_SCHEDULE].join(", ");
        parse(&format!(
            "[[endpoints]]\nname = \"a\"\nurl = \"https://example.com/h\"\nschedule = [{delays}]\n"
        ))
        .unwrap();
    }

    /// `content-encoding` describes the body, which courier sends as it was ingested: an
    /// endpoint that gives it is refused, naming the key; one stored through the API before
    /// the rule has it left out of its requests.
    #[test]
    fn a_content_encoding_endpoint_header_is_refused() {
        for name in ["content-encoding", "Content-Encoding"] {
            let e = parse(&format!(
                "[[endpoints]]\nname = \"a\"\nurl = \"https://example.com/h\"\nheaders = {{ \"{name}\" = \"gzip\" }}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("endpoints[0].headers.{name}"))
                    && e.contains("describes the body"),
                "{e}"
            );
        }
        let stored: RawEndpoint = serde_json::from_value(serde_json::json!({
            "name": "a", "url": "https://example.com/h",
            "headers": {"Content-Encoding": "gzip", "x-tenant": "t"},
        }))
        .unwrap();
        assert!(check_limits(&stored, "").is_err());
        let built = build_endpoint(stored, "", &Config::defaults().delivery, &[]).unwrap();
        assert_eq!(built.headers.keys().collect::<Vec<_>>(), ["x-tenant"]);
    }

    /// An API endpoint's `tenant` and `description` are bounded, the field named.
    #[test]
    fn long_labels_are_refused_naming_the_field() {
        let long = "x".repeat(MAX_DESCRIPTION + 1);
        assert!(check_labels(Some(&long[..MAX_TENANT]), Some(&long[..MAX_DESCRIPTION])).is_ok());
        for (tenant, description, field) in [
            (Some(&long[..MAX_TENANT + 1]), None, "tenant"),
            (None, Some(long.as_str()), "description"),
        ] {
            match check_labels(tenant, description) {
                Err(ConfigError::Invalid { key, message }) => {
                    assert_eq!(key, field);
                    assert!(message.contains("at most"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// Whatever its type, the value at fault is named by its kind, not shown.
    #[test]
    fn a_structural_error_shows_no_value() {
        for (text, shown) in [
            (
                r#"invalid type: string "whsec_a\"b", expected a sequence"#,
                "invalid type: a string, expected a sequence",
            ),
            (
                "invalid type: integer `987654321`, expected a string",
                "invalid type: an integer, expected a string",
            ),
            (
                "invalid value: integer `-5`, expected u32",
                "invalid value: an integer, expected u32",
            ),
            (
                "invalid type: floating point `1.5`, expected a string",
                "invalid type: a floating point number, expected a string",
            ),
            (
                "invalid type: boolean `true`, expected a string",
                "invalid type: a boolean, expected a string",
            ),
            (
                "unknown field `grace_period`, expected `grace`",
                "unknown field `grace_period`, expected `grace`",
            ),
        ] {
            assert_eq!(structural_error(text), shown);
        }
        let e = parse(
            "[[endpoints]]\nname = \"a\"\nurl = \"https://example.com/h\"\nheaders = { \"x-api-key\" = 987654321 }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("987654321") && e.contains("an integer"), "{e}");
    }

    /// A value of the wrong type is named by its key, never shown: it may be a secret
    /// (read from the environment, too).
    #[test]
    fn a_value_of_the_wrong_type_is_not_shown_in_the_error() {
        let env = [("COURIER_TEST_WRONG_TYPE_SECRET", "whsec_FROMENV\"quoted")];
        let endpoint = "[[endpoints]]\nname = \"a\"\nurl = \"https://example.com/h\"\n";
        for (text, key) in [
            (
                format!("{endpoint}secrets = \"whsec_INLINESECRET\"\n"),
                "endpoints[0]",
            ),
            (
                format!("{endpoint}secrets = \"env:COURIER_TEST_WRONG_TYPE_SECRET\"\n"),
                "endpoints[0]",
            ),
            (
                format!("{endpoint}headers = \"Bearer HEADERSECRET\"\n"),
                "endpoints[0]",
            ),
            ("keys = [\"TOKENSECRET\"]\n".to_string(), "keys[0]"),
            ("server = \"SERVERSECRET\"\n".to_string(), "server"),
        ] {
            let e = with_env(&env, || parse(&text)).unwrap_err().to_string();
            for secret in ["SECRET", "FROMENV", "quoted"] {
                assert!(!e.contains(secret), "{text} → {e}");
            }
            assert!(e.contains(key) && e.contains("a string"), "{text} → {e}");
        }
        // A URL that is not one is shown without its password or query.
        let e = parse(
            "[[endpoints]]\nname = \"a\"\nurl = \"ftp://u:PASSWORD@example.com/h?k=QUERYSECRET\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("PASSWORD") && !e.contains("QUERYSECRET"), "{e}");
        assert!(e.contains("ftp://u:…@example.com/h?…"), "{e}");
    }

    /// A reload takes a `listen` written as before as the address it was resolved to, so a
    /// host name that does not resolve at that moment does not reject the file (only a
    /// restart applies `listen`); one written differently is resolved.
    #[test]
    fn a_reload_does_not_look_up_an_unchanged_listen_name_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("courier.toml");
        let text = "[server]\nlisten = \"courier-test-host.invalid:8080\"\n";
        let mut running = parse("[server]\nlisten = \"127.0.0.1:8081\"").unwrap();
        running.server.listen_text = "courier-test-host.invalid:8080".into();
        let c = Config::load_bytes_running(&path, text.as_bytes(), Some(&running)).unwrap();
        assert_eq!(c.server.listen, running.server.listen);
        let c = Config::load_bytes_running(
            &path,
            b"[server]\nlisten = \"127.0.0.1:9090\"\n",
            Some(&running),
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 9090);
    }

    /// A variable set to nothing is refused, naming the key and the variable: an empty
    /// header or plugin setting would otherwise go out as an empty credential.
    #[test]
    fn an_empty_environment_variable_is_refused() {
        let e = with_env(&[("COURIER_TEST_EMPTY_VAR", "")], || {
            parse(
                "[[endpoints]]\nname = \"a\"\nurl = \"https://example.com/h\"\nheaders = { authorization = \"env:COURIER_TEST_EMPTY_VAR\" }\n",
            )
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("endpoints[0].headers.authorization")
                && e.contains("environment variable COURIER_TEST_EMPTY_VAR is empty"),
            "{e}"
        );
    }

    /// `M` is months to the duration parser: refused rather than taken for minutes.
    #[test]
    fn a_capital_m_in_a_duration_is_refused() {
        let e = parse("[delivery]\ntimeout = \"5M\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("delivery.timeout") && e.contains("months"),
            "{e}"
        );
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(
            parse_duration("1month").map(|d| d > Duration::from_secs(86_400 * 28)),
            Ok(true)
        );
    }

    #[test]
    fn an_endpoint_on_a_private_address_is_warned_of_unless_private_networks_are_allowed() {
        let warned = |url: &str, allow: bool| {
            let text = format!(
                "[delivery]\nallow_private_networks = {allow}\n[[endpoints]]\nname = \"a\"\nurl = \"{url}\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n"
            );
            Config::parse(&text, Path::new("."), None, "t")
                .unwrap()
                .warnings()
                .into_iter()
                .any(|w| w.starts_with("endpoints[0].url:") && w.contains("ssrf_blocked"))
        };
        assert!(warned("http://127.0.0.1:9/h", false));
        assert!(warned("http://10.1.2.3/h", false));
        assert!(warned("http://localhost:8080/h", false));
        assert!(warned("http://[::1]:8080/h", false));
        assert!(!warned("http://127.0.0.1:9/h", true));
        assert!(!warned("https://hooks.example.com/h", false));
        assert!(!warned("http://93.184.216.34/h", false));
    }

    #[test]
    fn defaults_match_design() {
        let c = Config::defaults();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        let named = Config::parse(
            "[server]\nlisten = \"localhost:9000\"",
            Path::new("."),
            None,
            "t",
        )
        .unwrap();
        assert!(named.server.listen.ip().is_loopback());
        assert_eq!(named.server.listen.port(), 9000);
        // On port 0 the callback URL names the port bound, whatever spelling `listen` had;
        // a `public_url` set is kept as written.
        let bound: std::net::SocketAddr = "127.0.0.1:40123".parse().unwrap();
        for (text, want) in [
            (
                "[server]\nlisten = \"localhost:0\"",
                "http://127.0.0.1:40123",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:0\"",
                "http://127.0.0.1:40123",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://hooks.example\"",
                "https://hooks.example",
            ),
        ] {
            let mut c = Config::parse(text, Path::new("."), None, "t").unwrap();
            c.resolve_public_url(bound);
            assert_eq!(c.server.public_url, want, "{text}");
        }
        assert_eq!(c.delivery.schedule.len(), 8);
        assert_eq!(c.delivery.schedule[7], Duration::from_secs(7200));
        assert!(!c.delivery.allow_private_networks);
        assert_eq!(c.server.max_body_bytes, 1048576);
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
            [server]
            listen = "0.0.0.0:9000"
            data_dir = "data"
            [[keys]]
            token = "0123456789abcdef0123"
            scopes = ["ingest", "admin"]
            [delivery]
            timeout = "500ms"
            schedule = ["0s", "2m"]
            [[endpoints]]
            name = "app"
            url = "https://example.com/hook"
            secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
            event_types = ["order.*"]
            rate_limit = "100/s"
            headers = { "X-Tenant" = "acme" }
            "#,
        )
        .unwrap();
        assert_eq!(c.server.data_dir, Path::new("/etc/courier/data"));
        assert_eq!(c.delivery.timeout, Duration::from_millis(500));
        assert_eq!(c.endpoints[0].timeout, Duration::from_millis(500));
        assert_eq!(
            c.endpoints[0].schedule,
            vec![Duration::ZERO, Duration::from_secs(120)]
        );
        assert_eq!(c.endpoints[0].headers["x-tenant"], "acme");
        assert!(c.endpoints[0].subscribes("order.created"));
        assert!(!c.endpoints[0].subscribes("user.created"));
    }

    #[test]
    fn a_key_limited_by_lists_reaches_what_they_name() {
        let c = parse(
            "[[endpoints]]\nname = \"acme-a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"acme-a\"\nupstream = { url = \"http://u\" }\n[[keys]]\ntoken = \"0123456789abcdef\"\nscopes = [\"ingest\", \"callback\"]\nendpoints = [\"acme-*\", \"billing\"]\nworkflows = [\"w\"]\n[[keys]]\ntoken = \"fedcba9876543210\"\nscopes = [\"ingest\"]\nendpoints = []\n[[keys]]\ntoken = \"fedcba9876543211\"\nscopes = [\"ingest\"]\nendpoints = [\"acme-*\"]\n[[keys]]\ntoken = \"fedcba9876543212\"\nscopes = [\"ingest\"]\nworkflows = [\"w\"]\n",
        )
        .unwrap();
        let reach = c.keys[0].reach.as_ref().unwrap();
        assert!(
            reach.endpoint("acme-a") && reach.endpoint("acme-zzz") && reach.endpoint("billing")
        );
        assert!(!reach.endpoint("billing-2") && !reach.endpoint("globex"));
        assert!(reach.workflow("w", Some("globex")) && !reach.workflow("w2", Some("acme-a")));
        // An empty list reaches no endpoint, and without `workflows` no workflow either.
        let none = c.keys[1].reach.as_ref().unwrap();
        assert!(!none.endpoint("acme-a") && !none.workflow("w", Some("acme-a")));
        // `endpoints` alone: the workflows whose endpoint it reaches. `workflows` alone: no
        // endpoint directly.
        let by_endpoint = c.keys[2].reach.as_ref().unwrap();
        assert!(by_endpoint.workflow("w", Some("acme-a")));
        assert!(!by_endpoint.workflow("w", Some("globex")) && !by_endpoint.workflow("w", None));
        let by_workflow = c.keys[3].reach.as_ref().unwrap();
        assert!(by_workflow.workflow("w", Some("acme-a")) && !by_workflow.endpoint("acme-a"));
        // Without lists a key is not limited at all.
        let open =
            parse("[[keys]]\ntoken = \"0123456789abcdef\"\nscopes = [\"ingest\"]\n").unwrap();
        assert!(open.keys[0].reach.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[delivery]\ntimeout = \"soon\"", "delivery.timeout"),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\nheaders = { \"X-A\" = \"1\", \"x-a\" = \"2\" }",
                "endpoints[0].headers.",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\" }\nevent_name = \" \"",
                "workflows[0].event_name",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"ftp://x\"",
                "endpoints[0].url",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\nsecrets = [\"nope\"]",
                "endpoints[0].secrets[0]",
            ),
            (
                "[[keys]]\ntoken = \"0123456789abcdef\"\nscopes = [\"root\"]",
                "keys[0].scopes[0]",
            ),
            (
                "[[keys]]\ntoken = \"0123456789abcdef\"\nscopes = [\"ingest\", \"admin\"]\nendpoints = [\"a\"]",
                "keys[0].endpoints",
            ),
            (
                "[[keys]]\ntoken = \"0123456789abcdef\"\nscopes = [\"callback\"]\nendpoints = [\"a\"]",
                "keys[0].endpoints",
            ),
            (
                "[[keys]]\ntoken = \"0123456789abcdef\"\nscopes = [\"ingest\"]\nendpoints = [\"\"]",
                "keys[0].endpoints[0]",
            ),
            (
                "[[keys]]\ntoken = \"0123456789abcdef\"\nscopes = [\"callback\"]\nworkflows = [\"nope\"]",
                "keys[0].workflows[0]",
            ),
            ("[server]\nlisten = \"here\"", "server.listen"),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\ntimeout = \"300000000000y\"",
                "endpoints[0].timeout",
            ),
            (
                "[delivery]\nschedule = [\"0s\", \"11y\"]",
                "delivery.schedule[1]",
            ),
            ("[delivery]\nretention = \"0s\"", "delivery.retention"),
            (
                "[server]\npublic_url = \"hooks.example.com:8443\"",
                "server.public_url",
            ),
            (
                "[[plugins]]\nname = \"p\"\npath = \"p.wasm\"\nkind = \"transform\"\nlimits = { memory = \"17179869184G\" }",
                "plugins[0].limits.memory",
            ),
            (
                "[[plugins]]\nname = \"p\"\npath = \"p.wasm\"\nkind = \"transform\"\nlimits = { memory = \"1GiB\" }",
                "plugins[0].limits.memory",
            ),
            (
                "[[plugins]]\nname = \"p\"\npath = \"p.wasm\"\nkind = \"transform\"\nlimits = { fuel = 0 }",
                "plugins[0].limits.fuel",
            ),
            (
                "[server]\nmax_body_bytes = 2147483648",
                "server.max_body_bytes",
            ),
            ("[server]\nmax_body_bytes = 0", "server.max_body_bytes"),
            (
                "[delivery]\nschedule = [\"1s\", \"x\"]",
                "delivery.schedule[1]",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\nrate_limit = \"fast\"",
                "endpoints[0].rate_limit",
            ),
            (
                "[[keys]]\ntoken = \"env:COURIER_SURELY_UNSET_VAR\"\nscopes=[\"admin\"]",
                "keys[0].token",
            ),
            (
                "[[keys]]\ntoken = \"0123456789abcdef\"\nscopes=[\"admin\"]\n[[keys]]\ntoken = \"0123456789abcdef\"\nscopes=[\"ingest\"]",
                "keys[1].token: is the same token as keys[0]",
            ),
            (
                "[[keys]]\ntoken = \"0123456789abcdef\\n\"\nscopes=[\"admin\"]",
                "keys[0].token: contains whitespace",
            ),
            (
                "[delivery]\ncircuit_failures = 0",
                "delivery.circuit_failures",
            ),
            (
                "[delivery]\ncircuit_probe_interval = \"0s\"",
                "delivery.circuit_probe_interval: must be greater than 0",
            ),
            (
                "[server]\nmax_channel_subscribers = 0",
                "server.max_channel_subscribers: must be between 1 and 1000000",
            ),
            (
                "[server]\nheader_timeout = \"1ns\"",
                "server.header_timeout: must be at least 100ms",
            ),
            (
                "[server]\nbody_timeout = \"50ms\"",
                "server.body_timeout: must be at least 100ms",
            ),
            (
                "[server]\npublic_url = \"http://h.example/base?x=1\"",
                "server.public_url",
            ),
            ("[server]\ndata_dir = \" \"", "server.data_dir"),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\", timeout = \"0s\" }",
                "workflows[0].upstream.timeout: must be greater than 0",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\", retries = 11 }",
                "workflows[0].upstream.retries",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\" }\ncallback_timeout = \"0s\"",
                "workflows[0].callback_timeout",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\", headers = { \"bad name\" = \"v\" } }",
                "workflows[0].upstream.headers.bad name",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\", headers = { authorization = \"line\\nbreak\" } }",
                "workflows[0].upstream.headers.authorization",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\", max_in_flight = 0 }",
                "workflows[0].upstream.max_in_flight",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\", max_response = \"65MiB\" }",
                "workflows[0].upstream.max_response",
            ),
            (
                "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\", max_response = \"lots\" }",
                "workflows[0].upstream.max_response",
            ),
            (
                "[[plugins]]\nname = \"sim\"\npath = \"s.wasm\"\nkind = \"simulator\"\n[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[workflows]]\nname = \"w\"\nendpoint = \"a\"\nupstream = { url = \"http://u\" }\nsimulate = \"sim\"",
                "workflows[0].simulate",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(key), "{text:?}: {err}");
        }
        // A structural error names the entry, not just the table.
        let err = parse("[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\n[[endpoints]]\nname = \"b\"\nrate_limt = \"1/s\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("endpoints[1]") && err.contains("rate_limt"),
            "{err}"
        );
        // A syntax error says where, without quoting the line (it may hold a secret).
        let err = parse("[[keys]]\ntoken = \"supersecrettoken-123456\nscopes = []")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && !err.contains("supersecret"),
            "{err}"
        );
        // A password in a URL is not repeated in the error.
        let err =
            parse("[[endpoints]]\nname = \"a\"\nurl = \"https://user:hunter2@exa mple.com/h\"")
                .unwrap_err()
                .to_string();
        assert!(
            err.starts_with("endpoints[0].url") && !err.contains("hunter2"),
            "{err}"
        );
        // Ten years, as written with a year unit, is within the limit.
        assert!(parse("[delivery]\nretention = \"10y\"").is_ok());
        let err = parse("[delivery]\ntimout = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("timout"), "{err}");
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("order.*", "order.created"));
        assert!(!pattern_matches("order.*", "orders"));
        assert!(pattern_matches("order.created", "order.created"));
        assert!(!pattern_matches("order.created", "order.created.v2"));
        assert!(pattern_matches("order.*.v2", "order.created.v2"));
        assert!(!pattern_matches("order.*.v2", "order.created.v3"));
        assert!(pattern_matches("*.created", "order.created"));
        assert!(pattern_matches("a*b*c", "abc") && pattern_matches("a*b*c", "axxbyyc"));
        assert!(!pattern_matches("a*b*c", "axxbyy"));
    }

    /// Every pattern over `a`, `b`, `*` up to 6 long against every name over `a`, `b` up to
    /// 6 long, checked against a plain dynamic-programming matcher.
    #[test]
    fn patterns_match_as_a_reference_matcher_does() {
        fn reference(p: &[u8], n: &[u8]) -> bool {
            // m[i][j]: p[..i] matches n[..j].
            let mut m = vec![vec![false; n.len() + 1]; p.len() + 1];
            m[0][0] = true;
            for i in 1..=p.len() {
                for j in 0..=n.len() {
                    m[i][j] = if p[i - 1] == b'*' {
                        m[i - 1][j] || (j > 0 && m[i][j - 1])
                    } else {
                        j > 0 && m[i - 1][j - 1] && p[i - 1] == n[j - 1]
                    };
                }
            }
            m[p.len()][n.len()]
        }
        fn all(alphabet: &[u8], max: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|s| alphabet.iter().map(move |&c| format!("{s}{}", c as char)))
                    .collect();
                out.extend(last.iter().cloned());
            }
            out
        }
        let (patterns, names) = (all(b"ab*", 6), all(b"ab", 6));
        for p in &patterns {
            for n in &names {
                assert_eq!(
                    pattern_matches(p, n),
                    reference(p.as_bytes(), n.as_bytes()),
                    "{p:?} against {n:?}"
                );
            }
        }
        // A pattern that makes a backtracking matcher take ~10^12 steps.
        let stars = format!("{}x", "*".repeat(40));
        assert!(!pattern_matches(&stars, "order.created"));
        assert!(pattern_matches(&stars, "order.createx"));
        // Patterns are bounded like event types.
        let long = format!(
            "[[endpoints]]\nname = \"a\"\nurl = \"http://x\"\nevent_types = [\"{}\"]",
            "a".repeat(257)
        );
        let err = parse(&long).unwrap_err().to_string();
        assert!(err.starts_with("endpoints[0].event_types[0]"), "{err}");
    }
}
