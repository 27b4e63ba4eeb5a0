//! The HTTP API (hyper 1): routing, body limits, JSON in and out, and the one
//! place where an [`ApiError`] becomes a response.
//!
//! Handlers take one snapshot of the active bundle per request and hand the
//! decision to the engine; this module must never evaluate policies itself,
//! nor block the runtime (reloads go to a blocking thread).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::authzen::{self, Semantic};
use crate::engine::{InputError, Query};
use crate::metrics::Endpoint;
use crate::state::{Logged, Reloaded, Shared};

pub type Body = Full<Bytes>;

/// An error a caller sees: HTTP status and `{"error":{"code","message","path"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub path: String,
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            path: String::new(),
            allow: None,
        }
    }

    fn at(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message, "path": self.path}})
    }

    fn into_response(self) -> Response<Body> {
        let mut resp = json_response(self.status, &self.body());
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.code, e.message).at(e.path)
    }
}

fn json_response(status: StatusCode, value: &(impl serde::Serialize + ?Sized)) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text_response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Entry point for every request, on every listener.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    use tracing::Instrument as _;
    let request_id = req.headers().get("x-request-id").cloned();
    let endpoint = match req.uri().path() {
        "/v1/is_authorized" => Some(Endpoint::IsAuthorized),
        "/v1/is_authorized/batch" => Some(Endpoint::Batch),
        "/access/v1/evaluation" => Some(Endpoint::AuthzenEvaluation),
        "/access/v1/evaluations" => Some(Endpoint::AuthzenEvaluations),
        _ => None,
    };
    let started = std::time::Instant::now();
    // The caller's trace context (W3C traceparent/tracestate), read once:
    // decisions are its children, log lines carry its trace id.
    let parent = crate::telemetry::from_headers(req.headers());
    // Only a request that carries a trace id gets a log span: a span with
    // nothing in it cost 4% of a cache hit's CPU (created, formatted and
    // dropped by the log layer on every request).
    let span = match crate::telemetry::trace_id(&parent) {
        Some(trace_id) => tracing::info_span!("request", trace_id = trace_id.as_str()),
        None => tracing::Span::none(),
    };
    let routed = route(&shared, req, &parent).instrument(span).await;
    if let Some(e) = endpoint {
        shared.metrics.observe(e, started.elapsed());
    }
    let mut resp = match routed {
        Ok(resp) => resp,
        Err(e) => {
            if e.status == StatusCode::BAD_REQUEST {
                shared.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            }
            e.into_response()
        }
    };
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    Ok(resp)
}

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    parent: &opentelemetry::Context,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let allowed = match path.as_str() {
        "/v1/is_authorized"
        | "/v1/is_authorized/batch"
        | "/access/v1/evaluation"
        | "/access/v1/evaluations"
        | "/v1/reload" => "POST",
        "/healthz"
        | "/readyz"
        | "/v1/status"
        | "/metrics"
        | "/.well-known/authzen-configuration" => "GET, HEAD",
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for `{path}`"),
            ))
        }
    };
    let method_ok = match allowed {
        "POST" => method == Method::POST,
        _ => method == Method::GET || method == Method::HEAD,
    };
    if !method_ok {
        let mut e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("`{method}` is not allowed on `{path}` (allowed: {allowed})"),
        );
        e.allow = Some(allowed);
        return Err(e);
    }

    match path.as_str() {
        "/healthz" => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        "/readyz" => Ok(json_response(
            StatusCode::OK,
            &json!({"status": "ready", "epoch": shared.active().epoch}),
        )),
        "/v1/status" => Ok(json_response(StatusCode::OK, &status(shared))),
        "/metrics" => Ok(text_response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(shared)
                + &shared.metrics.render()
                + &cache_metrics(shared)
                + &log_metrics(shared)
                + &plugin_metrics(shared),
        )),
        "/.well-known/authzen-configuration" => {
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map_or_else(|| shared.config.server.listen.to_string(), str::to_owned);
            let base = format!("http://{host}");
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "policy_decision_point": base,
                    "access_evaluation_endpoint": format!("{base}/access/v1/evaluation"),
                    "access_evaluations_endpoint": format!("{base}/access/v1/evaluations"),
                }),
            ))
        }
        "/v1/reload" => reload(shared).await,
        "/v1/is_authorized" => {
            let body = read_body(shared, req).await?;
            let logged = decide(shared, &body, parent).await?;
            Ok(json_response(StatusCode::OK, &Answer::of(&logged)))
        }
        "/v1/is_authorized/batch" => {
            let batch: Value = read_json(shared, req).await?;
            batch_decide(shared, batch, parent)
                .await
                .map(|v| json_response(StatusCode::OK, &v))
        }
        "/access/v1/evaluation" => {
            let eval: authzen::Evaluation = read_json(shared, req).await?;
            let active = shared.active();
            let input = authzen::to_input(&shared.config.authzen, &active.bundle, eval)?;
            let logged = shared.decide_logged(&active, input, parent).await?;
            shared
                .metrics
                .decision(Endpoint::AuthzenEvaluation, logged.outcome.allow);
            Ok(json_response(StatusCode::OK, &authzen_single(&logged)))
        }
        "/access/v1/evaluations" => {
            let evals: authzen::Evaluations = read_json(shared, req).await?;
            authzen_batch(shared, evals, parent)
                .await
                .map(|v| json_response(StatusCode::OK, &v))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for `{path}`"),
        )),
    }
}

