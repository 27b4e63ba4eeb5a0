//! `vigie ledger`: the central store of decision records. It accepts signed
//! batches from enrolled sidecars only, verifies signature and chain, stores
//! each record once, appends it to a Merkle tree and publishes signed
//! checkpoints; it answers queries and streams exports that verify offline.

pub mod merkle;
pub mod store;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{Env, Flag};
use crate::note::{KeyPair, PublicKey};
use store::{BatchBody, Store};

/// The ledger's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub data: Data,
    pub ledger: Ledger,
    /// Enrolled sidecars: `[[sidecars]] id = "...", public_key = "..."`.
    pub sidecars: Vec<Enrolled>,
    pub log: crate::config::Log,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Default `127.0.0.1:8290`.
    pub listen: SocketAddr,
    /// Largest batch accepted, after decompression. Default 64 MiB.
    pub max_body_bytes: usize,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8290)),
            max_body_bytes: 64 << 20,
        }
    }
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Data {
    /// Default `.vigie-ledger`.
    pub dir: PathBuf,
}

impl Default for Data {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".vigie-ledger"),
        }
    }
}

/// `[ledger]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ledger {
    /// The checkpoint origin, e.g. `ledger.example.gouv.fr/vigie`. Default
    /// `vigie-ledger/<host name>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The ledger's private key. Default `<data-dir>/ledger.key`, created on first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    pub id: String,
    /// The key as `vigie keygen` prints it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
    /// Or a file holding it (e.g. the sidecar's `sidecar.pub` on a shared
    /// volume); read again whenever the sidecar is not known yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
}

fn keys_of(section: &str) -> &'static [&'static str] {
    match section {
        "server" => &["listen", "max_body_bytes"],
        "data" => &["dir"],
        "ledger" => &["origin", "key"],
        "log" => &["format", "level"],
        _ => &[],
    }
}

impl Config {
    pub fn load(
        file: Option<&Path>,
        env: &dyn Env,
        flags: &[Flag],
    ) -> Result<Self, crate::config::ConfigError> {
        crate::config::load_layers(file, env, flags, keys_of)
    }
}

