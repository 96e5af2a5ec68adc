//! The wasmtime host: one engine, components compiled once per file version, and every call
//! run in a fresh instance from a pre-instantiated template, bounded by fuel, an epoch
//! deadline and a memory cap.
//!
//! Why a fresh instance per call: an instance that trapped or was interrupted must be thrown
//! away anyway, and plugins are meant to be stateless; with the pooling allocator and
//! `InstancePre` an instantiation costs tens of microseconds, so isolation is cheap.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasData, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynPollable, Pollable};
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
/// Most table elements one call may hold, over all its tables.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;
/// Most core instances, memories and tables one call may create: a component that needs
/// more is refused instead of draining the pool every plugin shares.
const MAX_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 64;
/// Most log lines one call may write, and the longest line kept: a plugin cannot flood
/// courier's log.
const MAX_LOG_LINES: u32 = 100;
const MAX_LOG_BYTES: usize = 4096;

/// Per-call state of a store.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    /// `limits.memory`, for all the linear memories of the call together.
    memory_cap: usize,
    memory_used: usize,
    table_elements: usize,
    /// Set when the cap refused a memory growth, to tell a memory trap from others.
    memory_refused: bool,
    /// When `limits.timeout` runs out; sleeps on the WASI clock end here at the latest.
    deadline: Instant,
    /// Set when a sleep was cut short at the deadline and waited out to it: the call ran out
    /// of time. (Shared with the sleeps themselves, which alone know whether they waited: a
    /// plugin may set up a long timer and return without waiting on it.)
    overslept: Arc<std::sync::atomic::AtomicBool>,
    log_lines: u32,
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
    /// Also called with `current == 0` when a memory is created, so `memory_used` is the
    /// sum over every memory of every core instance of the call.
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let used = self.memory_used - current.min(self.memory_used) + desired;
        if used > self.memory_cap {
            self.memory_refused = true;
            return Ok(false);
        }
        self.memory_used = used;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let used = self.table_elements - current.min(self.table_elements) + desired;
        if used > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = used;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// The WASI monotonic clock as plugins see it. WASI's own would let a plugin sleep (or
/// block in `poll`) past its deadline: the epoch interrupt only fires while WebAssembly
/// runs, not while the host waits on the plugin's behalf, so a plugin sleeping for an hour
/// would hold a thread for an hour. Here every sleep ends at the call's deadline at the
/// latest, after which the epoch interrupt ends the call.
struct DeadlineClock<'a> {
    table: &'a mut ResourceTable,
    deadline: Instant,
    overslept: &'a Arc<std::sync::atomic::AtomicBool>,
}

struct HasDeadlineClock;

impl HasData for HasDeadlineClock {
    type Data<'a> = DeadlineClock<'a>;
}

/// The origin of plugins' monotonic clock.
static CLOCK_ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

impl monotonic_clock::Host for DeadlineClock<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(u64::try_from(CLOCK_ORIGIN.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1)
    }

    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let now = self.now()?;
        self.subscribe_duration(when.saturating_sub(now))
    }

    fn subscribe_duration(&mut self, nanos: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let (until, cut) = match Instant::now().checked_add(Duration::from_nanos(nanos)) {
            Some(until) if until <= self.deadline => (until, None),
            _ => (self.deadline, Some(self.overslept.clone())),
        };
        let sleep = self.table.push(Sleep {
            until: tokio::time::Instant::from_std(until),
            yielded: false,
            cut,
        })?;
        wasmtime_wasi::p2::subscribe(self.table, sleep)
    }
}

