//! Tokenizer for DuckDB's SQL dialect, written to find the same token boundaries as DuckDB's own
//! lexer (its fork of PostgreSQL's `scan.l`, checked against DuckDB 1.5.x).
//!
//! The guard is only as good as this agreement: if DuckDB saw code where this lexer sees a string
//! or a comment, that code would pass unchecked. So every construct whose boundaries are uncertain
//! is refused instead of guessed:
//!
//! - Whitespace is exactly DuckDB's: space, tab, `\n`, `\r` and form feed. Other control
//!   characters, `\`, `` ` `` and every non-ASCII character outside string literals, quoted
//!   identifiers and comments are refused. DuckDB would treat non-ASCII bytes as identifier
//!   characters, and it rewrites Unicode spaces to ASCII spaces before parsing (outside what *it*
//!   believes are quotes), so [`check_invisible_characters`] refuses those anywhere, even inside
//!   strings.
//! - `--` comments end before `\n` or `\r`; `/* */` comments nest, as in DuckDB.
//! - `'...'` strings use `''` for a quote and keep backslashes (DuckDB's standard-conforming
//!   strings). `E'...'` strings also take backslash escapes, so `\'` does not end them. A prefix
//!   such as `X'..'`, `B'..'`, `N'..'` or `U&'..'` is lexed as an identifier (or `U` and `&`)
//!   followed by a plain string. DuckDB may split such a literal differently (`X'a''b'` is two
//!   adjacent literals to it, one here), but never disagrees on which characters are inside a
//!   literal, and that is what matters.
//! - `$tag$...$tag$` and `$$...$$` strings have ASCII tags. `$1`, `$name` and `?` are prepared
//!   statement parameters, which the query API never binds, so they are refused.
//! - Numbers follow DuckDB's grammar (`1_000`, `1.5`, `.5`, `1e-3`); a number running straight
//!   into a letter, digit, `_`, `$` or `.` (`1abc`, `0x1F`, `1.2.3`) is refused, because DuckDB
//!   would split it into a number and an alias.

use std::ops::Range;

use super::GuardError;

/// What a token is. Keywords are not told apart from identifiers here: DuckDB treats keywords
/// case-insensitively, so callers compare [`TokenKind::Word`] texts ignoring ASCII case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenKind {
    /// An unquoted identifier or keyword: `[A-Za-z_][A-Za-z0-9_$]*`.
    Word,
    /// A double-quoted identifier, `"..."` with `""` for a quote.
    QuotedIdentifier,
    /// A string literal of any kind: `'...'`, `E'...'` or `$tag$...$tag$`.
    String,
    /// A numeric literal.
    Number,
    /// One of `( ) [ ] { } , ; . :` (a lone colon; `::` and `:=` are operators).
    Punctuation,
    /// A run of operator characters (`+ - * / % ^ < > = ~ ! @ & | #`), `::` or `:=`.
    Operator,
}

/// One token: its kind and its byte range in the SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Token {
    pub kind: TokenKind,
    pub start: usize,
    pub end: usize,
}

/// The tokens of a SQL text, and the byte ranges of the comments between them.
#[derive(Debug, Default)]
pub(super) struct Lexed {
    pub tokens: Vec<Token>,
    /// Sorted by start; each is a whole `--` or `/* */` comment.
    pub comments: Vec<Range<usize>>,
}

/// Refuses NUL and the invisible or non-ASCII space characters DuckDB's parser rewrites to
/// spaces (`Parser::StripUnicodeSpaces`: U+00A0, U+2000..U+200B, U+202F, U+205F, U+2060,
/// U+3000, U+FEFF), plus every other Unicode space and the remaining zero-width format characters
/// for good measure. These are refused even inside strings and comments, because DuckDB's
/// rewriting pass has its own, simpler idea of where quotes begin and end.
pub(super) fn check_invisible_characters(sql: &str) -> Result<(), GuardError> {
    if let Some(offset) = sql.bytes().position(|byte| byte == 0) {
        return Err(GuardError::UnexpectedCharacter {
            character: '\0',
            offset,
        });
    }
    if sql.is_ascii() {
        return Ok(());
    }
    for (offset, character) in sql.char_indices() {
        let invisible = (!character.is_ascii() && character.is_whitespace())
            || matches!(
                character,
                '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}'
            );
        if invisible {
            return Err(GuardError::InvisibleCharacter {
                code_point: u32::from(character),
                offset,
            });
        }
    }
    Ok(())
}

