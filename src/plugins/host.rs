//! The wasmtime host: one engine, components compiled once per file version, and every call
//! run in a fresh instance from a pre-instantiated template, bounded by fuel, an epoch
//! deadline and a memory cap.
//!
//! Why a fresh instance per call: an instance that trapped or was interrupted must be thrown
//! away anyway, and plugins are meant to be stateless; with the pooling allocator and
//! `InstancePre` an instantiation costs tens of microseconds, so isolation is cheap.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::PluginError;
use crate::config::{PluginConfig, PluginKind};

pub(crate) mod bindings {
    pub mod transformer {
        wasmtime::component::bindgen!({ path: "wit", world: "transformer" });
    }
    pub mod backoff {
        wasmtime::component::bindgen!({
            path: "wit",
            world: "backoff-policy",
            with: {
                "courier:plugin/host": super::transformer::courier::plugin::host,
                "courier:plugin/types": super::transformer::courier::plugin::types,
            },
        });
    }
    pub mod simulator {
        wasmtime::component::bindgen!({
            path: "wit",
            world: "callback-simulator",
            with: {
                "courier:plugin/host": super::transformer::courier::plugin::host,
            },
        });
    }
}

pub use bindings::transformer::courier::plugin::host::Level;
pub use bindings::transformer::courier::plugin::types::{
    AttemptInfo, BackoffDecision, Header, Request, TransformOutcome,
};

/// Epoch tick: the resolution of `limits.timeout`.
const TICK: Duration = Duration::from_millis(1);
/// Defaults when a plugin sets no limits.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
pub const DEFAULT_MEMORY: u64 = 64 * 1024 * 1024;
pub const DEFAULT_FUEL: u64 = 1_000_000_000;
/// The largest memory any plugin may be given (the pool's slot size).
pub const MAX_MEMORY: u64 = 256 * 1024 * 1024;

/// Per-call state of a store.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    memory_cap: usize,
    /// Set when the cap refused a memory growth, to tell a memory trap from others.
    memory_refused: bool,
    plugin: Arc<str>,
    config: Arc<Vec<(String, String)>>,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime::ResourceLimiter for State {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_cap;
        if !ok {
            self.memory_refused = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl bindings::transformer::courier::plugin::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn config(&mut self) -> Vec<(String, String)> {
        self.config.as_ref().clone()
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.config
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }
}

impl bindings::transformer::courier::plugin::types::Host for State {}

/// A compiled plugin, ready to instantiate.
pub(crate) enum Template {
    Transform(bindings::transformer::TransformerPre<State>),
    Backoff(bindings::backoff::BackoffPolicyPre<State>),
    Simulator(bindings::simulator::CallbackSimulatorPre<State>),
}

/// Call limits of one plugin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub fuel: u64,
    pub memory: u64,
    pub timeout: Duration,
}

impl Limits {
    pub fn of(cfg: &PluginConfig) -> Limits {
        Limits {
            fuel: cfg.fuel.unwrap_or(DEFAULT_FUEL),
            memory: cfg.memory_bytes.unwrap_or(DEFAULT_MEMORY).min(MAX_MEMORY),
            timeout: cfg.timeout.unwrap_or(DEFAULT_TIMEOUT),
        }
    }
}

/// The engine and linker every plugin shares.
pub struct Host {
    engine: Engine,
    linker: Linker<State>,
}

