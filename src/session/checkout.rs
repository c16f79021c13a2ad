//! Taking a server connection for a client's request: the pool to use (a
//! replica when the request may run there and one is fresh enough, else the
//! primary), the wait for a free slot, and what a held connection carries
//! (cancel target, the client's settings, the client's listing in SHOW CLIENTS).

use tokio::io::AsyncWriteExt;

use super::transfer::{Attached, Conn, Exit, Phase};
use crate::config::PoolMode;
use crate::pool::{CheckoutError, Role};
use crate::protocol::backend::{ErrorFields, error_response, ready_for_query};
use crate::protocol::extended::write_query;
use crate::protocol::{SqlState, TransactionStatus};
use crate::router::{Class, Reason};

use super::expect::Request;

impl Conn<'_> {
    /// Makes sure a server connection is held. `Ok(false)`: none could be had
    /// and the client has been told.
    pub(super) async fn ensure_server(&mut self, tag: u8, class: Class) -> Result<bool, Exit> {
        if let Phase::Attached(a) = &mut self.phase {
            if a.role == Role::Primary && matches!(class, Class::Primary(_)) {
                a.wrote = true;
            }
            if self.expect.is_empty()
                && !a.unsynced
                && a.status == TransactionStatus::Idle
                && self.mode == PoolMode::Transaction
                // (A query drops the server's unnamed statement: with renaming
                // off it is the client's own, and not sent again.)
                && (tag == b'Q' || self.shared.max_prepared.load(std::sync::atomic::Ordering::Relaxed) > 0)
                && let Some(sql) = a.conn.conn.state.carry(&self.settings)
            {
                // Kept across transactions (pinned): a RESET since went to
                // the server connection's own defaults, not to the client's
                // startup values. Its ParameterStatus messages reach the
                // client, which was told the connection's.
                a.conn.conn.state.query_sent();
                write_query(&mut self.to_server, &sql);
                self.expect.sent_resync();
            }
            return Ok(true);
        }
        if self.draining {
            return Err(Exit::Fatal(super::transfer::shutdown_error()));
        }
        // Chosen once: a choice taken again would take another turn of the
        // round robin, so a replica whose pool has no idle connection would
        // never be used.
        let choice = self.choose_replica(class);
        if self.attach_now(class, choice) {
            return Ok(true);
        }
        // Boxed: checking out (and maybe connecting) is a large future that
        // an idle client's task should not carry.
        match Box::pin(self.attach(class, choice)).await? {
            Ok(()) => Ok(true),
            Err(e) => {
                self.report_checkout_failure(tag, &e);
                Ok(false)
            }
        }
    }

    /// [`Self::attach`] when nothing has to wait, as for most transactions:
    /// the database is not paused, the chosen pool has a free slot and an
    /// idle connection, and no cancel is being delivered. Needs no future of
    /// its own. `false` leaves everything as it was, for the full path.
    fn attach_now(&mut self, class: Class, (replica, reason): (Option<usize>, Reason)) -> bool {
        if self.paused.as_ref().is_some_and(|p| *p.borrow()) {
            return false;
        }
        let (pool, role) = self.pool_of(replica);
        let Some(conn) = pool.try_checkout() else {
            return false;
        };
        if !self.may_run_on(&conn) {
            conn.checkin();
            return false;
        }
        if self.slot.try_set(conn.conn.cancel_key()).is_err() {
            // A cancel of the client's last request is still on its way.
            conn.checkin();
            return false;
        }
        self.stats.routed(reason.as_str());
        self.stats.wait.observe(std::time::Duration::ZERO);
        self.hold_now(conn, role, replica, class, std::time::Instant::now());
        true
    }

    /// Checks out a server connection for a request of `class`: a replica
    /// when the class allows and one is fresh enough, else the primary. A
    /// replica that cannot be reached is taken out of rotation and the next
    /// choice tried (nothing was sent yet). Carries the client's settings over
    /// in the same write as its request. `choice`: where the request was
    /// first sent (chosen again after a wait for RESUME). The outer error
    /// means the client left while we flushed its pending output.
    async fn attach(
        &mut self,
        class: Class,
        mut choice: (Option<usize>, Reason),
    ) -> Result<Result<(), CheckoutError>, Exit> {
        // Do not hold back output the client may be waiting for while we wait for a server.
        if !self.to_client.is_empty() {
            self.wr.write_all(&self.to_client).await.map_err(|_| Exit::ClientLeft)?;
            self.wr.flush().await.map_err(|_| Exit::ClientLeft)?;
            self.to_client.clear();
        }
        let waiting_since = std::time::Instant::now();
        // Not attached, so no server connection to clear (detach did).
        self.me.set_state(crate::clients::ClientState::Waiting);
        if let Some(paused) = &self.paused
            && *paused.borrow()
        {
            let mut paused = paused.subscribe();
            if *paused.borrow() {
                tracing::info!("database paused: the client's next transaction waits for RESUME");
                let _ = paused.wait_for(|&p| !p).await;
                // The replicas' health and lag may have changed meanwhile.
                choice = self.choose_replica(class);
            }
        }
        let wait = self.shared.live().config.pool.checkout_timeout;
        let result = self.checkout_routed(class, choice, wait).await;
        let now = std::time::Instant::now();
        let waited = now.saturating_duration_since(waiting_since);
        crate::stats::DbStats::add_time(&self.stats.wait_time_us, waited);
        self.stats.wait.observe(waited);
        match result {
            Ok((conn, role, replica)) => {
                self.hold(conn, role, replica, class, now).await;
                Ok(Ok(()))
            }
            Err(e) => {
                self.me.set_state(crate::clients::ClientState::Idle);
                Ok(Err(e))
            }
        }
    }

    /// The checkout of [`Self::attach`]: replicas first when allowed, then the
    /// primary, starting with `choice`. Returns the connection, its role and
    /// its replica's index.
    async fn checkout_routed(
        &mut self,
        class: Class,
        mut choice: (Option<usize>, Reason),
        wait: std::time::Duration,
    ) -> Result<(crate::pool::Checkout, Role, Option<usize>), CheckoutError> {
        // Why the primary, if the loop gives up: every replica failed just now.
        let mut fallback = Reason::NoHealthyReplica;
        for _ in 0..=self.replica_pools.len() {
            let (replica, reason) = choice;
            let (pool, role) = self.pool_of(replica);
            match pool.clone().checkout(wait).await {
                Ok(conn) if !self.may_run_on(&conn) => {
                    // Opened just now, or before the role's default changed.
                    conn.checkin();
                    fallback = Reason::Serializable;
                    break;
                }
                Ok(conn) => {
                    self.stats.routed(reason.as_str());
                    return Ok((conn, role, replica));
                }
                Err(CheckoutError::Connect(e)) if replica.is_some() => {
                    tracing::warn!(error = %e, "replica unreachable; trying elsewhere");
                    if let Some(i) = replica {
                        self.router.replicas[i].mark_down();
                    }
                    choice = self.choose_replica(class);
                }
                Err(e) => return Err(e),
            }
        }
        // The primary is the last resort.
        let conn = self.pool.checkout(wait).await?;
        self.stats.routed(fallback.as_str());
        Ok((conn, Role::Primary, None))
    }

    /// Takes `conn` for the client: registers it for cancel and carries the
    /// client's settings over, in the same write as the request that follows.
    /// `now`: a clock reading taken just before.
    async fn hold(
        &mut self,
        conn: crate::pool::Checkout,
        role: Role,
        replica: Option<usize>,
        class: Class,
        now: std::time::Instant,
    ) {
        if let Err(key) = self.slot.try_set(conn.conn.cancel_key()) {
            // A cancel of the client's last request is still on its way.
            self.slot.set(key).await;
        }
        self.hold_now(conn, role, replica, class, now);
    }

    /// [`Self::hold`] once the cancel slot names `conn`.
    fn hold_now(
        &mut self,
        mut conn: crate::pool::Checkout,
        role: Role,
        replica: Option<usize>,
        class: Class,
        now: std::time::Instant,
    ) {
        if let Some(sql) = conn.conn.state.carry(&self.settings) {
            conn.conn.state.query_sent();
            write_query(&mut self.to_server, &sql);
            self.expect.sent(Request::Query, true, None);
        }
        let routed = match role {
            Role::Primary => &self.stats.routed_primary,
            Role::Replica => &self.stats.routed_replica,
        };
        routed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let server = crate::clients::HeldServer {
            addr: conn.conn.label(),
            pid: conn.conn.process_id,
            tls: conn.conn.stream.is_tls(),
            generation: conn.conn.generation,
            tls_epoch: conn.conn.tls_epoch,
        };
        self.me.set(crate::clients::ClientState::Active, Some(server));
        self.phase = Phase::Attached(Attached {
            conn,
            role,
            wrote: role == Role::Primary && matches!(class, Class::Primary(_)),
            unsynced: false,
            status: TransactionStatus::Idle,
            since: now,
            replica,
            server_io: now,
            read_reserve: super::buffers::SMALL_READ_RESERVE,
            delivered: now,
        });
    }

    /// Whether the client's requests may run on `conn`: not on a standby's
    /// connection defaulting to SERIALIZABLE (see [`Pool::serializable_default`]),
    /// unless the client set a default of its own.
    ///
    /// [`Pool::serializable_default`]: crate::pool::Pool::serializable_default
    fn may_run_on(&self, conn: &crate::pool::Checkout) -> bool {
        conn.conn.state.default_serializable.is_none() || self.settings.serializable().is_some()
    }

    /// The pool of replica `replica`, or of the primary.
    fn pool_of(&self, replica: Option<usize>) -> (&std::sync::Arc<crate::pool::Pool>, Role) {
        match replica {
            Some(i) => (&self.replica_pools[i], Role::Replica),
            None => (&self.pool, Role::Primary),
        }
    }

    /// The replica for a request of `class`, if it may and should use one,
    /// and why the request goes where it goes.
    fn choose_replica(&self, class: Class) -> (Option<usize>, Reason) {
        if !self.split || !self.pins.is_empty() {
            return (None, Reason::Primary);
        }
        if let Class::Primary(why) = class {
            tracing::debug!(reason = why.as_str(), "routed to the primary");
            return (None, Reason::Statement(why));
        }
        let own_default = self.settings.serializable();
        if own_default == Some(true) {
            tracing::debug!(reason = "serializable", "read routed to the primary");
            return (None, Reason::Serializable);
        }
        let routing = &self.shared.live().config.routing;
        let mark = routing.read_your_writes.then_some(&*self.mark);
        let pools = &self.replica_pools;
        let active = |i: usize| pools[i].server_active();
        match self.router.pick_replica(routing.balance, mark, active) {
            Ok(i) if own_default.is_none() && pools[i].serializable_default() => {
                tracing::debug!(
                    reason = "serializable",
                    "read routed to the primary (the role's default)"
                );
                (None, Reason::Serializable)
            }
            Ok(i) if class == Class::ReadOnlyTransaction => (Some(i), Reason::ReadOnlyTransaction),
            Ok(i) => (Some(i), Reason::Read),
            Err(reason) => {
                tracing::debug!(reason = reason.as_str(), "read routed to the primary");
                (None, reason)
            }
        }
    }

    /// The request that needed a server fails; the client stays connected.
    fn report_checkout_failure(&mut self, tag: u8, e: &CheckoutError) {
        tracing::warn!(error = %e, "no server connection for the client's request");
        self.shared.errors.count(match e {
            CheckoutError::Timeout { .. } => "checkout_timeout",
            CheckoutError::Connect(_) => "server_connect",
        });
        let code = match e {
            CheckoutError::Timeout { .. } => SqlState::QUERY_CANCELED,
            CheckoutError::Connect(se) => se.sqlstate(),
        };
        error_response(&mut self.to_client, &ErrorFields::error(code, e.to_string()));
        match tag {
            b'Q' | b'F' | b'S' => ready_for_query(&mut self.to_client, TransactionStatus::Idle),
            _ => self.phase = Phase::SkipToSync,
        }
    }
}
