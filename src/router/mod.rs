//! Read/write splitting: classify each statement (`classify`), know which
//! servers are healthy and how far replicas have replayed (`health`), and
//! choose a server for a client's next transaction (`Router::choose`).

pub mod classify;
pub mod health;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;

pub use classify::{Class, Volatility, WriteReason, classify};
pub use health::ServerHealth;

use crate::config::Balance;

/// Why a statement went where it went (logged, and counted in metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A read on a replica.
    Read,
    /// A read-only transaction on a replica.
    ReadOnlyTransaction,
    /// The primary, because of the statement.
    Statement(WriteReason),
    /// A read on the primary: no replica has replayed the client's last write.
    ReadYourWrites,
    /// A read on the primary: no replica is in rotation.
    NoHealthyReplica,
    /// A read on the primary: the client's transactions default to
    /// SERIALIZABLE, which hot standbys refuse.
    Serializable,
    /// Splitting is off, or the client is pinned.
    Primary,
}

impl Reason {
    /// Label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Read => "read",
            Reason::ReadOnlyTransaction => "read_only_transaction",
            Reason::Statement(r) => r.as_str(),
            Reason::ReadYourWrites => "read_your_writes",
            Reason::NoHealthyReplica => "no_healthy_replica",
            Reason::Serializable => "serializable",
            Reason::Primary => "primary",
        }
    }
}

/// Read-your-writes state of one client.
#[derive(Debug, Default)]
pub struct WriteMark {
    /// Primary WAL position after the client's last committed write.
    lsn: AtomicU64,
    /// Writes whose position is still being read.
    pending: AtomicUsize,
}

