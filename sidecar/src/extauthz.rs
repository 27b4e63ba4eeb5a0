//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`)
//! over gRPC (tonic), so a mesh can put Vigie in front of any service.
//!
//! A `CheckRequest` is mapped onto a Cedar request by the `[ext_authz]`
//! config, checked against the schema at start: the principal from the first
//! identity source that yields one (the peer's SPIFFE id, a verified JWT claim
//! that Envoy's `jwt_authn` filter put in the metadata, or a header); action
//! and resource from a route table (`GET /records/{id}` → `read` on
//! `Agency::Record::"{id}"`); context from the source address, the request
//! time, chosen headers and TLS facts. The decision goes through the same
//! cache and decision log as the HTTP API.
//!
//! Invariant: nothing here answers OK except an Allow from the engine whose
//! record was logged. A request the mapping cannot place is denied (and
//! logged with its reason), never an error a proxy might fail open on; only
//! a request too malformed to map (no HTTP attributes) gets a gRPC error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use envoy_types::pb::google::rpc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::audit::{Asked, Draft};
use crate::engine::{self, Input, Outcome, Paths};
use crate::state::Shared;

/// `[ext_authz]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Serve ext_authz at all. Default false (`--ext-authz-listen` turns it on).
    pub enabled: bool,
    /// Default `127.0.0.1:9191`.
    pub listen: SocketAddr,
    /// Where the principal comes from, tried in order.
    pub identity: Vec<Identity>,
    /// Method + path pattern → action and resource.
    pub routes: Vec<Route>,
    /// What goes into the Cedar context.
    pub context: ContextMap,
    /// HTTP status Envoy returns on a denial. Default 403.
    pub denied_status: u16,
    /// Body Envoy returns on a denial. Default `access denied\n`.
    pub denied_body: String,
    /// Headers added to both answers (besides `x-vigie-decision-id`).
    pub headers: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 9191)),
            identity: Vec::new(),
            routes: Vec::new(),
            context: ContextMap::default(),
            denied_status: 403,
            denied_body: "access denied\n".into(),
            headers: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// `spiffe` (the peer's `source.principal`), `jwt` (a claim of a payload
    /// `jwt_authn` verified) or `header`.
    pub source: IdentitySource,
    /// The Cedar entity type of the principal, e.g. `Agency::User`.
    pub entity_type: String,
    /// For `header`: the header name. For `jwt`: the key under which
    /// `jwt_authn` stores the payload (`payload_in_metadata`). Default
    /// `jwt_payload`.
    #[serde(default)]
    pub name: Option<String>,
    /// For `jwt`: the claim. Default `sub`.
    #[serde(default)]
    pub claim: Option<String>,
    /// Removed from the front of the value, e.g. `spiffe://agency.example/user/`.
    #[serde(default)]
    pub strip_prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentitySource {
    Spiffe,
    Jwt,
    Header,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `GET`, `POST`, ... or `*`.
    pub method: String,
    /// `/records/{id}`: literal segments and `{name}` parameters.
    pub path: String,
    /// The action id, in the schema's namespace (`read`).
    pub action: String,
    /// The resource's entity type (`Agency::Record`).
    pub resource_type: String,
    /// The resource id, with `{name}` parameters replaced (`{id}`).
    pub resource_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextMap {
    /// Context attribute for the source address (an `ipaddr`), e.g. `ip`.
    pub source_ip: Option<String>,
    /// Context attribute for the request time (a `datetime`), e.g. `now`.
    pub request_time: Option<String>,
    /// Context attribute for the TLS SNI (a `String`).
    pub tls_sni: Option<String>,
    /// Request header → context attribute, e.g. `{ "x-risk-score" = "risk" }`.
    pub headers: BTreeMap<String, String>,
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

impl Route {
    /// The path parameters if this route matches.
    fn matches(&self, method: &str, path: &str) -> Option<BTreeMap<String, String>> {
        if self.method != "*" && !self.method.eq_ignore_ascii_case(method) {
            return None;
        }
        let path = path.split('?').next().unwrap_or("");
        let mut params = BTreeMap::new();
        let mut want = segments(&self.path);
        let mut got = segments(path);
        loop {
            match (want.next(), got.next()) {
                (None, None) => return Some(params),
                (Some(w), Some(g)) => {
                    if let Some(name) = w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                        params.insert(name.to_owned(), percent_decode(g));
                    } else if w != g {
                        return None;
                    }
                }
                _ => return None,
            }
        }
    }
}

/// `%xx` escapes decoded (a malformed one is kept as it is).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn fill(template: &str, params: &BTreeMap<String, String>) -> String {
    let mut out = template.to_owned();
    for (k, v) in params {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// Checks the mapping against the active schema; every problem is named.
pub fn check_config(config: &Config, shared: &Shared) -> Result<(), String> {
    let active = shared.active();
    let bundle = &active.bundle;
    let ns = bundle.namespace.as_deref();
    let mut problems = Vec::new();
    if config.identity.is_empty() {
        problems.push("[ext_authz] needs at least one `identity` source".to_owned());
    }
    let types: Vec<String> = bundle
        .schema
        .as_ref()
        .map(|s| s.entity_types().map(ToString::to_string).collect())
        .unwrap_or_default();
    let known_type = |t: &str| bundle.schema.is_none() || types.iter().any(|k| k == t);
    for (i, id) in config.identity.iter().enumerate() {
        if !known_type(&id.entity_type) {
            problems.push(format!(
                "[ext_authz] identity[{i}]: entity type `{}` is not in the schema",
                id.entity_type
            ));
        }
        if id.source == IdentitySource::Header && id.name.is_none() {
            problems.push(format!(
                "[ext_authz] identity[{i}]: a `header` source needs `name`"
            ));
        }
    }
    for (i, r) in config.routes.iter().enumerate() {
        if !r.path.starts_with('/') {
            problems.push(format!(
                "[ext_authz] routes[{i}]: path `{}` must start with `/`",
                r.path
            ));
        }
        if !known_type(&r.resource_type) {
            problems.push(format!(
                "[ext_authz] routes[{i}]: entity type `{}` is not in the schema",
                r.resource_type
            ));
        }
        let action = action_uid(ns, &r.action);
        match (&action, &bundle.schema) {
            (Ok(a), Some(s)) if !s.actions().any(|x| x == a) => {
                problems.push(format!(
                    "[ext_authz] routes[{i}]: action `{a}` is not in the schema"
                ));
            }
            (Err(e), _) => problems.push(format!("[ext_authz] routes[{i}]: {e}")),
            _ => {}
        }
        let params: Vec<&str> = segments(&r.path)
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let mut rest = r.resource_id.clone();
        for p in &params {
            rest = rest.replace(&format!("{{{p}}}"), "");
        }
        if rest.contains('{') {
            problems.push(format!("[ext_authz] routes[{i}]: resource_id `{}` names a parameter the path does not have", r.resource_id));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn action_uid(ns: Option<&str>, action: &str) -> Result<cedar_policy::EntityUid, String> {
    let ty = ns.map_or_else(|| "Action".to_owned(), |ns| format!("{ns}::Action"));
    engine::uid(&ty, action)
}

/// A protobuf Struct as JSON.
fn struct_json(s: &Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &envoy_types::pb::google::protobuf::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_json).collect()),
    }
}

/// Why a request could not be placed.
struct Unplaced {
    code: &'static str,
    message: String,
}

struct Mapped {
    input: Input,
}

fn principal(
    config: &Config,
    req: &CheckRequest,
    headers: &std::collections::HashMap<String, String>,
) -> Result<cedar_policy::EntityUid, Unplaced> {
    let attrs = req.attributes.as_ref();
    for id in &config.identity {
        let raw = match id.source {
            IdentitySource::Spiffe => attrs
                .and_then(|a| a.source.as_ref())
                .map(|p| p.principal.clone())
                .filter(|p| !p.is_empty()),
            IdentitySource::Header => id
                .name
                .as_ref()
                .and_then(|n| headers.get(&n.to_ascii_lowercase()).cloned()),
            IdentitySource::Jwt => {
                let key = id.name.as_deref().unwrap_or("jwt_payload");
                let claim = id.claim.as_deref().unwrap_or("sub");
                attrs
                    .and_then(|a| a.metadata_context.as_ref())
                    .and_then(|m| m.filter_metadata.get("envoy.filters.http.jwt_authn"))
                    .map(struct_json)
                    .and_then(|m| {
                        m.get(key)
                            .and_then(|p| p.get(claim))
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    })
            }
        };
        let Some(raw) = raw else { continue };
        let value = match &id.strip_prefix {
            Some(prefix) => match raw.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.to_owned(),
                None => continue,
            },
            None => raw,
        };
        return engine::uid(&id.entity_type, &value).map_err(|m| Unplaced {
            code: "bad_identity",
            message: m,
        });
    }
    Err(Unplaced {
        code: "no_identity",
        message: "no identity source yielded a principal".into(),
    })
}

fn map(
    config: &Config,
    mask: &[String],
    ns: Option<&str>,
    req: &CheckRequest,
) -> Result<Result<Mapped, (Unplaced, Draft)>, tonic::Status> {
    let attrs = req
        .attributes
        .as_ref()
        .ok_or_else(|| tonic::Status::invalid_argument("the CheckRequest has no attributes"))?;
    let http = attrs
        .request
        .as_ref()
        .and_then(|r| r.http.as_ref())
        .ok_or_else(|| {
            tonic::Status::invalid_argument("the CheckRequest has no HTTP request attributes")
        })?;
    let headers = &http.headers;
    let denied = |u: Unplaced, principal: String, action: String, resource: String| {
        let draft = Draft {
            decision_id: crate::state::decision_id(),
            request: Arc::new(Asked::new(
                [principal, action, resource],
                &serde_json::json!({"method": http.method, "path": http.path}),
                0,
                mask,
            )),
            allow: false,
            reasons: vec![format!("ext_authz_{}", u.code)],
            errors: vec![u.message.clone()],
            epoch: 0,
            policy_hash: String::new(),
            cached: false,
            plugins: Vec::new(),
            trace_id: None,
        };
        Ok(Err((u, draft)))
    };
    let principal = match principal(config, req, headers) {
        Ok(p) => p,
        Err(u) => return denied(u, String::new(), String::new(), String::new()),
    };
    let Some((route, params)) = config
        .routes
        .iter()
        .find_map(|r| r.matches(&http.method, &http.path).map(|p| (r, p)))
    else {
        let u = Unplaced {
            code: "no_route",
            message: format!("no route for `{} {}`", http.method, http.path),
        };
        return denied(u, principal.to_string(), String::new(), String::new());
    };
    let action = match action_uid(ns, &route.action) {
        Ok(a) => a,
        Err(m) => {
            return denied(
                Unplaced {
                    code: "bad_route",
                    message: m,
                },
                principal.to_string(),
                String::new(),
                String::new(),
            )
        }
    };
    let resource = match engine::uid(&route.resource_type, &fill(&route.resource_id, &params)) {
        Ok(r) => r,
        Err(m) => {
            return denied(
                Unplaced {
                    code: "bad_route",
                    message: m,
                },
                principal.to_string(),
                action.to_string(),
                String::new(),
            )
        }
    };
    let mut context = Map::new();
    let c = &config.context;
    if let Some(attr) = &c.source_ip {
        let ip = attrs
            .source
            .as_ref()
            .and_then(|p| p.address.as_ref())
            .and_then(|a| match &a.address {
                Some(envoy_types::ext_authz::v3::pb::Address::SocketAddress(s)) => {
                    Some(s.address.clone())
                }
                _ => None,
            });
        if let Some(ip) = ip {
            context.insert(attr.clone(), Value::String(ip));
        }
    }
    if let Some(attr) = &c.request_time {
        let t = attrs
            .request
            .as_ref()
            .and_then(|r| r.time.as_ref())
            .map(|t| {
                std::time::UNIX_EPOCH
                    + std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
            })
            .unwrap_or_else(std::time::SystemTime::now);
        let ts = crate::audit::rfc3339_nanos(t);
        // Cedar's datetime takes milliseconds at most.
        context.insert(attr.clone(), Value::String(format!("{}Z", &ts[..23])));
    }
    if let Some(attr) = &c.tls_sni {
        if let Some(sni) = attrs
            .tls_session
            .as_ref()
            .map(|t| t.sni.clone())
            .filter(|s| !s.is_empty())
        {
            context.insert(attr.clone(), Value::String(sni));
        }
    }
    for (header, attr) in &c.headers {
        if let Some(v) = headers.get(&header.to_ascii_lowercase()) {
            let value = serde_json::from_str::<Value>(v)
                .ok()
                .filter(|j| j.is_boolean() || j.is_i64())
                .unwrap_or_else(|| Value::String(v.clone()));
            context.insert(attr.clone(), value);
        }
    }
    Ok(Ok(Mapped {
        input: Input::new(
            [principal, action, resource],
            Value::Object(context),
            Vec::new(),
            Paths {
                principal: "identity",
                action: "route.action",
                resource: "route.resource",
                context: "context",
                entities: "entities",
            },
        ),
    }))
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Service {
    /// Logs a Deny the engine did not make (the request could not be
    /// placed or was refused by the schema), like every other decision.
    async fn log_denied(&self, draft: Draft) -> crate::state::Logged {
        let outcome = Outcome {
            allow: false,
            reasons: draft.reasons.clone(),
            errors: draft.errors.clone(),
        };
        self.shared.log_one((outcome, false, draft)).await
    }

    fn answer(&self, allow: bool, decision_id: &str, reason: &str) -> CheckResponse {
        let config = &self.shared.config.ext_authz;
        let mut headers = vec![header("x-vigie-decision-id", decision_id)];
        headers.extend(config.headers.iter().map(|(k, v)| header(k, v)));
        if allow {
            CheckResponse {
                status: Some(rpc::Status {
                    code: 0,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers,
                    ..Default::default()
                })),
                ..Default::default()
            }
        } else {
            headers.push(header("x-vigie-reason", reason));
            CheckResponse {
                status: Some(rpc::Status {
                    code: 7, // PERMISSION_DENIED
                    message: reason.to_owned(),
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(config.denied_status),
                    }),
                    headers,
                    body: config.denied_body.clone(),
                })),
                ..Default::default()
            }
        }
    }
}