/// Reads a JSON body: content type checked, size capped, errors located.
async fn read_json<T: DeserializeOwned>(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    parse_json(&read_body(shared, req).await?)
}

/// Reads a body that must be JSON: content type checked, size capped.
async fn read_body(shared: &Shared, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let mime = ct.split(';').next().unwrap_or("").trim();
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("expected `application/json`, got `{mime}`"),
            )
            .at("Content-Type"));
        }
    }
    let limit = shared.config.server.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body_unreadable",
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// Parses JSON, naming the field at fault on a data error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // The common case without the path tracking; a body that fails is
    // parsed again with it, for the message.
    if let Ok(parsed) = serde_json::from_slice(bytes) {
        return Ok(parsed);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", inner.to_string())
                    .at(if path == "." { String::new() } else { path })
            }
            _ => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {inner}"),
            ),
        }
    })
}

/// The whole in-process path of `POST /v1/is_authorized` after the body is
/// read: parse, validate, authorize, log, serialize. (Used by the benchmarks.)
pub async fn is_authorized(shared: &Shared, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let logged = decide(shared, body, &opentelemetry::Context::new()).await?;
    Ok(serde_json::to_vec(&Answer::of(&logged)).unwrap_or_default())
}

async fn decide(
    shared: &Shared,
    body: &[u8],
    parent: &opentelemetry::Context,
) -> Result<Logged, ApiError> {
    let active = shared.active();
    let parse = |body: &[u8]| Ok::<_, ApiError>(parse_json::<Query>(body)?.into_input()?);
    let logged = shared.decide_body(&active, body, parse, parent).await?;
    shared
        .metrics
        .decision(Endpoint::IsAuthorized, logged.outcome.allow);
    Ok(logged)
}

/// The native answer, serialized straight from the decision (no JSON tree
/// in between): `{"decision", "diagnostics": {"reason", "errors"},
/// "decision_id", "cached"}`.
#[derive(serde::Serialize)]
struct Answer<'a> {
    decision: &'static str,
    diagnostics: Diagnostics<'a>,
    decision_id: &'a str,
    cached: bool,
}

#[derive(serde::Serialize)]
struct Diagnostics<'a> {
    reason: &'a [String],
    errors: &'a [String],
}

impl<'a> Answer<'a> {
    fn of(l: &'a Logged) -> Self {
        let o = &l.outcome;
        Answer {
            decision: if o.allow { "Allow" } else { "Deny" },
            diagnostics: Diagnostics {
                reason: &o.reasons,
                errors: &o.errors,
            },
            decision_id: &l.decision_id,
            cached: l.cached,
        }
    }
}

