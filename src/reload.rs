//! Configuration hot reload: the config file is watched (and SIGHUP also reloads); a changed
//! file is parsed and validated in full and, only if valid, swapped in atomically.
//!
//! Why watch the directory and not the file: editors and `cp`/`mv` replace files by writing a
//! temporary file and renaming it, which a watch on the old inode never sees. Events are only
//! hints: after a quiet period the file is re-read, and unchanged content (by hash) is
//! skipped. An invalid file changes nothing; the running config keeps serving.

use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::app::{self, App};
use crate::config::Config;
use crate::deliver::client;
use crate::model::now_ms;
use crate::scheduler::Scheduler;

/// What `GET /v1/config/status` reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    /// Increases by one with every configuration applied (1 = the one loaded at start).
    pub version: u64,
    /// Keys the applied file changed that only a restart applies (the running values stay).
    pub restart_needed: Vec<String>,
    pub loaded_at_ms: u64,
    pub source: Option<PathBuf>,
    pub sha256: Option<String>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// The last rejected file's error, until a valid file is applied.
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    /// The last rejected file's hash: the same bad content is not reported again and again.
    #[serde(skip)]
    pub rejected_sha256: Option<String>,
    /// The plugin files the last rejected configuration named: they are watched too, so that
    /// a configuration rejected because a plugin file was missing or broken is tried again
    /// when that file is fixed.
    #[serde(skip)]
    pub rejected_plugins: Vec<PathBuf>,
    /// Those files as the rejected load found them (looked at before it read them): their
    /// watch starts from these looks, so that a file fixed while the load ran, before the
    /// watch began, still brings another try.
    #[serde(skip)]
    pub rejected_looks: Vec<(PathBuf, Option<crate::watch::Look>)>,
}

fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Initial status for the configuration courier started with.
pub fn initial_status(config: &Config) -> Status {
    Status {
        version: 1,
        loaded_at_ms: now_ms(),
        source: config.source.clone(),
        // The bytes that were parsed: a file changed while courier started is then
        // different from the running configuration, and the first look at it applies it.
        sha256: config.source_sha256.clone(),
        ..Status::default()
    }
}

/// Starts watching the config file (if courier was started from one) and SIGHUP.
pub fn start(app: &Arc<App>) {
    // Installed in any case: without a handler, SIGHUP would end the process.
    on_sighup(app);
    let Some(path) = app.config.load().source.clone() else {
        return;
    };
    let (tx, rx) = mpsc::unbounded_channel::<PathBuf>();
    let watched = if app.config.load().server.watch {
        let watched = crate::watch::watch_files(std::slice::from_ref(&path), tx.clone());
        // The file may have changed while courier started, before this watch: it is
        // compared once with what courier parsed.
        let _ = tx.send(path.clone());
        watched
    } else {
        tracing::info!("server.watch = false: reload the configuration with SIGHUP");
        Err(notify::Error::generic("disabled by server.watch = false"))
    };
    match watched {
        Ok((watcher, _)) => {
            let app2 = app.clone();
            app.tasks.spawn(async move {
                // The watcher lives as long as this task.
                let _watcher = watcher;
                debounce(app2, rx).await;
            });
        }
        Err(_) if !app.config.load().server.watch => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch the config file; reload with SIGHUP")
        }
    }
}

/// SIGHUP reloads the config file and every plugin file; with no config file (embedded
/// defaults) it is logged as having nothing to reload.
fn on_sighup(app: &Arc<App>) {
    #[cfg(unix)]
    {
        let app2 = app.clone();
        app.tasks.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        if app2.config.load().source.is_none() {
                            tracing::info!("SIGHUP: courier runs on its embedded defaults (no config file): nothing to reload");
                            continue;
                        }
                        tracing::info!("SIGHUP: reloading the configuration and plugins");
                        let app3 = app2.clone();
                        // Reading files and compiling plugins is blocking work.
                        let _ = tokio::task::spawn_blocking(move || {
                            reload(&app3, true);
                            crate::plugins::reload_files(&app3, |_| true, true);
                        })
                        .await;
                    }
                    _ = app2.shutdown.cancelled() => return,
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = app;
}

async fn debounce(app: Arc<App>, mut rx: mpsc::UnboundedReceiver<PathBuf>) {
    loop {
        tokio::select! {
            batch = crate::watch::next_batch(&mut rx) => if batch.is_none() { return },
            _ = app.shutdown.cancelled() => return,
        }
        let app2 = app.clone();
        // Reading the file and compiling plugins is blocking work.
        let _ = tokio::task::spawn_blocking(move || reload(&app2, false)).await;
    }
}