/// The enrollment file the `enroll` command writes, beside the store.
pub fn enrollment_file(data_dir: &Path) -> PathBuf {
    data_dir.join("sidecars.toml")
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollmentFile {
    #[serde(default)]
    sidecars: Vec<Enrolled>,
}

/// `vigie ledger enroll`: adds (or replaces) a sidecar's key in the data
/// directory's enrollment file. The running ledger picks it up on the next
/// batch from that sidecar.
pub fn enroll(data_dir: &Path, id: &str, public_key: &str) -> anyhow::Result<()> {
    let key = PublicKey::decode(public_key)?;
    if key.name != id {
        anyhow::bail!(
            "the key is named `{}`, not `{id}`: a sidecar signs under its own id",
            key.name
        );
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create `{}`", data_dir.display()))?;
    let path = enrollment_file(data_dir);
    let mut file: EnrollmentFile = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("`{}`", path.display()))?,
        Err(_) => EnrollmentFile::default(),
    };
    file.sidecars.retain(|s| s.id != id);
    file.sidecars.push(Enrolled {
        id: id.to_owned(),
        public_key: public_key.to_owned(),
        public_key_file: None,
    });
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, toml::to_string(&file)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Enrolled keys: the config's, then the enrollment file's (re-read when a
/// sidecar is not known yet).
#[derive(Debug)]
struct Keys {
    config: Vec<Enrolled>,
    file: PathBuf,
    known: RwLock<BTreeMap<String, PublicKey>>,
}

impl Keys {
    fn load(&self) -> anyhow::Result<()> {
        let mut known = BTreeMap::new();
        let mut all = self.config.clone();
        if let Ok(text) = std::fs::read_to_string(&self.file) {
            let f: EnrollmentFile =
                toml::from_str(&text).with_context(|| format!("`{}`", self.file.display()))?;
            all.extend(f.sidecars);
        }
        for e in all {
            let text = match &e.public_key_file {
                Some(path) if e.public_key.is_empty() => match std::fs::read_to_string(path) {
                    Ok(t) => t.trim().to_owned(),
                    // Not there yet (the sidecar has not started): skip it for now.
                    Err(_) => continue,
                },
                _ => e.public_key.clone(),
            };
            let key =
                PublicKey::decode(&text).with_context(|| format!("enrolled sidecar `{}`", e.id))?;
            known.insert(e.id, key);
        }
        if let Ok(mut k) = self.known.write() {
            *k = known;
        }
        Ok(())
    }

    fn get(&self, id: &str) -> Option<PublicKey> {
        if let Some(k) = self.known.read().ok().and_then(|k| k.get(id).cloned()) {
            return Some(k);
        }
        let _ = self.load();
        self.known.read().ok().and_then(|k| k.get(id).cloned())
    }
}

struct State {
    store: Store,
    keys: Keys,
    max_body: usize,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    batches: std::sync::atomic::AtomicU64,
    records: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_resp(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json_resp(
        status,
        &json!({"error": {"code": code, "message": message.into(), "path": ""}}),
    )
}

/// Opens the store and serves until stopped.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data.dir).with_context(|| {
        format!(
            "cannot create the data directory `{}`",
            config.data.dir.display()
        )
    })?;
    let origin = config
        .ledger
        .origin
        .clone()
        .unwrap_or_else(|| format!("vigie-ledger/{}", crate::state::host_name()));
    let key_path = config
        .ledger
        .key
        .clone()
        .unwrap_or_else(|| config.data.dir.join("ledger.key"));
    let (key, created) = KeyPair::load_or_create(&key_path, &origin)?;
    if created {
        tracing::info!(path = %key_path.display(), "ledger key created");
    }
    tracing::info!(public_key = %key.public().encode(), "ledger key (give it to auditors for `vigie verify --ledger-key`)");
    let store = Store::open(&config.data.dir, key, origin).map_err(|e| anyhow::anyhow!(e))?;
    let keys = Keys {
        config: config.sidecars.clone(),
        file: enrollment_file(&config.data.dir),
        known: RwLock::new(BTreeMap::new()),
    };
    keys.load()?;
    let state = Arc::new(State {
        store,
        keys,
        max_body: config.server.max_body_bytes,
        counters: Counters::default(),
    });
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "listening (ledger)");
    let accept = async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(Arc::clone(&state), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    };
    tokio::select! {
        () = accept => {}
        _ = tokio::signal::ctrl_c() => {}
        () = crate::app::terminated() => {}
    }
    tracing::info!("ledger shutting down");
    Ok(())
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

/// The tree size a signed checkpoint states (its second line).
fn tree_size(checkpoint: &str) -> u64 {
    checkpoint
        .lines()
        .nth(1)
        .and_then(|l| l.parse::<u64>().ok())
        .unwrap_or(0)
}