fn batch_items(body: Value) -> Result<Vec<Value>, ApiError> {
    match body {
        Value::Object(mut map) => {
            if let Some(extra) = map.keys().find(|k| *k != "requests") {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    format!("unknown field `{extra}`, expected `requests`"),
                )
                .at(extra.clone()));
            }
            match map.remove("requests") {
                Some(Value::Array(r)) => Ok(r),
                _ => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    "expected `requests`: an array of requests",
                )
                .at("requests")),
            }
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "expected an object with `requests`",
        )),
    }
}

fn check_batch_size(shared: &Shared, n: usize, field: &str) -> Result<(), ApiError> {
    let max = shared.config.server.max_batch;
    if n > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "batch_too_large",
            format!("{n} items in one request; the limit is {max}"),
        )
        .at(field));
    }
    Ok(())
}

async fn batch_decide(
    shared: &Shared,
    body: Value,
    parent: &opentelemetry::Context,
) -> Result<Value, ApiError> {
    let requests = batch_items(body)?;
    check_batch_size(shared, requests.len(), "requests")?;
    // One snapshot for the whole batch: every item sees the same policy set.
    let active = shared.active();
    let mut decided = Vec::new();
    let mut slots: Vec<Result<usize, Value>> = Vec::with_capacity(requests.len());
    for (i, item) in requests.into_iter().enumerate() {
        let prefix = format!("requests[{i}]");
        let result = serde_path_to_error::deserialize::<_, Query>(item)
            .map_err(|e| {
                let path = e.path().to_string();
                let err = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    e.into_inner().to_string(),
                );
                if path == "." {
                    err.at(prefix.clone())
                } else {
                    err.at(format!("{prefix}.{path}"))
                }
            })
            .and_then(|q| q.into_input().map_err(|e| ApiError::from(e.under(&prefix))));
        let result = match result {
            Ok(input) => shared
                .decide_draft(&active, input, parent)
                .await
                .map_err(|e| ApiError::from(e.under(&prefix))),
            Err(e) => Err(e),
        };
        match result {
            Ok(d) => {
                slots.push(Ok(decided.len()));
                decided.push(d);
            }
            Err(e) => {
                shared.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                slots.push(Err(e.body()));
            }
        }
    }
    let logged = shared.log_all(decided).await;
    for l in &logged {
        shared.metrics.decision(Endpoint::Batch, l.outcome.allow);
    }
    let responses: Vec<Value> = slots
        .into_iter()
        .map(|slot| match slot {
            Ok(i) => logged
                .get(i)
                .and_then(|l| serde_json::to_value(Answer::of(l)).ok())
                .unwrap_or(Value::Null),
            Err(body) => body,
        })
        .collect();
    Ok(json!({ "responses": responses }))
}

fn authzen_single(l: &Logged) -> Value {
    json!({
        "decision": l.outcome.allow,
        "context": {"decision_id": l.decision_id, "reason": l.outcome.reasons},
    })
}