impl Host {
    pub fn new() -> Result<Host, PluginError> {
        let mut cfg = wasmtime::Config::new();
        cfg.wasm_component_model(true);
        cfg.consume_fuel(true);
        cfg.epoch_interruption(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(256)
            .total_core_instances(1024)
            .total_memories(512)
            .total_tables(1024)
            .max_memory_size(MAX_MEMORY as usize)
            // Reset small memories and tables with memset instead of returning the pages to
            // the kernel: cheaper than the syscalls for the few pages a plugin call touches.
            .linear_memory_keep_resident(64 << 10)
            .table_keep_resident(1 << 16)
            .decommit_batch_size(16);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        bindings::transformer::courier::plugin::host::add_to_linker::<State, HasSelf<State>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        // The epoch ticker: deadlines are counted in ticks; it stops with the engine.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("courier-plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        Ok(Host { engine, linker })
    }

    /// Compiles `bytes` (a component binary, or WAT text) and checks that it is a `kind`
    /// plugin that instantiates. Runs off the request path (start-up, reload).
    pub(crate) fn compile(
        &self,
        kind: PluginKind,
        bytes: &[u8],
        limits: Limits,
    ) -> Result<Template, String> {
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| format!("not a valid component: {e:#}"))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            format!(
                "cannot be linked (does it import more than WASI and courier:plugin/host?): {e:#}"
            )
        })?;
        let template = match kind {
            PluginKind::Transform => Template::Transform(
                bindings::transformer::TransformerPre::new(pre)
                    .map_err(|e| format!("is not a transformer: {e:#}"))?,
            ),
            PluginKind::Backoff => Template::Backoff(
                bindings::backoff::BackoffPolicyPre::new(pre)
                    .map_err(|e| format!("is not a backoff-policy: {e:#}"))?,
            ),
            PluginKind::Simulator => Template::Simulator(
                bindings::simulator::CallbackSimulatorPre::new(pre)
                    .map_err(|e| format!("is not a callback-simulator: {e:#}"))?,
            ),
        };
        // A trial instantiation, so that a component that cannot start is refused now and
        // not on the first delivery.
        let mut store = self.store("check".into(), Arc::new(Vec::new()), limits);
        let ok = match &template {
            Template::Transform(p) => p.instantiate(&mut store).map(drop),
            Template::Backoff(p) => p.instantiate(&mut store).map(drop),
            Template::Simulator(p) => p.instantiate(&mut store).map(drop),
        };
        ok.map_err(|e| format!("cannot be instantiated: {e:#}"))?;
        Ok(template)
    }

    fn store(
        &self,
        plugin: Arc<str>,
        config: Arc<Vec<(String, String)>>,
        limits: Limits,
    ) -> Store<State> {
        let state = State {
            // No preopens, no environment, no network: an empty, capability-less context.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            memory_cap: limits.memory as usize,
            memory_refused: false,
            plugin,
            config,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        let _ = store.set_fuel(limits.fuel);
        let ticks = (limits.timeout.as_micros() / TICK.as_micros()).max(1) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        store
    }

    /// Runs `f` against a fresh instance of `template` and classifies any failure.
    pub(crate) fn call<R>(
        &self,
        plugin: &Loaded,
        f: impl FnOnce(&mut Store<State>, &Template) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let mut store = self.store(plugin.name.clone(), plugin.config.clone(), plugin.limits);
        let started = Instant::now();
        let result = f(&mut store, &plugin.template);
        result.map_err(|e| {
            let class = if store.data().memory_refused {
                "plugin_memory"
            } else {
                match e.downcast_ref::<Trap>() {
                    Some(Trap::OutOfFuel) => "plugin_fuel",
                    Some(Trap::Interrupt) => "plugin_timeout",
                    _ => "plugin_trap",
                }
            };
            PluginError::Call {
                plugin: plugin.name.to_string(),
                class,
                detail: format!("{e:#} (after {} µs)", started.elapsed().as_micros()),
            }
        })
    }
}

/// One loaded version of a plugin.
pub struct Loaded {
    pub name: Arc<str>,
    pub kind: PluginKind,
    pub(crate) template: Template,
    pub config: Arc<Vec<(String, String)>>,
    pub limits: Limits,
    pub sha256: String,
    pub version: u64,
    pub loaded_at_ms: u64,
}

impl Loaded {
    pub(crate) fn transform(
        &self,
        host: &Host,
        req: &Request,
    ) -> Result<Result<TransformOutcome, String>, PluginError> {
        host.call(self, |store, t| match t {
            Template::Transform(pre) => pre
                .instantiate(&mut *store)?
                .call_transform(&mut *store, req),
            _ => unreachable!("kind checked by the caller"),
        })
    }

    pub(crate) fn next_delay(
        &self,
        host: &Host,
        info: &AttemptInfo,
    ) -> Result<BackoffDecision, PluginError> {
        host.call(self, |store, t| match t {
            Template::Backoff(pre) => pre
                .instantiate(&mut *store)?
                .call_next_delay(&mut *store, info),
            _ => unreachable!("kind checked by the caller"),
        })
    }

    pub(crate) fn simulate(
        &self,
        host: &Host,
        message: &str,
    ) -> Result<Result<String, String>, PluginError> {
        host.call(self, |store, t| match t {
            Template::Simulator(pre) => pre
                .instantiate(&mut *store)?
                .call_simulate(&mut *store, message),
            _ => unreachable!("kind checked by the caller"),
        })
    }
}
