//! WebAssembly plugins: the registry of loaded plugins, hot reload of their files, and the
//! calls the delivery path makes (transform chain, backoff policy, callback simulator).
//!
//! The WIT contract is in `wit/plugin.wit`; [`host`] runs components. Calls are synchronous
//! and CPU-bound: async callers run them on the blocking pool (WASI's sync bindings must not
//! run on an async worker). Loaded plugins sit in an
//! `ArcSwap` map: a call takes the current version and keeps it alive for its duration, so a
//! reload swaps atomically and calls in flight finish on the version they started with.

pub mod host;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::config::{PluginConfig, PluginKind};
use crate::model::now_ms;
use crate::observe::Metrics;
use host::{Host, Limits, Loaded};

pub use host::{AttemptInfo, BackoffDecision, Header, Request, TransformOutcome};

/// Plugin errors at the module boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("the WebAssembly engine could not start: {0}")]
    Engine(String),
    #[error("plugin `{0}` is not loaded")]
    NotLoaded(String),
    #[error("plugin `{plugin}` is not a {kind} plugin")]
    WrongKind { plugin: String, kind: &'static str },
    #[error("plugin `{plugin}` failed ({class}): {detail}")]
    Call {
        plugin: String,
        /// `plugin_trap`, `plugin_timeout`, `plugin_fuel`, `plugin_memory`, `plugin_error`.
        class: &'static str,
        detail: String,
    },
}

impl PluginError {
    /// The error class recorded in the audit trail.
    pub fn class(&self) -> &'static str {
        match self {
            PluginError::Engine(_) | PluginError::NotLoaded(_) | PluginError::WrongKind { .. } => {
                "plugin_missing"
            }
            PluginError::Call { class, .. } => class,
        }
    }
}

/// What `courier check` and the API report about a plugin.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub name: String,
    pub kind: String,
    pub path: PathBuf,
    /// Increases with every successfully loaded file version (0 = never loaded).
    pub version: u64,
    pub sha256: Option<String>,
    pub loaded_at_ms: Option<u64>,
    pub loads_ok: u64,
    pub loads_failed: u64,
    pub last_error: Option<String>,
    /// The sha256 of the file that last failed to load: a file looked at again unchanged
    /// (an event and the poll both report a change, say) is not compiled and reported again.
    #[serde(skip)]
    pub failed_sha256: Option<String>,
}

/// The result of a transform chain.
pub enum Transformed {
    Send(crate::deliver::Outgoing),
    Drop(String),
}

/// Every loaded plugin.
#[derive(Default)]
pub struct Plugins {
    host: OnceLock<Result<Host, PluginError>>,
    loaded: ArcSwap<HashMap<String, Arc<Loaded>>>,
    status: Mutex<BTreeMap<String, Status>>,
    /// The status of plugins no longer listed but still loaded (see
    /// [`Plugins::forget_unconfigured`]), listed again if a configuration names them before
    /// they are unloaded.
    forgotten: Mutex<BTreeMap<String, Status>>,
    /// The file watcher, replaced when the set of plugin files changes.
    watcher: Mutex<Option<crate::watch::Watch>>,
    /// Plugin files whose directory did not exist when the watcher was made.
    unwatched: Mutex<Vec<PathBuf>>,
    /// The files the watcher watches.
    watched: Mutex<Vec<PathBuf>>,
    watch_tx: Mutex<Option<tokio::sync::mpsc::UnboundedSender<PathBuf>>>,
    /// Held while the registry changes (a configuration's plugin set, or one file's reload):
    /// each reads the current map and stores a new one, so two at once would undo each other.
    changes: Mutex<()>,
    /// Blocking threads plugin calls may hold at once (see [`Plugins::on_thread`]).
    threads: CallThreads,
}

/// Plugins compiled for a configuration, not yet live (see [`Plugins::stage`]).
pub struct Staged {
    next: HashMap<String, Arc<Loaded>>,
    fresh: Vec<String>,
    configs: Vec<PluginConfig>,
}

/// As many permits as the host has call slots: a call that would only wait for a slot waits
/// here, on the async side, holding no thread.
struct CallThreads(Arc<tokio::sync::Semaphore>);

