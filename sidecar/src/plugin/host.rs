//! The wasmtime side: one engine with a pooling allocator and an epoch
//! ticker, the import allow-list, and a call of one plugin on a fresh
//! instance under its deadline and caps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use wasmtime::component::{Component, ComponentType, InstancePre, Lift, Linker, Lower, WasmStr};
use wasmtime::{Engine, PoolingAllocationConfig, ResourceLimiter, Store, UpdateDeadline};

use super::cache;
use super::spec::{Config, Spec};
use super::{Fault, Fits, Health, Set, Stats};

/// The executable that compiles plugins in a child process, once
/// [`compile_in_child_processes`] named it.
static COMPILER: OnceLock<PathBuf> = OnceLock::new();

/// Has every plugin that is not in the cache compiled by `exe plugin
/// compile` (the `vigie` binary itself) in a child process, which writes it
/// to the cache, instead of in this process. Cranelift needs several MiB per
/// plugin and touches as many of the binary's code pages; compiled here,
/// most of that stayed in the sidecar's RSS for good (48 MB peak under load
/// after a start with an empty cache, against 34 MB after a start from the
/// cache). The `vigie` binary calls this for `serve`; a plugin the child
/// cannot compile is compiled here, for the error it gives.
pub fn compile_in_child_processes(exe: PathBuf) {
    let _ = COMPILER.set(exe);
}

/// What a plugin may import (any 0.1.x version): the host's log function,
/// and the contract's types (an import without functions).
const ALLOWED_IMPORTS: [&str; 2] = ["vigie:plugin/host@0.1", "vigie:plugin/types@0.1"];

/// The request as plugins see it (the WIT `request` record).
#[derive(ComponentType, Lower)]
#[component(record)]
struct WitRequest<'a> {
    principal: &'a str,
    action: &'a str,
    resource: &'a str,
    context: &'a str,
    #[component(name = "now-unix-ms")]
    now_unix_ms: i64,
}

/// The WIT `outcome` record. The attributes are copied out of the
/// plugin's memory during the call (its post-return frees them), so their
/// size is bounded by the plugin's memory cap before `max_output_kib` is
/// checked.
#[derive(ComponentType, Lift)]
#[component(record)]
struct WitOutcome {
    attributes: String,
    #[component(name = "ttl-ms")]
    ttl_ms: Option<u64>,
}

// Built by wasmtime when it lifts the plugin's argument.
#[allow(dead_code)]
#[derive(ComponentType, Lift, Debug, Clone, Copy)]
#[component(enum)]
#[repr(u8)]
enum Level {
    #[component(name = "debug")]
    Debug,
    #[component(name = "info")]
    Info,
    #[component(name = "warn")]
    Warn,
    #[component(name = "error")]
    Error,
}

/// Most log lines one call may write; the rest are dropped and counted.
const LOG_LINES_PER_CALL: u32 = 8;
/// Log lines are cut at this many bytes.
const LOG_LINE_BYTES: usize = 1024;

/// A store's data: the caps of the call and its log budget.
struct State {
    plugin: Arc<str>,
    stats: Arc<Stats>,
    memory_cap: usize,
    table_cap: usize,
    memory_refused: bool,
    table_refused: bool,
    /// The largest memory size granted, bytes.
    peak_memory: usize,
    log_lines: u32,
    log_bucket: Arc<Mutex<Bucket>>,
}

impl ResourceLimiter for State {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_cap;
        self.memory_refused |= !ok;
        if ok {
            self.peak_memory = self.peak_memory.max(desired);
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.table_cap;
        self.table_refused |= !ok;
        Ok(ok)
    }
}

/// A token bucket: log lines per second per plugin, across calls.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Lines per second a plugin may log, and its burst.
const LOG_RATE: f64 = 20.0;
const LOG_BURST: f64 = 50.0;