fn percent_decode(s: &str) -> String {
    crate::extauthz::percent_decode(&s.replace('+', " "))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let resp = match (method.clone(), path.as_str()) {
        (Method::POST, "/v1/batches") => ingest(&state, req).await,
        (Method::GET, "/v1/decisions") => decisions(&state, &query(&req)),
        (Method::GET, p) if p.starts_with("/v1/decisions/") => {
            decision(&state, &p["/v1/decisions/".len()..])
        }
        (Method::GET, "/v1/export") => export(&state, &query(&req)),
        (Method::GET, "/v1/checkpoint") => {
            let mut r = Response::new(full(state.store.checkpoint()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        (Method::GET, "/v1/events") => {
            json_resp(StatusCode::OK, &json!({"events": state.store.events()}))
        }
        (Method::GET, "/healthz") => json_resp(StatusCode::OK, &json!({"status": "ok"})),
        (Method::GET, "/readyz") => json_resp(
            StatusCode::OK,
            &json!({"status": "ready", "size": state.store.size()}),
        ),
        (Method::GET, "/metrics") => {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &state.counters;
            let mut r = Response::new(full(format!(
                "# HELP vigie_ledger_batches_total Batches accepted.\n# TYPE vigie_ledger_batches_total counter\nvigie_ledger_batches_total {}\n\
                 # HELP vigie_ledger_records_total Records appended.\n# TYPE vigie_ledger_records_total counter\nvigie_ledger_records_total {}\n\
                 # HELP vigie_ledger_refused_total Batches refused.\n# TYPE vigie_ledger_refused_total counter\nvigie_ledger_refused_total {}\n\
                 # HELP vigie_ledger_tree_size Records in the Merkle tree.\n# TYPE vigie_ledger_tree_size gauge\nvigie_ledger_tree_size {}\n",
                c.batches.load(Relaxed),
                c.records.load(Relaxed),
                c.refused.load(Relaxed),
                state.store.size()
            )));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (
            _,
            "/v1/batches" | "/v1/decisions" | "/v1/export" | "/v1/checkpoint" | "/v1/events"
            | "/healthz" | "/readyz" | "/metrics",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("`{method}` is not allowed on `{path}`"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for `{path}`"),
        ),
    };
    Ok(resp)
}

async fn ingest(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    use std::sync::atomic::Ordering::Relaxed;
    let gzip = req
        .headers()
        .get(CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let bytes = match Limited::new(req.into_body(), state.max_body)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the batch is too large",
            )
        }
    };
    let state = Arc::clone(state);
    let result = tokio::task::spawn_blocking(move || {
        let raw = if gzip {
            let mut out = Vec::new();
            let limit = state.max_body as u64;
            match flate2::read::GzDecoder::new(&bytes[..])
                .take(limit + 1)
                .read_to_end(&mut out)
            {
                Ok(n) if n as u64 <= limit => out,
                _ => {
                    return Err(Box::new(error(
                        StatusCode::BAD_REQUEST,
                        "bad_batch",
                        "the body is not valid gzip, or too large",
                    )))
                }
            }
        } else {
            bytes.to_vec()
        };
        let body: BatchBody = serde_json::from_slice(&raw).map_err(|e| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                "bad_batch",
                format!("the body is not a batch: {e}"),
            ))
        })?;
        let result = state.store.ingest(&body, &|id| state.keys.get(id));
        Ok((state, result))
    })
    .await;
    match result {
        Ok(Ok((state, Ok(a)))) => {
            state.counters.batches.fetch_add(1, Relaxed);
            state.counters.records.fetch_add(a.appended, Relaxed);
            json_resp(
                StatusCode::OK,
                &json!({"next": a.next, "committed": a.next.checked_sub(1), "appended": a.appended, "duplicates": a.duplicates}),
            )
        }
        Ok(Ok((state, Err(r)))) => {
            state.counters.refused.fetch_add(1, Relaxed);
            tracing::warn!(code = r.code, "batch refused: {}", r.message);
            json_resp(
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
                &json!({"error": {"code": r.code, "message": r.message, "path": "", "expected": r.expected}}),
            )
        }
        Ok(Err(resp)) => *resp,
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Whether a record's `ts` is within the query's `from` (inclusive) and `to`.
fn in_time_range(rec: &Value, q: &BTreeMap<String, String>) -> bool {
    let ts = rec["ts"].as_str();
    q.get("from")
        .is_none_or(|f| ts.is_some_and(|ts| ts >= f.as_str()))
        && q.get("to")
            .is_none_or(|t| ts.is_some_and(|ts| ts < t.as_str()))
}

fn matches(rec: &Value, q: &BTreeMap<String, String>) -> bool {
    let eq = |field: &str, v: &Value| {
        q.get(field)
            .is_none_or(|want| v.as_str() == Some(want.as_str()))
    };
    rec["kind"] == "decision"
        && eq("sidecar", &rec["sidecar"])
        && eq("principal", &rec["request"]["principal"])
        && eq("action", &rec["request"]["action"])
        && eq("decision", &rec["decision"])
        && in_time_range(rec, q)
}

fn decisions(state: &State, q: &BTreeMap<String, String>) -> Response<Body> {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let cursor = q
        .get("cursor")
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(0);
    let mut out = Vec::new();
    let mut next = None;
    for stored in state.store.records_from(cursor) {
        if out.len() == limit {
            next = Some(stored.index.to_string());
            break;
        }
        let Ok(rec) = serde_json::from_slice::<Value>(&stored.bytes) else {
            continue;
        };
        if matches(&rec, q) {
            out.push(rec);
        }
    }
    json_resp(
        StatusCode::OK,
        &json!({"decisions": out, "next_cursor": next}),
    )
}

fn decision(state: &State, id: &str) -> Response<Body> {
    let Some(index) = state.store.index_of(id) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no decision `{id}`"),
        );
    };
    let Some(bytes) = state.store.record(index) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no decision `{id}`"),
        );
    };
    let checkpoint = state.store.checkpoint();
    let size = tree_size(&checkpoint);
    let leaves = state.store.leaves_upto(size);
    let proof = merkle::inclusion_proof(index as usize, &leaves);
    json_resp(
        StatusCode::OK,
        &json!({
            "record": serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            "bytes": B64.encode(&bytes),
            "index": index,
            "leaf_hash": B64.encode(crate::audit::leaf_hash(&bytes)),
            "tree_size": size,
            "inclusion_proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
            "checkpoint": checkpoint,
        }),
    )
}