async fn authzen_batch(
    shared: &Shared,
    req: authzen::Evaluations,
    parent: &opentelemetry::Context,
) -> Result<Value, ApiError> {
    let semantic = Semantic::parse(req.options.as_ref())?;
    let active = shared.active();
    let items = match req.evaluations {
        // Without items, the request is a single evaluation (AuthZEN 1.0, 7.1).
        None => {
            let eval = req.defaults.complete()?;
            let input = authzen::to_input(&shared.config.authzen, &active.bundle, eval)?;
            let logged = shared.decide_logged(&active, input, parent).await?;
            shared
                .metrics
                .decision(Endpoint::AuthzenEvaluations, logged.outcome.allow);
            return Ok(authzen_single(&logged));
        }
        Some(items) => items,
    };
    check_batch_size(shared, items.len(), "evaluations")?;
    let mut out = Vec::with_capacity(items.len());
    // Short-circuit semantics need each answer before the next question;
    // execute_all logs the whole batch in one group commit.
    let mut decided = Vec::new();
    let mut slots: Vec<Result<usize, Value>> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let prefix = format!("evaluations[{i}]");
        let result = item
            .over(&req.defaults)
            .complete()
            .and_then(|e| authzen::to_input(&shared.config.authzen, &active.bundle, e));
        let result = match result {
            Ok(input) => shared.decide_draft(&active, input, parent).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(d) if semantic == Semantic::ExecuteAll => {
                slots.push(Ok(decided.len()));
                decided.push(d);
            }
            Ok(d) => {
                let allow = shared.log_one(d).await.outcome.allow;
                shared.metrics.decision(Endpoint::AuthzenEvaluations, allow);
                out.push(json!({"decision": allow}));
                if semantic.stops_after(allow) {
                    break;
                }
            }
            Err(e) => {
                let e = e.under(&prefix);
                shared.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                let failed = json!({
                    "decision": false,
                    "context": {"error": {"status": 400, "code": e.code, "message": e.message, "path": e.path}},
                });
                if semantic == Semantic::ExecuteAll {
                    slots.push(Err(failed));
                } else {
                    out.push(failed);
                    if semantic.stops_after(false) {
                        break;
                    }
                }
            }
        }
    }
    if semantic == Semantic::ExecuteAll {
        let logged = shared.log_all(decided).await;
        for l in &logged {
            shared
                .metrics
                .decision(Endpoint::AuthzenEvaluations, l.outcome.allow);
        }
        out = slots
            .into_iter()
            .map(|slot| match slot {
                Ok(i) => json!({"decision": logged.get(i).is_some_and(|l| l.outcome.allow)}),
                Err(v) => v,
            })
            .collect();
    }
    Ok(json!({ "evaluations": out }))
}

async fn reload(shared: &Arc<Shared>) -> Result<Response<Body>, ApiError> {
    let s = Arc::clone(shared);
    let result = tokio::task::spawn_blocking(move || s.reload())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reload_failed",
                format!("reload task failed: {e}"),
            )
        })?;
    match result {
        Ok(r) => {
            let (changed, epoch) = match r {
                Reloaded::Swapped(e) => (true, e),
                Reloaded::Unchanged(e) => (false, e),
            };
            Ok(json_response(
                StatusCode::OK,
                &json!({"reloaded": changed, "epoch": epoch, "hash": shared.active().bundle.hash}),
            ))
        }
        Err(problems) => {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reload_refused",
                format!(
                    "the policy directory does not validate; the last good set stays active:\n{problems}"
                ),
            );
            e.path = problems
                .0
                .first()
                .map(|p| format!("{}:{}:{}", p.file, p.line, p.col))
                .unwrap_or_default();
            Err(e)
        }
    }
}

fn unix_secs(t: std::time::SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn status(shared: &Shared) -> Value {
    let active = shared.active();
    let b = &active.bundle;
    let reload = shared.reload_status();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "policy": {
            "dir": b.dir.display().to_string(),
            "epoch": active.epoch,
            "hash": b.hash,
            "loaded_at": unix_secs(active.loaded_at),
            "validation": b.validation,
            "schema": b.schema.is_some(),
            "namespace": b.namespace,
            "policies": b.counts.policies,
            "templates": b.counts.templates,
            "links": b.counts.links,
            "entities": b.counts.entities,
            "warnings": b.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        },
        "reload": {
            "reloads": reload.reloads,
            "failures": reload.failures,
            "last_attempt": reload.last_attempt.map(unix_secs),
            "last_error": reload.last_error.map(|ps| ps.iter().map(ToString::to_string).collect::<Vec<_>>()),
        },
        "cache": cache_status(shared),
        "log": log_status(shared),
        "plugins": plugin_status(shared, &active),
        "decisions": {
            "allow": shared.metrics.totals().0,
            "deny": shared.metrics.totals().1,
            "bad_requests": shared.counters.bad_requests.load(Ordering::Relaxed),
        },
    })
}

