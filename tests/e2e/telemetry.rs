//! Observability: spans reach a real OTLP receiver (gRPC and HTTP/protobuf,
//! decoded from the protobufs) as children of the caller's span, and
//! `/metrics` moves with traffic and parses as Prometheus exposition format.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::{json, Value};

use crate::support::{eventually, example_policies, Vigie};

pub(crate) type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

#[derive(Clone, Default)]
struct Receiver(Received);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A real OTLP/gRPC trace receiver on loopback, in its own runtime thread.
pub(crate) fn grpc_receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let r = Receiver(Arc::clone(&received));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let incoming = async_stream(l);
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(r))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
    });
    (rx.recv().unwrap(), received)
}

fn async_stream(
    l: tokio::net::TcpListener,
) -> impl futures_core::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    struct S(tokio::net::TcpListener);
    impl futures_core::Stream for S {
        type Item = std::io::Result<tokio::net::TcpStream>;
        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_accept(cx).map(|r| Some(r.map(|(s, _)| s)))
        }
    }
    S(l)
}

/// A real OTLP/HTTP receiver: `POST /v1/traces`, protobuf body.
fn http_receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let sink = Arc::clone(&sink);
            std::thread::spawn(move || serve_http(stream, sink));
        }
    });
    (addr, received)
}

fn serve_http(mut s: std::net::TcpStream, sink: Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut reader = BufReader::new(s.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path_ok = line.starts_with("POST /v1/traces ");
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        if path_ok {
            sink.lock()
                .unwrap()
                .push(ExportTraceServiceRequest::decode(body.as_slice()).unwrap());
        }
        let status = if path_ok { "200 OK" } else { "404 Not Found" };
        let _ = s.write_all(format!("HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n").as_bytes());
    }
}

pub(crate) fn spans(received: &Received) -> Vec<(Span, HashMap<String, String>)> {
    let mut out = Vec::new();
    for req in received.lock().unwrap().iter() {
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Any::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    let mut attrs: HashMap<String, String> = span
                        .attributes
                        .iter()
                        .map(|a| {
                            let v = match a.value.as_ref().and_then(|v| v.value.clone()) {
                                Some(Any::StringValue(s)) => s,
                                Some(Any::BoolValue(b)) => b.to_string(),
                                Some(Any::IntValue(i)) => i.to_string(),
                                other => format!("{other:?}"),
                            };
                            (a.key.clone(), v)
                        })
                        .collect();
                    attrs.insert("service.name".into(), service.clone());
                    out.push((span.clone(), attrs));
                }
            }
        }
    }
    out
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn traced_request(v: &Vigie) -> Value {
    let body = json!({
        "principal": "Agency::User::\"alice\"",
        "action": "Agency::Action::\"read\"",
        "resource": "Agency::Record::\"social-001\"",
        "context": {"ip": "10.1.2.3"},
    });
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let r = v.send(
        "POST",
        "/v1/is_authorized",
        &[
            ("content-type", "application/json"),
            ("traceparent", &traceparent),
            ("tracestate", "vendor=x"),
        ],
        Some(body.to_string().as_bytes()),
    );
    r.json()
}

