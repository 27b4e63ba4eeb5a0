//! What every request handler shares: the active policy bundle (swapped
//! atomically on reload), the decision engine, the reload status and the
//! counters behind `/v1/status` and `/metrics`.
//!
//! Invariant: a request takes one snapshot of the bundle and uses it to the
//! end, so a request in flight during a reload finishes on the old set.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::audit::outbox::{self, Opened, Outbox};
use crate::audit::{self, Asked, Draft};
use crate::cache::{self, Cache};
use crate::config::Config;
use crate::engine::{Engine, Input, InputError, Outcome};
use crate::note::KeyPair;
use crate::plugin;
use crate::policy::{self, Bundle, Problem, Problems};
use crate::telemetry;

/// A bundle and the epoch it was activated in.
#[derive(Debug)]
pub struct Active {
    pub bundle: Bundle,
    /// The bundle's plugins, compiled.
    pub plugins: plugin::Set,
    /// 1 for the bundle loaded at start, +1 for each reload that changed it.
    pub epoch: u64,
    pub loaded_at: SystemTime,
}

/// The outcome of the last reload attempt, for `/v1/status`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub last_attempt: Option<SystemTime>,
    /// Why the last attempt was refused; `None` once a later one succeeds.
    pub last_error: Option<Vec<Problem>>,
    pub reloads: u64,
    pub failures: u64,
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// A new bundle is active, in this epoch.
    Swapped(u64),
    /// The directory's content hash is the one already active.
    Unchanged(u64),
}

#[derive(Debug, Default)]
pub struct Counters {
    pub bad_requests: AtomicU64,
}