impl Bucket {
    fn new() -> Self {
        Bucket {
            tokens: LOG_BURST,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * LOG_RATE).min(LOG_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("plugin `{name}` ({origin}): {message}")]
pub struct LoadError {
    pub name: String,
    pub origin: String,
    /// The line of its `[[plugin]]` in `plugins.toml` (0 when run by hand).
    pub line: usize,
    pub message: String,
}

impl LoadError {
    /// As a policy-directory problem (`plugins.toml:<line>:1: ...`).
    pub fn problem(&self) -> crate::policy::Problem {
        crate::policy::Problem {
            file: super::SPECS_FILE.into(),
            line: self.line,
            col: 1,
            message: format!("plugin `{}`: {}", self.name, self.message),
        }
    }
}

/// The sidecar's wasmtime engine and what every plugin shares.
pub struct Host {
    engine: Engine,
    linker: Linker<State>,
    config: Config,
    cache: Option<cache::Cache>,
    stats: Mutex<HashMap<String, Arc<Stats>>>,
    buckets: Mutex<HashMap<String, Arc<Mutex<Bucket>>>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Host {
    /// The engine, its pool and its epoch ticker. `cache_dir`: where
    /// compiled plugins are kept (`None`: compile every time, as `vigie
    /// check` does).
    pub fn new(config: &Config, cache_dir: Option<&Path>) -> Result<Arc<Host>, String> {
        let stack = (config.stack_kib.max(64) as usize) << 10;
        let max_memory = (config.max_memory_mib.max(1) as usize) << 20;
        let mut pool = PoolingAllocationConfig::default();
        let n = config.instances.max(1);
        pool.total_component_instances(n)
            .total_core_instances(n * 2)
            .total_memories(n * 2)
            .total_tables(n * 2)
            .total_stacks(n)
            .max_memory_size(max_memory)
            .table_elements(100_000)
            // Reset the pages a call touched with memset rather than
            // madvise: no page faults on the next call, and no TLB
            // shootdown across the sidecar's threads.
            .linear_memory_keep_resident((config.keep_resident_kib as usize) << 10)
            // Where the kernel has PAGEMAP_SCAN (Linux 6.7), only the pages
            // that are resident are reset, and memory past them is not
            // handed to madvise on every call: `plugin/network_call` 34-40
            // -> 24-28 us on a 2-core EPYC guest. Elsewhere, the first
            // `keep_resident` bytes are reset whole, as before.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .table_keep_resident(16 << 10)
            .max_memories_per_component(2)
            .max_tables_per_component(2)
            .max_core_instances_per_component(8);
        let mut wasm = wasmtime::Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(stack)
            .async_stack_size(stack + (256 << 10))
            .allocation_strategy(pool)
            // Each slot reserves only what the cap allows plus a guard, not
            // the default 4 GiB of address space.
            .memory_reservation((max_memory as u64).next_power_of_two())
            .memory_guard_size(64 << 10);
        let engine = Engine::new(&wasm).map_err(|e| format!("cannot start wasmtime: {e:#}"))?;
        let mut linker = Linker::new(&engine);
        linker
            .root()
            .instance("vigie:plugin/host@0.1.0")
            .and_then(|mut host| {
                host.func_wrap(
                    "log",
                    |mut cx: wasmtime::StoreContextMut<'_, State>,
                     (level, message): (Level, WasmStr)| {
                        log_line(&mut cx, level, &message);
                        Ok(())
                    },
                )
            })
            .map_err(|e| format!("cannot define the host interface: {e:#}"))?;
        let cache = match cache_dir {
            Some(dir) => match cache::Cache::open(dir, &engine) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "plugin cache unusable; compiling plugins at every start");
                    None
                }
            },
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.weak();
        let ticker_stop = stop.clone();
        let tick = Duration::from_millis(config.tick_ms.max(1));
        std::thread::Builder::new()
            .name("vigie-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    match ticker_engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| format!("cannot start the epoch thread: {e}"))?;
        Ok(Arc::new(Host {
            engine,
            linker,
            config: config.clone(),
            cache,
            stats: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            stop,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters of the plugin named `name` (created on first use).
    pub fn stats(&self, name: &str) -> Arc<Stats> {
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }

    /// Every plugin's counters, by name.
    pub fn all_stats(&self) -> Vec<(String, Arc<Stats>)> {
        let map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn bucket(&self, name: &str) -> Arc<Mutex<Bucket>> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Bucket::new())))
            .clone()
    }

    /// Reads, checks and compiles (or loads from the cache) each plugin.
    pub fn load(self: &Arc<Self>, specs: &[Spec]) -> Result<Set, Vec<LoadError>> {
        let mut plugins = Vec::new();
        let mut errors = Vec::new();
        let mut compiled = false;
        for spec in specs {
            match self.load_one(spec, &mut compiled) {
                Ok(p) => plugins.push(Arc::new(p)),
                Err(message) => errors.push(LoadError {
                    name: spec.name.clone(),
                    origin: spec.origin.clone(),
                    line: spec.line,
                    message,
                }),
            }
        }
        if compiled {
            release_freed_heap();
        }
        if errors.is_empty() {
            Ok(Set {
                host: Some(self.clone()),
                plugins,
            })
        } else {
            Err(errors)
        }
    }

    fn load_one(&self, spec: &Spec, compiled: &mut bool) -> Result<Plugin, String> {
        let max = (self.config.max_wasm_mib as u64) << 20;
        let size = std::fs::metadata(&spec.path)
            .map_err(|e| {
                format!(
                    "cannot read `{}`: {e} (the example plugins are built by ./scripts/build-plugins)",
                    spec.path.display()
                )
            })?
            .len();
        if size > max {
            return Err(format!(
                "`{}` is {size} bytes, over the {} MiB cap (plugins.max_wasm_mib)",
                spec.path.display(),
                self.config.max_wasm_mib
            ));
        }
        if spec.memory_bytes > (self.config.max_memory_mib as usize) << 20 {
            return Err(format!(
                "memory_mib {} is over the sidecar's cap of {} (plugins.max_memory_mib)",
                spec.memory_bytes >> 20,
                self.config.max_memory_mib
            ));
        }
        let bytes = std::fs::read(&spec.path)
            .map_err(|e| format!("cannot read `{}`: {e}", spec.path.display()))?;
        let component = self.compile(&bytes, compiled)?;
        check_imports(&self.engine, &component)?;
        check_exports(&self.engine, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| format!("cannot link: {e:#}"))?;
        Ok(Plugin {
            spec: spec.clone(),
            name: Arc::from(spec.name.as_str()),
            pre,
            health: Mutex::new(Health::default()),
            stats: self.stats(&spec.name),
            bucket: self.bucket(&spec.name),
        })
    }

    /// A component from the cache, else compiled (and cached); sets
    /// `compiled` when it compiled.
    fn compile(&self, wasm: &[u8], compiled: &mut bool) -> Result<Component, String> {
        if let Some(cache) = &self.cache {
            match cache.load(&self.engine, wasm) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "plugin cache entry refused; compiling again"),
            }
        }
        if is_core_module(wasm) {
            return Err("this is a core WebAssembly module, not a component: build it for wasm32-wasip2 (see sdk/README.md)".into());
        }
        // Why the child process did not give the plugin, if it was asked.
        let mut child_failed = None;
        if let (Some(cache), Some(exe)) = (&self.cache, COMPILER.get()) {
            let started = Instant::now();
            let failed = match self.compile_in_child(exe, cache.dir(), wasm) {
                Ok(()) => match cache.load(&self.engine, wasm) {
                    Ok(Some(c)) => {
                        tracing::info!(
                            ms = started.elapsed().as_millis() as u64,
                            "plugin compiled in a child process"
                        );
                        return Ok(c);
                    }
                    Ok(None) => "it left no cache entry".to_owned(),
                    Err(e) => e,
                },
                // An invalid plugin lands here too: compiled here, it gets
                // its error message.
                Err(e) => e,
            };
            child_failed = Some(failed);
        }
        *compiled = true;
        let code = self.precompile(wasm)?;
        if let Some(why) = child_failed {
            tracing::warn!(error = %why, "plugin compiled in the sidecar: the child process failed");
        }
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.store(wasm, &code) {
                tracing::warn!(error = %e, "cannot write the plugin cache");
            }
        }
        cache::deserialize(&self.engine, &code)
    }

