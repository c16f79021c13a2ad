//! What the server owes us: one entry per request sent, in order, saying
//! which server message completes it and whether its answers go to the client.
//!
//! This lets the proxy add requests of its own to a client's batch (a Parse of
//! a statement the server connection lacks, the SETs that carry the client's
//! settings) and swallow their answers, and answer some client requests itself
//! (ParseComplete for a statement already prepared, CloseComplete) at exactly
//! the point of the stream where the server would have.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::server_state::{NamedChange, NamedEffects};

/// A request sent to the server, by what completes its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Parse,
    Bind,
    DescribeStatement,
    DescribePortal,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

impl Request {
    /// Whether `tag` is the server message that ends this request's answer.
    fn completed_by(self, tag: u8) -> bool {
        match self {
            Request::Parse => tag == b'1',
            Request::Bind => tag == b'2',
            Request::DescribeStatement | Request::DescribePortal => matches!(tag, b'T' | b'n'),
            Request::Execute => matches!(tag, b'C' | b'I' | b's'),
            Request::Close => tag == b'3',
            Request::Sync | Request::Query | Request::FunctionCall => tag == b'Z',
        }
    }

    /// Extended-protocol requests are skipped by the server after an error
    /// until the next Sync.
    fn skipped_after_error(self) -> bool {
        !matches!(self, Request::Sync | Request::Query | Request::FunctionCall)
    }

    /// Whether the answer ends with ReadyForQuery.
    pub fn ends_with_ready(self) -> bool {
        !self.skipped_after_error()
    }
}

/// A client's named Parse, answered by the server or by the proxy: if the
/// answer never comes (an earlier error skips it, the connection is lost),
/// the client's name for it must go (see `Statements::forget`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientParse {
    /// Shared with the client's statement table.
    pub name: Arc<str>,
    /// Which statement of that name (`Statements::insert`).
    pub id: u64,
}

/// What a Bind of a statement under the client's own name (renaming off)
/// would meet among the Parses and Closes of that name owed an answer.
#[derive(Debug, Clone)]
pub enum PendingNamed {
    /// None: the statement recorded on the connection, if any, is the one.
    None,
    /// The last is in the Bind's batch: the Bind gets its statement (a
    /// Close: none), or is skipped with it. What that statement does.
    SameBatch(Option<Arc<NamedEffects>>),
    /// In earlier batches only, which may yet fail or be skipped: the Bind
    /// may meet any of them, or the one recorded. Whether any does something.
    Earlier { effects: bool },
}

/// A response the proxy writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synthetic {
    ParseComplete,
    CloseComplete,
}

#[derive(Debug)]
enum Entry {
    Sent {
        request: Request,
        /// Injected by the proxy: the client never sees the answer.
        injected: bool,
        /// The server-side statement a Parse creates (forgotten if it
        /// fails), a Close closes, or a Bind uses.
        creates: Option<Arc<str>>,
        /// The client's Parse this is, if it is one.
        client: Option<ClientParse>,
        /// A Parse or Close under the client's own name (renaming off):
        /// its change is in `Expectations::named_pending`, in order. (A
        /// flag, so that the hot path's entries stay as small as they were.)
        named: bool,
        /// Injected, but its ParameterStatus messages are the client's.
        show_status: bool,
    },
    Synthetic(Synthetic, Option<ClientParse>),
    /// The client ended a COPY IN here (CopyDone or CopyFail); no answer.
    CopyEnd,
}

/// What to do with one server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it to the client.
    Forward,
    /// Drop it: it answers the proxy's own request.
    Swallow,
    /// An error from the proxy's own SETs: show it to the client as a notice.
    Demote,
}

