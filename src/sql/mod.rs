//! Lightweight SQL analysis: a lexer that understands comments, quoting and
//! dollar quoting, and what a statement does to the session (settings,
//! session-only features) so transaction pooling can carry or pin it.

pub mod encoding;
pub mod lexer;
mod precheck;
pub mod session;

pub use lexer::{Kind, Token, tokenize};

/// Whether `text` contains `word`, ASCII case ignored (`word` in lower case).
pub fn mentions(text: &str, word: &str) -> bool {
    text.as_bytes()
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
}
pub use session::{
    Effects, LocalCommand, Pins, SettingChange, TxCommand, analyze, quote_literal, set_config_sql, setting_name_sql,
};
