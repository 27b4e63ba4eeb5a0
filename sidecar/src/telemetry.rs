//! Traces (OpenTelemetry): the caller's W3C trace context is extracted from
//! HTTP headers or gRPC metadata, each decision is a span that is a child of
//! the caller's span (with a child span for the evaluation), and spans are
//! exported over OTLP (gRPC or HTTP/protobuf) when configured.
//!
//! Off by default. `[telemetry] enabled = true`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! turns export on; the other `OTEL_*` variables (protocol, headers, service
//! name, sampler, timeout) work as in every OpenTelemetry SDK. With export
//! off, spans are not recorded, but the caller's trace id still reaches the
//! decision record. This module never puts a secret in a span: types, ids of
//! policies and of the decision, never context values.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _};
use opentelemetry::{global, Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde::{Deserialize, Serialize};

/// `[telemetry]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Export spans over OTLP. Default false (or true when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
    pub enabled: bool,
    /// Collector endpoint. Default: `OTEL_EXPORTER_OTLP_*ENDPOINT`, else
    /// `http://localhost:4317` (gRPC) / `http://localhost:4318` (HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Default: `OTEL_EXPORTER_OTLP_PROTOCOL`, else `grpc`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Headers sent to the collector (e.g. an API key).
    pub headers: HashMap<String, String>,
    /// Fraction of traces sampled when the caller did not decide, 0.0..=1.0.
    /// Default: `OTEL_TRACES_SAMPLER`, else parent-based always-on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_ratio: Option<f64>,
    /// `service.name`. Default: `OTEL_SERVICE_NAME`, else `vigie`.
    pub service_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: None,
            protocol: None,
            headers: HashMap::new(),
            sample_ratio: None,
            service_name: "vigie".into(),
        }
    }
}

/// Whether spans are exported ([`init`] set up a provider). Without it
/// every span would be a no-op.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keeps the tracer provider alive; flushes spans when dropped.
#[derive(Debug, Default)]
pub struct Guard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Sets up propagation and, when configured, OTLP export. Call it from
/// within the tokio runtime (the gRPC exporter's channel lives on it).
pub fn init(config: &Config) -> anyhow::Result<Guard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let from_env = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if disabled || !(config.enabled || from_env) {
        return Ok(Guard::default());
    }
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let protocol = config
        .protocol
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "grpc".into());
    let exporter = match protocol.as_str() {
        "grpc" => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(e) = &config.endpoint {
                b = b.with_endpoint(e.clone());
            }
            if !config.headers.is_empty() {
                let mut md = tonic::metadata::MetadataMap::new();
                for (k, v) in &config.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|e| anyhow::anyhow!("[telemetry] headers: `{k}`: {e}"))?;
                    md.insert(
                        key,
                        v.parse()
                            .map_err(|e| anyhow::anyhow!("[telemetry] headers: `{k}`: {e}"))?,
                    );
                }
                b = b.with_metadata(md);
            }
            b.build()?
        }
        "http/protobuf" => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_http();
            if let Some(e) = &config.endpoint {
                // The config gives the collector's base URL, as the env var does.
                let e = e.trim_end_matches('/');
                let url = if e.ends_with("/v1/traces") {
                    e.to_owned()
                } else {
                    format!("{e}/v1/traces")
                };
                b = b.with_endpoint(url);
            }
            if !config.headers.is_empty() {
                b = b.with_headers(config.headers.clone());
            }
            b.build()?
        }
        other => {
            anyhow::bail!("[telemetry] protocol `{other}`: expected `grpc` or `http/protobuf`")
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let mut builder = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(Batcher::start(exporter))
        .with_resource(resource.build());
    if let Some(r) = config.sample_ratio {
        builder = builder.with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(r),
        )));
    }
    let provider = builder.build();
    global::set_tracer_provider(provider.clone());
    EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(protocol = %protocol, "exporting traces over OTLP");
    Ok(Guard {
        provider: Some(provider),
    })
}

struct Headers<'a>(&'a hyper::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context from HTTP headers (`traceparent`, `tracestate`).
pub fn from_headers(headers: &hyper::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// The caller's trace context from gRPC metadata.
pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&Metadata(md))
}

/// The trace id of a context, if it has a valid one.
pub fn trace_id(cx: &Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Starts a span, child of `parent`.
pub fn start(name: &'static str, kind: SpanKind, parent: &Context) -> Context {
    if !EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        // Nothing records it: a no-op span would only copy the parent's
        // ids (1.5% of a cache hit's CPU), so the parent stands in for it.
        return parent.clone();
    }
    let tracer = global::tracer("vigie");
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(&tracer, parent);
    parent.with_span(span)
}

/// The span of one decision (`vigie.decision`), child of the caller's.
pub fn start_decision(parent: &Context) -> Context {
    start("vigie.decision", SpanKind::Server, parent)
}

/// Sets the attributes of a decision span and ends it.
pub fn end_decision(cx: &Context, attrs: Vec<KeyValue>) {
    let span = cx.span();
    span.set_attributes(attrs);
    span.end();
}

/// Collects finished spans and exports them from its own thread every
/// 200 ms (or 512 at a time). Unlike the SDK's batch processor, ending a span
/// only pushes it onto a queue: it never wakes a thread, which on a sidecar
/// pinned to one core costs more than the span itself. A full queue drops
/// spans (counted), never blocks a decision.
#[derive(Debug)]
struct Batcher {
    queue: std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>,
    exporter: std::sync::Arc<std::sync::Mutex<opentelemetry_otlp::SpanExporter>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

const QUEUE_MAX: usize = 8192;
const BATCH_MAX: usize = 512;
const EXPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

impl Batcher {
    fn start(exporter: opentelemetry_otlp::SpanExporter) -> Batcher {
        let b = Batcher {
            queue: Default::default(),
            exporter: std::sync::Arc::new(std::sync::Mutex::new(exporter)),
            stop: Default::default(),
            dropped: Default::default(),
        };
        let (queue, exporter, stop, dropped) = (
            std::sync::Arc::clone(&b.queue),
            std::sync::Arc::clone(&b.exporter),
            std::sync::Arc::clone(&b.stop),
            std::sync::Arc::clone(&b.dropped),
        );
        let spawned = std::thread::Builder::new()
            .name("vigie-otlp".into())
            .spawn(move || loop {
                std::thread::sleep(EXPORT_EVERY);
                export_queued(&queue, &exporter);
                let lost = dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
                if lost > 0 {
                    tracing::warn!(spans = lost, "span queue full: spans dropped");
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the span export thread; spans will not be exported");
        }
        b
    }
}

fn export_queued(
    queue: &std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>,
    exporter: &std::sync::Mutex<opentelemetry_otlp::SpanExporter>,
) {
    use opentelemetry_sdk::trace::SpanExporter as _;
    let spans = std::mem::take(&mut *queue.lock().unwrap_or_else(|p| p.into_inner()));
    let exporter = exporter.lock().unwrap_or_else(|p| p.into_inner());
    for chunk in spans.chunks(BATCH_MAX) {
        if let Err(e) = futures_executor::block_on(exporter.export(chunk.to_vec())) {
            tracing::warn!(error = %e, spans = chunk.len(), "span export failed");
        }
    }
}

impl opentelemetry_sdk::trace::SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() < QUEUE_MAX {
            q.push(span);
        } else {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        export_queued(&self.queue, &self.exporter);
        Ok(())
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        use opentelemetry_sdk::trace::SpanExporter as _;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        export_queued(&self.queue, &self.exporter);
        self.exporter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        use opentelemetry_sdk::trace::SpanExporter as _;
        self.exporter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_resource(resource);
    }
}
