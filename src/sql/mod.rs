//! Lightweight SQL analysis: a lexer that understands comments, quoting and
//! dollar quoting, and what a statement does to the session (settings,
//! session-only features) so transaction pooling can carry or pin it.

pub mod lexer;
pub mod session;

pub use lexer::{Kind, Token, tokenize};
pub use session::{Effects, LocalCommand, Pins, SettingChange, TxCommand, analyze, quote_literal, set_config_sql};
