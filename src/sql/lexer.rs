//! A small SQL lexer: enough to find keywords, identifiers, literals and
//! statement boundaries correctly (never inside strings or comments).

use std::ops::ControlFlow;

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Unquoted identifier or keyword.
    Word,
    /// `"quoted identifier"`.
    Quoted,
    /// String literal: `'...'`, `E'...'`, `$tag$...$tag$`.
    Str,
    /// Number.
    Number,
    /// `$1`.
    Param,
    /// Any other single character (`;`, `(`, `,`, `=`, ...).
    Punct,
}

/// A token and where it is in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

impl Token {
    /// The token's text.
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        &sql[self.start..self.end]
    }

    /// Whether this is the keyword `kw` (given in lower case).
    pub fn is_word(&self, sql: &str, kw: &str) -> bool {
        self.kind == Kind::Word && self.text(sql).eq_ignore_ascii_case(kw)
    }

    /// Whether this is the punctuation character `c`.
    pub fn is_punct(&self, sql: &str, c: u8) -> bool {
        self.kind == Kind::Punct && sql.as_bytes()[self.start] == c
    }
}

fn ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn ident_cont(b: u8) -> bool {
    ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// Splits `sql` into tokens. Unterminated strings or comments run to the
/// end; the lexer never fails and never panics.
pub fn tokenize(sql: &str) -> Vec<Token> {
    // About one token per four bytes (a word and its space), so a usual
    // statement needs no regrowth: three of them cost more than the lexing.
    let mut out = Vec::with_capacity((sql.len() / 4 + 4).min(4096));
    for_each_token(sql, |token| {
        out.push(token);
        ControlFlow::Continue(())
    });
    out
}

/// Gives each token of `sql` to `f`, in order, until `f` breaks (what
/// [`tokenize`] collects). A loop of its own, inlined into each caller: an
/// iterator's `next`, or a call, made `tokenize` 8-20 % slower (criterion,
/// `classify_uncached`).
#[inline(always)]
pub fn for_each_token(sql: &str, mut f: impl FnMut(Token) -> ControlFlow<()>) {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let kind = match c {
            _ if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b'\'' => {
                i = skip_quoted(b, i + 1, b'\'', false);
                Kind::Str
            }
            b'e' | b'E' if b.get(i + 1) == Some(&b'\'') => {
                i = skip_quoted(b, i + 2, b'\'', true);
                Kind::Str
            }
            b'"' => {
                i = skip_quoted(b, i + 1, b'"', false);
                Kind::Quoted
            }
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                Kind::Param
            }
            b'$' => match dollar_tag(b, i) {
                Some(tag_end) => {
                    let tag = &b[i..tag_end];
                    i = tag_end;
                    loop {
                        if i >= b.len() {
                            break;
                        }
                        if b[i..].starts_with(tag) {
                            i += tag.len();
                            break;
                        }
                        i += 1;
                    }
                    Kind::Str
                }
                None => {
                    i += 1;
                    Kind::Punct
                }
            },
            _ if ident_start(c) => {
                while i < b.len() && ident_cont(b[i]) {
                    i += 1;
                }
                Kind::Word
            }
            _ if c.is_ascii_digit() => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                Kind::Number
            }
            _ => {
                // Step over a whole UTF-8 character so slices stay on boundaries.
                i += 1;
                while i < b.len() && (b[i] & 0xc0) == 0x80 {
                    i += 1;
                }
                Kind::Punct
            }
        };
        if f(Token { kind, start, end: i }).is_break() {
            return;
        }
    }
}

/// End of a quoted run starting at `i` (just after the opening quote).
fn skip_quoted(b: &[u8], mut i: usize, quote: u8, backslash: bool) -> usize {
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// If a dollar-quote tag (`$$` or `$name$`) starts at `i`, where it ends.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() && b[j] != b'$' {
        if !(ident_cont(b[j]) && b[j] != b'$') || (j == i + 1 && b[j].is_ascii_digit()) {
            return None;
        }
        j += 1;
    }
    (j < b.len()).then_some(j + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> Vec<(Kind, &str)> {
        tokenize(sql).iter().map(|t| (t.kind, t.text(sql))).collect()
    }

    #[test]
    fn comments_strings_and_dollar_quotes_hide_their_contents() {
        let sql = "SELECT 'for update' /* set x */, $$ listen $$, $f$ a $$ b $f$ -- temp\n, \"Set\" FROM t";
        let got = words(sql);
        assert_eq!(got[0], (Kind::Word, "SELECT"));
        assert_eq!(got[1], (Kind::Str, "'for update'"));
        assert_eq!(got[3], (Kind::Str, "$$ listen $$"));
        assert_eq!(got[5], (Kind::Str, "$f$ a $$ b $f$"));
        assert_eq!(got[7], (Kind::Quoted, "\"Set\""));
        assert_eq!(got.len(), 10);
    }

    #[test]
    fn escapes_params_and_odd_input() {
        assert_eq!(
            words("E'it\\'s' 'it''s' $1"),
            [(Kind::Str, "E'it\\'s'"), (Kind::Str, "'it''s'"), (Kind::Param, "$1")]
        );
        for junk in [
            "'unterminated",
            "/* open",
            "$tag$ open",
            "\"open",
            "é€;",
            "$",
            "e'",
            "/*/",
        ] {
            let _ = tokenize(junk);
        }
    }
}