impl Default for CallThreads {
    fn default() -> Self {
        CallThreads(Arc::new(tokio::sync::Semaphore::new(
            host::MAX_CONCURRENT_CALLS,
        )))
    }
}

fn kind_name(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Transform => "transform",
        PluginKind::Backoff => "backoff",
        PluginKind::Simulator => "simulator",
    }
}

fn config_table(cfg: &PluginConfig) -> Vec<(String, String)> {
    cfg.config
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Plugins {
    /// The engine, created on first use so that a courier without plugins never pays for it.
    fn host(&self) -> Result<&Host, PluginError> {
        self.host
            .get_or_init(Host::new)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Runs `f` — plugin calls — on one of tokio's blocking threads once fewer than
    /// [`host::MAX_CONCURRENT_CALLS`] such threads are running plugin calls.
    ///
    /// Why not `spawn_blocking` alone: calls beyond the host's slots would each park a
    /// blocking thread while they wait for one. A slow or looping plugin with hundreds of
    /// attempts in flight would then fill the pool, and what else runs there — the delivery
    /// client's DNS lookups, reloads, stats — would queue behind it, failing other endpoints'
    /// attempts. The permit goes with the closure, so a caller that gives up does not free
    /// it while the call still runs.
    pub async fn on_thread<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, tokio::task::JoinError> {
        let permit = self
            .threads
            .0
            .clone()
            .acquire_owned()
            .await
            .expect("the plugin call semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let result = f();
            drop(permit);
            result
        })
        .await
    }

    pub fn get(&self, name: &str) -> Option<Arc<Loaded>> {
        self.loaded.load().get(name).cloned()
    }

    /// The loaded plugin `name` if it is of `kind`: a plugin of another kind cannot be
    /// called as this one, so it counts as not loaded.
    fn get_kind(&self, name: &str, kind: PluginKind) -> Result<Arc<Loaded>, PluginError> {
        let plugin = self
            .get(name)
            .ok_or_else(|| PluginError::NotLoaded(name.to_string()))?;
        if plugin.kind != kind {
            return Err(PluginError::WrongKind {
                plugin: name.to_string(),
                kind: kind_name(kind),
            });
        }
        Ok(plugin)
    }

    pub fn status(&self) -> Vec<Status> {
        self.status
            .lock()
            .expect("plugin status")
            .values()
            .cloned()
            .collect()
    }

    /// Compiles one plugin file. Pure: changes nothing in the registry.
    fn compile(&self, cfg: &PluginConfig, version: u64) -> Result<Loaded, String> {
        self.compile_from(cfg, version, std::fs::read(&cfg.path))
    }

    /// Compiles the bytes read from a plugin's file.
    fn compile_from(
        &self,
        cfg: &PluginConfig,
        version: u64,
        bytes: std::io::Result<Vec<u8>>,
    ) -> Result<Loaded, String> {
        let bytes = bytes.map_err(|e| format!("cannot read {}: {e}", cfg.path.display()))?;
        let limits = Limits::of(cfg);
        let host = self.host().map_err(|e| e.to_string())?;
        let name: Arc<str> = cfg.name.as_str().into();
        let config = Arc::new(config_table(cfg));
        let template = host
            .compile(cfg.kind, &bytes, limits, name.clone(), config.clone())
            .map_err(|e| format!("{}: {e}", cfg.path.display()))?;
        Ok(Loaded {
            name,
            kind: cfg.kind,
            template,
            config,
            limits,
            sha256: hex::encode(Sha256::digest(&bytes)),
            version,
            loaded_at_ms: now_ms(),
        })
    }

    fn unchanged(current: &Loaded, cfg: &PluginConfig) -> bool {
        current.kind == cfg.kind
            && current.limits == Limits::of(cfg)
            && *current.config == config_table(cfg)
            && std::fs::read(&cfg.path)
                .map(|b| hex::encode(Sha256::digest(&b)) == current.sha256)
                .unwrap_or(false)
    }

    /// Loads the plugin set of a configuration, all or nothing: if any new or changed plugin
    /// fails to load, nothing changes and every failure is returned. Used at start-up and
    /// before a new configuration is applied.
    ///
    /// Plugins the new set no longer names stay loaded: the running configuration may still
    /// call them until the new one is in place, and attempts begun under it a moment longer
    /// ([`Plugins::RETIRE_GRACE`]), after which [`Plugins::retire_unconfigured`] removes
    /// them. (Unloading them first would fail those calls as `plugin_missing`.)
    pub fn load_all(&self, configs: &[PluginConfig], metrics: &Metrics) -> Result<(), Vec<String>> {
        let staged = self.stage(configs, metrics)?;
        self.publish(staged, metrics);
        Ok(())
    }

    /// The first half of [`Plugins::load_all`]: compiles what `configs` name that is not
    /// loaded as it is, and reports every failure, without making anything live. A reload
    /// publishes the result with its configuration, so that no call made under the running
    /// one meets a plugin changed for the next (a transform made a backoff, say). Whoever
    /// stages holds what keeps the set of plugins from changing until it publishes (the
    /// reload lock).
    pub fn stage(
        &self,
        configs: &[PluginConfig],
        metrics: &Metrics,
    ) -> Result<Staged, Vec<String>> {
        let _changing = self.changes.lock().expect("plugin changes");
        let current = self.loaded.load_full();
        let mut next = HashMap::new();
        let mut errors = Vec::new();
        let mut fresh = Vec::new();
        for cfg in configs {
            if let Some(cur) = current.get(&cfg.name)
                && cur.kind == cfg.kind
                && Self::unchanged(cur, cfg)
            {
                next.insert(cfg.name.clone(), cur.clone());
                continue;
            }
            let version = current.get(&cfg.name).map_or(0, |c| c.version) + 1;
            match self.compile(cfg, version) {
                Ok(l) => {
                    fresh.push(cfg.name.clone());
                    next.insert(cfg.name.clone(), Arc::new(l));
                }
                Err(e) => {
                    self.record_failure(cfg, &e, metrics);
                    errors.push(format!("plugins: {}: {e}", cfg.name));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Staged {
            next,
            fresh,
            configs: configs.to_vec(),
        })
    }

    /// Makes what [`Plugins::stage`] compiled live, keeping loaded every plugin it does not
    /// name (see [`Plugins::load_all`]).
    pub fn publish(&self, staged: Staged, metrics: &Metrics) {
        let _changing = self.changes.lock().expect("plugin changes");
        let Staged {
            mut next,
            fresh,
            configs,
        } = staged;
        let current = self.loaded.load_full();
        let mut status = self.status.lock().expect("plugin status");
        let mut forgotten = self.forgotten.lock().expect("plugin status");
        for cfg in &configs {
            // Named again while still loaded: listed again as it was.
            if let Some(st) = forgotten.remove(&cfg.name) {
                status.entry(cfg.name.clone()).or_insert(st);
            }
        }
        drop(forgotten);
        for name in fresh {
            let l = &next[&name];
            let cfg = configs.iter().find(|c| c.name == name).expect("configured");
            record_success(&mut status, cfg, l, metrics);
        }
        // A plugin kept as it was (the same bytes, kind, limits and config) may now be named
        // by another path: the status shows the file the configuration names.
        for cfg in &configs {
            if let Some(st) = status.get_mut(&cfg.name) {
                st.path = cfg.path.clone();
            }
        }
        drop(status);
        for (name, old) in current.iter() {
            next.entry(name.clone()).or_insert_with(|| old.clone());
        }
        self.loaded.store(Arc::new(next));
    }

    /// How long a plugin the running configuration no longer names stays loaded: an attempt
    /// that took its endpoint's definition just before a reload may still call it (its
    /// transforms run right after), and should not fail as `plugin_missing` for it.
    pub const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

    /// Stops reporting the plugins `configs` does not name, once the configuration that
    /// dropped them is the running one; they stay callable until
    /// [`Plugins::retire_unconfigured`] (see [`Plugins::RETIRE_GRACE`]).
    pub fn forget_unconfigured(&self, configs: &[PluginConfig]) {
        let _changing = self.changes.lock().expect("plugin changes");
        let mut status = self.status.lock().expect("plugin status");
        let (named, gone): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut *status)
            .into_iter()
            .partition(|(name, _)| configs.iter().any(|c| c.name == *name));
        *status = named;
        self.forgotten.lock().expect("plugin status").extend(gone);
    }

    /// Unloads the plugins `configs` does not name (and stops reporting them).
    pub fn retire_unconfigured(&self, configs: &[PluginConfig]) {
        self.forget_unconfigured(configs);
        let _changing = self.changes.lock().expect("plugin changes");
        let named = |name: &str| configs.iter().any(|c| c.name == name);
        self.forgotten
            .lock()
            .expect("plugin status")
            .retain(|name, _| named(name));
        let current = self.loaded.load_full();
        if current.keys().all(|n| named(n)) {
            return;
        }
        let next = current
            .iter()
            .filter(|(n, _)| named(n))
            .map(|(n, l)| (n.clone(), l.clone()))
            .collect();
        self.loaded.store(Arc::new(next));
    }

    /// Reloads one plugin after its file changed. A file that fails to load (or is gone)
    /// leaves the previous version serving; the failure is logged, counted and reported.
    /// Reloads one plugin from its file; `force` (SIGHUP) tries again a file that failed
    /// before, unchanged.
    pub fn reload_file(&self, cfg: &PluginConfig, metrics: &Metrics, force: bool) {
        let _changing = self.changes.lock().expect("plugin changes");
        let current = self.get(&cfg.name);
        if current.as_ref().is_some_and(|c| Self::unchanged(c, cfg)) {
            // The file is back to the version that serves (a bad file replaced by the good
            // one again): an error reported meanwhile no longer applies.
            if let Some(st) = self
                .status
                .lock()
                .expect("plugin status")
                .get_mut(&cfg.name)
                && st.failed_sha256.take().is_some() | st.last_error.take().is_some()
            {
                tracing::info!(plugin = %cfg.name, "plugin file restored to the version serving");
            }
            return;
        }
        let bytes = std::fs::read(&cfg.path);
        let sha = bytes.as_ref().ok().map(|b| hex::encode(Sha256::digest(b)));
        let failed_before = self
            .status
            .lock()
            .expect("plugin status")
            .get(&cfg.name)
            .and_then(|st| st.failed_sha256.clone());
        if !force && sha.is_some() && sha == failed_before {
            return;
        }
        let version = current.as_ref().map_or(0, |c| c.version) + 1;
        match self.compile_from(cfg, version, bytes) {
            Ok(l) => {
                let l = Arc::new(l);
                let mut map = (*self.loaded.load_full()).clone();
                map.insert(cfg.name.clone(), l.clone());
                self.loaded.store(Arc::new(map));
                record_success(
                    &mut self.status.lock().expect("plugin status"),
                    cfg,
                    &l,
                    metrics,
                );
                tracing::info!(plugin = %cfg.name, version = l.version, sha256 = %l.sha256, "plugin reloaded");
            }
            Err(e) => {
                self.record_failure(cfg, &e, metrics);
                // A file that found the pool full is not at fault: the next look tries it
                // again.
                let busy = e.contains(host::POOL_FULL);
                if let Some(st) = self
                    .status
                    .lock()
                    .expect("plugin status")
                    .get_mut(&cfg.name)
                {
                    st.failed_sha256 = if busy { None } else { sha };
                }
            }
        }
    }

    fn record_failure(&self, cfg: &PluginConfig, error: &str, metrics: &Metrics) {
        let mut status = self.status.lock().expect("plugin status");
        let st = status.entry(cfg.name.clone()).or_insert_with(|| Status {
            name: cfg.name.clone(),
            kind: kind_name(cfg.kind).into(),
            path: cfg.path.clone(),
            ..Status::default()
        });
        st.loads_failed += 1;
        st.last_error = Some(error.to_string());
        metrics
            .plugin_loads
            .get_or_create(&vec![
                ("plugin", cfg.name.clone()),
                ("result", "error".into()),
            ])
            .inc();
        let serving = self.get(&cfg.name).map(|l| l.version);
        tracing::error!(plugin = %cfg.name, error, serving_version = ?serving, "plugin failed to load; the previous version (if any) keeps serving");
    }

    /// Runs an endpoint's transform chain in order.
    pub fn run_transforms(
        &self,
        metrics: &Metrics,
        names: &[String],
        mut out: crate::deliver::Outgoing,
        ctx: &TransformContext,
    ) -> Result<Transformed, PluginError> {
        if names.is_empty() {
            return Ok(Transformed::Send(out));
        }
        let host = self.host()?;
        // A body may grow to twice what came in as well as to twice the ingest limit: a
        // workflow's webhook carries an upstream answer of up to `upstream.max_response`,
        // which may be larger than `server.max_body_bytes`.
        let max_body = ctx.max_body.max(out.body.len().saturating_mul(2));
        // Headers courier owns that are already set (a workflow delivery's `mr-channel-id`):
        // a plugin sees them but cannot change or remove them.
        let owned: Vec<(String, String)> = out
            .headers
            .iter()
            .filter(|(n, _)| is_owned(n))
            .cloned()
            .collect();
        for name in names {
            let plugin = self.get_kind(name, PluginKind::Transform)?;
            let req = Request {
                endpoint: ctx.endpoint.clone(),
                event_type: ctx.event_type.clone(),
                event_id: ctx.event_id.clone(),
                timestamp: ctx.timestamp.clone(),
                headers: out
                    .headers
                    .iter()
                    .map(|(n, v)| Header {
                        name: n.clone(),
                        value: v.clone(),
                    })
                    .collect(),
                body: std::mem::take(&mut out.body),
            };
            let outcome = observe_call(metrics, name, || {
                plugin
                    .transform(host, &req)?
                    .map_err(|detail| PluginError::Call {
                        plugin: name.clone(),
                        class: "plugin_error",
                        detail,
                    })
                    .and_then(|o| {
                        if let TransformOutcome::Send(r) = &o {
                            check_output(name, r, max_body)?;
                        }
                        Ok(o)
                    })
            })?;
            match outcome {
                TransformOutcome::Send(r) => {
                    out.body = r.body;
                    out.headers = r
                        .headers
                        .into_iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value))
                        .filter(|(n, _)| !is_owned(n))
                        .chain(owned.iter().cloned())
                        .collect();
                }
                TransformOutcome::Drop(reason) => {
                    return Ok(Transformed::Drop(format!("{name}: {reason}")));
                }
            }
        }
        Ok(Transformed::Send(out))
    }

    /// Asks a backoff plugin when to retry.
    /// The backoff plugin `name` as loaded now: taken when an attempt starts, so that the
    /// attempt's retry is decided by the version it started under, even if a reload retires
    /// that version while the attempt waits for its answer.
    pub fn backoff(&self, name: &str) -> Result<Arc<Loaded>, PluginError> {
        self.get_kind(name, PluginKind::Backoff)
    }

    /// Asks the backoff plugin `name` (as [`Plugins::backoff`] found it) for the next delay.
    pub fn next_delay(
        &self,
        metrics: &Metrics,
        name: &str,
        plugin: Result<Arc<Loaded>, PluginError>,
        info: &AttemptInfo,
    ) -> Result<BackoffDecision, PluginError> {
        observe_call(metrics, name, || {
            let plugin = plugin?;
            plugin.next_delay(self.host()?, info)
        })
    }

    /// Runs a callback simulator on a message (JSON text); returns the callback body.
    pub fn simulate(
        &self,
        metrics: &Metrics,
        name: &str,
        message: &str,
    ) -> Result<String, PluginError> {
        let host = self.host()?;
        let plugin = self.get_kind(name, PluginKind::Simulator)?;
        observe_call(metrics, name, || {
            plugin
                .simulate(host, message)?
                .map_err(|detail| PluginError::Call {
                    plugin: name.to_string(),
                    class: "plugin_error",
                    detail,
                })
        })
    }
}

