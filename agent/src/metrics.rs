//! Counters behind `GET /metrics`, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vibstage_protocol::ErrorCode;

use crate::fetch::FetchStats;
use crate::server::HandshakeStats;

/// Counters the agent keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    verification_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Depot client counters.
    pub fetch: Arc<FetchStats>,
    /// The mTLS listener's handshakes.
    pub handshakes: Arc<HandshakeStats>,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, method: &str, route: &str, status: u16) {
        // Clients choose the method token: keep the label set bounded.
        let method = match method {
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS" => method,
            _ => "other",
        };
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((method.to_owned(), route.to_owned(), status))
            .or_insert(0) += 1;
    }

    /// Counts one refusal of signed content.
    pub fn verification_failed(&self, code: ErrorCode) {
        let mut m = self
            .verification_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(code.as_str()).or_insert(0) += 1;
    }

    /// The Prometheus text exposition, with the gauges the caller supplies.
    pub fn render(&self, staged_bytes: u64, tasks: &[(String, String, u64)]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP vibstage_staged_bytes Bytes of staged VIB content."
        );
        let _ = writeln!(out, "# TYPE vibstage_staged_bytes gauge");
        let _ = writeln!(out, "vibstage_staged_bytes {staged_bytes}");
        let _ = writeln!(out, "# HELP vibstage_tasks Tasks by kind and state.");
        let _ = writeln!(out, "# TYPE vibstage_tasks gauge");
        for (kind, state, n) in tasks {
            let _ = writeln!(
                out,
                "vibstage_tasks{{kind=\"{kind}\",state=\"{state}\"}} {n}"
            );
        }
        for (name, help, value) in [
            (
                "vibstage_downloads_total",
                "VIB blobs downloaded and verified.",
                &self.fetch.downloads,
            ),
            (
                "vibstage_download_retries_total",
                "Download attempts after a failure.",
                &self.fetch.retries,
            ),
            (
                "vibstage_download_bytes_total",
                "Bytes received from depots.",
                &self.fetch.bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP vibstage_tls_handshakes_total TLS handshakes on the mTLS listener by result."
        );
        let _ = writeln!(out, "# TYPE vibstage_tls_handshakes_total counter");
        for (result, n) in [
            ("completed", &self.handshakes.completed),
            ("failed", &self.handshakes.failed),
            ("turned_away", &self.handshakes.turned_away),
        ] {
            let _ = writeln!(
                out,
                "vibstage_tls_handshakes_total{{result=\"{result}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP vibstage_verification_failures_total Refusals of signed content by code."
        );
        let _ = writeln!(out, "# TYPE vibstage_verification_failures_total counter");
        for (code, n) in self
            .verification_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "vibstage_verification_failures_total{{code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP vibstage_http_requests_total API requests by route and status."
        );
        let _ = writeln!(out, "# TYPE vibstage_http_requests_total counter");
        for ((method, route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "vibstage_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}
