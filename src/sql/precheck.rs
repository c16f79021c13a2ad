//! The cheap pre-check of [`super::session::analyze`]: whether a text could
//! hold any statement with session effects, decided from the starts of its
//! words alone, so that most statements (`SELECT ...`, `UPDATE t SET ...`)
//! are never tokenized for them. It may say yes wrongly, never no.

/// Words whose absence (at the start of a word) proves a statement has no
/// session effect. `advisory` also matches inside `pg_advisory_lock`. (The
/// whole word `DO`, found through `d`, and `U&"` are looked for too: see
/// [`may_have_effects`].)
const TRIGGERS: [&[u8]; 14] = [
    b"set",
    b"savepoint",
    b"release",
    b"reset",
    b"listen",
    b"unlisten",
    b"pg_advisory",
    b"temp",
    b"hold",
    b"prepare",
    b"deallocate",
    b"discard",
    b"close",
    b"rollback",
];

/// Cheap pre-check: could `sql` contain any statement with session effects?
/// Looks only at the starts of words: one table lookup per byte, and a
/// comparison with the trigger words only at a word that starts with one of
/// their first letters.
///
/// The word `SET` in a text that starts with `UPDATE`, `INSERT` or `MERGE`
/// and holds no `;` but at its end is a clause of that one statement (`UPDATE t SET`,
/// `ON CONFLICT DO UPDATE SET`), not a SET statement: such a text is not
/// analysed for it (every write of an OLTP load would be lexed otherwise).
pub(super) fn may_have_effects(sql: &str) -> bool {
    let b = sql.as_bytes();
    let mut i = 0;
    // Where a SET passed over as a clause of the text's one statement is.
    let mut clause_at = None;
    while i < b.len() {
        let class = BYTE_CLASS[usize::from(b[i])];
        if class == NOT_WORD {
            i += 1;
            continue;
        }
        let word = &b[i..];
        if class == TRIGGER_START
            && (starts_with_trigger(word) || word[1..].starts_with(b"&\"") || is_word(word, b"do"))
        {
            // (Looked into only here, off the path of texts without triggers;
            // `U&"...`: an identifier with Unicode escapes may name anything;
            // `DO`: a block of code, unless an upsert's `ON CONFLICT DO`.)
            let clause = (is_word(word, b"set") || is_word(word, b"do"))
                && memchr::memchr(b';', &b[..i]).is_none()
                && starts_with_dml(b);
            if !clause {
                return true;
            }
            clause_at = clause_at.or(Some(i));
        }
        // The rest of the word.
        i += 1;
        while i < b.len() && BYTE_CLASS[usize::from(b[i])] != NOT_WORD {
            i += 1;
        }
    }
    // After such a SET, a `;` may only end the text.
    clause_at.is_some_and(|at| memchr::memchr(b';', &b[at..]).is_some_and(|j| !blank(&b[at + j + 1..])))
}

/// Nothing but `;` and white space (the end of a text: pgbench ends each
/// statement with `;`).
fn blank(rest: &[u8]) -> bool {
    rest.iter().all(|&c| c == b';' || c.is_ascii_whitespace())
}

/// Whether `text` starts with the whole word `word` (lower case).
fn is_word(text: &[u8], word: &[u8]) -> bool {
    text.len() >= word.len()
        && text[..word.len()].eq_ignore_ascii_case(word)
        && text
            .get(word.len())
            .is_none_or(|&c| BYTE_CLASS[usize::from(c)] == NOT_WORD)
}

/// Whether the text's first word, with nothing but white space before it
/// (a comment's words are not the statement's), is UPDATE, INSERT or MERGE.
fn starts_with_dml(b: &[u8]) -> bool {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    [&b"update"[..], b"insert", b"merge"]
        .iter()
        .any(|w| is_word(&b[start..], w))
}

/// Whether `word` (at least one byte long) starts with one of [`TRIGGERS`].
fn starts_with_trigger(word: &[u8]) -> bool {
    let candidates: &[&[u8]] = match word[0] | 0x20 {
        b's' => &[b"set", b"savepoint"],
        b'r' => &[b"reset", b"rollback", b"release"],
        b'l' => &[b"listen"],
        b'u' => &[b"unlisten"],
        b'p' => &[b"pg_advisory", b"prepare"],
        b't' => &[b"temp"],
        b'h' => &[b"hold"],
        b'd' => &[b"deallocate", b"discard"],
        b'c' => &[b"close"],
        _ => &[],
    };
    candidates
        .iter()
        .any(|w| word.len() >= w.len() && word[1..w.len()].eq_ignore_ascii_case(&w[1..]))
}

const NOT_WORD: u8 = 0;
const WORD: u8 = 1;
const TRIGGER_START: u8 = 2;

/// Per byte: not part of a word, part of one, or part of one and the first
/// letter of some trigger word (either case). One table lookup per byte keeps
/// the pre-check cheap on every simple query.
static BYTE_CLASS: [u8; 256] = {
    let mut t = [NOT_WORD; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 {
            t[c] = WORD;
        }
        c += 1;
    }
    let mut i = 0;
    while i < TRIGGERS.len() {
        let first = TRIGGERS[i][0];
        t[first as usize] = TRIGGER_START;
        t[first.to_ascii_uppercase() as usize] = TRIGGER_START;
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pre_check_never_hides_an_effect() {
        assert!(!may_have_effects(
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        ));
        for sql in [
            "SeT x = 1",
            "select set_config('a','b',false)",
            "LISTEN c",
            "discard all",
            "RESET x",
            // SET after an UPDATE's own statement, or not a clause of one.
            "UPDATE t SET x = 1; SET work_mem = '1GB'",
            "update t set x = 1;set work_mem = '1GB'",
            "UPDATE t SET x = set_config('a', 'b', false)",
            "UPDATE t SET x = 1 RETURNING pg_advisory_lock(1)",
            "/* UPDATE */ SET x = 1",
            "-- UPDATE\nSET x = 1",
            "updates SET x = 1",
            "SELECT U&\"\\0073et_config\"('work_mem', '1GB', false)",
            "DO $$ BEGIN PERFORM 1; END $$",
            "do 'begin null; end'",
            "SELECT 1; UPDATE t SET x = 1",
            "UPDATE t SET x = 1; -- \n SET work_mem = 1",
            "UPDATE t SET x = 1;; LISTEN c;",
        ] {
            assert!(may_have_effects(sql), "{sql}");
        }
        for sql in [
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            "insert into t values (1) on conflict (id) do update set x = excluded.x",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET x = s.x",
            "UPDATE \"set\" SET \"set\" = 1",
            "UPDATE t SET x = 1; ;\n",
            "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING;",
            "SELECT double_precision, done, d FROM domains",
        ] {
            assert!(!may_have_effects(sql), "{sql}");
        }
        // The per-letter lists hold every trigger word, in any case, and
        // only at the start of a word.
        for w in TRIGGERS {
            let text = std::str::from_utf8(w).unwrap();
            for sql in [format!("x; {text}"), format!("x ({})", text.to_uppercase())] {
                assert!(may_have_effects(&sql), "{sql}");
            }
            assert!(!may_have_effects(&format!("x x{text}")), "{text}");
            assert!(!may_have_effects(&text[..text.len() - 1]), "{text}");
        }
    }
}
