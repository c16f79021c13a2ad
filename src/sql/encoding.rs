//! Statement text in client encodings other than UTF-8 (README, "Client
//! encodings other than UTF-8"). dbproxy reads statements as UTF-8; a client
//! whose `client_encoding` is LATIN1, WIN1252, SJIS, ... may send text that
//! is not, which reaches the server exactly as sent and is read here only to
//! be safe: with a stand-in for each byte that is not UTF-8, what cannot be
//! recorded faithfully pins the client, and where the bytes do not even tell
//! where strings and statements end (a backslash that may be half an SJIS
//! character), nothing is read at all.

use std::borrow::Cow;

use super::session::{Effects, LocalCommand, Pins, analyze};

/// How dbproxy reads a statement's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legibility {
    /// UTF-8, read as the server reads it.
    Clear,
    /// Not UTF-8 (LATIN1, ...): read with stand-ins, only to be safe.
    Foreign,
    /// Its statements cannot be told from its bytes (`backslash_in_doubt`).
    Unreadable,
}

/// Whether an encoding (its name, or a statement naming it) may end a
/// character with the byte of a backslash: SJIS, BIG5, GBK, UHC, GB18030,
/// JOHAB and their aliases.
pub fn backslash_trail(name: &str) -> bool {
    // Encoding names as PostgreSQL compares them: case and punctuation aside.
    const NAMES: [&str; 12] = [
        "sjis", "shiftjis", "mskanji", "932", "big5", "950", "gbk", "936", "uhc", "949", "gb18030", "johab",
    ];
    let folded: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    NAMES.iter().any(|name| folded.contains(name))
}

/// A statement's text `raw` (as sent), to read, and how it can be read;
/// `backslash_trail`: the client's encoding may end a character with the
/// byte of a backslash (`Settings::backslash_trail`).
#[inline]
pub fn read(raw: &[u8], backslash_trail: bool) -> (Cow<'_, str>, Legibility) {
    let text = lossy_text(raw);
    let legibility = if backslash_trail && backslash_in_doubt(raw) {
        Legibility::Unreadable
    } else if matches!(text, Cow::Borrowed(_)) {
        Legibility::Clear
    } else if raw.windows(2).any(|w| w[0] == 0xef && matches!(w[1], 0x9e | 0x9f)) {
        // A character of the stand-ins' range sent as UTF-8 (U+F780 is
        // EF 9E 80) would read as one of them.
        Legibility::Unreadable
    } else {
        Legibility::Foreign
    };
    (text, legibility)
}

/// What running text read by [`read`] does to the session.
#[inline]
pub fn effects(text: &str, legibility: Legibility) -> Effects {
    match legibility {
        Legibility::Clear => analyze(text),
        Legibility::Foreign => analyze_foreign(text),
        // Whatever it does pins the client.
        Legibility::Unreadable => Effects::untracked(),
    }
}

/// Text in any client encoding, to read: borrowed when it is UTF-8 (as
/// nearly always), else (`Owned`) with a stand-in for each byte that is
/// not, one character per byte value (U+F700 + the byte: U+F780 to U+F7FF, in
/// a private-use area), so that different names and quote tags stay
/// different. ([`read`] does not trust text that holds those characters
/// itself.)
#[inline]
fn lossy_text(bytes: &[u8]) -> Cow<'_, str> {
    // (`from_utf8` first: its check of ASCII text is several times faster.)
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => {
            let mut text = String::with_capacity(bytes.len() + bytes.len() / 2);
            for chunk in bytes.utf8_chunks() {
                text.push_str(chunk.valid());
                text.extend(chunk.invalid().iter().map(|&b| stand_in(b)));
            }
            Cow::Owned(text)
        }
    }
}

