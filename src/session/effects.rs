//! What a statement does to the session, as the session reads and applies
//! it: how its text is read (`sql::encoding`), its effects and where it may
//! run, and, when it is sent, its pins, setting changes to confirm and a
//! connection to reset.

use std::borrow::Cow;

use super::transfer::{Conn, Phase};
use crate::config::PoolMode;
use crate::router::{Class, WriteReason};
use crate::sql::Effects;
use crate::sql::encoding::{Legibility, read};

impl Conn<'_> {
    /// A statement's text (`raw`, as sent), to read: see [`Legibility`].
    #[inline]
    pub(super) fn read_statement<'a>(&self, raw: &'a [u8]) -> (Cow<'a, str>, Legibility) {
        // The held connection's view too: a RESET there returns to its own
        // default, not to the client's startup value.
        let held = || matches!(&self.phase, Phase::Attached(a) if a.conn.conn.state.backslash_trail());
        let trail = self.encoding_unsettled
            || self.settings.backslash_trail().unwrap_or(self.default_backslash_trail)
            || held();
        read(raw, trail)
    }

    /// What running a statement does to the session: needed in transaction
    /// mode only.
    #[inline]
    pub(super) fn effects_of(&self, text: &str, legibility: Legibility) -> Effects {
        match self.mode {
            PoolMode::Session => Effects::default(),
            PoolMode::Transaction => crate::sql::encoding::effects(text, legibility),
        }
    }

    /// Where a statement may run: text not read as the server reads it goes
    /// to the primary.
    #[inline]
    pub(super) fn class_of(&self, text: &str, legibility: Legibility) -> Class {
        match (self.split, legibility) {
            (false, _) => Class::Neutral,
            (true, Legibility::Clear) => self.router.classify(text),
            (true, _) => Class::Primary(WriteReason::ParseFallback),
        }
    }

    /// Session effects of a statement about to run: pins and setting changes.
    pub(super) fn apply_effects(&mut self, fx: &Effects) {
        if self.mode != PoolMode::Transaction {
            return;
        }
        self.encoding_unsettled |= fx.encoding;
        if fx.opaque
            && let Some(a) = self.attached()
        {
            a.conn.conn.state.dirty = true;
        }
        if !fx.pins.is_empty() {
            let before = self.pins;
            self.pins.add(fx.pins);
            if self.pins != before && before.is_empty() {
                self.stats.pinned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if self.pins != before {
                tracing::info!(features = ?fx.pins.names(), "client pinned to its server connection");
            }
        }
        if !fx.unpins.is_empty() {
            self.pins.remove(fx.unpins);
        }
        if !fx.pins.is_empty() || !fx.unpins.is_empty() {
            self.me.set_pins(self.pins);
        }
        self.tracker.record(fx);
    }
}