    /// Runs `exe plugin compile` on `wasm` (its standard input), which
    /// compiles it with this host's settings into the cache in `dir`.
    fn compile_in_child(&self, exe: &Path, dir: &Path, wasm: &[u8]) -> Result<(), String> {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let sandbox = serde_json::to_string(&self.config).map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(["plugin", "compile", "--cache-dir"])
            .arg(dir)
            .args(["--sandbox", &sandbox])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", exe.display()))?;
        // The child reads all of its input before it writes anything.
        let written = child
            .stdin
            .take()
            .map_or(Ok(()), |mut stdin| stdin.write_all(wasm));
        let out = child
            .wait_with_output()
            .map_err(|e| format!("`{}`: {e}", exe.display()))?;
        match (written, out.status.success()) {
            (Ok(()), true) => Ok(()),
            (Err(e), _) => Err(format!("cannot hand the plugin to the compiler: {e}")),
            (_, false) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        }
    }

    /// Compiles `wasm` here and writes it to the cache: what `vigie plugin
    /// compile` does in the child process.
    pub fn compile_into_cache(&self, wasm: &[u8]) -> Result<(), String> {
        let cache = self
            .cache
            .as_ref()
            .ok_or("the plugin cache cannot be opened")?;
        cache
            .store(wasm, &self.precompile(wasm)?)
            .map_err(|e| format!("cannot write the plugin cache: {e}"))
    }