/// Most headers a transform may return.
const MAX_TRANSFORM_HEADERS: usize = 100;

/// A transform's headers must be valid HTTP, few and of a size config headers may have, and
/// its body within `max_body`: anything else fails the call (audited and retried as a
/// `plugin_error`) rather than being dropped silently or sent at all.
fn check_output(plugin: &str, r: &Request, max_body: usize) -> Result<(), PluginError> {
    let fail = |detail: String| PluginError::Call {
        plugin: plugin.to_string(),
        class: "plugin_error",
        detail,
    };
    // What a transform returns is sent as it is, with every retry: held to what the
    // configuration's own headers are held to, and to a body a receiver can be asked to take.
    if r.body.len() > max_body {
        return Err(fail(format!(
            "returned a body of {} bytes; at most {max_body} are allowed (twice server.max_body_bytes, or twice the body it was given)",
            r.body.len()
        )));
    }
    let headers = &r.headers;
    if headers.len() > MAX_TRANSFORM_HEADERS {
        return Err(fail(format!(
            "returned {} headers; at most {MAX_TRANSFORM_HEADERS} are allowed",
            headers.len()
        )));
    }
    for h in headers {
        if !crate::config::valid_header(&h.name, &h.value) {
            return Err(fail(format!(
                "returned the header `{}`, which is not valid HTTP",
                h.name.escape_debug()
            )));
        }
        if h.value.len() > crate::config::MAX_HEADER_VALUE {
            return Err(fail(format!(
                "returned the header `{}` with a value of {} bytes; at most {} are allowed",
                h.name,
                h.value.len(),
                crate::config::MAX_HEADER_VALUE
            )));
        }
    }
    Ok(())
}