/// Re-reads the config file and applies it if valid. `force` applies even unchanged content
/// (SIGHUP: an operator's explicit ask, which also reloads every plugin file; `env:` values
/// come from the environment courier started with, so they cannot have changed). Blocking.
pub fn reload(app: &Arc<App>, force: bool) {
    let _one_at_a_time = app.reloading.lock().expect("reload lock");
    // Stopping: a reload now (compiling plugins, say) could outlast the tasks the shutdown
    // waits for, and would configure what is being taken down.
    if app.shutdown.is_cancelled() {
        return;
    }
    // No API endpoint is made or changed meanwhile: the new configuration is checked against
    // the API endpoints (their transforms must still exist), and one built against the old
    // configuration but installed after that check would escape it.
    let _no_endpoint_changes = app.endpoints.changes.blocking_lock();
    let Some(path) = app
        .reload_status
        .lock()
        .expect("status lock")
        .source
        .clone()
    else {
        return;
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            // Mid-rename or deleted: keep serving; a later event will bring it back.
            tracing::warn!(path = %path.display(), error = %e, "config file unreadable; keeping the running configuration");
            return;
        }
    };
    let sha = digest(&bytes);
    {
        let st = app.reload_status.lock().expect("status lock");
        let seen = |h: &Option<String>| h.as_deref() == Some(sha.as_str());
        // Back to the running file after a rejected one: applied again, which clears the
        // reported error.
        let running = seen(&st.sha256) && st.rejected_sha256.is_none();
        if !force && (running || seen(&st.rejected_sha256)) {
            return;
        }
    }
    let mut plugin_paths = Vec::new();
    let mut looks = Vec::new();
    let running = app.config.load_full();
    let loaded = Config::load_bytes_running(&path, &bytes, Some(&running)).map_err(|e| match &e {
        crate::config::ConfigError::Invalid { .. } => format!("{}: {e}", path.display()),
        _ => e.to_string(),
    });
    // Plugins named by the new file must load before it is applied (all or nothing).
    let loaded = loaded.and_then(|new| {
        app.endpoints
            .check_api(&new)
            .map_err(|errors| format!("{}: {}", path.display(), errors.join("; ")))?;
        plugin_paths = new.plugins.iter().map(|p| p.path.clone()).collect();
        looks = plugin_paths
            .iter()
            .map(|p| (p.clone(), crate::watch::look(p)))
            .collect();
        match app.plugins.stage(&new.plugins, &app.metrics) {
            Ok(staged) => Ok((new, staged)),
            Err(errors) => Err(format!("{}: {}", path.display(), errors.join("; "))),
        }
    });
    match loaded {
        Ok((new, staged)) => {
            for w in new.key_warnings() {
                tracing::warn!("{w}");
            }
            let restart_needed = apply(app, new, staged);
            app.plugins.forget_unconfigured(&app.config.load().plugins);
            // Unloaded a little later, against the configuration running then (a plugin
            // named again meanwhile stays). Not past shutdown: the wait holds the app, and
            // with it the database, which a stop must close.
            let later = app.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(crate::plugins::Plugins::RETIRE_GRACE) => {}
                    _ = later.shutdown.cancelled() => return,
                }
                // Between reloads: one under way may have loaded plugins its configuration
                // names that the running one does not, and is about to make it live.
                let _ = tokio::task::spawn_blocking(move || {
                    let _one_at_a_time = later.reloading.lock().expect("reload lock");
                    later
                        .plugins
                        .retire_unconfigured(&later.config.load().plugins);
                })
                .await;
            });
            let mut st = app.reload_status.lock().expect("status lock");
            st.restart_needed = restart_needed;
            st.version += 1;
            st.loaded_at_ms = now_ms();
            st.sha256 = Some(sha);
            st.reloads_ok += 1;
            st.last_error = None;
            st.last_error_at_ms = None;
            st.rejected_sha256 = None;
            st.rejected_plugins.clear();
            st.rejected_looks.clear();
            drop(st);
            crate::plugins::rewatch(app);
            let st = app.reload_status.lock().expect("status lock");
            app.metrics
                .config_reloads
                .get_or_create(&vec![("result", "ok".to_string())])
                .inc();
            tracing::info!(path = %path.display(), version = st.version, "configuration reloaded");
        }
        Err(message) => {
            let mut st = app.reload_status.lock().expect("status lock");
            st.reloads_failed += 1;
            st.last_error = Some(message);
            st.last_error_at_ms = Some(now_ms());
            st.rejected_sha256 = Some(sha);
            let rewatch = st.rejected_plugins != plugin_paths;
            st.rejected_plugins = plugin_paths;
            st.rejected_looks = looks;
            app.metrics
                .config_reloads
                .get_or_create(&vec![("result", "error".to_string())])
                .inc();
            tracing::error!(
                error = st.last_error.as_deref().unwrap_or_default(),
                "invalid configuration rejected; the running configuration stays"
            );
            drop(st);
            if rewatch {
                crate::plugins::rewatch(app);
            }
        }
    }
}