/// Splits `sql` into tokens. Comments are recorded apart so that the rewritten SQL can drop them.
pub(super) fn lex(sql: &str) -> Result<Lexed, GuardError> {
    let bytes = sql.as_bytes();
    let mut lexed = Lexed::default();
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        let next = bytes.get(index + 1).copied();
        let (kind, end) = match byte {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => {
                index += 1;
                continue;
            }
            b'-' if next == Some(b'-') => {
                let end = bytes[index..]
                    .iter()
                    .position(|&byte| byte == b'\n' || byte == b'\r')
                    .map_or(bytes.len(), |length| index + length);
                lexed.comments.push(index..end);
                index = end;
                continue;
            }
            b'/' if next == Some(b'*') => {
                let end = block_comment_end(bytes, index)?;
                lexed.comments.push(index..end);
                index = end;
                continue;
            }
            b'\'' => (TokenKind::String, standard_string_end(bytes, index)?),
            b'"' => (
                TokenKind::QuotedIdentifier,
                quoted_identifier_end(bytes, index)?,
            ),
            b'$' => (TokenKind::String, dollar_string_end(sql, index)?),
            b'?' => return Err(GuardError::Parameter { offset: index }),
            b'0'..=b'9' => (TokenKind::Number, number_end(sql, index)?),
            b'.' if next.is_some_and(|byte| byte.is_ascii_digit()) => {
                (TokenKind::Number, number_end(sql, index)?)
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'_' => {
                let end = word_end(bytes, index);
                // `E'...'` is an escape string only when the E stands alone right before the quote,
                // as in DuckDB's lexer (`typE'x'` is an identifier followed by a plain string).
                if end == index + 1 && (byte == b'E' || byte == b'e') && next == Some(b'\'') {
                    (TokenKind::String, escape_string_end(bytes, index)?)
                } else {
                    (TokenKind::Word, end)
                }
            }
            b'(' | b')' | b'[' | b']' | b'{' | b'}' | b',' | b';' | b'.' => {
                (TokenKind::Punctuation, index + 1)
            }
            b':' if matches!(next, Some(b':' | b'=')) => (TokenKind::Operator, index + 2),
            b':' => (TokenKind::Punctuation, index + 1),
            byte if is_operator_byte(byte) => (TokenKind::Operator, operator_end(bytes, index)),
            _ => {
                // `index` is always at a character boundary here: every token and comment ends
                // right after an ASCII byte.
                let character = sql[index..].chars().next().unwrap_or('\u{fffd}');
                return Err(GuardError::UnexpectedCharacter {
                    character,
                    offset: index,
                });
            }
        };
        debug_assert!(end > index && end <= bytes.len());
        lexed.tokens.push(Token {
            kind,
            start: index,
            end,
        });
        index = end;
    }
    Ok(lexed)
}

/// The operator characters DuckDB's lexer knows, minus the backtick (refused: no DuckDB operator
/// needs it, and other dialects quote identifiers with it), plus `#` (DuckDB's positional column
/// reference, `#1`).
fn is_operator_byte(byte: u8) -> bool {
    matches!(
        byte,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'%'
            | b'^'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'&'
            | b'|'
            | b'#'
    )
}

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$'
}

fn word_end(bytes: &[u8], start: usize) -> usize {
    bytes[start..]
        .iter()
        .position(|&byte| !is_word_byte(byte))
        .map_or(bytes.len(), |length| start + length)
}

/// An operator run stops before a comment start, as DuckDB's does (`+--x` is `+` and a comment).
fn operator_end(bytes: &[u8], start: usize) -> usize {
    let mut index = start + 1;
    while index < bytes.len() && is_operator_byte(bytes[index]) {
        let next = bytes.get(index + 1).copied();
        if (bytes[index] == b'-' && next == Some(b'-'))
            || (bytes[index] == b'/' && next == Some(b'*'))
        {
            break;
        }
        index += 1;
    }
    index
}