fn cache_status(shared: &Shared) -> Value {
    let c = &shared.cache;
    let s = &c.stats;
    let (n1, b1, n2, b2) = c.sizes();
    let (nb, bb) = c.bodies();
    json!({
        "enabled": c.enabled(),
        "ttl_ms": c.ttl().as_millis() as u64,
        "misses": s.misses.load(Ordering::Relaxed),
        "expired": s.expired.load(Ordering::Relaxed),
        "l1": {"hits": s.l1_hits.load(Ordering::Relaxed), "evictions": s.l1_evictions.load(Ordering::Relaxed), "entries": n1, "bytes": b1},
        "l2": {"enabled": c.l2_enabled(), "hits": s.l2_hits.load(Ordering::Relaxed), "evictions": s.l2_evictions.load(Ordering::Relaxed), "entries": n2, "bytes": b2},
        "bodies": {"hits": s.body_hits.load(Ordering::Relaxed), "entries": nb, "bytes": bb},
    })
}

fn log_status(shared: &Shared) -> Value {
    let log = &shared.log;
    let p = &log.outbox.position;
    let (written, _) = p.head();
    let acked = p.acked.load(Ordering::Relaxed);
    let bytes = p.bytes.load(Ordering::Relaxed);
    let max = shared.config.audit.max_outbox_bytes;
    let s = &log.shipper;
    json!({
        "sidecar_id": log.sidecar_id,
        "public_key": log.key.public().encode(),
        "chain": p.chain,
        "durability": shared.config.audit.durability,
        "ledger": shared.config.audit.ledger,
        "outbox": {
            "next_seq": written,
            "acknowledged": acked,
            "pending": written.saturating_sub(acked),
            "bytes": bytes,
            "max_bytes": max,
            "fill": if max == 0 { 0.0 } else { bytes as f64 / max as f64 },
            "write_failures": p.write_failures.load(Ordering::Relaxed),
            "full_refusals": p.full_refusals.load(Ordering::Relaxed),
        },
        "shipper": {
            "batches": s.batches.load(Ordering::Relaxed),
            "records": s.records.load(Ordering::Relaxed),
            "heartbeats": s.heartbeats.load(Ordering::Relaxed),
            "failures": s.failures.load(Ordering::Relaxed),
            "last_error": s.last_error.lock().ok().and_then(|e| e.clone()),
        },
    })
}

fn log_metrics(shared: &Shared) -> String {
    let p = &shared.log.outbox.position;
    let (written, _) = p.head();
    let acked = p.acked.load(Ordering::Relaxed);
    let bytes = p.bytes.load(Ordering::Relaxed);
    let max = shared.config.audit.max_outbox_bytes.max(1);
    let s = &shared.log.shipper;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    format!(
        "# HELP vigie_outbox_records Decision records not yet acknowledged by the ledger.\n\
         # TYPE vigie_outbox_records gauge\n\
         vigie_outbox_records {}\n\
         # HELP vigie_outbox_bytes Bytes held in the outbox.\n\
         # TYPE vigie_outbox_bytes gauge\n\
         vigie_outbox_bytes {}\n\
         # HELP vigie_outbox_fill_ratio Outbox bytes over its configured maximum.\n\
         # TYPE vigie_outbox_fill_ratio gauge\n\
         vigie_outbox_fill_ratio {}\n\
         # HELP vigie_outbox_write_failures_total Group writes that failed (their decisions were denied).\n\
         # TYPE vigie_outbox_write_failures_total counter\n\
         vigie_outbox_write_failures_total {}\n\
         # HELP vigie_outbox_full_refusals_total Decisions denied because the outbox was full.\n\
         # TYPE vigie_outbox_full_refusals_total counter\n\
         vigie_outbox_full_refusals_total {}\n\
         # HELP vigie_log_shipped_records_total Records acknowledged by the ledger.\n\
         # TYPE vigie_log_shipped_records_total counter\n\
         vigie_log_shipped_records_total {}\n\
         # HELP vigie_log_shipping_failures_total Failed attempts to ship to the ledger.\n\
         # TYPE vigie_log_shipping_failures_total counter\n\
         vigie_log_shipping_failures_total {}\n",
        written.saturating_sub(acked),
        bytes,
        bytes as f64 / max as f64,
        l(&p.write_failures),
        l(&p.full_refusals),
        l(&s.records),
        l(&s.failures),
    )
}

