//! Confirms a client's setting changes only once they have really taken
//! effect: a SET in autocommit when its request succeeds, a SET inside a
//! transaction when the transaction commits with it in force; nothing from
//! a request that failed, a transaction that rolled back, or a savepoint
//! rolled back to. SET LOCAL never gets here.
//!
//! Inside a transaction block the changes are kept on a stack of savepoint
//! frames, as PostgreSQL keeps them: `SAVEPOINT` opens a frame, `RELEASE`
//! merges a frame (and those above it) into the one below, `ROLLBACK TO`
//! empties it, `COMMIT` confirms them all and `ROLLBACK` drops them. These
//! commands are steps of the request that carries them, in order with its
//! changes; a request that dbproxy did not analyse (no trigger word, so no
//! changes) ends a block by the CommandComplete tags it answers with.
//!
//! A request that fails runs none of its steps. If it had one statement,
//! that is exact. If it had several, some ran: its changes went to the top
//! frame, which the `ROLLBACK TO` or `ROLLBACK` that ends the block's failed
//! state empties anyway; but a transaction or savepoint command among them
//! leaves dbproxy unsure of the server's settings until the block ends, and
//! then the connection is reset.

use std::collections::VecDeque;

use crate::protocol::TransactionStatus;
use crate::sql::{Effects, SettingChange, TxCommand};

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
    Tx(TxCommand),
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
    /// The block's savepoints are not known (a name not found, or one that
    /// could not be read): its commit is uncertain.
    lost_track: bool,
    /// What the server's settings are is not known until the block ends (a
    /// transaction or savepoint command in a request that failed part-way,
    /// a commit with `lost_track`, `PREPARE TRANSACTION`).
    unknown: bool,
    /// A change was sent since the last block ended (in force or not).
    touched: bool,
    /// The block is in the failed state: its COMMIT rolls back.
    block_failed: bool,
    /// Changes committed by a `COMMIT` tag of an unanalysed request, to be
    /// reported with its ReadyForQuery.
    committed: Vec<SettingChange>,
    /// Transaction-ending tags (`COMMIT`, `ROLLBACK`, `PREPARE TRANSACTION`)
    /// in the answers to an analysed request: more than its steps account
    /// for means a statement dbproxy did not analyse ended a block (an
    /// extended batch's `COMMIT`, whose Parse has no trigger word).
    tx_tags: usize,
    failed: bool,
}

