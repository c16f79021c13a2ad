//! Confirms a client's setting changes only once they have really taken
//! effect: a SET in autocommit when its request succeeds, a SET inside a
//! transaction when the transaction commits; nothing from a request that
//! failed or a transaction that rolled back. SET LOCAL never gets here.

use std::collections::VecDeque;

use crate::protocol::TransactionStatus;
use crate::sql::SettingChange;

/// What a ReadyForQuery settled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Changes now in force on the server connection.
    pub confirmed: Vec<SettingChange>,
    /// Changes whose fate the proxy cannot know (e.g. a savepoint was rolled
    /// back): the server connection must be reset before reuse.
    pub uncertain: bool,
}

/// Pending setting changes of one client, by request.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Requests (Query, Sync, FunctionCall) sent / answered by ReadyForQuery.
    sent: u64,
    answered: u64,
    pending: VecDeque<(u64, SettingChange)>,
    /// Changes that succeeded inside an open transaction block.
    in_transaction: Vec<SettingChange>,
    failed: bool,
    rolled_back: bool,
    /// The open transaction rolled back to a savepoint: what it keeps
    /// cannot be followed. (Creating and releasing savepoints undoes nothing.)
    rolled_back_to: bool,
}

impl Tracker {
    /// Whether any change awaits confirmation (then CommandComplete tags matter).
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty() || !self.in_transaction.is_empty()
    }

    /// Changes carried by the request being sent now.
    pub fn record(&mut self, changes: impl IntoIterator<Item = SettingChange>) {
        let at = self.sent;
        self.pending.extend(changes.into_iter().map(|c| (at, c)));
    }

    /// A request that ends with ReadyForQuery was sent.
    pub fn request_sent(&mut self) {
        self.sent += 1;
    }

    /// `n` requests reported sent will get no ReadyForQuery (Syncs the server
    /// ignored during COPY IN).
    pub fn forget_requests(&mut self, n: usize) {
        let n = n as u64;
        self.sent = self.sent.saturating_sub(n).max(self.answered);
        for (unit, _) in self.pending.iter_mut() {
            *unit = unit.saturating_sub(n).max(self.answered);
        }
    }

    /// A ROLLBACK TO SAVEPOINT was sent.
    pub fn rollback_to(&mut self) {
        self.rolled_back_to = true;
    }

    /// The server reported an error for a client request.
    pub fn error(&mut self) {
        if self.waiting() {
            self.failed = true;
        }
    }

    /// A CommandComplete tag went by.
    pub fn command_complete(&mut self, tag: &[u8]) {
        if tag.starts_with(b"ROLLBACK") {
            self.rolled_back = true;
        }
    }

    /// A ReadyForQuery answered the oldest outstanding request.
    pub fn ready(&mut self, status: TransactionStatus) -> Settled {
        let unit = self.answered;
        self.answered += 1;
        let mut changes = Vec::new();
        while self.pending.front().is_some_and(|(u, _)| *u <= unit) {
            if let Some((_, c)) = self.pending.pop_front() {
                changes.push(c);
            }
        }
        let failed = std::mem::take(&mut self.failed);
        let rolled_back = std::mem::take(&mut self.rolled_back);
        if self.rolled_back_to && status != TransactionStatus::InTransaction && status != TransactionStatus::Failed {
            self.rolled_back_to = false;
            let touched = !changes.is_empty() || !self.in_transaction.is_empty();
            self.in_transaction.clear();
            return Settled {
                confirmed: Vec::new(),
                uncertain: touched,
            };
        }
        match status {
            TransactionStatus::Idle if failed || rolled_back => {
                // A failed request rolls its implicit transaction back; a
                // ROLLBACK drops what the block set.
                self.in_transaction.clear();
                Settled::default()
            }
            TransactionStatus::Idle => {
                let mut confirmed = std::mem::take(&mut self.in_transaction);
                confirmed.extend(changes);
                Settled {
                    confirmed,
                    uncertain: false,
                }
            }
            TransactionStatus::InTransaction => {
                if !failed {
                    self.in_transaction.extend(changes);
                }
                Settled::default()
            }
            TransactionStatus::Failed => {
                // A later ROLLBACK TO SAVEPOINT could still keep some of these.
                let uncertain = !self.in_transaction.is_empty() || !changes.is_empty();
                self.in_transaction.clear();
                Settled {
                    confirmed: Vec::new(),
                    uncertain,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TransactionStatus::*;

    fn set(n: &str) -> SettingChange {
        SettingChange::Set {
            name: n.into(),
            sql: format!("SET {n} TO 1"),
        }
    }

    #[test]
    fn autocommit_set_is_confirmed_when_it_succeeds() {
        let mut t = Tracker::default();
        t.record([set("a")]);
        t.request_sent();
        assert_eq!(t.ready(Idle).confirmed, [set("a")]);
        t.record([set("b")]);
        t.request_sent();
        t.error();
        assert!(t.ready(Idle).confirmed.is_empty());
    }

    #[test]
    fn only_a_rollback_to_a_savepoint_makes_a_transaction_uncertain() {
        let mut t = Tracker::default();
        t.request_sent(); // BEGIN; SAVEPOINT s; SET a; RELEASE s
        t.record([set("a")]);
        assert!(t.ready(InTransaction).confirmed.is_empty());
        t.request_sent(); // COMMIT
        assert_eq!(
            t.ready(Idle),
            Settled {
                confirmed: vec![set("a")],
                uncertain: false
            }
        );

        t.request_sent(); // BEGIN; SAVEPOINT s; SET b
        t.record([set("b")]);
        t.ready(InTransaction);
        t.rollback_to();
        t.request_sent(); // ROLLBACK TO s
        t.ready(InTransaction);
        t.request_sent(); // COMMIT
        assert_eq!(
            t.ready(Idle),
            Settled {
                confirmed: vec![],
                uncertain: true
            }
        );
        // The next transaction starts clean.
        t.record([set("c")]);
        t.request_sent();
        assert_eq!(t.ready(Idle).confirmed, [set("c")]);
    }

    #[test]
    fn transaction_sets_wait_for_commit() {
        let mut t = Tracker::default();
        t.request_sent(); // BEGIN
        assert!(t.ready(InTransaction).confirmed.is_empty());
        t.record([set("a")]);
        t.request_sent();
        assert!(t.ready(InTransaction).confirmed.is_empty());
        t.request_sent(); // COMMIT
        t.command_complete(b"COMMIT\0");
        assert_eq!(t.ready(Idle).confirmed, [set("a")]);

        t.request_sent();
        t.ready(InTransaction);
        t.record([set("b")]);
        t.request_sent();
        t.ready(InTransaction);
        t.request_sent();
        t.command_complete(b"ROLLBACK\0");
        assert!(t.ready(Idle).confirmed.is_empty());
        assert!(!t.waiting());
    }

    #[test]
    fn pipelined_requests_settle_in_order() {
        let mut t = Tracker::default();
        t.record([set("a")]);
        t.request_sent();
        t.request_sent();
        t.record([set("c")]);
        t.request_sent();
        assert_eq!(t.ready(Idle).confirmed, [set("a")]);
        assert!(t.ready(Idle).confirmed.is_empty());
        assert_eq!(t.ready(Idle).confirmed, [set("c")]);
    }

    #[test]
    fn failed_transaction_is_uncertain() {
        let mut t = Tracker::default();
        t.request_sent();
        t.ready(InTransaction);
        t.record([set("a")]);
        t.request_sent();
        t.ready(InTransaction);
        t.request_sent();
        t.error();
        assert!(t.ready(Failed).uncertain);
    }
}
