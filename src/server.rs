//! Starting and stopping courier: open the store, bind the listener, start the workers and
//! the retention sweeper, and shut down gracefully.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{self, App};
use crate::config::Config;
use crate::deliver::client;
use crate::model::now_ms;
use crate::observe::Metrics;
use crate::scheduler::Scheduler;
use crate::store::{PurgeCursor, Store};

/// A running courier.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    /// The key created on first start when the config has no `[[keys]]` (printed once).
    pub created_key: Option<String>,
    /// Where the generated key is kept, when the config has no `[[keys]]`.
    pub generated_key_path: Option<std::path::PathBuf>,
    join: JoinHandle<()>,
}

/// A key created by a start that has not succeeded yet: should the start fail, the key goes
/// with it (never shown, it would lock the operator out, the next start taking it for one
/// already printed), and the next start makes and prints one.
struct UnshownKey(Option<std::path::PathBuf>);

impl Drop for UnshownKey {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Running {
    /// Stops accepting, lets in-flight attempts finish (or time out), and returns when done.
    pub async fn shutdown(self) {
        self.app.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until something else (a signal handler) cancels `app.shutdown` and the server
    /// has stopped, then closes the database cleanly.
    pub async fn wait(self) {
        let _ = self.join.await;
        let closer = self.app.store.closer();
        drop(self.app);
        let closed = tokio::task::spawn_blocking(move || closer.wait(Duration::from_secs(10)))
            .await
            .unwrap_or(false);
        if !closed {
            tracing::warn!("the database was not closed cleanly; the next start will check it");
        }
    }
}

/// The database file's name in the data dir.
pub const DB_FILE: &str = "courier.redb";

/// Starts courier with `config`. The listener is bound before this returns, so `addr` is
/// usable at once (port 0 picks a free port).
pub async fn start(mut config: Config) -> anyhow::Result<Running> {
    let data_dir = config.server.data_dir.clone();
    // The directories about to be made, deepest first.
    let made: Vec<std::path::PathBuf> = data_dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(std::path::Path::to_path_buf)
        .collect();
    // Made for courier's user only (an existing directory keeps its mode).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    // A new directory's entry is in its parent: synced, or a power cut soon after the first
    // acknowledgements could take the whole data dir (the journal syncs only its own
    // directory's entries).
    for dir in &made {
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| {
                format!(
                    "cannot sync {} after creating the data dir",
                    parent.display()
                )
            })?;
    }
    let db_path = data_dir.join(DB_FILE);
    let store = Store::open(&db_path, config.server.quick_repair)
        .with_context(|| format!("cannot open {}", db_path.display()))?;
    // The key after the database: only the courier that holds the data dir makes (or takes
    // back) its key. `unshown` is dropped before `store` should the start fail.
    let generated_key_path = config
        .keys
        .is_empty()
        .then(|| data_dir.join(app::GENERATED_KEY_FILE));
    let created_key = app::ensure_key(&mut config, &data_dir)
        .with_context(|| format!("cannot write the admin key into {}", data_dir.display()))?;
    let mut unshown = UnshownKey(created_key.as_ref().and(generated_key_path.clone()));
    let watch_secret = app::watch_secret(&data_dir).with_context(|| {
        format!(
            "cannot keep the channel watch secret in {}",
            data_dir.display()
        )
    })?;
    for w in config.key_warnings() {
        tracing::warn!("{w}");
    }
    if store.replayed_on_open() > 0 {
        tracing::info!(
            records = store.replayed_on_open(),
            "re-applied acknowledged events from the ingest journal (the last run did not shut down cleanly)"
        );
    }
    let metrics = Metrics::new();
    let plugins = crate::plugins::Plugins::default();
    if let Err(errors) = plugins.load_all(&config.plugins, &metrics) {
        anyhow::bail!("{}", errors.join("\n"));
    }
    metrics.register_store(&store);
    let listener = crate::listener::bind(config.server.listen)
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    config.resolve_public_url(addr);
    if config.server.listen.ip().is_unspecified() && config.server.public_url_defaulted {
        tracing::warn!(public_url = %config.server.public_url, "server.public_url is not set and courier listens on every address: callback URLs will not reach it; set public_url");
    }
    // Idle connections must not take the file descriptors deliveries need: under a low
    // open-file limit, fewer connections are served than `server.max_connections` says (the
    // configuration keeps its value: a reload compares with it).
    let mut max_connections = config.server.max_connections;
    let mut max_attempts = config.delivery.max_attempts_in_flight;
    if let Some(open_files) = crate::listener::raise_open_files() {
        let attempts_fit = crate::listener::attempts_within(open_files);
        if attempts_fit < max_attempts {
            tracing::warn!(
                open_files,
                max_attempts_in_flight = max_attempts,
                attempting = attempts_fit,
                "the open-file limit is too low for delivery.max_attempts_in_flight: fewer attempts run at once; raise the limit (LimitNOFILE, ulimit -n)"
            );
            max_attempts = attempts_fit;
        }
        let fit = crate::listener::connections_within(open_files);
        if fit < max_connections {
            tracing::warn!(
                open_files,
                max_connections = config.server.max_connections,
                serving = fit,
                "the open-file limit is too low for server.max_connections (two descriptors per connection, with a WebSocket each, and room for deliveries): serving fewer; raise the limit (LimitNOFILE, ulimit -n) or lower max_connections"
            );
            max_connections = fit;
        }
    }
    let app = Arc::new(App {
        client: ArcSwap::from_pointee(client::build(&config.delivery)),
        reload_status: std::sync::Mutex::new(crate::reload::initial_status(&config)),
        reloading: std::sync::Mutex::new(()),
        addr,
        config: ArcSwap::from_pointee(config),
        store,
        metrics,
        plugins,
        workflows: Default::default(),
        hub: Default::default(),
        sockets: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        attempts: Arc::new(tokio::sync::Semaphore::new(max_attempts)),
        attempt_slots: max_attempts,
        scheduler: Scheduler::default(),
        endpoints: Default::default(),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        watch_secret,
        data_dir: data_dir.clone(),
        backup_lock: Default::default(),
    });
    for name in app.store.config_paused()? {
        app.endpoints.set_config_paused(&name, true);
    }
    app.endpoints.set_config(&app.config.load());
    load_api_endpoints(&app)?;
    let app2 = app.clone();
    app.tasks
        .spawn(async move { crate::api::endpoints::finish_unfinished_drops(&app2).await });
    Scheduler::start_workers(&app);
    Scheduler::start_sweeper(&app);
    app.tasks.spawn(retention(app.clone()));
    crate::reload::start(&app);
    crate::plugins::start_watching(&app);
    crate::workflows::start(&app);