/// The character [`lossy_text`] reads byte `b` (not UTF-8) as.
fn stand_in(b: u8) -> char {
    char::from_u32(0xf700 + u32::from(b)).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Whether `c` is one of [`lossy_text`]'s stand-ins.
fn is_stand_in(c: char) -> bool {
    ('\u{f780}'..='\u{f7ff}').contains(&c)
}

/// [`analyze`] for text that is not UTF-8 (a client encoding such as
/// LATIN1), read with a stand-in for each byte that is not ([`lossy_text`]):
/// what it cannot record faithfully is made safe instead. A setting it
/// changes (whose value may hold such bytes, and is carried to other server
/// connections as SQL) pins the client as untracked; a `DEALLOCATE` of a
/// name with such bytes (not one of the client's statements, whose names
/// are UTF-8) goes to the server.
fn analyze_foreign(text: &str) -> Effects {
    let mut fx = analyze(text);
    if !fx.changes.is_empty() || !fx.param_changes.is_empty() {
        fx.changes.clear();
        fx.param_changes.clear();
        for (before, _) in &mut fx.tx {
            *before = 0;
        }
        fx.pins.add(Pins::UNTRACKED);
    }
    if let Some(LocalCommand::Deallocate(name)) = &fx.local
        && name.chars().any(is_stand_in)
    {
        // Not a name of the client's statements (those are UTF-8).
        fx.local = None;
    }
    fx
}

/// Whether a backslash in `bytes` may be the second byte of a character
/// rather than an escape, in a client encoding where characters can end in
/// that byte (SJIS, BIG5, GBK, UHC, GB18030, JOHAB): one that follows a byte
/// above 0x7f, in text with an escape string (`E'...'`, the only place a
/// backslash means anything to the lexer). Where strings and statements end
/// cannot then be told from the bytes.
fn backslash_in_doubt(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'\\', bytes).any(|i| i > 0 && bytes[i - 1] > 0x7f)
        && bytes.windows(2).any(|w| w[0] | 0x20 == b'e' && w[1] == b'\'')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_read_with_stand_ins_records_only_what_is_safe() {
        // LATIN1 bytes (0xe9: e acute, 0xe8: e grave).
        let read = |bytes: &[u8]| analyze_foreign(&lossy_text(bytes));
        let fx = read(b"BEGIN; SET application_name = 'caf\xe9'; SAVEPOINT \xe9; SAVEPOINT \xe8");
        assert!(fx.changes.is_empty());
        assert_eq!(fx.pins, Pins::UNTRACKED);
        // Savepoint names stay apart, as do quote tags.
        let names: Vec<_> = fx.tx.iter().map(|(before, c)| (*before, c.clone())).collect();
        assert_eq!(names.len(), 2);
        assert!(names[0] != names[1] && names.iter().all(|(before, _)| *before == 0));
        let tags = read(b"SELECT $\xe9$ a $\xe8$ b $\xe9$; SET work_mem = '1GB'");
        assert_eq!(tags.pins, Pins::UNTRACKED);
        assert_eq!(read(b"LISTEN caf\xe9").pins, Pins::LISTEN);
        assert!(read(b"SELECT 'caf\xe9'").is_empty());
        assert_eq!(read(b"DEALLOCATE caf\xe9").local, None);
        assert_eq!(
            read(b"DEALLOCATE s1 -- caf\xe9").local,
            Some(LocalCommand::Deallocate("s1".into()))
        );
        assert_eq!(read(b"DISCARD ALL -- \xe9").local, Some(LocalCommand::DiscardAll));
        // A character of the stand-ins' own range (U+F7E9: EF 9F A9) in text
        // that needs them is not trusted to tell dollar-quote tags apart.
        let clash = b"SELECT $\xe9$x$\xef\x9f\xa9$y$\xe9$; SET work_mem = '1GB'";
        assert_eq!(super::read(clash, false).1, Legibility::Unreadable);
        assert_eq!(super::read(b"SELECT '\xe9'", false).1, Legibility::Foreign);
        assert_eq!(super::read("SELECT '\u{f7e9}'".as_bytes(), false).1, Legibility::Clear);
        // A backslash after a byte above 0x7f, with an escape string about.
        assert!(backslash_in_doubt(b"SELECT E'\x95\\'; SET work_mem = '1GB'; --'"));
        assert!(backslash_in_doubt(b"select e'\xe3\x81\x81\\'"));
        assert!(!backslash_in_doubt(b"SELECT '\x95\\'"));
        assert!(!backslash_in_doubt(b"SELECT E'\\n', '\x95'"));
    }
}