#[tonic::async_trait]
impl Authorization for Service {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let started = std::time::Instant::now();
        let parent = crate::telemetry::from_metadata(request.metadata());
        let req = request.into_inner();
        let active = self.shared.active();
        let ns = active.bundle.namespace.clone();
        let config = &self.shared.config;
        let mapped = map(&config.ext_authz, &config.audit.mask, ns.as_deref(), &req)?;
        let (logged, reason) = match mapped {
            Ok(m) => match self.shared.decide_draft(&active, m.input, &parent).await {
                Ok(decided) => {
                    let logged = self.shared.log_one(decided).await;
                    let reason = logged.outcome.reasons.join(",");
                    (logged, reason)
                }
                Err(e) => {
                    // The request maps, but the schema refuses it: deny, and log why.
                    let draft = Draft {
                        decision_id: crate::state::decision_id(),
                        request: Arc::new(Asked::new(Default::default(), &Value::Null, 0, &[])),
                        allow: false,
                        reasons: vec!["ext_authz_invalid_request".into()],
                        errors: vec![format!("{}: {}", e.path, e.message)],
                        epoch: active.epoch,
                        policy_hash: active.bundle.hash.clone(),
                        cached: false,
                        plugins: Vec::new(),
                        trace_id: crate::telemetry::trace_id(&parent),
                    };
                    (
                        self.log_denied(draft).await,
                        "ext_authz_invalid_request".to_owned(),
                    )
                }
            },
            Err((u, mut draft)) => {
                draft.trace_id = crate::telemetry::trace_id(&parent);
                draft.epoch = active.epoch;
                draft.policy_hash = active.bundle.hash.clone();
                (
                    self.log_denied(draft).await,
                    format!("ext_authz_{}", u.code),
                )
            }
        };
        let metrics = &self.shared.metrics;
        metrics.decision(crate::metrics::Endpoint::ExtAuthz, logged.outcome.allow);
        metrics.observe(crate::metrics::Endpoint::ExtAuthz, started.elapsed());
        Ok(tonic::Response::new(self.answer(
            logged.outcome.allow,
            &logged.decision_id,
            &reason,
        )))
    }
}