/// The end of a `/* */` comment starting at `start`. Comments nest, as in DuckDB.
fn block_comment_end(bytes: &[u8], start: usize) -> Result<usize, GuardError> {
    let mut depth = 1usize;
    let mut index = start + 2;
    while index < bytes.len() {
        let next = bytes.get(index + 1).copied();
        if bytes[index] == b'/' && next == Some(b'*') {
            depth += 1;
            index += 2;
        } else if bytes[index] == b'*' && next == Some(b'/') {
            depth -= 1;
            index += 2;
            if depth == 0 {
                return Ok(index);
            }
        } else {
            index += 1;
        }
    }
    Err(GuardError::Unterminated {
        what: "block comment",
        offset: start,
    })
}

/// The end of a literal delimited by `quote` where a doubled quote stands for one.
fn doubled_quote_end(bytes: &[u8], start: usize, quote: u8) -> Option<usize> {
    let mut index = start + 1;
    loop {
        let found = index + bytes.get(index..)?.iter().position(|&byte| byte == quote)?;
        if bytes.get(found + 1) == Some(&quote) {
            index = found + 2;
        } else {
            return Some(found + 1);
        }
    }
}

fn standard_string_end(bytes: &[u8], start: usize) -> Result<usize, GuardError> {
    doubled_quote_end(bytes, start, b'\'').ok_or(GuardError::Unterminated {
        what: "string literal",
        offset: start,
    })
}

fn quoted_identifier_end(bytes: &[u8], start: usize) -> Result<usize, GuardError> {
    let end = doubled_quote_end(bytes, start, b'"').ok_or(GuardError::Unterminated {
        what: "quoted identifier",
        offset: start,
    })?;
    if end == start + 2 {
        // DuckDB refuses `""` too ("zero-length delimited identifier").
        return Err(GuardError::EmptyQuotedIdentifier { offset: start });
    }
    Ok(end)
}

/// The end of an `E'...'` string starting at the `E`: a backslash escapes the next character
/// whatever it is (so `\'` does not end the string), and `''` is a quote.
fn escape_string_end(bytes: &[u8], start: usize) -> Result<usize, GuardError> {
    let mut index = start + 2;
    while index < bytes.len() {
        match bytes[index] {
            // A multi-byte character after the backslash leaves `index` on continuation bytes,
            // which are never a quote or a backslash, so the scan stays correct.
            b'\\' => index += 2,
            b'\'' if bytes.get(index + 1) == Some(&b'\'') => index += 2,
            b'\'' => return Ok(index + 1),
            _ => index += 1,
        }
    }
    Err(GuardError::Unterminated {
        what: "string literal",
        offset: start,
    })
}

/// The end of a dollar-quoted string starting at `start`. A `$` that does not open one is a
/// parameter (`$1`, `$name`) or a stray character; both are refused.
fn dollar_string_end(sql: &str, start: usize) -> Result<usize, GuardError> {
    let bytes = sql.as_bytes();
    let tag_start = start + 1;
    let tag_end = match bytes.get(tag_start) {
        Some(b'$') => tag_start,
        Some(&byte) if byte.is_ascii_alphabetic() || byte == b'_' => {
            let end = bytes[tag_start..]
                .iter()
                .position(|&byte| !(byte.is_ascii_alphanumeric() || byte == b'_'))
                .map_or(bytes.len(), |length| tag_start + length);
            if bytes.get(end) != Some(&b'$') {
                return Err(GuardError::Parameter { offset: start });
            }
            end
        }
        Some(byte) if byte.is_ascii_digit() => return Err(GuardError::Parameter { offset: start }),
        _ => {
            return Err(GuardError::UnexpectedCharacter {
                character: '$',
                offset: start,
            })
        }
    };
    let delimiter = &sql[start..=tag_end];
    let body_start = tag_end + 1;
    match sql[body_start..].find(delimiter) {
        Some(position) => Ok(body_start + position + delimiter.len()),
        None => Err(GuardError::Unterminated {
            what: "dollar-quoted string",
            offset: start,
        }),
    }
}

