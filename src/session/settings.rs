//! Confirms a client's setting changes only once they have really taken
//! effect: a SET in autocommit when its request succeeds, a SET inside a
//! transaction when the transaction commits with it in force; nothing from
//! a request that failed, a transaction that rolled back, or a savepoint
//! rolled back to. SET LOCAL never gets here.
//!
//! Inside a transaction block the changes are kept on a stack of savepoint
//! frames, as PostgreSQL keeps them: `SAVEPOINT` opens a frame, `RELEASE`
//! merges a frame (and those above it) into the one below, `ROLLBACK TO`
//! empties it. A request that fails inside a block leaves the block failed
//! until a `ROLLBACK TO` empties the frame its statements went to (or one
//! below), so what such a request set never needs to be known; but a
//! savepoint command in a request that failed part-way (dbproxy does not
//! count the statements that ran) leaves the frames unknown.

use std::collections::VecDeque;

use crate::protocol::TransactionStatus;
use crate::sql::{Effects, Savepoint, SettingChange};

/// What a ReadyForQuery settled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Changes now in force on the server connection.
    pub confirmed: Vec<SettingChange>,
    /// Changes whose fate the proxy cannot know: the server connection must
    /// be reset before reuse.
    pub uncertain: bool,
}

/// One step of a request, in the order the server runs them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Change(SettingChange),
    Savepoint(Savepoint),
}

/// A savepoint's share of a transaction (the first frame is the
/// transaction's own).
#[derive(Debug, Default)]
struct Frame {
    name: String,
    changes: Vec<SettingChange>,
}

/// Pending setting changes of one client, by request.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Requests (Query, Sync, FunctionCall) sent / answered by ReadyForQuery.
    sent: u64,
    answered: u64,
    pending: VecDeque<(u64, Step)>,
    /// Statements in the request being sent.
    statements: usize,
    /// Requests with steps and more than one statement.
    multi: VecDeque<u64>,
    /// The open transaction block's savepoint frames; empty outside one.
    frames: Vec<Frame>,
    /// The block's savepoints are not known (a savepoint command in a request
    /// that failed part-way, or a name not found): only a rollback of the
    /// whole transaction settles it.
    lost_track: bool,
    /// The block has run a setting change (in force or not).
    touched: bool,
    failed: bool,
    /// ROLLBACK tags in the answers to the oldest outstanding request (a
    /// ROLLBACK TO's tag is `ROLLBACK` too).
    rollback_tags: usize,
}