    let router = crate::api::router(app.clone());
    let app2 = app.clone();
    let join = tokio::spawn(async move {
        let stop = app2.shutdown.clone();
        let drain = stop.clone();
        let app3 = app2.clone();
        // Requests under way when shutdown starts may finish, for a while: a client that
        // stops sending halfway through its body would otherwise hold courier up for good.
        tokio::select! {
            _ = crate::listener::serve(listener, router, stop, max_connections, || {
                app3.config.load().server.header_timeout
            }) => {},
            _ = async move {
                drain.cancelled().await;
                tokio::time::sleep(HTTP_DRAIN).await;
            } => tracing::warn!("requests still under way {HTTP_DRAIN:?} after shutdown began are cut off"),
        }
        // In-flight attempts finish or hit their own timeout; bound the wait anyway.
        app2.tasks.close();
        // Every endpoint counts, those made through the API included.
        let config = app2.config.load();
        let (all, _) = app2.endpoints.list(None, None, usize::MAX);
        // At most a minute: an endpoint's timeout may be set far longer (by a tenant, through
        // the endpoint API), and an attempt cut short is made again after the restart.
        let longest = all
            .iter()
            .map(|l| l.endpoint.timeout)
            .max()
            .unwrap_or(config.delivery.timeout)
            .max(config.delivery.timeout)
            .min(ATTEMPTS_DRAIN);
        if tokio::time::timeout(longest + Duration::from_secs(5), app2.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some attempts did not finish in time; they will be retried after restart"
            );
        }
        tracing::info!("courier stopped");
    });
    tracing::info!(%addr, "courier listening");
    unshown.0 = None;
    Ok(Running {
        addr,
        app,
        created_key,
        generated_key_path,
        join,
    })
}