/// What a transform sees besides the request itself.
pub struct TransformContext {
    pub endpoint: String,
    pub event_type: String,
    pub event_id: String,
    pub timestamp: String,
    /// The largest body a transform may return (or twice the body it is given, if more).
    pub max_body: usize,
}

fn record_success(
    status: &mut BTreeMap<String, Status>,
    cfg: &PluginConfig,
    l: &Loaded,
    metrics: &Metrics,
) {
    let st = status.entry(cfg.name.clone()).or_default();
    st.name = cfg.name.clone();
    st.kind = kind_name(cfg.kind).into();
    st.path = cfg.path.clone();
    st.version = l.version;
    st.sha256 = Some(l.sha256.clone());
    st.loaded_at_ms = Some(l.loaded_at_ms);
    st.loads_ok += 1;
    st.last_error = None;
    st.failed_sha256 = None;
    metrics
        .plugin_loads
        .get_or_create(&vec![("plugin", cfg.name.clone()), ("result", "ok".into())])
        .inc();
    // Every result's series is there from the plugin's first load, at 0: an alert on errors
    // has a series to watch before the first one.
    let _ = metrics.plugin_loads.get_or_create(&vec![
        ("plugin", cfg.name.clone()),
        ("result", "error".into()),
    ]);
    for result in ["ok", "error"] {
        let _ = metrics.plugin_calls.get_or_create(&vec![
            ("plugin", cfg.name.clone()),
            ("result", result.into()),
        ]);
    }
}