    /// The native code of a component, not yet loaded.
    fn precompile(&self, wasm: &[u8]) -> Result<Vec<u8>, String> {
        self.engine
            .precompile_component(wasm)
            .map_err(|e| format!("not a valid WebAssembly component: {e:#}"))
    }
}

/// Gives the heap that compiling freed back to the system. Cranelift
/// allocates several MiB per plugin and frees them, but glibc keeps freed
/// memory inside its heaps: after a start with an empty plugin cache the
/// sidecar sat at 40 MB RSS, 5 MiB of it free heap (17 MB anonymous against
/// 7 MB after a start from the cache; see docs/performance.md). Plugins
/// are compiled here only when no child process can (see
/// [`compile_in_child_processes`]). `malloc_trim` hands back every free page
/// of every arena. It takes the arenas' locks a few milliseconds, once per
/// load that compiled.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it locks
    // each arena while it does, like any malloc call.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A core module starts with version 1; a component with a larger layer.
fn is_core_module(wasm: &[u8]) -> bool {
    wasm.len() >= 8 && wasm[..4] == *b"\0asm" && wasm[4..8] == [1, 0, 0, 0]
}

/// Refuses a component that imports anything but the host interface, naming
/// what it wanted.
fn check_imports(engine: &Engine, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    let refused: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| !ALLOWED_IMPORTS.iter().any(|a| name.starts_with(a)))
        .map(|name| {
            let what = if name.starts_with("wasi:filesystem") {
                " (filesystem)"
            } else if name.starts_with("wasi:sockets") || name.starts_with("wasi:http") {
                " (network)"
            } else if name.starts_with("wasi:cli/environment") {
                " (environment)"
            } else if name.starts_with("wasi:") {
                " (WASI)"
            } else {
                ""
            };
            format!("`{name}`{what}")
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "imports what plugins may not: {}; a plugin may import only `vigie:plugin/host` (is it built without `no_std`? see sdk/README.md)",
            refused.join(", ")
        ))
    }
}

fn check_exports(engine: &Engine, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    match ty.get_export(engine, "check") {
        Some(wasmtime::component::types::ComponentExtern {
            ty: wasmtime::component::types::ComponentItem::ComponentFunc(_),
            ..
        }) => Ok(()),
        _ => Err("does not export `check` (is it built with vigie_plugin::plugin!?)".into()),
    }
}