fn plugin_status(shared: &Shared, active: &crate::state::Active) -> Value {
    let loaded: Vec<Value> = active
        .plugins
        .plugins
        .iter()
        .map(|p| {
            let s = &p.stats;
            let faults = s.faults.lock().map(|f| f.clone()).unwrap_or_default();
            let calls = s.ok.load(Ordering::Relaxed) + faults.values().sum::<u64>();
            json!({
                "name": p.spec.name,
                "path": p.spec.path.display().to_string(),
                "sha256": p.spec.wasm_hash,
                "actions": p.spec.actions,
                "timeout_ms": p.spec.timeout.as_millis() as u64,
                "memory_mib": p.spec.memory_bytes >> 20,
                "failure": p.spec.failure,
                "quarantined": s.quarantined.load(Ordering::Relaxed),
                "quarantines": s.quarantines.load(Ordering::Relaxed),
                "ok": s.ok.load(Ordering::Relaxed),
                "faults": faults,
                "mean_us": if calls == 0 { 0.0 } else { s.nanos.load(Ordering::Relaxed) as f64 / calls as f64 / 1e3 },
                "log_lines": s.log_lines.load(Ordering::Relaxed),
                "log_dropped": s.log_dropped.load(Ordering::Relaxed),
            })
        })
        .collect();
    json!({
        "enabled": shared.plugin_host.is_some(),
        "loaded": loaded,
    })
}