/// The queue of expected answers of one server connection.
#[derive(Debug, Default)]
pub struct Expectations {
    queue: VecDeque<Entry>,
    /// Synthetic answers due now, in order, for the caller to write.
    ready: Vec<Synthetic>,
    /// Statements whose Parse failed or was skipped.
    failed: Vec<Arc<str>>,
    /// Statements whose Parse the server acknowledged.
    created: Vec<Arc<str>>,
    /// Statements whose Close was skipped after an error: still prepared.
    kept: Vec<Arc<str>>,
    /// Parses and Closes under clients' own names the server answered.
    named: Vec<NamedChange>,
    /// The changes of the entries marked `named` owed an answer, in order.
    named_pending: VecDeque<NamedChange>,
    /// Client Parses that got no ParseComplete after all, each with whether
    /// it was skipped after an earlier error (rather than failed or lost).
    unparsed: Vec<(ClientParse, bool)>,
    /// In COPY IN started by Execute, before the client's CopyDone/CopyFail:
    /// the server ignores Syncs sent now.
    in_copy_in: bool,
    /// Syncs the server ignored (sent during COPY IN), not yet reported.
    ignored_syncs: usize,
    /// Client-visible answers completed so far (the client's own requests
    /// and synthetic answers), a running count.
    visible_done: u64,
}

impl Expectations {
    /// Nothing is owed.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Client requests still waiting for their ReadyForQuery.
    pub fn client_syncs(&self) -> usize {
        self.queue
            .iter()
            .filter(|e| matches!(e, Entry::Sent { request, injected: false, .. } if request.ends_with_ready()))
            .count()
    }

    /// Records a request sent to the server.
    pub fn sent(&mut self, request: Request, injected: bool, creates: Option<Arc<str>>) {
        if request == Request::Sync && self.in_copy_in {
            // PostgreSQL ignores Sync and Flush in copy-in mode.
            self.ignored_syncs += 1;
            return;
        }
        self.queue.push_back(Entry::Sent {
            request,
            injected,
            creates,
            client: None,
            named: false,
            show_status: false,
        });
    }

    /// Records the client's Parse, sent to the server as `creates` (None:
    /// the unnamed statement).
    pub fn sent_client_parse(&mut self, creates: Option<Arc<str>>, client: ClientParse) {
        self.queue.push_back(Entry::Sent {
            request: Request::Parse,
            injected: false,
            creates,
            client: Some(client),
            named: false,
            show_status: false,
        });
    }

    /// Records the client's unnamed Parse sent again by the proxy (`client`
    /// from `Unnamed::again`): if it gets no ParseComplete, whose unnamed
    /// statement the connection holds is not known.
    pub fn sent_unnamed_again(&mut self, client: ClientParse) {
        self.queue.push_back(Entry::Sent {
            request: Request::Parse,
            injected: true,
            creates: None,
            client: Some(client),
            named: false,
            show_status: false,
        });
    }

    /// Records the proxy's query setting the client's settings again on the
    /// connection it holds: answers swallowed but for ParameterStatus.
    pub fn sent_resync(&mut self) {
        self.queue.push_back(Entry::Sent {
            request: Request::Query,
            injected: true,
            creates: None,
            client: None,
            named: false,
            show_status: true,
        });
    }

    /// Records the client's Parse or Close of a statement under its own
    /// name (renaming off): `change` is collected once the server answers it.
    pub fn sent_named(&mut self, request: Request, change: NamedChange) {
        self.queue.push_back(Entry::Sent {
            request,
            injected: false,
            creates: None,
            client: None,
            named: true,
            show_status: false,
        });
        self.named_pending.push_back(change);
    }

    /// Parses under clients' own names owed an answer whose statements do
    /// something: each takes a record when answered.
    pub fn pending_named_effects(&self) -> usize {
        let records = |c: &&NamedChange| matches!(c, NamedChange::Parsed(_, Some(_)));
        self.named_pending.iter().filter(records).count()
    }