/// Digits with single underscores between them (`1_000`), as DuckDB's `integer` rule.
fn integer_end(bytes: &[u8], start: usize) -> usize {
    let mut index = start;
    loop {
        while bytes.get(index).is_some_and(u8::is_ascii_digit) {
            index += 1;
        }
        if bytes.get(index) == Some(&b'_') && bytes.get(index + 1).is_some_and(u8::is_ascii_digit) {
            index += 1;
            continue;
        }
        return index;
    }
}

fn number_end(sql: &str, start: usize) -> Result<usize, GuardError> {
    let bytes = sql.as_bytes();
    let mut index = start;
    if bytes[index].is_ascii_digit() {
        index = integer_end(bytes, index);
        if bytes.get(index) == Some(&b'.') && bytes.get(index + 1) != Some(&b'.') {
            index = integer_end(bytes, index + 1);
        }
    } else {
        // `.5`: the caller saw a digit after the dot.
        index = integer_end(bytes, index + 1);
    }
    if matches!(bytes.get(index), Some(b'e' | b'E')) {
        let digits = match bytes.get(index + 1) {
            Some(b'+' | b'-') => index + 2,
            _ => index + 1,
        };
        if bytes.get(digits).is_some_and(u8::is_ascii_digit) {
            index = integer_end(bytes, digits);
        }
    }
    if let Some(&byte) = bytes.get(index) {
        if is_word_byte(byte) || byte == b'.' || !byte.is_ascii() {
            let text_end = sql[index..]
                .char_indices()
                .find(|&(_, character)| !(character.is_alphanumeric() || "_$.".contains(character)))
                .map_or(sql.len(), |(length, _)| index + length);
            return Err(GuardError::MalformedNumber {
                text: super::excerpt(&sql[start..text_end]),
                offset: start,
            });
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds_and_texts(sql: &str) -> Vec<(TokenKind, &str)> {
        lex(sql)
            .unwrap_or_else(|error| panic!("lex {sql:?}: {error}"))
            .tokens
            .iter()
            .map(|token| (token.kind, &sql[token.start..token.end]))
            .collect()
    }

    // The literal forms whose ends differ between dialects end where DuckDB ends them: standard
    // strings keep backslashes, E-strings honour `\'`, dollar strings ignore other `$...$` tags.
    #[test]
    fn string_literal_boundaries() {
        use TokenKind::*;
        assert_eq!(
            kinds_and_texts(r"'a\' x"),
            vec![(String, r"'a\'"), (Word, "x")]
        );
        assert_eq!(kinds_and_texts("'it''s'"), vec![(String, "'it''s'")]);
        assert_eq!(
            kinds_and_texts(r"E'a\'b' e'\\' x"),
            vec![(String, r"E'a\'b'"), (String, r"e'\\'"), (Word, "x")]
        );
        assert_eq!(
            kinds_and_texts("typE'x'"),
            vec![(Word, "typE"), (String, "'x'")]
        );
        assert_eq!(
            kinds_and_texts("$a$ $b$ ' $a$ x"),
            vec![(String, "$a$ $b$ ' $a$"), (Word, "x")]
        );
        assert_eq!(kinds_and_texts("$$a'b$$"), vec![(String, "$$a'b$$")]);
        assert_eq!(
            kinds_and_texts("X'4F' U&\"x\""),
            vec![
                (Word, "X"),
                (String, "'4F'"),
                (Word, "U"),
                (Operator, "&"),
                (QuotedIdentifier, "\"x\"")
            ]
        );
        assert_eq!(
            kinds_and_texts("\"a\"\"b\".c"),
            vec![
                (QuotedIdentifier, "\"a\"\"b\""),
                (Punctuation, "."),
                (Word, "c")
            ]
        );
        // Identifiers may hold `$`, as in DuckDB, so `a$b$` is one word and not a dollar quote.
        assert_eq!(
            kinds_and_texts("a$b$ 1"),
            vec![(Word, "a$b$"), (Number, "1")]
        );
    }

    // Comments are not tokens; block comments nest and line comments stop at \r too.
    #[test]
    fn comments() {
        let lexed = lex("a /* x /* y */ z */ b -- c\rd").unwrap();
        let texts: Vec<_> = lexed
            .tokens
            .iter()
            .map(|token| &"a /* x /* y */ z */ b -- c\rd"[token.start..token.end])
            .collect();
        assert_eq!(texts, vec!["a", "b", "d"]);
        assert_eq!(lexed.comments, vec![2..19, 22..26]);
        assert_eq!(
            lex("a /* x /* y */ b").unwrap_err(),
            GuardError::Unterminated {
                what: "block comment",
                offset: 2
            }
        );
        // An operator stops where a comment starts.
        assert_eq!(
            kinds_and_texts("1+--x\n2+/**/3"),
            vec![
                (TokenKind::Number, "1"),
                (TokenKind::Operator, "+"),
                (TokenKind::Number, "2"),
                (TokenKind::Operator, "+"),
                (TokenKind::Number, "3")
            ]
        );
    }

    // Numbers DuckDB accepts lex whole; numbers DuckDB would split into a number and an alias are
    // refused.
    #[test]
    fn numbers() {
        for good in ["1", "1_000", "1.5", "1.", ".5", "1e5", "1.5E-3", "2e+2"] {
            assert_eq!(
                kinds_and_texts(good),
                vec![(TokenKind::Number, good)],
                "{good}"
            );
        }
        for bad in ["1abc", "0x1F", "1.2.3", "1__0", "1e", "1$", "1é"] {
            assert!(
                matches!(lex(bad), Err(GuardError::MalformedNumber { .. })),
                "{bad}: {:?}",
                lex(bad)
            );
        }
        assert_eq!(
            kinds_and_texts("t.5"),
            vec![(TokenKind::Word, "t"), (TokenKind::Number, ".5")]
        );
    }

    // Characters DuckDB would read differently, or that have no use, are refused with their offset.
    #[test]
    fn refused_characters() {
        assert_eq!(
            lex("a `b`").unwrap_err(),
            GuardError::UnexpectedCharacter {
                character: '`',
                offset: 2
            }
        );
        assert_eq!(
            lex("a \\ b").unwrap_err(),
            GuardError::UnexpectedCharacter {
                character: '\\',
                offset: 2
            }
        );
        assert_eq!(
            lex("x\u{0b}y").unwrap_err(),
            GuardError::UnexpectedCharacter {
                character: '\u{0b}',
                offset: 1
            }
        );
        assert_eq!(
            lex("caf\u{e9}").unwrap_err(),
            GuardError::UnexpectedCharacter {
                character: '\u{e9}',
                offset: 3
            }
        );
        assert_eq!(
            lex("a = ?").unwrap_err(),
            GuardError::Parameter { offset: 4 }
        );
        assert_eq!(
            lex("a = $1").unwrap_err(),
            GuardError::Parameter { offset: 4 }
        );
        assert_eq!(
            lex("a = $x").unwrap_err(),
            GuardError::Parameter { offset: 4 }
        );
        assert_eq!(
            lex("\"\"").unwrap_err(),
            GuardError::EmptyQuotedIdentifier { offset: 0 }
        );
        // Non-ASCII text is fine inside literals and comments.
        assert!(lex("'caf\u{e9}' \"\u{e9}\" /* \u{e9} */").is_ok());
    }

    // Unicode spaces are refused anywhere, because DuckDB rewrites them to ASCII spaces before
    // parsing; so is NUL.
    #[test]
    fn invisible_characters() {
        assert_eq!(
            check_invisible_characters("SELECT 1 AS x\u{a0}FROM t"),
            Err(GuardError::InvisibleCharacter {
                code_point: 0xa0,
                offset: 13
            })
        );
        assert!(matches!(
            check_invisible_characters("'\u{2060}'"),
            Err(GuardError::InvisibleCharacter {
                code_point: 0x2060,
                ..
            })
        ));
        assert!(matches!(
            check_invisible_characters("\u{feff}SELECT 1"),
            Err(GuardError::InvisibleCharacter { .. })
        ));
        assert!(matches!(
            check_invisible_characters("SELECT '\0'"),
            Err(GuardError::UnexpectedCharacter {
                character: '\0',
                ..
            })
        ));
        assert_eq!(
            check_invisible_characters("SELECT 'caf\u{e9} \u{2713}'"),
            Ok(())
        );
    }
}