/// The decision log as the handlers see it.
#[derive(Debug)]
pub struct Log {
    pub sidecar_id: String,
    pub key: Arc<KeyPair>,
    pub outbox: Outbox,
    pub shipper: Arc<audit::shipper::Stats>,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the policy directory does not load:\n{0}")]
    Policies(Problems),
    #[error("{0}")]
    Key(#[from] crate::note::NoteError),
    #[error("the decision log cannot be opened: {0}")]
    Outbox(#[from] outbox::AuditError),
    #[error("{0}")]
    Plugins(String),
    #[error("{0}")]
    DataDir(String),
}

/// Takes `<data-dir>/lock` for the life of the process: two sidecars on one
/// data directory would interleave their records in one outbox (breaking
/// its chain) and take each other's cache for a damaged one. The lock is
/// the kernel's (`flock`): a sidecar killed with `-9` leaves none behind.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = dir.join("lock");
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        StartError::DataDir(format!("cannot {what} `{}`: {e}", path.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| failed("create the directory of", &e))?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| failed("open", &e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            return Err(StartError::DataDir(format!(
                "the data directory `{}` is in use by another vigie{holder}; \
                 give each sidecar its own (--data-dir)",
                dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(failed("lock", &e)),
    }
    // Whose it is, for the message above (the lock itself is what counts).
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

/// What a logged decision resolves to.
#[derive(Debug, Clone)]
pub struct Logged {
    pub outcome: Outcome,
    pub cached: bool,
    pub decision_id: String,
}

/// Compiles the bundle's plugins. With plugins disabled, none run, and the
/// attributes they would set may come from the caller.
fn load_plugins(
    host: Option<&Arc<plugin::Host>>,
    bundle: &Bundle,
) -> Result<plugin::Set, Vec<Problem>> {
    match host {
        None => {
            if !bundle.plugins.is_empty() {
                tracing::warn!(
                    plugins = bundle.plugins.len(),
                    "plugins are disabled (plugins.enabled = false): plugins.toml is ignored"
                );
            }
            Ok(plugin::Set::default())
        }
        Some(host) => host
            .load(&bundle.plugins)
            .map_err(|errors| errors.iter().map(plugin::LoadError::problem).collect()),
    }
}

/// The host name, the default sidecar id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "vigie".into())
}

pub struct Shared {
    pub config: Config,
    pub policy_dir: PathBuf,
    pub engine: Engine,
    pub cache: Cache,
    pub log: Log,
    /// The wasmtime host; `None` when plugins are disabled.
    pub plugin_host: Option<Arc<plugin::Host>>,
    active: ArcSwap<Active>,
    status: Mutex<ReloadStatus>,
    /// Serializes reloads (watcher and `POST /v1/reload`).
    reload_lock: Mutex<()>,
    pub counters: Counters,
    pub metrics: crate::metrics::Metrics,
    pub started: Instant,
    /// Held for the life of the sidecar (see [`lock_data_dir`]).
    _data_lock: std::fs::File,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("policy_dir", &self.policy_dir)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Loads the policy directory, the key and the outbox; any of them
    /// failing is fatal here.
    pub fn new(config: Config, policy_dir: PathBuf) -> Result<Arc<Self>, StartError> {
        let bundle =
            policy::load(&policy_dir, config.policies.validation).map_err(StartError::Policies)?;
        let data_lock = lock_data_dir(&config.data.dir)?;
        let sidecar_id = config.audit.sidecar_id.clone().unwrap_or_else(host_name);
        let key_path = config
            .audit
            .key
            .clone()
            .unwrap_or_else(|| config.data.dir.join("sidecar.key"));
        let (key, created) = KeyPair::load_or_create(&key_path, &sidecar_id)?;
        // The public half beside it, for enrollment (e.g. a ledger reading
        // `public_key_file` from a shared volume).
        let public_path = key_path.with_extension("pub");
        let current = std::fs::read_to_string(&public_path).unwrap_or_default();
        if current.trim() != key.public().encode() {
            if let Err(e) = std::fs::write(&public_path, format!("{}\n", key.public().encode())) {
                tracing::warn!(path = %public_path.display(), error = %e, "cannot write the public key file");
            }
        }
        if created {
            tracing::info!(path = %key_path.display(), public_key = %key.public().encode(), "sidecar key created; enroll it in the ledger");
        }
        let (outbox, opened) = outbox::open(
            &config.data.dir.join("outbox"),
            &config.data.dir.join("chains"),
            &sidecar_id,
            &config.audit,
        )?;
        match opened {
            Opened::Started(reason) => {
                tracing::info!(chain = %outbox.position.chain, reason, "decision log chain started")
            }
            Opened::Recovered { cut } => {
                let (written, _) = outbox.position.head();
                tracing::info!(chain = %outbox.position.chain, next_seq = written, torn_bytes_cut = cut, "decision log recovered");
            }
        }
        if config.audit.ledger.is_none() {
            tracing::warn!("no ledger configured (--ledger): decision records stay in the outbox, which fills up");
        }
        let log = Log {
            sidecar_id,
            key: Arc::new(key),
            outbox,
            shipper: Arc::new(audit::shipper::Stats::default()),
        };
        for w in &bundle.warnings {
            tracing::warn!("{w}");
        }
        let cache = Cache::open(config.cache.clone(), &config.data.dir);
        let plugin_host = if config.plugins.enabled {
            let dir = config
                .plugins
                .cache_dir
                .clone()
                .unwrap_or_else(|| config.data.dir.join("plugin-cache"));
            Some(plugin::Host::new(&config.plugins, Some(&dir)).map_err(StartError::Plugins)?)
        } else {
            None
        };
        let plugins = load_plugins(plugin_host.as_ref(), &bundle)
            .map_err(|p| StartError::Plugins(Problems(p).to_string()))?;
        Ok(Arc::new(Self {
            config,
            policy_dir,
            engine: Engine::new(),
            cache,
            log,
            plugin_host,
            active: ArcSwap::from_pointee(Active {
                bundle,
                plugins,
                epoch: 1,
                loaded_at: SystemTime::now(),
            }),
            status: Mutex::new(ReloadStatus::default()),
            reload_lock: Mutex::new(()),
            counters: Counters::default(),
            metrics: crate::metrics::Metrics::default(),
            started: Instant::now(),
            _data_lock: data_lock,
        }))
    }

    /// The active bundle. Hold it for the whole request.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Loads the directory again and, if it is valid and different, makes it
    /// active. A directory that fails keeps the last good bundle. Blocking:
    /// call it off the async runtime.
    pub fn reload(&self) -> Result<Reloaded, Problems> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let result =
            policy::load(&self.policy_dir, self.config.policies.validation).and_then(|bundle| {
                let plugins = load_plugins(self.plugin_host.as_ref(), &bundle).map_err(Problems)?;
                Ok((bundle, plugins))
            });
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.last_attempt = Some(SystemTime::now());
        match result {
            Err(problems) => {
                status.failures += 1;
                status.last_error = Some(problems.0.clone());
                tracing::error!(
                    dir = %self.policy_dir.display(),
                    "policy reload refused, keeping the last good set:\n{problems}"
                );
                Err(problems)
            }
            Ok((bundle, plugins)) => {
                status.last_error = None;
                let current = self.active.load();
                if current.bundle.hash == bundle.hash {
                    return Ok(Reloaded::Unchanged(current.epoch));
                }
                for w in &bundle.warnings {
                    tracing::warn!("{w}");
                }
                let epoch = current.epoch + 1;
                tracing::info!(
                    epoch,
                    hash = %bundle.hash,
                    policies = bundle.counts.policies,
                    entities = bundle.counts.entities,
                    "policy set reloaded"
                );
                self.active.store(Arc::new(Active {
                    bundle,
                    plugins,
                    epoch,
                    loaded_at: SystemTime::now(),
                }));
                status.reloads += 1;
                Ok(Reloaded::Swapped(epoch))
            }
        }
    }

    /// The engine's evaluation, in a `vigie.evaluate` span (child of the
    /// current context: the decision's span).
    fn evaluate(&self, active: &Active, input: Input) -> Result<Outcome, InputError> {
        let span = telemetry::start(
            "vigie.evaluate",
            opentelemetry::trace::SpanKind::Internal,
            &opentelemetry::Context::current(),
        );
        let evaluated = self.engine.decide(&active.bundle, input);
        opentelemetry::trace::TraceContextExt::span(&span).end();
        evaluated
    }

    /// Answers from the cache, or runs the plugins that apply, evaluates and
    /// caches. Returns the outcome, whether it came from the cache, and what
    /// each plugin did. `active` is the request's snapshot.
    /// `key`: the request's cache key, `None` with the cache off; `texts`:
    /// its principal, action and resource as Cedar writes them.
    pub async fn decide(
        &self,
        active: &Active,
        mut input: Input,
        key: Option<cache::Key>,
        texts: &[String; 3],
    ) -> Result<(Outcome, bool, Vec<plugin::Report>), InputError> {
        let plugins = &active.plugins;
        let action = &texts[1];
        // The resource's type as text, for the plugins only.
        let resource_type = if plugins.is_empty() {
            String::new()
        } else {
            input.resource.type_name().to_string()
        };
        let run_plugins = !plugins.is_empty() && plugins.any_applies(action, &resource_type);
        if !plugins.is_empty() {
            // The attributes a plugin owns come from the plugin only.
            if let Some(obj) = input.context.as_object() {
                if let Some(attr) = obj.keys().find(|k| plugins.owns(k)) {
                    return Err(InputError::new(
                        "plugin_attribute",
                        format!("{}.{attr}", input.paths.context),
                        format!(
                            "`{attr}` is set by the plugin of that name; a caller may not set it"
                        ),
                    ));
                }
            }
        }
        let now = cache::now_ms();
        if let Some(key) = &key {
            // INVARIANT: only valid requests are ever cached, so a hit needs
            // no validation: the same input on the same bundle validated
            // before.
            if let Some((entry, _tier)) = self.cache.get(key, now) {
                return Ok((entry.outcome(), true, Vec::new()));
            }
        }
        let mut enriched = plugin::Enriched::default();
        if run_plugins {
            // A context the schema refuses is the caller's fault (400), not
            // something for the plugins to fail on.
            if let Some((path, what)) = active.bundle.shapes.locate(action, &input.context) {
                let path = path.replacen("context", input.paths.context, 1);
                return Err(InputError::new(
                    "invalid_context",
                    path.clone(),
                    format!("`{path}`: {what}"),
                ));
            }
            let context_text = input.context.to_string();
            let [principal, _, resource] = texts;
            let call = plugin::Call {
                principal,
                action,
                resource,
                context: &context_text,
                now_unix_ms: now as i64,
            };
            // The caller's context stays as it came in the record.
            let mut map = match Arc::unwrap_or_clone(std::mem::take(&mut input.context)) {
                serde_json::Value::Object(m) => m,
                _ => serde_json::Map::new(),
            };
            let shapes = &active.bundle.shapes;
            let fits =
                |attr: &str, value: &serde_json::Value| shapes.check_attribute(action, attr, value);
            enriched = plugins.enrich(&call, &resource_type, &mut map, &fits).await;
            input.context = Arc::new(serde_json::Value::Object(map));
            if let Some((allow, reason, error)) = enriched.verdict.take() {
                // The failure mode decides; nothing is cached.
                let outcome = Outcome {
                    allow,
                    reasons: vec![reason],
                    errors: vec![error],
                };
                return Ok((outcome, false, enriched.reports));
            }
        }
        let mut outcome = self.evaluate(active, input)?;
        outcome.errors.append(&mut enriched.skipped);
        if let Some(key) = key {
            let ttl = self.cache.ttl().as_millis() as u64;
            let ttl = enriched.ttl_ms.map_or(ttl, |t| t.min(ttl));
            if ttl > 0 {
                self.cache.put(
                    key,
                    cache::Entry {
                        expires_ms: now + ttl,
                        allow: outcome.allow,
                        reasons: outcome.reasons.clone(),
                        errors: outcome.errors.clone(),
                    },
                );
            }
        }
        Ok((outcome, false, enriched.reports))
    }

    /// Decides (from the cache or the engine) and drafts the decision's
    /// record. Nothing is answered before the record is logged: see
    /// [`Shared::log_all`].
    pub async fn decide_draft(
        &self,
        active: &Active,
        input: Input,
        parent: &opentelemetry::Context,
    ) -> Result<(Outcome, bool, Draft), InputError> {
        let key = self
            .cache
            .enabled()
            .then(|| cache::key(&active.bundle.hash, &input));
        self.decide_keyed(active, input, key, parent).await
    }

    async fn decide_keyed(
        &self,
        active: &Active,
        mut input: Input,
        key: Option<cache::Key>,
        parent: &opentelemetry::Context,
    ) -> Result<(Outcome, bool, Draft), InputError> {
        use opentelemetry::trace::FutureExt;
        use opentelemetry::KeyValue;
        // The texts move to the record (nothing after the cache key reads
        // them from the input).
        let asked = Arc::new(Asked::new(
            std::mem::take(&mut input.texts),
            &input.context,
            input.entities.len(),
            &self.config.audit.mask,
        ));
        // A span per decision, child of the caller's; the evaluation (on a
        // cache miss) is its child.
        let span = telemetry::start_decision(parent);
        let decided = self
            .decide(active, input, key, &asked.texts)
            .with_context(span.clone())
            .await;
        match decided {
            Ok((outcome, cached, reports)) => {
                Ok(self.draft(active, &span, asked, outcome, cached, &reports))
            }
            Err(e) => {
                telemetry::end_decision(&span, vec![KeyValue::new("vigie.error", e.code)]);
                Err(e)
            }
        }
    }

    /// Ends the decision's span and drafts its record.
    fn draft(
        &self,
        active: &Active,
        span: &opentelemetry::Context,
        asked: Arc<Asked>,
        outcome: Outcome,
        cached: bool,
        reports: &[plugin::Report],
    ) -> (Outcome, bool, Draft) {
        use opentelemetry::trace::TraceContextExt;
        use opentelemetry::KeyValue;
        let [principal, action, resource] = &asked.texts;
        let decision_id = decision_id();
        // Attributes only for a span that is recorded (an exporter is set).
        if span.span().is_recording() {
            let mut attributes = vec![
                KeyValue::new(
                    "vigie.decision",
                    if outcome.allow { "Allow" } else { "Deny" },
                ),
                KeyValue::new("vigie.policy_ids", outcome.reasons.join(",")),
                KeyValue::new("vigie.principal_type", type_of(principal).to_owned()),
                KeyValue::new("vigie.action", action.clone()),
                KeyValue::new("vigie.resource_type", type_of(resource).to_owned()),
                KeyValue::new("vigie.cache_hit", cached),
                KeyValue::new("vigie.decision_id", decision_id.clone()),
                KeyValue::new("vigie.policy_epoch", active.epoch as i64),
            ];
            if !reports.is_empty() {
                let summary: Vec<String> = reports
                    .iter()
                    .map(|r| format!("{}={}", r.name, r.status))
                    .collect();
                attributes.push(KeyValue::new("vigie.plugins", summary.join(",")));
            }
            telemetry::end_decision(span, attributes);
        } else {
            telemetry::end_decision(span, Vec::new());
        }
        tracing::debug!(
            decision_id = %decision_id,
            decision = if outcome.allow { "Allow" } else { "Deny" },
            reasons = %outcome.reasons.join(","),
            cached,
            "decision"
        );
        let draft = Draft {
            trace_id: telemetry::trace_id(span),
            decision_id,
            request: asked,
            allow: outcome.allow,
            reasons: outcome.reasons.clone(),
            errors: outcome.errors.clone(),
            epoch: active.epoch,
            policy_hash: active.bundle.hash.clone(),
            cached,
            plugins: reports.iter().map(plugin::Report::to_json).collect(),
        };
        (outcome, cached, draft)
    }

    /// [`Shared::log_all`] for one decision.
    pub async fn log_one(&self, decided: (Outcome, bool, Draft)) -> Logged {
        let (outcome, cached, draft) = decided;
        let decision_id = draft.decision_id.clone();
        let written = self.log.outbox.append(draft).await;
        logged(outcome, cached, decision_id, written)
    }

    /// Logs drafted decisions in one group commit and returns the answers:
    /// a decision whose record could not be written becomes Deny with reason
    /// `audit_unavailable` (fail closed).
    pub async fn log_all(&self, decided: Vec<(Outcome, bool, Draft)>) -> Vec<Logged> {
        let mut drafts = Vec::with_capacity(decided.len());
        let mut rest = Vec::with_capacity(decided.len());
        for (outcome, cached, draft) in decided {
            rest.push((outcome, cached, draft.decision_id.clone()));
            drafts.push(draft);
        }
        let written = self.log.outbox.append_many(drafts).await;
        rest.into_iter()
            .zip(written)
            .map(|((outcome, cached, decision_id), w)| logged(outcome, cached, decision_id, w))
            .collect()
    }

    /// [`Shared::decide_logged`] for a request body, which `parse` turns
    /// into an input. A body whose very bytes were decided before on this
    /// bundle, and whose answer still lives, is answered without being
    /// parsed again ([`Cache::seen`]), and logged like any other decision.
    pub async fn decide_body<E: From<InputError>>(
        &self,
        active: &Active,
        body: &[u8],
        parse: impl FnOnce(&[u8]) -> Result<Input, E>,
        parent: &opentelemetry::Context,
    ) -> Result<Logged, E> {
        if !self.cache.enabled() {
            return Ok(self.decide_logged(active, parse(body)?, parent).await?);
        }
        let digest = cache::body_digest(body);
        let decided = match self.cache.seen(&digest, active.epoch, cache::now_ms()) {
            Some(seen) => {
                let span = telemetry::start_decision(parent);
                let (asked, outcome) = (Arc::clone(&seen.asked), seen.entry().outcome());
                self.draft(active, &span, asked, outcome, true, &[])
            }
            None => {
                let input = parse(body)?;
                let key = cache::key(&active.bundle.hash, &input);
                let decided = self.decide_keyed(active, input, Some(key), parent).await?;
                let asked = Arc::clone(&decided.2.request);
                self.cache.remember(digest, active.epoch, &key, asked);
                decided
            }
        };
        Ok(self.log_one(decided).await)
    }

    /// One decision, logged.
    pub async fn decide_logged(
        &self,
        active: &Active,
        input: Input,
        parent: &opentelemetry::Context,
    ) -> Result<Logged, InputError> {
        let decided = self.decide_draft(active, input, parent).await?;
        Ok(self.log_one(decided).await)
    }
}

/// The answer for a decision once its record is written, or not: one whose
/// record could not be written becomes Deny with reason `audit_unavailable`
/// (fail closed).
fn logged(
    outcome: Outcome,
    cached: bool,
    decision_id: String,
    written: Result<u64, outbox::AuditError>,
) -> Logged {
    let outcome = match written {
        Ok(_) => outcome,
        Err(e) => Outcome {
            allow: false,
            reasons: vec!["audit_unavailable".into()],
            errors: vec![e.to_string()],
        },
    };
    Logged {
        outcome,
        cached,
        decision_id,
    }
}

/// The type of a uid as Cedar writes it (`NS::User` of `NS::User::"alice"`).
fn type_of(uid: &str) -> &str {
    uid.find("::\"").map_or(uid, |i| &uid[..i])
}

/// A new decision id: a UUIDv7, hyphenated (written straight into its
/// string, without the formatting machinery of `to_string`).
pub fn decision_id() -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}
