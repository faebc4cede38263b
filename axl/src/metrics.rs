//! `/metrics` in the Prometheus text format: API requests, the node's own counters
//! (sessions, stanzas, logins, TLS, store latency) and one series per catalogued alarm.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::{Https, NodeControl};

pub(crate) async fn metrics<C: NodeControl>(State(https): State<Arc<Https<C>>>) -> Response {
    let mut out = String::with_capacity(4096);
    out.push_str(
        "# HELP impmesh_api_requests_total HTTPS requests served, by operation and status.\n",
    );
    out.push_str("# TYPE impmesh_api_requests_total counter\n");
    for ((op, status), n) in https.stats.snapshot() {
        let _ = writeln!(
            out,
            "impmesh_api_requests_total{{operation=\"{op}\",status=\"{status}\"}} {n}"
        );
    }
    https.control.render_metrics(&mut out);
    let active = https.store.active_alarms().await;
    out.push_str("# HELP impmesh_store_up Whether the store answered this scrape.\n");
    out.push_str("# TYPE impmesh_store_up gauge\n");
    let _ = writeln!(out, "impmesh_store_up {}", u8::from(active.is_ok()));
    let active = match active {
        Ok(a) => a,
        Err(e) => {
            // Everything else still renders; the alarm series are left out rather than
            // reported clear.
            tracing::error!(error = %e, "cannot read alarms for /metrics");
            return text(out);
        }
    };
    out.push_str(
        "# HELP impmesh_alarm_active Active instances of each catalogued alarm (0 = clear).\n",
    );
    out.push_str("# TYPE impmesh_alarm_active gauge\n");
    for def in impmesh_store::alarms::CATALOGUE {
        let n = active.iter().filter(|a| a.name == def.name).count();
        let _ = writeln!(
            out,
            "impmesh_alarm_active{{name=\"{}\",severity=\"{}\"}} {n}",
            def.name,
            def.severity.as_str()
        );
    }
    text(out)
}

fn text(out: String) -> Response {
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