/// One export line: records (exact bytes, with the chain hashes around
/// them), leaves of records outside the time range, batch notes,
/// heartbeats, the ledger's key and the checkpoint.
fn export(state: &Arc<State>, q: &BTreeMap<String, String>) -> Response<Body> {
    if q.get("format").is_some_and(|f| f != "ndjson") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_option",
            "only `format=ndjson` is supported",
        );
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let state = Arc::clone(state);
    let q = q.clone();
    tokio::task::spawn_blocking(move || {
        let checkpoint = state.store.checkpoint();
        let size = tree_size(&checkpoint);
        let mut buf = String::new();
        let push = |v: Value, buf: &mut String| -> bool {
            buf.push_str(&v.to_string());
            buf.push('\n');
            if buf.len() > 64 << 10 {
                let chunk = std::mem::take(buf);
                return tx
                    .blocking_send(Ok(Frame::data(Bytes::from(chunk))))
                    .is_ok();
            }
            true
        };
        push(
            json!({"type": "ledger", "public_key": state.store.public_key().encode()}),
            &mut buf,
        );
        let known: Vec<(String, String)> = state
            .keys
            .known
            .read()
            .map(|k| {
                k.iter()
                    .map(|(id, key)| (id.clone(), key.encode()))
                    .collect()
            })
            .unwrap_or_default();
        for (id, key) in known {
            push(
                json!({"type": "sidecar", "id": id, "public_key": key}),
                &mut buf,
            );
        }
        let ranged = q.contains_key("from") || q.contains_key("to");
        for stored in state.store.records_from(0) {
            let (index, bytes) = (stored.index, &stored.bytes);
            if index >= size {
                break;
            }
            let rec: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
            let in_range = !ranged || in_time_range(&rec, &q);
            let line = if in_range {
                let (prev, chain) = (stored.prev, stored.chain);
                json!({"type": "record", "index": index, "decision_id": rec["decision_id"], "sidecar": rec["sidecar"],
                       "chain_id": rec["chain"], "seq": rec["seq"], "prev": B64.encode(prev), "chain": B64.encode(chain),
                       "bytes": B64.encode(bytes)})
            } else {
                json!({"type": "leaf", "index": index, "leaf": B64.encode(crate::audit::leaf_hash(bytes))})
            };
            if !push(line, &mut buf) {
                return;
            }
        }
        for b in state.store.batches() {
            let mut b = b;
            b["type"] = json!("batch");
            if !push(b, &mut buf) {
                return;
            }
        }
        for (sidecar, note) in state.store.heartbeats() {
            if !push(
                json!({"type": "heartbeat", "sidecar": sidecar, "note": note}),
                &mut buf,
            ) {
                return;
            }
        }
        push(json!({"type": "checkpoint", "note": checkpoint}), &mut buf);
        if !buf.is_empty() {
            let _ = tx.blocking_send(Ok(Frame::data(Bytes::from(buf))));
        }
    });
    let mut r = Response::new(StreamBody::new(Chunks(rx)).boxed());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// A receiver as a stream of body frames.
struct Chunks(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);

impl futures_core::Stream for Chunks {
    type Item = Result<Frame<Bytes>, Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
