//! Counters and histograms: per-database traffic (the admin console's SHOW
//! STATS, PgBouncer's columns) and routing/latency figures for Prometheus.
//! Lock-free atomics, updated on the session's own path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of histogram buckets, in seconds.
pub const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

/// A Prometheus-style histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Cumulative counts per bucket (the last one counts everything).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let at = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// (cumulative counts per bucket incl. +Inf, sum in seconds).
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let counts = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        (counts, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Routing reasons, in the order of `DbStats::reasons`.
pub const REASONS: [&str; 11] = [
    "read",
    "read_only_transaction",
    "write",
    "locking_read",
    "volatile_function",
    "transaction",
    "parse_fallback",
    "read_your_writes",
    "no_healthy_replica",
    "serializable",
    "primary",
];

/// Kinds of error the proxy reports (not the servers' own errors).
pub const ERROR_KINDS: [&str; 10] = [
    "checkout_timeout",
    "server_connect",
    "server_lost",
    "server_unresponsive",
    "client_protocol",
    "auth_failed",
    "too_many_clients",
    "login_timeout",
    "idle_transaction_timeout",
    "client_statement_limit",
];

/// Errors the proxy reported, by kind (indexes into `ERROR_KINDS`).
#[derive(Debug, Default)]
pub struct ErrorCounts([AtomicU64; ERROR_KINDS.len()]);

impl ErrorCounts {
    /// Counts one error of `kind` (one of `ERROR_KINDS`).
    pub fn count(&self, kind: &str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (kind, count) pairs.
    pub fn snapshot(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ERROR_KINDS
            .iter()
            .zip(&self.0)
            .map(|(k, c)| (*k, c.load(Ordering::Relaxed)))
    }
}

/// Traffic of one database, since start.
#[derive(Debug, Default)]
pub struct DbStats {
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub xact_time_us: AtomicU64,
    pub query_time_us: AtomicU64,
    pub wait_time_us: AtomicU64,
    /// Transactions (server connections held) sent to the primary / replicas.
    pub routed_primary: AtomicU64,
    pub routed_replica: AtomicU64,
    /// Server connections taken, by routing reason (indexes into `REASONS`).
    pub reasons: [AtomicU64; REASONS.len()],
    /// Named statements found prepared on the server connection / prepared there.
    pub prepared_hits: AtomicU64,
    pub prepared_misses: AtomicU64,
    /// Time clients waited for a server connection.
    pub wait: Histogram,
    /// Time a server connection was held (a transaction, or a session).
    pub xact: Histogram,
    /// Time from a request to its ReadyForQuery.
    pub query: Histogram,
    /// Clients that became pinned to their server connection (session-only features).
    pub pinned: AtomicU64,
}

impl DbStats {
    /// Counts a routing decision by its reason label (one of `REASONS`).
    pub fn routed(&self, reason: &str) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.reasons[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds `d` to a microsecond counter.
    pub fn add_time(counter: &AtomicU64, d: Duration) {
        counter.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(10));
        let (counts, sum) = h.snapshot();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[5], 2);
        assert_eq!(*counts.last().unwrap(), 3);
        assert!((sum - 10.0203).abs() < 1e-6);
    }
}