fn log_line(cx: &mut wasmtime::StoreContextMut<'_, State>, level: Level, message: &WasmStr) {
    let data = cx.data_mut();
    data.log_lines += 1;
    let allowed = data.log_lines <= LOG_LINES_PER_CALL
        && data
            .log_bucket
            .lock()
            .map(|mut b| b.take())
            .unwrap_or(false);
    if !allowed {
        data.stats.log_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    data.stats.log_lines.fetch_add(1, Ordering::Relaxed);
    let plugin = data.plugin.clone();
    // Borrowed from the plugin's memory; only the first KiB is copied.
    let Ok(text) = message.to_str(&*cx) else {
        return;
    };
    let mut end = text.len().min(LOG_LINE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let line = &text[..end];
    match level {
        Level::Debug => tracing::debug!(plugin = %plugin, "{line}"),
        Level::Info => tracing::info!(plugin = %plugin, "{line}"),
        Level::Warn => tracing::warn!(plugin = %plugin, "{line}"),
        Level::Error => tracing::error!(plugin = %plugin, "{line}"),
    }
}

/// One compiled plugin.
pub struct Plugin {
    pub spec: Spec,
    /// `spec.name`, shared with each call's store.
    name: Arc<str>,
    pre: InstancePre<State>,
    health: Mutex<Health>,
    pub stats: Arc<Stats>,
    bucket: Arc<Mutex<Bucket>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.spec.name)
            .finish_non_exhaustive()
    }
}

/// The input of one call.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub principal: &'a str,
    pub action: &'a str,
    pub resource: &'a str,
    /// The caller's context, as JSON text.
    pub context: &'a str,
    pub now_unix_ms: i64,
}

/// A successful call.
#[derive(Debug, Clone)]
pub struct Called {
    pub attributes: serde_json::Map<String, Value>,
    pub ttl_ms: Option<u64>,
    /// The instance's largest linear memory, bytes.
    pub peak_memory_bytes: usize,
}

impl Plugin {
    /// Whether the plugin is quarantined now; lets one call through once the
    /// quarantine is over.
    fn quarantined(&self) -> bool {
        let Ok(health) = self.health.lock() else {
            return false;
        };
        matches!(health.until, Some(until) if Instant::now() < until)
    }

