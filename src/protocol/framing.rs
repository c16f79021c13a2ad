//! Bounds-checked framing of regular protocol messages (1-byte tag, 4-byte
//! big-endian length that counts itself, body), in either direction.
//!
//! The [`Scanner`] walks a buffer without copying. Messages the caller needs to
//! inspect are returned whole once fully buffered; everything else (rows, COPY
//! data) is returned as a header followed by body chunks so it can be forwarded
//! as it arrives, never buffered whole on a length the peer claims.

/// Length of a message header: tag byte plus length word.
pub const HEADER_LEN: usize = 5;

/// A framing violation. Either is fatal for the connection that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length word is smaller than itself.
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: u32 },
    /// The length word exceeds the configured maximum.
    #[error("message of type {tag:?} claims {len} bytes, above the limit of {max}")]
    TooLarge { tag: char, len: u32, max: usize },
}

/// One step of a scan: what the next bytes of the buffer are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A complete message of `len` bytes (header included) starting at the
    /// front of the buffer.
    Whole { tag: u8, len: usize },
    /// The 5-byte header of a message whose `body_len` body bytes follow as
    /// [`Item::Body`] chunks.
    Head { tag: u8, body_len: usize },
    /// The next `n` bytes of a streamed body.
    Body(usize),
}

impl Item {
    /// How many bytes at the front of the buffer this item covers.
    pub fn len(&self) -> usize {
        match *self {
            Item::Whole { len, .. } => len,
            Item::Head { .. } => HEADER_LEN,
            Item::Body(n) => n,
        }
    }

    /// Whether the item covers no bytes (never true for a returned item).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Incremental framer for one direction of a connection.
#[derive(Debug, Clone)]
pub struct Scanner {
    /// Body bytes of the current streamed message not yet returned.
    remaining: usize,
    /// Largest accepted value of the length word.
    max_len: usize,
}

impl Scanner {
    /// A scanner that refuses messages longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Scanner { remaining: 0, max_len }
    }

    /// Forgets a message in progress (its stream was cut), keeping the limit.
    pub fn reset(&mut self) {
        self.remaining = 0;
    }

    /// Whether the scanner is between messages (no streamed body pending).
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Classifies the bytes at the front of `buf`. `whole(tag)` says which
    /// message types must be returned complete. Returns `Ok(None)` when more
    /// bytes are needed. The caller must drop `item.len()` bytes from the front
    /// of its buffer before calling again.
    pub fn next(&mut self, buf: &[u8], whole: impl Fn(u8) -> bool) -> Result<Option<Item>, FrameError> {
        if self.remaining > 0 {
            let n = self.remaining.min(buf.len());
            if n == 0 {
                return Ok(None);
            }
            self.remaining -= n;
            return Ok(Some(Item::Body(n)));
        }
        let Some(&[tag, a, b, c, d]) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]);
        if len < 4 {
            return Err(FrameError::BadLength {
                tag: char::from(tag),
                len,
            });
        }
        if len as usize > self.max_len {
            return Err(FrameError::TooLarge {
                tag: char::from(tag),
                len,
                max: self.max_len,
            });
        }
        let total = len as usize + 1;
        if whole(tag) {
            if buf.len() >= total {
                Ok(Some(Item::Whole { tag, len: total }))
            } else {
                Ok(None)
            }
        } else {
            self.remaining = total - HEADER_LEN;
            Ok(Some(Item::Head {
                tag,
                body_len: self.remaining,
            }))
        }
    }

    /// How many more bytes the buffer must hold before the message at its
    /// front can be returned whole (0 if it already can or is streamed).
    pub fn bytes_wanted(&self, buf: &[u8]) -> usize {
        if self.remaining > 0 {
            return 0;
        }
        match buf.get(1..HEADER_LEN) {
            Some(&[a, b, c, d]) => {
                let total = u32::from_be_bytes([a, b, c, d]) as usize + 1;
                total.saturating_sub(buf.len())
            }
            _ => HEADER_LEN - buf.len(),
        }
    }
}

/// Reads a NUL-terminated string from the front of `buf`, returning it and the
/// rest. `None` if there is no terminator or the bytes are not UTF-8.
pub fn read_cstr(buf: &[u8]) -> Option<(&str, &[u8])> {
    let (s, rest) = read_cbytes(buf)?;
    Some((std::str::from_utf8(s).ok()?, rest))
}

/// [`read_cstr`] for text in any client encoding: the bytes as sent.
pub fn read_cbytes(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, buf)?;
    Some((&buf[..end], &buf[end + 1..]))
}

/// Reads a big-endian i32 from the front of `buf`.
pub fn read_i32(buf: &[u8]) -> Option<(i32, &[u8])> {
    let (head, rest) = buf.split_first_chunk::<4>()?;
    Some((i32::from_be_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn whole_messages_wait_until_complete() {
        let m = msg(b'Q', b"select 1\0");
        let mut s = Scanner::new(1 << 20);
        for cut in 0..m.len() {
            assert_eq!(s.next(&m[..cut], |_| true).unwrap(), None, "cut {cut}");
        }
        assert_eq!(
            s.next(&m, |_| true).unwrap(),
            Some(Item::Whole {
                tag: b'Q',
                len: m.len()
            })
        );
    }

    #[test]
    fn streamed_bodies_come_in_chunks() {
        let m = msg(b'D', &[7u8; 100]);
        let mut s = Scanner::new(1 << 20);
        let head = s.next(&m[..30], |_| false).unwrap().unwrap();
        assert_eq!(
            head,
            Item::Head {
                tag: b'D',
                body_len: 100
            }
        );
        assert!(!s.at_boundary());
        assert_eq!(s.next(&m[5..30], |_| false).unwrap(), Some(Item::Body(25)));
        assert_eq!(s.next(&m[30..], |_| false).unwrap(), Some(Item::Body(75)));
        assert!(s.at_boundary());
        assert_eq!(s.next(&[], |_| false).unwrap(), None);
    }

    #[test]
    fn absurd_lengths_are_refused_before_buffering() {
        let mut s = Scanner::new(1024);
        let huge = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(s.next(&huge, |_| true), Err(FrameError::TooLarge { .. })));
        let tiny = [b'Q', 0, 0, 0, 3];
        assert!(matches!(s.next(&tiny, |_| true), Err(FrameError::BadLength { .. })));
    }

    #[test]
    fn bytes_wanted_counts_missing_tail() {
        let m = msg(b'P', &[1u8; 10]);
        let s = Scanner::new(1024);
        assert_eq!(s.bytes_wanted(&m[..2]), 3);
        assert_eq!(s.bytes_wanted(&m[..7]), m.len() - 7);
        assert_eq!(s.bytes_wanted(&m), 0);
    }

    #[test]
    fn cstr_and_int_readers_are_bounded() {
        assert_eq!(read_cstr(b"abc\0rest"), Some(("abc", &b"rest"[..])));
        assert_eq!(read_cstr(b"abc"), None);
        assert_eq!(read_i32(&[0, 0, 1]), None);
        assert_eq!(read_i32(&[0, 0, 1, 0, 9]), Some((256, &[9u8][..])));
    }
}