/// Per plugin: calls by result, time in calls, quarantine, log lines.
fn plugin_metrics(shared: &Shared) -> String {
    let Some(host) = &shared.plugin_host else {
        return String::new();
    };
    let stats = host.all_stats();
    let mut out = String::from(
        "# HELP vigie_plugin_calls_total Plugin calls, by plugin and result (ok or the fault).\n\
         # TYPE vigie_plugin_calls_total counter\n",
    );
    for (name, s) in &stats {
        out += &format!(
            "vigie_plugin_calls_total{{plugin=\"{name}\",result=\"ok\"}} {}\n",
            s.ok.load(Ordering::Relaxed)
        );
        for (kind, n) in s.faults.lock().map(|f| f.clone()).unwrap_or_default() {
            out +=
                &format!("vigie_plugin_calls_total{{plugin=\"{name}\",result=\"{kind}\"}} {n}\n");
        }
    }
    out += "# HELP vigie_plugin_call_seconds_total Time spent in plugin calls (instantiation included).\n\
            # TYPE vigie_plugin_call_seconds_total counter\n";
    for (name, s) in &stats {
        out += &format!(
            "vigie_plugin_call_seconds_total{{plugin=\"{name}\"}} {}\n",
            s.nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
    }
    out += "# HELP vigie_plugin_quarantined Whether the plugin is quarantined now.\n\
            # TYPE vigie_plugin_quarantined gauge\n";
    for (name, s) in &stats {
        out += &format!(
            "vigie_plugin_quarantined{{plugin=\"{name}\"}} {}\n",
            u8::from(s.quarantined.load(Ordering::Relaxed))
        );
    }
    out += "# HELP vigie_plugin_log_lines_total Log lines written by plugins.\n\
            # TYPE vigie_plugin_log_lines_total counter\n";
    for (name, s) in &stats {
        out += &format!(
            "vigie_plugin_log_lines_total{{plugin=\"{name}\"}} {}\n",
            s.log_lines.load(Ordering::Relaxed)
        );
    }
    out += "# HELP vigie_plugin_log_lines_dropped_total Plugin log lines dropped by the per-call and rate caps.\n\
            # TYPE vigie_plugin_log_lines_dropped_total counter\n";
    for (name, s) in &stats {
        out += &format!(
            "vigie_plugin_log_lines_dropped_total{{plugin=\"{name}\"}} {}\n",
            s.log_dropped.load(Ordering::Relaxed)
        );
    }
    out
}

fn cache_metrics(shared: &Shared) -> String {
    let c = &shared.cache;
    let s = &c.stats;
    let (n1, b1, n2, b2) = c.sizes();
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    format!(
        "# HELP vigie_cache_hits_total Decisions answered from the cache, by tier.\n\
         # TYPE vigie_cache_hits_total counter\n\
         vigie_cache_hits_total{{tier=\"l1\"}} {}\n\
         vigie_cache_hits_total{{tier=\"l2\"}} {}\n\
         # HELP vigie_cache_misses_total Lookups that found no live entry.\n\
         # TYPE vigie_cache_misses_total counter\n\
         vigie_cache_misses_total {}\n\
         # HELP vigie_cache_evictions_total Entries evicted to stay within bounds, by tier.\n\
         # TYPE vigie_cache_evictions_total counter\n\
         vigie_cache_evictions_total{{tier=\"l1\"}} {}\n\
         vigie_cache_evictions_total{{tier=\"l2\"}} {}\n\
         # HELP vigie_cache_expired_total Entries dropped because their lifetime ended.\n\
         # TYPE vigie_cache_expired_total counter\n\
         vigie_cache_expired_total {}\n\
         # HELP vigie_cache_entries Entries held, by tier.\n\
         # TYPE vigie_cache_entries gauge\n\
         vigie_cache_entries{{tier=\"l1\"}} {}\n\
         vigie_cache_entries{{tier=\"l2\"}} {}\n\
         # HELP vigie_cache_bytes Bytes held, by tier (L1 approximate, L2 on disk).\n\
         # TYPE vigie_cache_bytes gauge\n\
         vigie_cache_bytes{{tier=\"l1\"}} {}\n\
         vigie_cache_bytes{{tier=\"l2\"}} {}\n",
        l(&s.l1_hits),
        l(&s.l2_hits),
        l(&s.misses),
        l(&s.l1_evictions),
        l(&s.l2_evictions),
        l(&s.expired),
        n1,
        n2,
        b1,
        b2,
    )
}

fn metrics(shared: &Shared) -> String {
    let active = shared.active();
    let reload = shared.reload_status();
    let c = &shared.counters;
    format!(
        "# HELP vigie_decisions_total Decisions answered, by result.\n\
         # TYPE vigie_decisions_total counter\n\
         vigie_decisions_total{{decision=\"allow\"}} {}\n\
         vigie_decisions_total{{decision=\"deny\"}} {}\n\
         # HELP vigie_bad_requests_total Requests refused as invalid (HTTP 400).\n\
         # TYPE vigie_bad_requests_total counter\n\
         vigie_bad_requests_total {}\n\
         # HELP vigie_policy_epoch Epoch of the active policy set.\n\
         # TYPE vigie_policy_epoch gauge\n\
         vigie_policy_epoch {}\n\
         # HELP vigie_policy_reloads_total Policy reloads that activated a new set.\n\
         # TYPE vigie_policy_reloads_total counter\n\
         vigie_policy_reloads_total {}\n\
         # HELP vigie_policy_reload_failures_total Policy reloads refused by validation.\n\
         # TYPE vigie_policy_reload_failures_total counter\n\
         vigie_policy_reload_failures_total {}\n\
         # HELP vigie_build_info Build information.\n\
         # TYPE vigie_build_info gauge\n\
         vigie_build_info{{version=\"{}\"}} 1\n",
        shared.metrics.totals().0,
        shared.metrics.totals().1,
        c.bad_requests.load(Ordering::Relaxed),
        active.epoch,
        reload.reloads,
        reload.failures,
        env!("CARGO_PKG_VERSION"),
    )
}