/// A sleep on the plugin clock. One that is already due still yields once, as WASI's own
/// does, so that a plugin polling in a loop cannot starve the runtime's I/O.
struct Sleep {
    until: tokio::time::Instant,
    yielded: bool,
    /// For a sleep cut at the deadline: set once it has waited that long.
    cut: Option<Arc<std::sync::atomic::AtomicBool>>,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Sleep {
    async fn ready(&mut self) {
        if self.until > tokio::time::Instant::now() {
            tokio::time::sleep_until(self.until).await;
            if let Some(overslept) = &self.cut {
                overslept.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        } else if let Some(overslept) = &self.cut {
            overslept.store(true, std::sync::atomic::Ordering::Relaxed);
        } else if !self.yielded {
            self.yielded = true;
            tokio::task::yield_now().await;
        }
    }
}

impl bindings::transformer::courier::plugin::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin;
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            if self.log_lines == MAX_LOG_LINES + 1 {
                tracing::warn!(
                    plugin,
                    "plugin wrote more than {MAX_LOG_LINES} log lines in one call; the rest of this call's are dropped"
                );
            }
            return;
        }
        let message = log_line(&message);
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

/// A plugin's log message — or any text it hands back that courier stores and logs (a
/// transform's error or drop reason, a backoff's reason to give up, a simulator's error) —
/// as courier keeps it: control characters escaped (a plugin cannot forge log lines) and at
/// most `MAX_LOG_BYTES` long (it is stored with every attempt).
fn log_line(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_LOG_BYTES));
    for (i, c) in message.char_indices() {
        if out.len() >= MAX_LOG_BYTES {
            out.push_str(&format!("… ({} more bytes)", message.len() - i));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

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

/// Component instances the pool holds: every call and every trial instantiation at load
/// takes one.
const POOL_INSTANCES: u32 = 256;

/// What wasmtime's error says when the pool is out of instances, memories or tables (part
/// of a load error's text).
pub const POOL_FULL: &str = "maximum concurrent limit";

/// How long a plugin's trial instantiation at load waits for room in a full pool.
const TRIAL_PATIENCE: Duration = Duration::from_secs(10);

/// Plugin calls running at once; the rest wait for a slot. Below the pool's size so that
/// loading a plugin (which instantiates it once) always finds room, and so that a burst of
/// calls waits its turn instead of failing for want of an instance.
pub const MAX_CONCURRENT_CALLS: usize = 192;

/// The engine and linker every plugin shares.
pub struct Host {
    engine: Engine,
    linker: Linker<State>,
    /// Calls running now, against [`MAX_CONCURRENT_CALLS`]; calls run on blocking threads,
    /// so they wait on a condition variable.
    running: std::sync::Mutex<usize>,
    finished: std::sync::Condvar,
}

/// A call slot; given back when dropped.
struct CallSlot<'a>(&'a Host);

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        *self.0.running.lock().expect("call slots") -= 1;
        // Both calls waiting for a slot and calls waiting for room in the pool wait here.
        self.0.finished.notify_all();
    }
}

impl Host {
    pub fn new() -> Result<Host, PluginError> {
        let mut cfg = wasmtime::Config::new();
        cfg.wasm_component_model(true);
        cfg.consume_fuel(true);
        cfg.epoch_interruption(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
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
        // WASI's monotonic clock, replaced by one whose sleeps respect the deadline.
        linker.allow_shadowing(true);
        monotonic_clock::add_to_linker::<State, HasDeadlineClock>(&mut linker, |s| DeadlineClock {
            table: &mut s.table,
            deadline: s.deadline,
            overslept: &s.overslept,
        })
        .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        linker.allow_shadowing(false);
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
        Ok(Host {
            engine,
            linker,
            running: std::sync::Mutex::new(0),
            finished: std::sync::Condvar::new(),
        })
    }

    /// Compiles `bytes` (a component binary, or WAT text) and checks that it is a `kind`
    /// plugin that instantiates. Runs off the request path (start-up, reload).
    pub(crate) fn compile(
        &self,
        kind: PluginKind,
        bytes: &[u8],
        limits: Limits,
        name: Arc<str>,
        config: Arc<Vec<(String, String)>>,
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
        // not on the first delivery: as the plugin it will be, with its own configuration.
        // (It waits, a while, for room in the pool should calls of heavy plugins fill it.)
        let (_, ok) = self.with_room(
            || self.store(name.clone(), config.clone(), limits),
            TRIAL_PATIENCE,
            |store| match &template {
                Template::Transform(p) => p.instantiate(store).map(drop),
                Template::Backoff(p) => p.instantiate(store).map(drop),
                Template::Simulator(p) => p.instantiate(store).map(drop),
            },
        );
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
            wasi: WasiCtx::builder()
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                // Random bytes are made by the host: one request may not ask for 64 MiB
                // (WASI's default) and hold the thread past the deadline.
                .max_random_size(64 << 10)
                .build(),
            table: ResourceTable::new(),
            memory_cap: limits.memory as usize,
            memory_used: 0,
            table_elements: 0,
            memory_refused: false,
            deadline: Instant::now() + limits.timeout,
            overslept: Arc::default(),
            log_lines: 0,
            plugin,
            config,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        let _ = store.set_fuel(limits.fuel);
        // What a plugin hands back (a transform's headers and body, a log line) is copied
        // into courier's memory. Strings that alias one another could make that copy far
        // larger than the plugin's own memory; it may not exceed the memory cap.
        store.set_hostcall_fuel(limits.memory as usize);
        let ticks = (limits.timeout.as_micros() / TICK.as_micros()).max(1) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        store
    }

    /// Waits for a call slot.
    fn slot(&self) -> CallSlot<'_> {
        let mut running = self.running.lock().expect("call slots");
        while *running >= MAX_CONCURRENT_CALLS {
            running = self.finished.wait(running).expect("call slots");
        }
        *running += 1;
        CallSlot(self)
    }