    /// Parses and Closes of `name` under the client's own name still owed
    /// an answer, as a Bind of it sent now would meet them.
    pub fn pending_named(&self, name: &str) -> PendingNamed {
        let mut after_sync = false;
        let mut found = PendingNamed::None;
        let mut changes = self.named_pending.iter().rev();
        for entry in self.queue.iter().rev() {
            match entry {
                Entry::Sent { named: true, .. } => {
                    let effects = match changes.next() {
                        Some(NamedChange::Parsed(n, named)) if **n == *name => named,
                        Some(NamedChange::Closed(n)) if **n == *name => &None,
                        _ => continue,
                    };
                    if !after_sync {
                        // The last, in the Bind's batch: if it fails, so does the Bind.
                        return PendingNamed::SameBatch(effects.clone());
                    }
                    found = PendingNamed::Earlier {
                        effects: effects.is_some() || matches!(found, PendingNamed::Earlier { effects: true }),
                    };
                }
                Entry::Sent { request, .. } if request.ends_with_ready() => after_sync = true,
                _ => {}
            }
        }
        found
    }

    /// Whether the last unnamed Parse owed (the client's, or the proxy's
    /// sent again) is in an earlier batch than the next request's: it may
    /// yet be skipped after an error in its batch.
    pub fn unnamed_parse_in_earlier_batch(&self) -> bool {
        let mut after_sync = false;
        for entry in self.queue.iter().rev() {
            match entry {
                Entry::Sent { client: Some(c), .. } if c.name.is_empty() => return after_sync,
                Entry::Sent { request, .. } if request.ends_with_ready() => after_sync = true,
                _ => {}
            }
        }
        false
    }

    /// Whether a Parse of the client's statement `name` is unanswered in an
    /// earlier batch than the next request's: it may yet fail, and a Parse
    /// of the same name now would then be fine. (In the same batch, its
    /// failure would make the server skip the new Parse anyway.)
    pub fn parse_pending_before_sync(&self, name: &str) -> bool {
        let mut pending = false;
        for entry in &self.queue {
            match entry {
                Entry::Sent { client: Some(c), .. } | Entry::Synthetic(_, Some(c)) if *c.name == *name => {
                    pending = true
                }
                Entry::Sent { request, .. } if pending && request.ends_with_ready() => return true,
                _ => {}
            }
        }
        false
    }