/// Times a call and counts its result; the one place plugin calls are logged and measured.
fn observe_call<R>(
    metrics: &Metrics,
    name: &str,
    f: impl FnOnce() -> Result<R, PluginError>,
) -> Result<R, PluginError> {
    let started = Instant::now();
    let result = f();
    metrics
        .plugin_call_duration
        .get_or_create(&vec![("plugin", name.to_string())])
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            metrics
                .plugin_calls
                .get_or_create(&vec![("plugin", name.to_string()), ("result", "ok".into())])
                .inc();
        }
        Err(e) => {
            metrics
                .plugin_calls
                .get_or_create(&vec![
                    ("plugin", name.to_string()),
                    ("result", "error".into()),
                ])
                .inc();
            tracing::warn!(plugin = name, class = e.class(), error = %e, "plugin call failed");
        }
    }
    result
}

/// Checks that every plugin of a configuration loads (for `courier check`).
pub fn check(configs: &[PluginConfig]) -> Result<(), Vec<String>> {
    Plugins::default().load_all(configs, &Metrics::new())
}

/// Starts the task that reloads plugins whose files change, and the first watcher.
pub fn start_watching(app: &Arc<crate::app::App>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    *app.plugins.watch_tx.lock().expect("watch tx") = Some(tx.clone());
    rewatch(app);
    // A directory named before it exists (a config deployed ahead of its plugins) is looked
    // for until it appears; then it is watched and its files are taken as changed.
    let poller = app.clone();
    app.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(crate::watch::MISSING_DIR_POLL) => {}
                _ = poller.shutdown.cancelled() => return,
            }
            let waiting = poller.plugins.unwatched.lock().expect("unwatched").clone();
            let found = crate::watch::appeared(&waiting);
            if found.is_empty() {
                continue;
            }
            rewatch(&poller);
            for f in found {
                let _ = tx.send(f);
            }
        }
    });
    let app2 = app.clone();
    app.tasks.spawn(async move {
        loop {
            let batch = tokio::select! {
                b = crate::watch::next_batch(&mut rx) => match b { Some(b) => b, None => return },
                _ = app2.shutdown.cancelled() => return,
            };
            let app3 = app2.clone();
            // Compilation is CPU work: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || {
                reload_files(&app3, |p| batch.contains(p), false);
                // A configuration rejected because of one of these files gets another try.
                let retry = app3
                    .reload_status
                    .lock()
                    .expect("status lock")
                    .rejected_plugins
                    .iter()
                    .any(|p| batch.contains(p));
                if retry {
                    crate::reload::reload(&app3, true);
                }
            })
            .await;
        }
    });
}