    fn record(&self, host: &Host, result: &Result<Called, Fault>) {
        let Ok(mut health) = self.health.lock() else {
            return;
        };
        match result {
            Ok(_) => {
                if health.until.take().is_some() {
                    tracing::info!(plugin = %self.spec.name, "plugin left quarantine");
                }
                health.consecutive_traps = 0;
                self.stats.quarantined.store(false, Ordering::Relaxed);
            }
            Err(f) if f.is_trap() => {
                health.consecutive_traps += 1;
                let after = host.config.quarantine_after.max(1);
                if health.consecutive_traps >= after {
                    let was = health.until.is_some();
                    health.until =
                        Some(Instant::now() + Duration::from_secs(host.config.quarantine_seconds));
                    health.consecutive_traps = 0;
                    self.stats.quarantined.store(true, Ordering::Relaxed);
                    if !was {
                        self.stats.quarantines.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::error!(
                        plugin = %self.spec.name,
                        traps = after,
                        seconds = host.config.quarantine_seconds,
                        last = %f,
                        "plugin quarantined: it is not called, its failure mode applies"
                    );
                }
            }
            Err(_) => {}
        }
    }

    /// Runs the plugin once on a fresh instance, under its deadline and caps.
    /// `fits` checks the attributes against the schema (a misfit is a
    /// `BadOutput` fault, counted once like any other).
    pub async fn call(
        &self,
        host: &Host,
        call: &Call<'_>,
        fits: Option<&Fits<'_>>,
    ) -> Result<Called, Fault> {
        let started = Instant::now();
        let result = if self.quarantined() {
            Err(Fault::Quarantined)
        } else {
            let mut r = self.run(host, call).await;
            if let (Ok(called), Some(fits)) = (&mut r, fits) {
                let value = Value::Object(std::mem::take(&mut called.attributes));
                match fits(&self.spec.name, &value) {
                    Some((path, message)) => {
                        r = Err(Fault::BadOutput(format!("{path}: {message}")))
                    }
                    None => {
                        if let Value::Object(map) = value {
                            called.attributes = map;
                        }
                    }
                }
            }
            self.record(host, &r);
            r
        };
        self.stats
            .nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match &result {
            Ok(_) => {
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => {
                self.stats.fault(f.kind());
                if !matches!(f, Fault::Quarantined) {
                    tracing::warn!(plugin = %self.spec.name, fault = %f, "plugin failed");
                }
            }
        }
        result
    }

    async fn run(&self, host: &Host, call: &Call<'_>) -> Result<Called, Fault> {
        let mut store = Store::new(
            &host.engine,
            State {
                plugin: self.name.clone(),
                stats: self.stats.clone(),
                memory_cap: self.spec.memory_bytes,
                table_cap: self.spec.table_elements,
                memory_refused: false,
                table_refused: false,
                peak_memory: 0,
                log_lines: 0,
                log_bucket: self.bucket.clone(),
            },
        );
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        let deadline = Instant::now() + self.spec.timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline {
                UpdateDeadline::Interrupt
            } else {
                // Let the runtime run other tasks, then carry on.
                UpdateDeadline::Yield(1)
            })
        });
        let instance = match self.pre.instantiate_async(&mut store).await {
            Ok(i) => i,
            Err(e) => return Err(classify(&store, e)),
        };
        let func = instance
            .get_typed_func::<(WitRequest<'_>, &str), (Result<WitOutcome, String>,)>(
                &mut store, "check",
            )
            .map_err(|e| Fault::Trap(format!("`check` has the wrong type: {e}")))?;
        let request = WitRequest {
            principal: call.principal,
            action: call.action,
            resource: call.resource,
            context: call.context,
            now_unix_ms: call.now_unix_ms,
        };
        let (result,) = match func
            .call_async(&mut store, (request, self.spec.config.as_str()))
            .await
        {
            Ok(r) => r,
            Err(e) => return Err(classify(&store, e)),
        };
        let outcome = result.map_err(|e| {
            let mut e = e;
            truncate(&mut e, LOG_LINE_BYTES);
            Fault::Error(e)
        })?;
        let text = outcome.attributes;
        if text.len() > self.spec.max_output_bytes {
            return Err(Fault::BadOutput(format!(
                "attributes are {} bytes, over the {} byte cap (max_output_kib)",
                text.len(),
                self.spec.max_output_bytes
            )));
        }
        let attributes = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(Fault::BadOutput("attributes are not a JSON object".into())),
            Err(e) => {
                return Err(Fault::BadOutput(format!(
                    "attributes are not valid JSON: {e}"
                )))
            }
        };
        Ok(Called {
            attributes,
            ttl_ms: outcome.ttl_ms,
            peak_memory_bytes: store.data().peak_memory,
        })
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// What a wasmtime error during a call means.
fn classify(store: &Store<State>, e: wasmtime::Error) -> Fault {
    if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return Fault::PoolExhausted;
    }
    if store.data().memory_refused {
        return Fault::Memory;
    }
    if store.data().table_refused {
        return Fault::Table;
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => Fault::Timeout,
        Some(wasmtime::Trap::StackOverflow) => Fault::Stack,
        Some(trap) => Fault::Trap(trap.to_string()),
        None => {
            let mut m = format!("{e:#}");
            truncate(&mut m, LOG_LINE_BYTES);
            Fault::Trap(m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_bucket_refills_at_its_rate() {
        let mut b = Bucket::new();
        let taken = (0..200).filter(|_| b.take()).count();
        assert_eq!(taken, LOG_BURST as usize);
        b.last -= Duration::from_secs(1);
        let taken = (0..200).filter(|_| b.take()).count();
        assert_eq!(taken, LOG_RATE as usize);
    }
}