impl Tracker {
    /// Whether any change awaits confirmation (then CommandComplete tags matter).
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty() || !self.frames.is_empty()
    }

    /// Changes and savepoint commands carried by the request being sent now.
    pub fn record(&mut self, fx: &Effects) {
        let at = self.sent;
        let mut savepoints = fx.savepoints.iter().peekable();
        for (i, change) in fx.changes.iter().enumerate() {
            while let Some((_, sp)) = savepoints.next_if(|(before, _)| *before <= i) {
                self.pending.push_back((at, Step::Savepoint(sp.clone())));
            }
            self.pending.push_back((at, Step::Change(change.clone())));
        }
        for (_, sp) in savepoints {
            self.pending.push_back((at, Step::Savepoint(sp.clone())));
        }
    }

    /// `n` statements go in the request being sent.
    pub fn statements_sent(&mut self, n: usize) {
        self.statements += n;
    }

    /// A request that ends with ReadyForQuery was sent.
    pub fn request_sent(&mut self) {
        let statements = std::mem::take(&mut self.statements);
        if statements > 1 && self.pending.back().is_some_and(|(u, _)| *u == self.sent) {
            self.multi.push_back(self.sent);
        }
        self.sent += 1;
    }

    /// `n` requests reported sent will get no ReadyForQuery (Syncs the server
    /// ignored during COPY IN).
    pub fn forget_requests(&mut self, n: usize) {
        let n = n as u64;
        let answered = self.answered;
        let earlier = |unit: &mut u64| *unit = unit.saturating_sub(n).max(answered);
        self.sent = self.sent.saturating_sub(n).max(answered);
        self.pending.iter_mut().for_each(|(unit, _)| earlier(unit));
        self.multi.iter_mut().for_each(earlier);
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
            self.rollback_tags += 1;
        }
    }

    /// A ReadyForQuery answered the oldest outstanding request.
    pub fn ready(&mut self, status: TransactionStatus) -> Settled {
        let unit = self.answered;
        self.answered += 1;
        if self.pending.is_empty() && self.frames.is_empty() && !self.lost_track && !self.touched {
            // Nothing to settle (nearly every request).
            self.failed = false;
            self.rollback_tags = 0;
            return Settled::default();
        }
        let mut steps = Vec::new();
        while let Some((_, step)) = self.pending.pop_front_if(|(u, _)| *u <= unit) {
            steps.push(step);
        }
        let mut multi = false;
        while self.multi.pop_front_if(|u| *u <= unit).is_some() {
            multi = true;
        }
        let failed = std::mem::take(&mut self.failed);
        let rollback_tags = std::mem::take(&mut self.rollback_tags);
        let rollbacks_to = steps
            .iter()
            .filter(|s| matches!(s, Step::Savepoint(Savepoint::RollbackTo(_))))
            .count();
        let changed_here = steps.iter().any(|s| matches!(s, Step::Change(_)));
        self.touched |= changed_here;
        if !failed {
            self.apply(steps);
        } else if multi && steps.iter().any(|s| matches!(s, Step::Savepoint(_))) {
            // Some statements ran, and dbproxy does not know which.
            self.lost_track = true;
        }
        // Otherwise what the failed request set is undone with its block, or
        // by the ROLLBACK TO that ends the block's failed state.
        match status {
            TransactionStatus::InTransaction | TransactionStatus::Failed => Settled::default(),
            TransactionStatus::Idle => {
                let frames = std::mem::take(&mut self.frames);
                let lost_track = std::mem::take(&mut self.lost_track);
                let touched = std::mem::take(&mut self.touched);
                // A failed request rolls its implicit transaction back, and a
                // ROLLBACK (or COMMIT of a failed block) the whole block. In a
                // string of several statements, a COMMIT before that may have
                // made some of its changes permanent.
                if failed || rollback_tags > rollbacks_to {
                    return Settled {
                        confirmed: Vec::new(),
                        uncertain: multi && changed_here,
                    };
                }
                if lost_track {
                    return Settled {
                        confirmed: Vec::new(),
                        uncertain: touched,
                    };
                }
                Settled {
                    confirmed: frames.into_iter().flat_map(|f| f.changes).collect(),
                    uncertain: false,
                }
            }
        }
    }

    /// The innermost frame, opened if there is none yet.
    fn ensure_frame(&mut self) -> &mut Frame {
        if self.frames.is_empty() {
            self.frames.push(Frame::default());
        }
        let last = self.frames.len() - 1;
        &mut self.frames[last]
    }

    /// Runs a request's steps, all of which took effect.
    fn apply(&mut self, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Change(c) => self.ensure_frame().changes.push(c),
                Step::Savepoint(Savepoint::Create(name)) => {
                    self.ensure_frame();
                    self.frames.push(Frame {
                        name,
                        ..Frame::default()
                    });
                }
                Step::Savepoint(Savepoint::Release(name)) => match self.find(&name) {
                    Some(i) => {
                        let merged: Vec<Frame> = self.frames.drain(i..).collect();
                        let below = &mut self.frames[i - 1];
                        below.changes.extend(merged.into_iter().flat_map(|f| f.changes));
                    }
                    None => self.lost_track = true,
                },
                Step::Savepoint(Savepoint::RollbackTo(name)) => match self.find(&name) {
                    Some(i) => {
                        self.frames.truncate(i + 1);
                        self.frames[i].changes.clear();
                    }
                    None => self.lost_track = true,
                },
            }
        }
    }

    /// The newest savepoint frame named `name` (never the transaction's own).
    fn find(&self, name: &str) -> Option<usize> {
        (1..self.frames.len()).rev().find(|&i| self.frames[i].name == name)
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

    /// Records what `sql` does, as one request.
    fn send(t: &mut Tracker, sql: &str) {
        let fx = crate::sql::analyze(sql);
        t.record(&fx);
        t.statements_sent(fx.statements);
        t.request_sent();
    }

    /// One request answered: its CommandComplete tags, then ReadyForQuery.
    fn answer(t: &mut Tracker, tags: &[&str], status: TransactionStatus) -> Settled {
        for tag in tags {
            if *tag == "ERROR" {
                t.error();
            } else {
                t.command_complete(tag.as_bytes());
            }
        }
        t.ready(status)
    }

    fn run(t: &mut Tracker, sql: &str, tags: &[&str], status: TransactionStatus) -> Settled {
        send(t, sql);
        answer(t, tags, status)
    }

    fn confirmed(names: &[&str]) -> Settled {
        Settled {
            confirmed: names.iter().map(|n| set(n)).collect(),
            uncertain: false,
        }
    }

    const UNCERTAIN: Settled = Settled {
        confirmed: Vec::new(),
        uncertain: true,
    };

    #[test]
    fn autocommit_set_is_confirmed_when_it_succeeds() {
        let mut t = Tracker::default();
        assert_eq!(run(&mut t, "SET a = 1", &["SET"], Idle), confirmed(&["a"]));
        assert_eq!(run(&mut t, "SET b = 1", &["ERROR"], Idle), Settled::default());
        assert!(!t.waiting());
    }

    #[test]
    fn released_savepoints_keep_their_settings() {
        let mut t = Tracker::default();
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SAVEPOINT s", &["SAVEPOINT"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        run(&mut t, "RELEASE s", &["RELEASE"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), confirmed(&["a"]));
    }

    #[test]
    fn a_rollback_to_a_savepoint_undoes_only_what_came_after_it() {
        let mut t = Tracker::default();
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        run(&mut t, "SAVEPOINT s", &["SAVEPOINT"], InTransaction);
        run(&mut t, "SET b = 1", &["SET"], InTransaction);
        run(&mut t, "SAVEPOINT inner", &["SAVEPOINT"], InTransaction);
        run(&mut t, "SET c = 1", &["SET"], InTransaction);
        // Its tag is ROLLBACK, which does not end the transaction.
        run(&mut t, "ROLLBACK TO SAVEPOINT s", &["ROLLBACK"], InTransaction);
        run(&mut t, "SET d = 1", &["SET"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), confirmed(&["a", "d"]));

        // All in one string, with the savepoint rolled back to twice.
        let sql = "BEGIN; SET a = 1; SAVEPOINT s; SET b = 1; ROLLBACK TO s; SET c = 1; ROLLBACK TO s; COMMIT";
        let tags = [
            "BEGIN",
            "SET",
            "SAVEPOINT",
            "SET",
            "ROLLBACK",
            "SET",
            "ROLLBACK",
            "COMMIT",
        ];
        assert_eq!(run(&mut t, sql, &tags, Idle), confirmed(&["a"]));
    }

    #[test]
    fn an_error_is_recovered_from_by_rolling_back_to_a_savepoint() {
        let mut t = Tracker::default();
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        run(&mut t, "SAVEPOINT s", &["SAVEPOINT"], InTransaction);
        // A request that fails part-way: its SET ran, and is undone by the
        // rollback to the savepoint that ends the failed state.
        run(&mut t, "SET b = 1; SELECT 1/0", &["SET", "ERROR"], Failed);
        run(&mut t, "ROLLBACK TO s", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), confirmed(&["a"]));

        // Or with the whole block.
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SAVEPOINT s", &["SAVEPOINT"], InTransaction);
        run(&mut t, "SET b = 1; SELECT 1/0", &["SET", "ERROR"], Failed);
        run(&mut t, "ROLLBACK TO s", &["ROLLBACK"], InTransaction);
        run(&mut t, "RELEASE s", &["RELEASE"], InTransaction);
        run(&mut t, "SET c = 1; SELECT 1/0", &["SET", "ERROR"], Failed);
        // A failed block's COMMIT answers ROLLBACK: nothing to be unsure of.
        assert_eq!(run(&mut t, "COMMIT", &["ROLLBACK"], Idle), Settled::default());

        // A single statement that fails changed nothing.
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        run(&mut t, "SAVEPOINT s", &["SAVEPOINT"], InTransaction);
        run(&mut t, "SET b = 'x'", &["ERROR"], Failed);
        run(&mut t, "ROLLBACK TO s", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), confirmed(&["a"]));
    }

    #[test]
    fn savepoints_dbproxy_lost_track_of_make_the_commit_uncertain() {
        let mut t = Tracker::default();
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        // A savepoint in a request that failed part-way may or may not exist.
        run(&mut t, "SAVEPOINT s; SELECT 1/0", &["SAVEPOINT", "ERROR"], Failed);
        run(&mut t, "ROLLBACK TO s", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), UNCERTAIN);
        // The next transaction starts clean.
        assert_eq!(run(&mut t, "SET c = 1", &["SET"], Idle), confirmed(&["c"]));

        // A savepoint released by a request that failed part-way: with two
        // savepoints named s, a later ROLLBACK TO s may reach either.
        run(
            &mut t,
            "BEGIN; SET a = 1; SAVEPOINT s; SET b = 1; SAVEPOINT s",
            &["BEGIN"],
            InTransaction,
        );
        run(&mut t, "RELEASE s; SELECT 1/0", &["RELEASE", "ERROR"], Failed);
        run(&mut t, "ROLLBACK TO s", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), UNCERTAIN);

        // A savepoint created where dbproxy could not see it.
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        run(&mut t, "SELECT 1", &["SELECT 1"], InTransaction);
        run(&mut t, "ROLLBACK TO hidden", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), UNCERTAIN);

        // Without a SET, there is nothing to be unsure of.
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "ROLLBACK TO hidden", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), Settled::default());

        // Rolled back entirely, nothing is uncertain.
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        run(&mut t, "ROLLBACK TO hidden", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "ROLLBACK", &["ROLLBACK"], Idle), Settled::default());
        assert!(!t.waiting());
    }

    #[test]
    fn a_string_that_commits_and_then_fails_is_uncertain() {
        let mut t = Tracker::default();
        let tags = ["BEGIN", "SET", "COMMIT", "ERROR"];
        assert_eq!(
            run(&mut t, "BEGIN; SET a = 1; COMMIT; SELECT 1/0", &tags, Idle),
            UNCERTAIN
        );
        let tags = ["BEGIN", "SET", "ROLLBACK", "SET"];
        assert_eq!(
            run(&mut t, "BEGIN; SET a = 1; ROLLBACK; SET b = 1", &tags, Idle),
            UNCERTAIN
        );
        // One statement that fails changed nothing.
        assert_eq!(run(&mut t, "SET a = 'x'", &["ERROR"], Idle), Settled::default());
    }

    #[test]
    fn transaction_sets_wait_for_commit() {
        let mut t = Tracker::default();
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        assert_eq!(run(&mut t, "SET a = 1", &["SET"], InTransaction), Settled::default());
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), confirmed(&["a"]));
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET b = 1", &["SET"], InTransaction);
        assert_eq!(run(&mut t, "ROLLBACK", &["ROLLBACK"], Idle), Settled::default());
        assert!(!t.waiting());
    }

    #[test]
    fn pipelined_requests_settle_in_order() {
        let mut t = Tracker::default();
        send(&mut t, "SET a = 1");
        send(&mut t, "SELECT 1");
        send(&mut t, "SET c = 1");
        assert_eq!(answer(&mut t, &["SET"], Idle), confirmed(&["a"]));
        assert_eq!(answer(&mut t, &["SELECT 1"], Idle), Settled::default());
        assert_eq!(answer(&mut t, &["SET"], Idle), confirmed(&["c"]));
    }

    #[test]
    fn an_extended_batch_counts_its_binds_as_statements() {
        let mut t = Tracker::default();
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SAVEPOINT s", &["SAVEPOINT"], InTransaction);
        // Bind/Execute of a SET, then of a failing statement, one Sync.
        t.record(&crate::sql::analyze("SET a = 1"));
        t.statements_sent(1);
        t.statements_sent(1);
        t.request_sent();
        answer(&mut t, &["SET", "ERROR"], Failed);
        run(&mut t, "ROLLBACK TO s", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), Settled::default());
    }
}