/// Reloads the active configuration's plugins whose path `changed` selects. Blocking. Runs
/// under the reload lock, so the configuration cannot change between reading a plugin's
/// entry and storing what its file compiled to.
pub fn reload_files(
    app: &crate::app::App,
    changed: impl Fn(&std::path::Path) -> bool,
    force: bool,
) {
    let _one_at_a_time = app.reloading.lock().expect("reload lock");
    let config = app.config.load();
    for cfg in config.plugins.iter().filter(|p| changed(&p.path)) {
        app.plugins.reload_file(cfg, &app.metrics, force);
    }
}

/// Watches the files of the active configuration's plugins, and those of the last rejected
/// one (after a config change or rejection).
pub fn rewatch(app: &Arc<crate::app::App>) {
    let config = app.config.load();
    if !config.server.watch {
        return;
    }
    let mut paths: Vec<PathBuf> = config.plugins.iter().map(|p| p.path.clone()).collect();
    let rejected_looks = {
        let st = app.reload_status.lock().expect("status lock");
        for p in &st.rejected_plugins {
            if !paths.contains(p) {
                paths.push(p.clone());
            }
        }
        st.rejected_looks.clone()
    };
    let Some(tx) = app.plugins.watch_tx.lock().expect("watch tx").clone() else {
        return;
    };
    // A file the running configuration newly names may have been written after that
    // configuration was read (while its other plugins compiled, say) and before this watch:
    // looked at once. (Only new ones, and only the running configuration's: a rejected
    // configuration's files are watched again after each retry, and sending them would
    // retry it again for nothing. Theirs are watched from the looks the rejected load took
    // before reading them, so that one changed since is sent at the first poll.)
    let before = std::mem::replace(
        &mut *app.plugins.watched.lock().expect("watched"),
        paths.clone(),
    );
    for p in config
        .plugins
        .iter()
        .map(|p| &p.path)
        .filter(|p| !before.contains(p) && p.exists())
    {
        let _ = tx.send(p.clone());
    }
    let (watcher, unwatched) = if paths.is_empty() {
        (None, Vec::new())
    } else {
        match crate::watch::watch_files_since(&paths, &rejected_looks, tx) {
            Ok((w, unwatched)) => {
                for f in &unwatched {
                    tracing::warn!(path = %f.display(), "the plugin file's directory does not exist; it is watched once it does");
                }
                (Some(w), unwatched)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch plugin files; they will not hot-reload");
                (None, Vec::new())
            }
        }
    };
    *app.plugins.watcher.lock().expect("watcher") = watcher;
    *app.plugins.unwatched.lock().expect("unwatched") = unwatched;
}

/// Whether courier sets header `name` itself, so that a transform's value for it is ignored
/// (all the reserved headers but `content-type`, which a transform may change with the body).
fn is_owned(name: &str) -> bool {
    name != "content-type" && crate::config::RESERVED_HEADERS.contains(&name)
}