    /// Client Parses that will get no ParseComplete, since last asked, each
    /// with whether it was skipped after an earlier error (rather than
    /// failed or lost with the connection).
    pub fn take_unparsed(&mut self) -> impl Iterator<Item = (ClientParse, bool)> + '_ {
        self.unparsed.drain(..)
    }

    /// The client sent CopyDone or CopyFail.
    pub fn copy_end(&mut self) {
        if self.in_copy_in {
            self.in_copy_in = false;
        } else if !self.queue.is_empty() {
            self.queue.push_back(Entry::CopyEnd);
        }
    }

    /// Client Syncs the server ignored since last asked (they get no ReadyForQuery).
    pub fn take_ignored_syncs(&mut self) -> usize {
        std::mem::take(&mut self.ignored_syncs)
    }

    /// Records an answer the proxy gives itself once everything before it is answered.
    pub fn synthetic(&mut self, s: Synthetic) {
        self.synthetic_for(s, None);
    }

    /// A synthetic ParseComplete answering the client's named Parse.
    pub fn synthetic_parse(&mut self, client: ClientParse) {
        self.synthetic_for(Synthetic::ParseComplete, Some(client));
    }

    fn synthetic_for(&mut self, s: Synthetic, client: Option<ClientParse>) {
        if self.queue.is_empty() {
            self.visible_done += 1;
            self.ready.push(s);
        } else {
            self.queue.push_back(Entry::Synthetic(s, client));
        }
    }

    /// Whether synthetic answers are due.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Synthetic answers now due, to write after the current server message.
    pub fn take_ready(&mut self) -> impl Iterator<Item = Synthetic> + '_ {
        self.ready.drain(..)
    }

    /// Whether the server acknowledged statements not yet collected.
    pub fn has_created(&self) -> bool {
        !self.created.is_empty()
    }

    /// Statements the server acknowledged since last asked.
    pub fn take_created(&mut self) -> impl Iterator<Item = Arc<str>> + '_ {
        self.created.drain(..)
    }

    /// Whether failed or skipped Parses, or skipped Closes, await
    /// [`Self::take_failed`], [`Self::take_unparsed`], [`Self::take_kept`] or
    /// [`Self::take_named`] (rarely: one check per server message instead of
    /// four drains).
    pub fn has_outcomes(&self) -> bool {
        !(self.failed.is_empty() && self.unparsed.is_empty() && self.kept.is_empty() && self.named.is_empty())
    }

    /// Parses and Closes under clients' own names the server answered.
    pub fn take_named(&mut self) -> impl Iterator<Item = NamedChange> + '_ {
        self.named.drain(..)
    }

    /// Statements the server did not create after all.
    pub fn take_failed(&mut self) -> impl Iterator<Item = Arc<str>> + '_ {
        self.failed.drain(..)
    }

    /// Forgets everything (the connection is gone); client Parses still owed
    /// an answer go to [`Self::take_unparsed`].
    pub fn clear(&mut self) {
        if !self.queue.is_empty() {
            for entry in self.queue.drain(..) {
                if let Entry::Sent { client: Some(c), .. } | Entry::Synthetic(_, Some(c)) = entry {
                    self.unparsed.push((c, false));
                }
            }
        }
        self.ready.clear();
        self.failed.clear();
        self.created.clear();
        self.kept.clear();
        self.named.clear();
        self.named_pending.clear();
        self.in_copy_in = false;
        self.ignored_syncs = 0;
    }

    /// Statements the proxy meant to close that the server still holds.
    pub fn take_kept(&mut self) -> impl Iterator<Item = Arc<str>> + '_ {
        self.kept.drain(..)
    }

    /// The server-side statement the request at the front uses (a Parse's,
    /// a Close's, or a Bind's), if recorded.
    pub fn front_statement(&self) -> Option<Arc<str>> {
        match self.queue.front() {
            Some(Entry::Sent { creates, .. }) => creates.clone(),
            _ => None,
        }
    }

    /// How many client-visible answers have completed so far.
    pub fn visible_done(&self) -> u64 {
        self.visible_done
    }

    /// The request at the front, if it is one sent to the server.
    pub fn front_request(&self) -> Option<Request> {
        match self.queue.front() {
            Some(Entry::Sent { request, .. }) => Some(*request),
            _ => None,
        }
    }

    /// Whether the first Sync owed is the last request owed: nothing was sent
    /// after the current batch.
    pub fn ends_at_first_sync(&self) -> bool {
        let first_sync = self.queue.iter().position(|e| {
            matches!(
                e,
                Entry::Sent {
                    request: Request::Sync,
                    ..
                }
            )
        });
        first_sync.is_some_and(|i| i + 1 == self.queue.len())
    }

    /// Accounts for one server message and says where it goes.
    pub fn on_server_message(&mut self, tag: u8) -> Verdict {
        if tag == b'A' {
            // NOTIFY for a pinned listener: always the client's.
            return Verdict::Forward;
        }
        let Some(Entry::Sent {
            request,
            injected,
            show_status,
            ..
        }) = self.queue.front()
        else {
            // Unsolicited (NOTIFY, ParameterStatus, a notice) or nothing owed.
            return Verdict::Forward;
        };
        let (request, injected) = (*request, *injected);
        let verdict = match (injected, tag) {
            (false, _) => Verdict::Forward,
            (true, b'E') if request == Request::Query => Verdict::Demote,
            // An injected Parse that fails: the client's own request needed it.
            (true, b'E') => Verdict::Forward,
            (true, b'S') if *show_status => Verdict::Forward,
            (true, _) => Verdict::Swallow,
        };
        if tag == b'G' && request == Request::Execute {
            self.copy_in_started();
        }
        if tag == b'E' && request.skipped_after_error() {
            self.fail_until_sync();
        } else if request.completed_by(tag) {
            if !injected {
                self.visible_done += 1;
            }
            match self.queue.pop_front() {
                Some(Entry::Sent {
                    creates: Some(name), ..
                }) => self.created.push(name),
                Some(Entry::Sent { named: true, .. }) => self.named.extend(self.named_pending.pop_front()),
                _ => {}
            }
            self.release_synthetic();
        }
        verdict
    }

    /// The front request failed: it and everything up to the next Sync get
    /// no answer (the server skips them, and so does the client's view).
    fn fail_until_sync(&mut self) {
        // The first is the request that failed; the rest are skipped.
        let mut skipped = false;
        while let Some(entry) = self.queue.front() {
            if let Entry::Sent { request, .. } = entry
                && !request.skipped_after_error()
            {
                break;
            }
            match self.queue.pop_front() {
                Some(Entry::Sent { named: true, .. }) => {
                    // Refused or skipped: nothing changes.
                    self.named_pending.pop_front();
                }
                Some(Entry::Sent {
                    request: Request::Close,
                    creates: Some(s),
                    ..
                }) => self.kept.push(s),
                Some(Entry::Sent {
                    request: Request::Parse,
                    creates,
                    client,
                    ..
                }) => {
                    self.failed.extend(creates);
                    self.unparsed.extend(client.map(|c| (c, skipped)));
                }
                Some(Entry::Synthetic(_, client)) => self.unparsed.extend(client.map(|c| (c, true))),
                _ => {}
            }
            skipped = true;
        }
    }

    /// An Execute started COPY IN: Syncs the client sent after it and before
    /// ending the copy are ignored by the server.
    fn copy_in_started(&mut self) {
        let mut i = 1;
        while i < self.queue.len() {
            match self.queue[i] {
                Entry::CopyEnd => {
                    self.queue.remove(i);
                    return;
                }
                Entry::Sent {
                    request: Request::Sync, ..
                } => {
                    self.queue.remove(i);
                    self.ignored_syncs += 1;
                }
                _ => i += 1,
            }
        }
        self.in_copy_in = true;
    }

    fn release_synthetic(&mut self) {
        loop {
            match self.queue.front() {
                Some(Entry::Synthetic(s, _)) => {
                    self.visible_done += 1;
                    self.ready.push(*s);
                }
                Some(Entry::CopyEnd) => {}
                _ => return,
            }
            self.queue.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(e: &mut Expectations, tags: &[u8]) -> Vec<(u8, Verdict, Vec<Synthetic>)> {
        tags.iter()
            .map(|&t| {
                let v = e.on_server_message(t);
                (t, v, e.take_ready().collect())
            })
            .collect()
    }

    #[test]
    fn injected_parse_is_swallowed_and_client_answers_pass() {
        let mut e = Expectations::default();
        e.sent(Request::Parse, true, Some("dbp_1".into()));
        e.sent(Request::Bind, false, None);
        e.sent(Request::Execute, false, None);
        e.sent(Request::Sync, false, None);
        let out = feed(&mut e, b"12DDCZ");
        let verdicts: Vec<Verdict> = out.iter().map(|o| o.1).collect();
        use Verdict::*;
        assert_eq!(verdicts, [Swallow, Forward, Forward, Forward, Forward, Forward]);
        assert!(e.is_empty());
    }

    #[test]
    fn synthetic_answers_come_in_order() {
        let mut e = Expectations::default();
        e.synthetic(Synthetic::ParseComplete); // nothing in flight: due at once
        assert_eq!(e.take_ready().collect::<Vec<_>>(), [Synthetic::ParseComplete]);
        e.sent(Request::Bind, false, None);
        e.synthetic(Synthetic::CloseComplete);
        e.sent(Request::Sync, false, None);
        let out = feed(&mut e, b"2Z");
        assert_eq!(
            out[0].2,
            [Synthetic::CloseComplete],
            "after BindComplete, before ReadyForQuery"
        );
        assert!(out[1].2.is_empty());
    }

    #[test]
    fn an_error_skips_to_sync_and_forgets_statements_not_created() {
        let mut e = Expectations::default();
        e.sent(Request::Parse, false, Some("dbp_a".into()));
        e.sent(Request::Parse, true, Some("dbp_b".into()));
        e.synthetic(Synthetic::ParseComplete);
        e.sent(Request::Bind, false, None);
        e.sent(Request::Sync, false, None);
        e.sent(Request::Query, false, None);
        assert_eq!(e.client_syncs(), 2);
        let out = feed(&mut e, b"EZ");
        assert_eq!(out[0].1, Verdict::Forward);
        assert!(out[0].2.is_empty(), "answers after the error are never sent");
        assert_eq!(
            e.take_failed().collect::<Vec<_>>(),
            [Arc::from("dbp_a"), Arc::from("dbp_b")]
        );
        assert_eq!(e.client_syncs(), 1);
        feed(&mut e, b"TDCZ");
        assert!(e.is_empty());
    }

    #[test]
    fn injected_query_errors_become_notices() {
        let mut e = Expectations::default();
        e.sent(Request::Query, true, None);
        e.sent(Request::Query, false, None);
        let out = feed(&mut e, b"CSEZ");
        let verdicts: Vec<Verdict> = out.iter().map(|o| o.1).collect();
        assert_eq!(
            verdicts,
            [Verdict::Swallow, Verdict::Swallow, Verdict::Demote, Verdict::Swallow]
        );
        assert_eq!(e.on_server_message(b'E'), Verdict::Forward, "the client's own error");
        assert_eq!(e.on_server_message(b'Z'), Verdict::Forward);
        assert!(e.is_empty());
    }

    #[test]
    fn syncs_sent_during_copy_in_are_ignored_like_the_server_does() {
        // tokio-postgres: Bind, Execute, Sync, then data, CopyDone, Sync.
        let mut e = Expectations::default();
        e.sent(Request::Bind, false, None);
        e.sent(Request::Execute, false, None);
        e.sent(Request::Sync, false, None);
        feed(&mut e, b"2G");
        assert_eq!(e.take_ignored_syncs(), 1);
        e.copy_end();
        e.sent(Request::Sync, false, None);
        feed(&mut e, b"CZ");
        assert!(e.is_empty());

        // A client that sends everything before the server answers.
        e.sent(Request::Bind, false, None);
        e.sent(Request::Execute, false, None);
        e.sent(Request::Sync, false, None);
        e.copy_end();
        e.sent(Request::Sync, false, None);
        feed(&mut e, b"2GCZ");
        assert!(e.is_empty());
        assert_eq!(e.take_ignored_syncs(), 1);

        // Simple-protocol COPY: nothing is ignored.
        e.sent(Request::Query, false, None);
        e.copy_end();
        feed(&mut e, b"GCZ");
        assert!(e.is_empty());
        assert_eq!(e.take_ignored_syncs(), 0);
    }

    #[test]
    fn describe_statement_completes_on_row_description_or_no_data() {
        let mut e = Expectations::default();
        e.sent(Request::DescribeStatement, false, None);
        e.sent(Request::DescribeStatement, false, None);
        e.sent(Request::Sync, false, None);
        feed(&mut e, b"tTtn");
        assert_eq!(e.client_syncs(), 1);
        feed(&mut e, b"Z");
        assert!(e.is_empty());
    }

    fn client(name: &str, id: u64) -> ClientParse {
        ClientParse { name: name.into(), id }
    }

    #[test]
    fn client_parses_that_get_no_parse_complete_are_reported() {
        let mut e = Expectations::default();
        e.sent(Request::Bind, false, None);
        e.sent_client_parse(Some("dbp_1".into()), client("a", 1));
        e.sent_client_parse(None, client("", 9));
        e.synthetic_parse(client("b", 2));
        e.sent(Request::Sync, false, None);
        e.synthetic_parse(client("c", 3));
        // The Bind fails: the Parses and the synthetic answer after them are skipped.
        feed(&mut e, b"E");
        assert_eq!(
            e.take_unparsed().collect::<Vec<_>>(),
            [(client("a", 1), true), (client("", 9), true), (client("b", 2), true)]
        );
        assert_eq!(e.take_failed().count(), 1);
        // The connection is lost before the next batch is answered.
        feed(&mut e, b"Z");
        e.sent_client_parse(Some("dbp_4".into()), client("d", 4));
        e.clear();
        assert_eq!(e.take_unparsed().collect::<Vec<_>>(), [(client("d", 4), false)]);
        // A Parse that fails itself is not skipped.
        e.sent_client_parse(None, client("", 5));
        e.sent_client_parse(None, client("", 6));
        e.sent(Request::Sync, false, None);
        feed(&mut e, b"E");
        assert_eq!(
            e.take_unparsed().collect::<Vec<_>>(),
            [(client("", 5), false), (client("", 6), true)]
        );
    }

    #[test]
    fn only_the_last_unnamed_parse_owed_counts() {
        let mut e = Expectations::default();
        assert!(!e.unnamed_parse_in_earlier_batch());
        e.sent_client_parse(None, client("", 1));
        assert!(!e.unnamed_parse_in_earlier_batch(), "same batch");
        e.sent(Request::Sync, false, None);
        assert!(e.unnamed_parse_in_earlier_batch());
        // The next batch has its own: its Bind follows that one.
        e.sent_client_parse(None, client("", 2));
        e.sent(Request::Bind, false, None);
        assert!(!e.unnamed_parse_in_earlier_batch());
    }

    #[test]
    fn a_bind_of_a_client_named_statement_meets_the_parses_owed_before_it() {
        let effects = || {
            Some(Arc::new(NamedEffects {
                effects: crate::sql::analyze("SET work_mem = '1MB'"),
                param_types: Box::default(),
            }))
        };
        let parsed = |name: &str, named| NamedChange::Parsed(name.into(), named);
        let mut e = Expectations::default();
        assert!(matches!(e.pending_named("s"), PendingNamed::None));
        e.sent_named(Request::Parse, parsed("s", effects()));
        assert_eq!(e.pending_named_effects(), 1);
        e.sent(Request::Sync, false, None);
        e.sent_named(Request::Parse, parsed("s", None));
        e.sent_named(Request::Parse, parsed("t", None));
        // The last of the name is in the Bind's batch: the Bind gets it.
        assert!(matches!(e.pending_named("s"), PendingNamed::SameBatch(None)));
        e.sent(Request::Sync, false, None);
        // Behind two batches: either may hold, and one does something.
        assert!(matches!(e.pending_named("s"), PendingNamed::Earlier { effects: true }));
        assert!(matches!(e.pending_named("t"), PendingNamed::Earlier { effects: false }));
        assert!(matches!(e.pending_named("u"), PendingNamed::None));
        // Answered or refused, each leaves the queue with its change, in order.
        assert_eq!(e.on_server_message(b'1'), Verdict::Forward);
        assert_eq!(e.on_server_message(b'Z'), Verdict::Forward);
        assert_eq!(e.on_server_message(b'E'), Verdict::Forward);
        assert_eq!(e.on_server_message(b'Z'), Verdict::Forward);
        let answered: Vec<NamedChange> = e.take_named().collect();
        assert!(matches!(&answered[..], [NamedChange::Parsed(n, Some(_))] if &**n == "s"));
        assert_eq!(e.pending_named_effects(), 0);
        assert!(matches!(e.pending_named("s"), PendingNamed::None));
        e.sent_named(Request::Close, NamedChange::Closed("s".into()));
        assert!(matches!(e.pending_named("s"), PendingNamed::SameBatch(None)));
    }

    #[test]
    fn a_parse_is_pending_before_a_sync_only_across_batches() {
        let mut e = Expectations::default();
        e.sent_client_parse(Some("dbp_1".into()), client("a", 1));
        assert!(
            !e.parse_pending_before_sync("a"),
            "same batch: its failure would skip the next"
        );
        e.sent(Request::Sync, false, None);
        assert!(e.parse_pending_before_sync("a"));
        assert!(!e.parse_pending_before_sync("b"));
        feed(&mut e, b"1Z");
        assert!(!e.parse_pending_before_sync("a"));
    }
}