fn check_spans(received: &Received, answer: &Value, service: &str) {
    assert!(
        eventually(20, || spans(received)
            .iter()
            .any(|(s, _)| s.name == "vigie.evaluate")),
        "no spans exported"
    );
    let all = spans(received);
    let (decision, attrs) = all
        .iter()
        .find(|(s, _)| s.name == "vigie.decision")
        .unwrap_or_else(|| {
            panic!(
                "no vigie.decision span in {:?}",
                all.iter().map(|s| &s.0.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(
        hex(&decision.trace_id),
        TRACE,
        "the span joins the caller's trace"
    );
    assert_eq!(
        hex(&decision.parent_span_id),
        PARENT,
        "the span is a child of the caller's span"
    );
    assert_eq!(attrs["vigie.decision"], "Allow");
    assert_eq!(attrs["vigie.policy_ids"], "staff-read-department");
    assert_eq!(attrs["vigie.principal_type"], "Agency::User");
    assert_eq!(attrs["vigie.resource_type"], "Agency::Record");
    assert_eq!(attrs["vigie.cache_hit"], "false");
    assert_eq!(
        attrs["vigie.decision_id"],
        answer["decision_id"].as_str().unwrap()
    );
    assert_eq!(attrs["service.name"], service);
    assert!(
        !attrs.values().any(|v| v.contains("10.1.2.3")),
        "no context values in spans: {attrs:?}"
    );
    let (evaluate, _) = all
        .iter()
        .find(|(s, _)| s.name == "vigie.evaluate")
        .unwrap();
    assert_eq!(
        evaluate.parent_span_id, decision.span_id,
        "evaluation is a child of the decision"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The decision record carries the trace id (the outbox holds the exact bytes).
fn record_has_trace(data: &std::path::Path) -> bool {
    std::fs::read_dir(data.join("outbox"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".vlog"))
        .any(|e| {
            String::from_utf8_lossy(&std::fs::read(e.path()).unwrap())
                .contains(&format!("\"trace_id\":\"{TRACE}\""))
        })
}

#[test]
fn spans_reach_an_otlp_grpc_receiver_as_children_of_the_caller() {
    let (addr, received) = grpc_receiver();
    let data = tempfile::tempdir().unwrap();
    let v = Vigie::start_in(
        &example_policies(),
        data.path(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "vigie-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let answer = traced_request(&v);
    check_spans(&received, &answer, "vigie-under-test");
    assert!(record_has_trace(data.path()));
}

#[test]
fn spans_reach_an_otlp_http_receiver_when_configured() {
    let (addr, received) = http_receiver();
    let v = Vigie::start(
        &example_policies(),
        &[],
        &[
            ("VIGIE_TELEMETRY_ENABLED", "true"),
            ("VIGIE_TELEMETRY_PROTOCOL", "http/protobuf"),
            ("VIGIE_TELEMETRY_ENDPOINT", &format!("http://{addr}")),
            ("VIGIE_TELEMETRY_SERVICE_NAME", "vigie-http"),
            // The gRPC test above has the cache on: this one covers a
            // decision that cannot be cached, evaluated all the same.
            ("VIGIE_CACHE_ENABLED", "false"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let answer = traced_request(&v);
    check_spans(&received, &answer, "vigie-http");
}

#[test]
fn without_export_the_callers_trace_id_still_reaches_the_record() {
    let data = tempfile::tempdir().unwrap();
    let v = Vigie::start_in(&example_policies(), data.path(), &[], &[]);
    traced_request(&v);
    assert!(record_has_trace(data.path()));
}

#[test]
fn json_logs_carry_the_trace_id() {
    let v = Vigie::start(
        &example_policies(),
        &[],
        &[("VIGIE_LOG_FORMAT", "json"), ("RUST_LOG", "vigie=debug")],
    );
    let answer = traced_request(&v);
    let id = answer["decision_id"].as_str().unwrap().to_owned();
    assert!(eventually(5, || v.log().contains(&id)));
    let line = v
        .log()
        .lines()
        .find(|l| l.contains(&id))
        .unwrap()
        .to_owned();
    let entry: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(entry["span"]["trace_id"], TRACE, "{entry}");
    assert_eq!(entry["fields"]["decision"], "Allow", "{entry}");
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{line_start}` in /metrics"))
}

#[test]
fn metrics_move_with_traffic_and_parse_as_prometheus() {
    let v = Vigie::example();
    let before = v.get("/metrics").text;
    let ask = |p: &str, r: &str| {
        v.post(
            "/v1/is_authorized",
            &json!({"principal": format!("Agency::User::\"{p}\""), "action": "Agency::Action::\"read\"", "resource": format!("Agency::Record::\"{r}\"")}),
        )
    };
    ask("alice", "social-001"); // allow
    ask("alice", "social-001"); // allow, cached
    ask("alice", "finance-001"); // deny
    v.post("/access/v1/evaluation", &json!({"subject": {"type": "User", "id": "bob"}, "action": {"name": "read"}, "resource": {"type": "Record", "id": "finance-001"}}));
    v.post("/v1/is_authorized", &json!({"principal": 1}));
    let after = v.get("/metrics").text;
    let delta = |k: &str| metric(&after, k) - metric(&before, k);
    assert_eq!(delta("vigie_decisions_total{decision=\"allow\"}"), 3.0);
    assert_eq!(delta("vigie_decisions_total{decision=\"deny\"}"), 1.0);
    assert_eq!(
        delta("vigie_endpoint_decisions_total{endpoint=\"is_authorized\",decision=\"allow\"}"),
        2.0
    );
    assert_eq!(
        delta("vigie_endpoint_decisions_total{endpoint=\"authzen_evaluation\",decision=\"allow\"}"),
        1.0
    );
    assert_eq!(
        delta("vigie_request_duration_seconds_count{endpoint=\"is_authorized\"}"),
        4.0
    );
    assert_eq!(delta("vigie_cache_hits_total{tier=\"l1\"}"), 1.0);
    assert_eq!(delta("vigie_bad_requests_total"), 1.0);
    assert!(metric(&after, "vigie_outbox_records") >= 4.0);

    // A real parser: the official Prometheus client's.
    let python = std::env::var("ORACLE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as parse\nfams = list(parse(sys.stdin.read()))\nprint(len(fams), sum(len(f.samples) for f in fams))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(after.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "/metrics does not parse (is prometheus_client installed for `{python}`? ./scripts/test installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts = String::from_utf8_lossy(&out.stdout);
    let families: usize = counts.split_whitespace().next().unwrap().parse().unwrap();
    assert!(families >= 15, "{counts}");
}

#[test]
fn the_grafana_dashboard_only_uses_metrics_that_exist() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/vigie-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let v = Vigie::example();
    let led = tempfile::tempdir().unwrap();
    let ledger = crate::support::Ledger::start(led.path(), "127.0.0.1:0");
    let exposed = v.get("/metrics").text + &ledger.get("/metrics").text;
    let mut used = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("vigie_"))
            {
                assert!(
                    exposed.contains(&format!("\n{name}")) || exposed.starts_with(name),
                    "panel `{}` uses `{name}`, which nothing exposes",
                    panel["title"]
                );
                used += 1;
            }
        }
    }
    assert!(used >= 15);
}
