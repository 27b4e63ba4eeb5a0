//! Prometheus figures that are not simple gauges of some other module's
//! state: decisions by endpoint and result, and request latency histograms.
//! Labels are a fixed, small set (never principal or resource ids).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where a decision was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    IsAuthorized = 0,
    Batch = 1,
    AuthzenEvaluation = 2,
    AuthzenEvaluations = 3,
    ExtAuthz = 4,
}

const ENDPOINTS: [&str; 5] = [
    "is_authorized",
    "is_authorized_batch",
    "authzen_evaluation",
    "authzen_evaluations",
    "ext_authz",
];

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    decisions: [[AtomicU64; 2]; 5],
    buckets: [[AtomicU64; 14]; 5],
    count: [AtomicU64; 5],
    sum_ns: [AtomicU64; 5],
}

impl Metrics {
    pub fn decision(&self, e: Endpoint, allow: bool) {
        self.decisions[e as usize][usize::from(allow)].fetch_add(1, Ordering::Relaxed);
    }

    /// Decisions over every endpoint: (allow, deny).
    pub fn totals(&self) -> (u64, u64) {
        self.decisions.iter().fold((0, 0), |(a, d), e| {
            (
                a + e[1].load(Ordering::Relaxed),
                d + e[0].load(Ordering::Relaxed),
            )
        })
    }

    /// Records the latency of one request (a batch counts once).
    pub fn observe(&self, e: Endpoint, d: Duration) {
        let i = e as usize;
        let secs = d.as_secs_f64();
        if let Some(b) = BUCKETS.iter().position(|ub| secs <= *ub) {
            self.buckets[i][b].fetch_add(1, Ordering::Relaxed);
        }
        self.count[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns[i].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP vigie_endpoint_decisions_total Decisions answered, by endpoint and result.\n",
        );
        out.push_str("# TYPE vigie_endpoint_decisions_total counter\n");
        for (i, name) in ENDPOINTS.iter().enumerate() {
            for (j, result) in ["deny", "allow"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "vigie_endpoint_decisions_total{{endpoint=\"{name}\",decision=\"{result}\"}} {}",
                    self.decisions[i][j].load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP vigie_request_duration_seconds Time to answer a decision request, by endpoint.\n");
        out.push_str("# TYPE vigie_request_duration_seconds histogram\n");
        for (i, name) in ENDPOINTS.iter().enumerate() {
            let mut cumulative = 0;
            for (b, ub) in BUCKETS.iter().enumerate() {
                cumulative += self.buckets[i][b].load(Ordering::Relaxed);
                let _ = writeln!(out, "vigie_request_duration_seconds_bucket{{endpoint=\"{name}\",le=\"{ub}\"}} {cumulative}");
            }
            let count = self.count[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "vigie_request_duration_seconds_bucket{{endpoint=\"{name}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "vigie_request_duration_seconds_sum{{endpoint=\"{name}\"}} {}",
                self.sum_ns[i].load(Ordering::Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "vigie_request_duration_seconds_count{{endpoint=\"{name}\"}} {count}"
            );
        }
        out
    }
}