    /// Runs `f` on a store from `new_store`. Should the pool run out of what `f`
    /// instantiates (a component with many core instances, with many calls running: the
    /// calls the slot limit lets run are not all small), `f` waits for another call to
    /// finish and runs again on a fresh store (what the failed instantiation took goes back
    /// with the old one), for at most `patience`.
    fn with_room<R>(
        &self,
        new_store: impl Fn() -> Store<State>,
        patience: Duration,
        mut f: impl FnMut(&mut Store<State>) -> wasmtime::Result<R>,
    ) -> (Store<State>, wasmtime::Result<R>) {
        let started = Instant::now();
        loop {
            let mut store = new_store();
            let result = f(&mut store);
            let exhausted = matches!(&result, Err(e) if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some());
            if !exhausted || started.elapsed() >= patience {
                return (store, result);
            }
            drop(store);
            let running = self.running.lock().expect("call slots");
            let _ = self
                .finished
                .wait_timeout(running, Duration::from_millis(5))
                .expect("call slots");
        }
    }

    /// Runs `f` against a fresh instance of `template` and classifies any failure.
    pub(crate) fn call<R>(
        &self,
        plugin: &Loaded,
        mut f: impl FnMut(&mut Store<State>, &Template) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let _slot = self.slot();
        // The time limit starts once the call has its slot.
        let started = Instant::now();
        // A call that waited for room in the pool runs in what is left of its time limit.
        let (store, mut result) = self.with_room(
            || {
                let left = plugin.limits.timeout.saturating_sub(started.elapsed());
                let limits = Limits {
                    timeout: left,
                    ..plugin.limits
                };
                self.store(plugin.name.clone(), plugin.config.clone(), limits)
            },
            plugin.limits.timeout,
            |store| f(store, &plugin.template),
        );
        if result.is_ok()
            && store
                .data()
                .overslept
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            // It returned, but only because its sleep was cut short at the deadline.
            result = Err(wasmtime::Error::from(Trap::Interrupt));
        }
        result.map_err(|e| {
            let class = if store.data().memory_refused {
                "plugin_memory"
            } else {
                match e.downcast_ref::<Trap>() {
                    Some(Trap::OutOfFuel) => "plugin_fuel",
                    Some(Trap::Interrupt) => "plugin_timeout",
                    // Its time limit passed while it waited for room in the pool.
                    _ if e
                        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                        .is_some() =>
                    {
                        "plugin_timeout"
                    }
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
        // Its error or drop reason goes into the audit trail (each attempt's) and the log:
        // one line, of a size a log can take.
        host.call(self, |store, t| match t {
            Template::Transform(pre) => pre
                .instantiate(&mut *store)?
                .call_transform(&mut *store, req),
            _ => unreachable!("kind checked by the caller"),
        })
        .map(|r| match r {
            Ok(TransformOutcome::Drop(reason)) => Ok(TransformOutcome::Drop(log_line(&reason))),
            Ok(send) => Ok(send),
            Err(e) => Err(log_line(&e)),
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
        .map(|d| match d {
            BackoffDecision::GiveUp(reason) => BackoffDecision::GiveUp(log_line(&reason)),
            retry => retry,
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
        .map(|r| r.map_err(|e| log_line(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_of_a_component_with_many_core_instances_wait_for_room_in_the_pool() {
        let host = Arc::new(Host::new().unwrap());
        // Eight core instances a call: as many calls as the slot limit lets run need
        // half as much again as the pool's core instances.
        let wat = format!(
            "(component (core module $m) {})",
            "(core instance (instantiate $m)) ".repeat(8)
        );
        let component = Component::new(&host.engine, wat).unwrap();
        let limits = Limits {
            fuel: DEFAULT_FUEL,
            memory: DEFAULT_MEMORY,
            timeout: Duration::from_secs(10),
        };
        let threads: Vec<_> = (0..MAX_CONCURRENT_CALLS)
            .map(|_| {
                let (host, component) = (host.clone(), component.clone());
                std::thread::spawn(move || {
                    let _slot = host.slot();
                    let (_, result) = host.with_room(
                        || host.store("t".into(), Arc::new(Vec::new()), limits),
                        limits.timeout,
                        |store| {
                            host.linker.instantiate(&mut *store, &component)?;
                            // Held a moment, as a call's instance is.
                            std::thread::sleep(Duration::from_millis(20));
                            Ok(())
                        },
                    );
                    result.map_err(|e| format!("{e:#}"))
                })
            })
            .collect();
        let failed: Vec<String> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap().err())
            .collect();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            failed.first()
        );
    }

    #[test]
    fn the_memory_cap_counts_every_memory_of_a_call() {
        let host = Host::new().unwrap();
        let limits = Limits {
            fuel: DEFAULT_FUEL,
            memory: 16 << 20,
            timeout: DEFAULT_TIMEOUT,
        };
        // Two core instances with a memory each: 2 × 6 MiB fits a 16 MiB cap; 2 × 10 MiB
        // does not, although either memory alone would.
        for (pages, fits) in [(96, true), (160, false)] {
            let wat = format!(
                "(component (core module $a (memory {pages})) (core module $b (memory {pages}))
                  (core instance (instantiate $a)) (core instance (instantiate $b)))"
            );
            let component = Component::new(&host.engine, wat).unwrap();
            let mut store = host.store("t".into(), Arc::new(Vec::new()), limits);
            let result = host.linker.instantiate(&mut store, &component);
            assert_eq!(result.is_ok(), fits, "{pages} pages: {:?}", result.err());
            assert_eq!(store.data().memory_refused, !fits);
        }
    }

    #[test]
    fn what_a_plugin_returns_is_bounded_by_its_memory_even_when_aliased() {
        let host = Host::new().unwrap();
        // Returns a list of 1,000 strings that all point at the same 32 KiB of its one
        // 64 KiB page: 32 MiB for the host to copy.
        let wat = r#"(component
          (core module $m
            (memory (export "memory") 1)
            (func (export "f") (result i32) (local $i i32)
              (loop $fill
                (i32.store (i32.add (i32.const 1024) (i32.mul (local.get $i) (i32.const 8)))
                           (i32.const 16384))
                (i32.store (i32.add (i32.const 1028) (i32.mul (local.get $i) (i32.const 8)))
                           (i32.const 32768))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $fill (i32.lt_u (local.get $i) (i32.const 1000))))
              (i32.store (i32.const 16) (i32.const 1024))
              (i32.store (i32.const 20) (i32.const 1000))
              (i32.const 16)))
          (core instance $i (instantiate $m))
          (func (export "f") (result (list string))
            (canon lift (core func $i "f") (memory (core memory $i "memory")))))"#;
        let component = Component::new(&host.engine, wat).unwrap();
        for (memory, copied) in [(16 << 20, false), (64 << 20, true)] {
            let limits = Limits {
                fuel: DEFAULT_FUEL,
                memory,
                timeout: DEFAULT_TIMEOUT,
            };
            let mut store = host.store("t".into(), Arc::new(Vec::new()), limits);
            let instance = host.linker.instantiate(&mut store, &component).unwrap();
            let f = instance
                .get_typed_func::<(), (Vec<String>,)>(&mut store, "f")
                .unwrap();
            match f.call(&mut store, ()) {
                Ok((list,)) => {
                    assert!(copied, "{memory}: copied 32 MiB");
                    assert_eq!(list.len(), 1000);
                }
                Err(e) => {
                    assert!(!copied, "{memory}: {e:#}");
                    assert!(format!("{e:#}").contains("too much data"), "{e:#}");
                }
            }
        }
    }

    #[test]
    fn plugin_log_lines_are_escaped_and_bounded() {
        assert_eq!(log_line("plain ünïcode"), "plain ünïcode");
        assert_eq!(
            log_line("a\nlevel=error forged\r\u{1b}[31m"),
            "a\\nlevel=error forged\\r\\u{1b}[31m"
        );
        let long = "é".repeat(MAX_LOG_BYTES);
        let line = log_line(&long);
        assert!(line.len() < MAX_LOG_BYTES + 40, "{}", line.len());
        assert!(
            line.ends_with(&format!("… ({} more bytes)", MAX_LOG_BYTES)),
            "{}",
            &line[line.len() - 40..]
        );
    }
}
