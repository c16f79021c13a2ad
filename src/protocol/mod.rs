//! PostgreSQL wire protocol: framing, the startup packet, the messages the proxy
//! writes itself, and typed SQLSTATEs. Pure byte handling: no tokio, no sockets,
//! so every decoder here can be unit-tested and fuzzed on arbitrary input.

pub mod backend;
pub mod extended;
pub mod framing;
pub mod frontend;
pub mod sqlstate;
pub mod startup;

pub use framing::{FrameError, Item, Scanner};
pub use sqlstate::SqlState;

/// Transaction status byte carried by `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (queries rejected until it ends).
    Failed,
}

impl TransactionStatus {
    /// Decodes the status byte; unknown bytes are `None`.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    /// The byte sent on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}