impl Tracker {
    /// Whether any change awaits confirmation (then CommandComplete tags matter).
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty() || !self.frames.is_empty()
    }

    /// Changes and transaction commands carried by the request being sent now.
    pub fn record(&mut self, fx: &Effects) {
        let at = self.sent;
        let mut commands = fx.tx.iter().peekable();
        for (i, change) in fx.changes.iter().enumerate() {
            while let Some((_, c)) = commands.next_if(|(before, _)| *before <= i) {
                self.pending.push_back((at, Step::Tx(c.clone())));
            }
            self.pending.push_back((at, Step::Change(change.clone())));
        }
        for (_, c) in commands {
            self.pending.push_back((at, Step::Tx(c.clone())));
        }
    }

    /// `n` statements (or extended-protocol messages that can fail) go in the
    /// request being sent.
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

    /// The server reported an error for a client request (whether or not
    /// its steps are recorded yet: a batch may be sent in several parts).
    pub fn error(&mut self) {
        self.failed = true;
    }

    /// A CommandComplete tag went by (while [`Self::waiting`]).
    pub fn command_complete(&mut self, tag: &[u8]) {
        let ends_block = |t: &[u8]| {
            (t.starts_with(b"COMMIT") || t.starts_with(b"ROLLBACK") || t.starts_with(b"PREPARE TRANSACTION"))
                && !t.starts_with(b"COMMIT PREPARED")
                && !t.starts_with(b"ROLLBACK PREPARED")
        };
        if self.pending.front().is_some_and(|(u, _)| *u == self.answered) {
            // An analysed request: its steps say what its statements did,
            // unless some of its statements were not analysed.
            if ends_block(tag) {
                self.tx_tags += 1;
            }
            return;
        }
        if tag.starts_with(b"COMMIT") && !tag.starts_with(b"COMMIT PREPARED") {
            self.end_block(true);
        } else if tag.starts_with(b"ROLLBACK") && !tag.starts_with(b"ROLLBACK PREPARED") {
            // A failed block's COMMIT answers ROLLBACK.
            self.end_block(false);
        } else if tag.starts_with(b"PREPARE TRANSACTION") {
            self.unknown = true;
            self.end_block(false);
        }
    }

    /// A ReadyForQuery answered the oldest outstanding request.
    pub fn ready(&mut self, status: TransactionStatus) -> Settled {
        let unit = self.answered;
        self.answered += 1;
        if self.pending.is_empty() && self.frames.is_empty() && self.committed.is_empty() && !self.dirty_block() {
            // Nothing to settle (nearly every request).
            self.failed = false;
            self.tx_tags = 0;
            self.block_failed = status == TransactionStatus::Failed;
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
        let tx_tags = std::mem::take(&mut self.tx_tags);
        self.touched |= steps.iter().any(|s| matches!(s, Step::Change(_)));
        let tx_steps = steps
            .iter()
            .filter(|s| {
                matches!(
                    s,
                    Step::Tx(TxCommand::Commit | TxCommand::Rollback | TxCommand::RollbackTo(_) | TxCommand::Unknown)
                )
            })
            .count();
        if tx_tags > tx_steps || (failed && tx_tags > 0) {
            // A block ended where dbproxy did not see it, or before an error.
            self.unknown = true;
        }
        if !failed {
            self.apply(steps);
        } else if multi && steps.iter().any(|s| matches!(s, Step::Tx(_))) {
            // Some statements ran, and dbproxy does not know which.
            self.unknown = true;
        }
        let mut confirmed = std::mem::take(&mut self.committed);
        match status {
            TransactionStatus::InTransaction | TransactionStatus::Failed => {
                self.block_failed = status == TransactionStatus::Failed;
                Settled {
                    confirmed,
                    uncertain: false,
                }
            }
            TransactionStatus::Idle => {
                // What is left is an autocommit request's (or an implicit
                // block's): in force if it succeeded, rolled back if not.
                if !failed {
                    self.end_block(true);
                    confirmed.append(&mut self.committed);
                }
                self.frames.clear();
                self.lost_track = false;
                self.block_failed = false;
                let unknown = std::mem::take(&mut self.unknown);
                let touched = std::mem::take(&mut self.touched);
                if unknown {
                    // Nothing is confirmed: the client keeps its previous values.
                    confirmed.clear();
                }
                Settled {
                    confirmed,
                    uncertain: unknown && touched,
                }
            }
        }
    }

    /// Whether the block holds state beyond its frames.
    fn dirty_block(&self) -> bool {
        self.lost_track || self.unknown || self.touched
    }

    /// The block ends: committed (its changes go to `committed`) or rolled
    /// back. A failed block's commit rolls back.
    fn end_block(&mut self, commit: bool) {
        let frames = std::mem::take(&mut self.frames);
        if commit && !self.block_failed {
            if self.lost_track || self.unknown {
                self.unknown = true;
            } else {
                self.committed.extend(frames.into_iter().flat_map(|f| f.changes));
            }
        }
        self.lost_track = false;
        self.block_failed = false;
    }

    /// The innermost frame, opened if there is none yet.
    fn top_frame(&mut self) -> &mut Frame {
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
                Step::Change(c) => self.top_frame().changes.push(c),
                Step::Tx(TxCommand::Savepoint(name)) => {
                    self.top_frame();
                    if name.is_empty() {
                        self.lost_track = true;
                    }
                    self.frames.push(Frame {
                        name,
                        ..Frame::default()
                    });
                }
                Step::Tx(TxCommand::Release(name)) => match self.find(&name) {
                    Some(i) => {
                        let merged: Vec<Frame> = self.frames.drain(i..).collect();
                        let below = &mut self.frames[i - 1];
                        below.changes.extend(merged.into_iter().flat_map(|f| f.changes));
                    }
                    None => self.lost_track = true,
                },
                Step::Tx(TxCommand::RollbackTo(name)) => {
                    self.block_failed = false;
                    match self.find(&name) {
                        Some(i) => {
                            self.frames.truncate(i + 1);
                            self.frames[i].changes.clear();
                        }
                        None => self.lost_track = true,
                    }
                }
                Step::Tx(TxCommand::Commit) => self.end_block(true),
                Step::Tx(TxCommand::Rollback) => self.end_block(false),
                Step::Tx(TxCommand::Unknown) => {
                    self.unknown = true;
                    self.end_block(false);
                }
            }
        }
    }

    /// The newest savepoint frame named `name` (never the transaction's own,
    /// nor one whose name could not be read).
    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return None;
        }
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
            sql: format!("SET {} TO 1", crate::sql::setting_name_sql(n)),
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

        // A savepoint whose name dbproxy cannot read.
        run(
            &mut t,
            "BEGIN; SET a = 1; SAVEPOINT s; SET b = 1",
            &["BEGIN"],
            InTransaction,
        );
        run(&mut t, "SAVEPOINT U&\"s\"", &["SAVEPOINT"], InTransaction);
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
    fn transaction_commands_inside_one_string_are_followed() {
        let mut t = Tracker::default();
        let tags = ["BEGIN", "SET", "ROLLBACK", "SET"];
        assert_eq!(
            run(&mut t, "BEGIN; SET a = 1; ROLLBACK; SET b = 1", &tags, Idle),
            confirmed(&["b"])
        );
        let tags = ["BEGIN", "SET", "COMMIT", "BEGIN", "SET"];
        let sql = "BEGIN; SET a = 1; COMMIT; BEGIN; SET b = 1";
        assert_eq!(run(&mut t, sql, &tags, InTransaction), confirmed(&["a"]));
        assert_eq!(run(&mut t, "ROLLBACK", &["ROLLBACK"], Idle), Settled::default());
        // A string that commits and then fails: how far it got is not known.
        let tags = ["BEGIN", "SET", "COMMIT", "BEGIN", "ERROR"];
        let sql = "BEGIN; SET a = 1; COMMIT; BEGIN; SELECT 1/0";
        assert_eq!(run(&mut t, sql, &tags, Failed), Settled::default());
        assert_eq!(run(&mut t, "ROLLBACK", &["ROLLBACK"], Idle), UNCERTAIN);
        // One statement that fails changed nothing.
        assert_eq!(run(&mut t, "SET a = 'x'", &["ERROR"], Idle), Settled::default());
    }

    #[test]
    fn a_block_ended_by_a_string_dbproxy_did_not_analyse_settles_by_its_tags() {
        let mut t = Tracker::default();
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        // No trigger word: not analysed; its COMMIT tag ends the block.
        assert_eq!(
            run(&mut t, "COMMIT; BEGIN", &["COMMIT", "BEGIN"], InTransaction),
            confirmed(&["a"])
        );
        assert_eq!(
            run(&mut t, "SELECT 1", &["SELECT 1"], InTransaction),
            Settled::default()
        );
        assert_eq!(run(&mut t, "ROLLBACK", &["ROLLBACK"], Idle), Settled::default());
        // A failed block's COMMIT answers ROLLBACK.
        run(&mut t, "BEGIN", &["BEGIN"], InTransaction);
        run(&mut t, "SET a = 1", &["SET"], InTransaction);
        run(&mut t, "SELECT 1/0", &["ERROR"], Failed);
        assert_eq!(run(&mut t, "COMMIT", &["ROLLBACK"], Idle), Settled::default());
        assert!(!t.waiting());
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
    fn an_extended_batch_ending_a_block_unseen_is_uncertain() {
        let mut t = Tracker::default();
        // Parse/Bind/Execute each of BEGIN, SET, COMMIT, BEGIN; one Sync:
        // COMMIT has no trigger word, so only the SET is analysed.
        t.record(&crate::sql::analyze("SET a = 1"));
        t.statements_sent(12);
        t.request_sent();
        answer(&mut t, &["BEGIN", "SET", "COMMIT", "BEGIN"], InTransaction);
        assert_eq!(run(&mut t, "ROLLBACK", &["ROLLBACK"], Idle), UNCERTAIN);
        // SET, ABORT in one batch: the ABORT rolled the SET back.
        t.record(&crate::sql::analyze("SET a = 1"));
        t.statements_sent(6);
        t.request_sent();
        assert_eq!(answer(&mut t, &["SET", "ROLLBACK"], Idle), UNCERTAIN);
    }

    #[test]
    fn an_error_before_the_steps_are_recorded_counts() {
        let mut t = Tracker::default();
        // Execute of SELECT 1/0 answered (after a Flush) before the Bind of
        // a SET in the same batch arrives.
        t.statements_sent(3);
        t.error();
        t.record(&crate::sql::analyze("SET a = 1"));
        t.statements_sent(3);
        t.request_sent();
        assert_eq!(t.ready(Idle), Settled::default());
    }

    #[test]
    fn an_extended_batch_that_fails_part_way_is_uncertain() {
        let mut t = Tracker::default();
        run(
            &mut t,
            "BEGIN; SET a = 1; SAVEPOINT s; SET b = 1; SAVEPOINT s",
            &["BEGIN"],
            InTransaction,
        );
        // Bind/Execute of RELEASE s, then a Parse that fails, one Sync.
        t.record(&crate::sql::analyze("RELEASE s"));
        t.statements_sent(1);
        t.statements_sent(1);
        t.request_sent();
        answer(&mut t, &["RELEASE", "ERROR"], Failed);
        run(&mut t, "ROLLBACK TO s", &["ROLLBACK"], InTransaction);
        assert_eq!(run(&mut t, "COMMIT", &["COMMIT"], Idle), UNCERTAIN);
    }
}