/// Keeps the running value of a setting only a restart applies, logging and listing `key`
/// if the file changed it.
fn keep_running<T: PartialEq + Clone + std::fmt::Debug>(
    key: &str,
    configured: &mut T,
    running: &T,
    restart_needed: &mut Vec<String>,
) {
    if configured != running {
        tracing::warn!(
            key,
            ?running,
            ?configured,
            "this setting cannot change while running; restart to apply it"
        );
        *configured = running.clone();
        restart_needed.push(key.to_string());
    }
}

/// Swaps in a validated configuration. Endpoints, keys, schedules, limits, headers and
/// secrets take effect for the next attempt; in-flight attempts finish with what they had.
/// Returns the keys that changed but only apply at the next start (their running values
/// are kept, and each is logged).
fn apply(app: &Arc<App>, mut new: Config, plugins: crate::plugins::Staged) -> Vec<String> {
    let old = app.config.load_full();
    let mut restart_needed = Vec::new();
    // The listener, the store and the watchers were set up with these at start.
    let (n, o) = (&mut new.server, &old.server);
    keep_running(
        "server.listen",
        &mut n.listen,
        &o.listen,
        &mut restart_needed,
    );
    keep_running(
        "server.data_dir",
        &mut n.data_dir,
        &o.data_dir,
        &mut restart_needed,
    );
    keep_running(
        "server.quick_repair",
        &mut n.quick_repair,
        &o.quick_repair,
        &mut restart_needed,
    );
    keep_running("server.watch", &mut n.watch, &o.watch, &mut restart_needed);
    keep_running(
        "server.max_connections",
        &mut n.max_connections,
        &o.max_connections,
        &mut restart_needed,
    );
    keep_running(
        "delivery.max_attempts_in_flight",
        &mut new.delivery.max_attempts_in_flight,
        &old.delivery.max_attempts_in_flight,
        &mut restart_needed,
    );
    let listen_waits = restart_needed.iter().any(|k| k == "server.listen");
    if listen_waits {
        // What the running address was written as: the next reload resolves the file's
        // `listen` again, and reports it again, until the restart.
        new.server.listen_text = old.server.listen_text.clone();
    }
    // A default public URL names the address courier listens on: made from a `listen` that
    // waits for a restart, callback URLs would name a port nobody answers on.
    if new.server.public_url_defaulted && listen_waits {
        new.server.public_url = if old.server.public_url_defaulted {
            old.server.public_url.clone()
        } else {
            format!("http://{}", app.addr)
        };
    }
    new.resolve_public_url(app.addr);
    if new.keys.is_empty() {
        let path = old.server.data_dir.join(app::GENERATED_KEY_FILE);
        match app::ensure_key(&mut new, &old.server.data_dir) {
            Ok(Some(_)) => {
                tracing::warn!(path = %path.display(), "the configuration has no [[keys]] any more: created an all-scopes API key, saved in the file named here (it is not logged)")
            }
            Ok(None) => {
                tracing::info!(path = %path.display(), "the configuration has no [[keys]]: using the generated API key saved there")
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the generated admin key; keeping the previous keys");
                new.keys = old.keys.clone();
            }
        }
    }
    if new.delivery.allow_private_networks != old.delivery.allow_private_networks
        || new.delivery.connect_timeout != old.delivery.connect_timeout
    {
        app.client.store(Arc::new(client::build(&new.delivery)));
    }
    // The plugins it names go live with it: endpoints that still name a plugin by its old
    // kind or settings do so until this moment, and those of the new configuration from it.
    app.plugins.publish(plugins, &app.metrics);
    let touched = app.endpoints.set_config(&new);
    app.config.store(Arc::new(new));
    // Wake every worker so that changed limits apply now and removed endpoints' workers stop,
    // and start workers for (re)added endpoints that have deliveries waiting.
    app.scheduler.notify_all();
    app.workflows.wake();
    crate::workflows::warn_unconfigured(app);
    for name in touched {
        if app.store.pending_count(&name) > 0 {
            Scheduler::wake(app, &name);
        }
    }
    restart_needed
}
