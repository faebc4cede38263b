//! Store query latency, per operation, as Prometheus histograms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

/// Bucket upper bounds, seconds.
const BOUNDS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

/// Latency histograms by operation name.
#[derive(Debug, Default)]
pub struct Latency {
    ops: Mutex<BTreeMap<&'static str, Histogram>>,
}

/// Records the time from its creation to its drop.
pub(crate) struct Timer<'a> {
    latency: &'a Latency,
    op: &'static str,
    started: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        let mut ops = self.latency.ops.lock().unwrap_or_else(|e| e.into_inner());
        let h = ops.entry(self.op).or_default();
        h.count += 1;
        h.sum += secs;
        for (i, bound) in BOUNDS.iter().enumerate() {
            if secs <= *bound {
                h.buckets[i] += 1;
            }
        }
    }
}

impl Latency {
    pub(crate) fn start(&self, op: &'static str) -> Timer<'_> {
        Timer {
            latency: self,
            op,
            started: Instant::now(),
        }
    }

    /// How many times `op` ran (for tests and diagnostics).
    pub fn count(&self, op: &str) -> u64 {
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        ops.get(op).map_or(0, |h| h.count)
    }

    /// Appends `impmesh_store_query_seconds` in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone();
        out.push_str("# HELP impmesh_store_query_seconds Store operation latency, by operation.\n");
        out.push_str("# TYPE impmesh_store_query_seconds histogram\n");
        for (op, h) in ops {
            for (i, bound) in BOUNDS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "impmesh_store_query_seconds_bucket{{op=\"{op}\",le=\"{bound}\"}} {}",
                    h.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "impmesh_store_query_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "impmesh_store_query_seconds_sum{{op=\"{op}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "impmesh_store_query_seconds_count{{op=\"{op}\"}} {}",
                h.count
            );
        }
    }
}