/// Serves ext_authz and the gRPC health service until the process ends.
pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AuthorizationServer<Service>>().await;
    let incoming = tokio_stream_listener(listener);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(AuthorizationServer::new(Service { shared }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// A listener as a stream of connections.
fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures_core::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    struct Incoming(tokio::net::TcpListener);
    impl futures_core::Stream for Incoming {
        type Item = std::io::Result<tokio::net::TcpStream>;
        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_accept(cx).map(|r| {
                Some(r.map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    s
                }))
            })
        }
    }
    Incoming(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str) -> Route {
        Route {
            method: method.into(),
            path: path.into(),
            action: "read".into(),
            resource_type: "Agency::Record".into(),
            resource_id: "{id}".into(),
        }
    }

    #[test]
    fn routes_match_literals_and_parameters() {
        let r = route("GET", "/records/{id}");
        assert_eq!(
            r.matches("GET", "/records/social-001").unwrap()["id"],
            "social-001"
        );
        assert_eq!(r.matches("get", "/records/a%20b?x=1").unwrap()["id"], "a b");
        assert!(r.matches("POST", "/records/x").is_none());
        assert!(r.matches("GET", "/records").is_none());
        assert!(r.matches("GET", "/records/x/y").is_none());
        assert!(route("*", "/audit").matches("DELETE", "/audit").is_some());
        assert_eq!(
            fill(
                "{dept}-{id}",
                &[
                    ("dept".to_owned(), "a".to_owned()),
                    ("id".to_owned(), "1".to_owned())
                ]
                .into()
            ),
            "a-1"
        );
    }
}