impl WriteMark {
    /// A write committed; its position is being read.
    pub fn begin(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// The position of that write (or `None` if it could not be read).
    pub fn finish(&self, lsn: Option<u64>) {
        match lsn {
            // After an unknown position, the next measured one replaces it.
            Some(lsn) if self.lsn.load(Ordering::Acquire) == u64::MAX => self.lsn.store(lsn, Ordering::Release),
            Some(lsn) => {
                self.lsn.fetch_max(lsn, Ordering::AcqRel);
            }
            // Unknown position: reads stay on the primary until the next write is measured.
            None => self.lsn.store(u64::MAX, Ordering::Release),
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Shards of the classification cache (spreads lock contention).
const CACHE_SHARDS: usize = 16;
/// Entries per shard; a full shard starts over.
const CACHE_PER_SHARD: usize = 256;
/// Statements longer than this are classified every time, not cached.
const CACHE_MAX_LEN: usize = 4096;

/// One shard of the classification cache: by the hash of a statement's text,
/// or of its shape (see [`classify::shape`]; computed once per lookup), that
/// text or shape and its class.
type CacheShard = HashMap<u64, (Box<[u8]>, Class), std::hash::BuildHasherDefault<HashIsKey>>;

thread_local! {
    /// The shape of the text being classified (a buffer kept per thread).
    static SHAPE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Hashes a `u64` key that already is a hash to itself.
#[derive(Default)]
struct HashIsKey(u64);

impl std::hash::Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the keys are u64); fold anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Routing state of one database.
#[derive(Debug)]
pub struct Router {
    pub primary: Arc<ServerHealth>,
    pub replicas: Vec<Arc<ServerHealth>>,
    next: AtomicUsize,
    functions: RwLock<HashMap<String, Volatility>>,
    /// Classes by full statement text, valid for the current `functions`.
    cache: Vec<std::sync::Mutex<CacheShard>>,
    /// Seeded at random: clients choose the texts.
    hasher: foldhash::fast::RandomState,
    refresh: Notify,
    refresh_requested: std::sync::atomic::AtomicBool,
    /// Schema changes that may change a statement's result type (ALTER,
    /// DROP, CREATE OR REPLACE) seen going to this database. Server-side
    /// statement names include it, so a statement a client prepares after
    /// such a change never reuses a server copy planned before it.
    schema_epoch: std::sync::atomic::AtomicU64,
    /// Number of the newest health watch started over this router: an older
    /// one ends (see `health::still_watched`).
    pub watch_epoch: std::sync::atomic::AtomicU64,
}

impl Router {
    /// A router for a primary and `replicas` replicas, none checked yet.
    pub fn new(replicas: usize) -> Router {
        Router {
            primary: Arc::new(ServerHealth::default()),
            replicas: (0..replicas).map(|_| Arc::new(ServerHealth::default())).collect(),
            next: AtomicUsize::new(0),
            functions: RwLock::new(HashMap::new()),
            cache: (0..CACHE_SHARDS).map(|_| Default::default()).collect(),
            hasher: Default::default(),
            refresh: Notify::new(),
            refresh_requested: Default::default(),
            schema_epoch: Default::default(),
            watch_epoch: Default::default(),
        }
    }

    /// Classifies `sql` with what is known of function volatility, from a
    /// bounded cache: by its text when that was seen before, else by its
    /// shape (the same statement with other literals).
    pub fn classify(&self, sql: &str) -> Class {
        use std::hash::BuildHasher;
        if sql.len() > CACHE_MAX_LEN {
            return self.classify_uncached(sql);
        }
        let text = sql.as_bytes();
        let hash = self.hasher.hash_one(text);
        if let Some(class) = self.cached(hash, text) {
            return class;
        }
        SHAPE.with_borrow_mut(|shape| {
            shape.clear();
            let shaped = classify::shape(sql, shape).then(|| self.hasher.hash_one(&shape[..]));
            if let Some(shape_hash) = shaped
                && let Some(class) = self.cached(shape_hash, shape)
            {
                return class;
            }
            // Hold the catalog while caching, so set_functions cannot clear
            // the cache between computing a class and storing it.
            let functions = self.functions.read().unwrap_or_else(|e| e.into_inner());
            let class = classify(sql, &|name| functions.get(name).copied());
            // The text too: it is found without lexing when it comes again.
            self.cache_store(hash, text, class);
            if let Some(shape_hash) = shaped {
                self.cache_store(shape_hash, shape, class);
            }
            class
        })
    }

    /// One hash picks the shard (from bits the shard's own table does not
    /// index by) and is the key within it; the key's bytes are compared, so
    /// another key under the same hash is a miss.
    fn cache_shard(&self, hash: u64) -> std::sync::MutexGuard<'_, CacheShard> {
        self.cache[(hash >> 32) as usize % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, hash: u64, key: &[u8]) -> Option<Class> {
        match self.cache_shard(hash).get(&hash) {
            Some((held, class)) if **held == *key => Some(*class),
            _ => None,
        }
    }

    /// (Call with the catalog held: see [`Self::classify`].)
    fn cache_store(&self, hash: u64, key: &[u8], class: Class) {
        let mut shard = self.cache_shard(hash);
        if shard.len() >= CACHE_PER_SHARD {
            shard.clear();
        }
        // (Another key with the same hash gives its place.)
        shard.insert(hash, (key.into(), class));
    }

    fn classify_uncached(&self, sql: &str) -> Class {
        let functions = self.functions.read().unwrap_or_else(|e| e.into_inner());
        classify(sql, &|name| functions.get(name).copied())
    }

    fn set_functions(&self, map: HashMap<String, Volatility>) {
        // Lock order: functions, then each shard, so no stale class is cached after this.
        let mut functions = self.functions.write().unwrap_or_else(|e| e.into_inner());
        *functions = map;
        for shard in &self.cache {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// DDL (`sql`, which [`classify::is_ddl`]) went by: re-read function
    /// volatility soon, and start a new schema epoch if result types may change.
    pub fn note_ddl(&self, sql: &str) {
        self.request_refresh();
        if classify::may_change_result_types(sql) {
            self.bump_schema_epoch();
        }
    }

    /// Starts a new schema epoch (a stale plan showed a schema change).
    pub fn bump_schema_epoch(&self) {
        self.schema_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The current schema epoch (see the field).
    pub fn schema_epoch(&self) -> u64 {
        self.schema_epoch.load(Ordering::Acquire)
    }

    /// DDL went by: re-read function volatility soon.
    pub fn request_refresh(&self) {
        self.refresh_requested.store(true, Ordering::Release);
        self.refresh.notify_one();
    }

    fn take_refresh_request(&self) -> bool {
        self.refresh_requested.swap(false, Ordering::AcqRel)
    }

    async fn wait_for_next_check(&self, interval: Duration) {
        let _ = tokio::time::timeout(interval, self.refresh.notified()).await;
    }

    /// Picks a replica for a read that must see `mark`, or says why not.
    /// `active(i)` is the number of connections replica `i` serves now.
    pub fn pick_replica(
        &self,
        balance: Balance,
        mark: Option<&WriteMark>,
        active: impl Fn(usize) -> usize,
    ) -> Result<usize, Reason> {
        let n = self.replicas.len();
        if n == 0 {
            return Err(Reason::NoHealthyReplica);
        }
        let min_lsn = match mark {
            Some(m) if m.pending.load(Ordering::Acquire) > 0 => return Err(Reason::ReadYourWrites),
            Some(m) => m.lsn.load(Ordering::Acquire),
            None => 0,
        };
        // No list is built: this runs for every read.
        let healthy = |i: usize| self.replicas[i].is_healthy();
        let fresh = |i: usize| healthy(i) && self.replicas[i].lsn() >= min_lsn;
        let count = (0..n).filter(|&i| fresh(i)).count();
        if count == 0 {
            return Err(match (0..n).any(healthy) {
                true => Reason::ReadYourWrites,
                false => Reason::NoHealthyReplica,
            });
        }
        // The fresh replicas in order, from the one whose turn it is.
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let mut rotation = (0..n).filter(|&i| fresh(i)).cycle().skip(turn).take(count);
        let pick = match balance {
            Balance::RoundRobin => rotation.next(),
            // Ties rotate, so equal replicas share the load.
            Balance::LeastConnections => rotation.min_by_key(|&i| active(i)),
        };
        // None only if every replica left the rotation since they were counted.
        pick.ok_or(Reason::NoHealthyReplica)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(healthy: &[(bool, u64)]) -> Router {
        let r = Router::new(healthy.len());
        for (h, (ok, lsn)) in r.replicas.iter().zip(healthy) {
            h.healthy.store(*ok, Ordering::Relaxed);
            h.lsn.store(*lsn, Ordering::Relaxed);
        }
        r
    }

    #[test]
    fn round_robin_rotates_over_healthy_replicas() {
        let r = router(&[(true, 10), (false, 10), (true, 10)]);
        let picks: Vec<usize> = (0..4)
            .map(|_| r.pick_replica(Balance::RoundRobin, None, |_| 0).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
    }

    #[test]
    fn read_your_writes_needs_a_replica_that_replayed_the_write() {
        let r = router(&[(true, 10), (true, 20)]);
        let mark = WriteMark::default();
        mark.begin();
        assert_eq!(
            r.pick_replica(Balance::RoundRobin, Some(&mark), |_| 0),
            Err(Reason::ReadYourWrites)
        );
        mark.finish(Some(15));
        assert_eq!(r.pick_replica(Balance::RoundRobin, Some(&mark), |_| 0), Ok(1));
        mark.begin();
        mark.finish(Some(30));
        assert_eq!(
            r.pick_replica(Balance::RoundRobin, Some(&mark), |_| 0),
            Err(Reason::ReadYourWrites)
        );
    }

    #[test]
    fn the_cache_answers_only_for_the_text_it_holds() {
        use std::hash::BuildHasher;
        let r = Router::new(0);
        assert_eq!(r.classify("SELECT 1"), Class::Read);
        assert_eq!(r.classify("SELECT 1"), Class::Read, "from the cache");
        // Another text under the same hash (a collision) is not its answer.
        let hash = r.hasher.hash_one(b"DELETE FROM t".as_slice());
        r.cache_shard(hash)
            .insert(hash, (b"SELECT 2".as_slice().into(), Class::Read));
        assert!(matches!(r.classify("DELETE FROM t"), Class::Primary(_)));
        assert!(matches!(r.classify("DELETE FROM t"), Class::Primary(_)), "now cached");
        assert_eq!(
            r.cache_shard(hash).get(&hash).map(|(t, _)| &**t),
            Some(b"DELETE FROM t".as_slice())
        );
    }

    #[test]
    fn texts_of_one_shape_share_a_class_unless_they_set() {
        let r = Router::new(0);
        let cached = |sql: &str| {
            let mut shape = Vec::new();
            classify::shape(sql, &mut shape);
            r.cache
                .iter()
                .any(|s| s.lock().unwrap().values().any(|(k, _)| **k == *shape))
        };
        assert_eq!(r.classify("SELECT a FROM t WHERE id = 1 AND b = 'x'"), Class::Read);
        assert!(cached("SELECT a FROM t WHERE id = 2 AND b = E'y'"));
        assert!(cached("SELECT a FROM t WHERE id = 3.5e2 AND b = $$z $$"));
        assert!(!cached("SELECT a FROM t WHERE id = $1 AND b = 'x'"));
        assert!(!cached("SELECT a FROM t WHERE id = 1 AND b = 'x' -- c"));
        assert!(!cached("SELECT a FROM \"t\" WHERE id = 1 AND b = 'x'"));
        assert_eq!(r.classify("SELECT a FROM t WHERE id = 2 AND b = 'y'"), Class::Read);
        // No shape: a literal may decide (`'serializable'`).
        assert_eq!(r.classify("SET x = 'read committed'"), Class::Neutral);
        assert!(!cached("SET x = 'serializable'"));
        assert_eq!(
            r.classify("SET x = 'serializable'"),
            Class::Primary(WriteReason::Transaction)
        );
        assert_eq!(
            r.classify("SELECT 1; set x TO 'serializable'"),
            Class::Primary(WriteReason::Transaction)
        );
        assert_eq!(r.classify("SELECT 2; set x TO 'read committed'"), Class::Read);
        // Words are kept whole: functions differ.
        assert_eq!(
            r.classify("SELECT f1(1)"),
            Class::Primary(WriteReason::VolatileFunction)
        );
        r.set_functions([("f2".to_owned(), Volatility::Stable)].into());
        assert_eq!(
            r.classify("SELECT f1(1)"),
            Class::Primary(WriteReason::VolatileFunction)
        );
        assert_eq!(r.classify("SELECT f2(2)"), Class::Read);
    }

    #[test]
    fn least_connections_ties_rotate_over_the_fresh_replicas() {
        let r = router(&[(true, 10), (false, 10), (true, 10), (true, 5)]);
        let mark = WriteMark::default();
        mark.begin();
        mark.finish(Some(10));
        let picks: Vec<usize> = (0..4)
            .map(|_| r.pick_replica(Balance::LeastConnections, Some(&mark), |_| 0).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
    }

    #[test]
    fn least_connections_prefers_the_idlest() {
        let r = router(&[(true, 0), (true, 0), (true, 0)]);
        let active = [5, 1, 3];
        assert_eq!(r.pick_replica(Balance::LeastConnections, None, |i| active[i]), Ok(1));
        assert_eq!(
            router(&[(false, 0)]).pick_replica(Balance::RoundRobin, None, |_| 0),
            Err(Reason::NoHealthyReplica)
        );
    }
}