/// How long requests under way at shutdown may take to finish.
const HTTP_DRAIN: Duration = Duration::from_secs(10);

/// The longest shutdown waits for attempts in flight (beyond which they are retried after
/// the restart), whatever the endpoints' timeouts.
const ATTEMPTS_DRAIN: Duration = Duration::from_secs(60);

/// Loads the endpoints made through the API. A configuration that breaks one (it lacks a
/// plugin the endpoint uses, say) stops the start, naming the endpoint, as it is rejected by
/// a reload: skipped, the endpoint could be neither delivered to, nor changed, nor deleted
/// (those need a loaded endpoint, and its name would stay taken).
fn load_api_endpoints(app: &App) -> anyhow::Result<()> {
    let config = app.config.load();
    let mut broken = Vec::new();
    for (name, json) in app.store.endpoints()? {
        let stored: crate::endpoints::StoredEndpoint = match serde_json::from_slice(&json) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(endpoint = %name, error = %e, "stored endpoint is unreadable; skipped");
                continue;
            }
        };
        match stored.build(&config) {
            Ok(built) => app.endpoints.put_api(stored, built),
            Err(e) => broken.push(format!(
                "endpoint `{name}` (created through the API) is not valid under this configuration: {e}"
            )),
        }
    }
    if !broken.is_empty() {
        anyhow::bail!(
            "{}\nstart with the configuration the endpoint was made under (with the plugin it uses, say), then change or delete the endpoint through the API",
            broken.join("\n")
        );
    }
    Ok(())
}

/// Deletes delivered, dead and dropped deliveries last changed more than `delivery.retention`
/// ago, workflow channels that finished that long ago, and expired idempotency keys: a sweep
/// every quarter of the retention (at most every minute), in small rounds so that the writer
/// is never held for long.
async fn retention(app: Arc<App>) {
    const BATCH: usize = 500;
    loop {
        let retention = app.config.load().delivery.retention;
        let every = (retention / 4).clamp(Duration::from_millis(200), Duration::from_secs(60));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = app.shutdown.cancelled() => return,
        }
        let now = now_ms();
        let before = now.saturating_sub(retention.as_millis() as u64);
        let idem_before =
            now.saturating_sub(retention.max(Duration::from_secs(24 * 3600)).as_millis() as u64);
        let mut cursor = PurgeCursor::default();
        loop {
            match app.store.purge(before, idem_before, BATCH, cursor).await {
                Ok(round) => {
                    app.metrics.purged.inc_by(round.purged as u64);
                    if round.purged > 0
                        || round.keys_expired > 0
                        || round.channels_purged > 0
                        || round.events_purged > 0
                        || round.rollups_purged > 0
                    {
                        tracing::debug!(
                            purged = round.purged,
                            keys_expired = round.keys_expired,
                            channels = round.channels_purged,
                            unrouted_events = round.events_purged,
                            rollups = round.rollups_purged,
                            "retention purge"
                        );
                    }
                    let done = round.cursor.finished()
                        && round.keys_expired < BATCH
                        && round.channels_purged < BATCH
                        && round.events_purged < BATCH;
                    if done || app.shutdown.is_cancelled() {
                        break;
                    }
                    cursor = round.cursor;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "retention purge failed");
                    break;
                }
            }
        }
    }
}
