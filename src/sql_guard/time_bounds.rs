//! Finds the time range a checked query reads from each table, so the engine can skip the
//! manifest's files that lie wholly outside it.
//!
//! Sans-IO and conservative: it only reports bounds it can prove restrict every row the query
//! reads from a table, and reports nothing (read everything) otherwise. A bound is the text of
//! an expression; the engine evaluates it in the query's own transaction (so `now()` is the
//! same instant) and ignores any bound that does not evaluate to a constant timestamp.
//!
//! Proven means: the table's placeholder appears exactly once; it is the only item of its
//! `FROM` (no join, no comma); the `WHERE` right after it has no top-level `OR` or `NOT`; and a
//! top-level `AND` conjunct compares the table's `time` column (bare, quoted or qualified by
//! the table's alias) with an expression, or uses `time BETWEEN a AND b`.

use super::lexer::{self, Token, TokenKind};
use super::PLACEHOLDER_PREFIX;

/// Which side of a bound an expression gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    /// Rows have `time >= expression` (or `>`).
    Lower(String),
    /// Rows have `time <= expression` (or `<`).
    Upper(String),
}

/// The bounds found for one placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableTimeBounds {
    pub placeholder: String,
    pub bounds: Vec<Bound>,
}

/// Words that end a `WHERE` clause at its own nesting depth.
const WHERE_ENDS: [&str; 12] = [
    "GROUP",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "HAVING",
    "QUALIFY",
    "WINDOW",
    "UNION",
    "EXCEPT",
    "INTERSECT",
    "SELECT",
    "USING",
];

/// The provable time bounds of each table of a query already rewritten by [`super::check`].
pub fn time_bounds(rewritten_sql: &str) -> Vec<TableTimeBounds> {
    let Ok(lexed) = lexer::lex(rewritten_sql) else {
        return Vec::new();
    };
    let scan = Scan {
        sql: rewritten_sql,
        tokens: &lexed.tokens,
    };
    let mut found = Vec::new();
    for (index, token) in lexed.tokens.iter().enumerate() {
        if token.kind != TokenKind::QuotedIdentifier {
            continue;
        }
        let name = scan.unquoted(index);
        if !name.starts_with(PLACEHOLDER_PREFIX) {
            continue;
        }
        let occurrences = (0..lexed.tokens.len())
            .filter(|&i| {
                lexed.tokens[i].kind == TokenKind::QuotedIdentifier && scan.unquoted(i) == name
            })
            .count();
        if occurrences != 1 {
            continue;
        }
        let bounds = scan.bounds_for(index);
        if !bounds.is_empty() {
            found.push(TableTimeBounds {
                placeholder: name,
                bounds,
            });
        }
    }
    found
}

struct Scan<'a> {
    sql: &'a str,
    tokens: &'a [Token],
}

impl Scan<'_> {
    fn text(&self, index: usize) -> &str {
        let token = self.tokens[index];
        &self.sql[token.start..token.end]
    }

    fn unquoted(&self, index: usize) -> String {
        let text = self.text(index);
        if self.tokens[index].kind == TokenKind::QuotedIdentifier {
            text[1..text.len() - 1].replace("\"\"", "\"")
        } else {
            text.to_string()
        }
    }

    fn is_word(&self, index: usize, word: &str) -> bool {
        index < self.tokens.len()
            && self.tokens[index].kind == TokenKind::Word
            && self.text(index).eq_ignore_ascii_case(word)
    }

    fn is_punctuation(&self, index: usize, character: &str) -> bool {
        index < self.tokens.len()
            && self.tokens[index].kind == TokenKind::Punctuation
            && self.text(index) == character
    }

    /// Bounds from the `WHERE` that follows the table at `table`, if the table is its block's
    /// only `FROM` item.
    fn bounds_for(&self, table: usize) -> Vec<Bound> {
        if table == 0 || !self.is_word(table - 1, "FROM") {
            return Vec::new();
        }
        let mut aliases = vec![self.unquoted(table)];
        let mut next = table + 1;
        if self.is_word(next, "AS") {
            next += 1;
        }
        if next < self.tokens.len() && matches!(self.tokens[next].kind, TokenKind::QuotedIdentifier)
            || (next < self.tokens.len()
                && self.tokens[next].kind == TokenKind::Word
                && !self.is_word(next, "WHERE")
                && !WHERE_ENDS.iter().any(|w| self.is_word(next, w)))
        {
            aliases.push(self.unquoted(next));
            next += 1;
        }
        if !self.is_word(next, "WHERE") {
            return Vec::new();
        }
        let start = next + 1;
        let end = self.where_end(start);
        let Some(conjuncts) = self.conjuncts(start, end) else {
            return Vec::new();
        };
        conjuncts
            .into_iter()
            .flat_map(|(first, last)| self.conjunct_bounds(first, last, &aliases))
            .collect()
    }

    /// The token after the `WHERE` clause that starts at `start`.
    fn where_end(&self, start: usize) -> usize {
        let mut depth = 0i32;
        for index in start..self.tokens.len() {
            if self.is_punctuation(index, "(") {
                depth += 1;
            } else if self.is_punctuation(index, ")") {
                if depth == 0 {
                    return index;
                }
                depth -= 1;
            } else if depth == 0
                && (WHERE_ENDS.iter().any(|w| self.is_word(index, w))
                    || self.is_punctuation(index, ";"))
            {
                return index;
            }
        }
        self.tokens.len()
    }

    /// Splits `start..end` at top-level `AND`s (the `AND` of `BETWEEN` excepted); `None` if a
    /// top-level `OR` or `NOT` makes the conjuncts unsafe to use.
    fn conjuncts(&self, start: usize, end: usize) -> Option<Vec<(usize, usize)>> {
        let mut parts = Vec::new();
        let mut depth = 0i32;
        let mut part_start = start;
        let mut between_open = false;
        for index in start..end {
            if self.is_punctuation(index, "(") {
                depth += 1;
            } else if self.is_punctuation(index, ")") {
                depth -= 1;
            } else if depth == 0 {
                if self.is_word(index, "OR") || self.is_word(index, "NOT") {
                    return None;
                }
                if self.is_word(index, "BETWEEN") {
                    between_open = true;
                } else if self.is_word(index, "AND") {
                    if between_open {
                        between_open = false;
                    } else {
                        parts.push((part_start, index));
                        part_start = index + 1;
                    }
                }
            }
        }
        parts.push((part_start, end));
        Some(parts)
    }

    /// Bounds from one conjunct `first..last`.
    fn conjunct_bounds(&self, first: usize, last: usize, aliases: &[String]) -> Vec<Bound> {
        let Some(after_time) = self.time_column(first, last, aliases) else {
            // `expression op time` is the mirror image.
            return self.mirrored_bounds(first, last, aliases);
        };
        if self.is_word(after_time, "BETWEEN") {
            let mut depth = 0i32;
            let and = (after_time + 1..last).find(|&i| {
                if self.is_punctuation(i, "(") {
                    depth += 1;
                } else if self.is_punctuation(i, ")") {
                    depth -= 1;
                }
                depth == 0 && self.is_word(i, "AND")
            });
            return match and {
                Some(and) if and > after_time + 1 && and + 1 < last => vec![
                    Bound::Lower(self.source(after_time + 1, and)),
                    Bound::Upper(self.source(and + 1, last)),
                ],
                _ => Vec::new(),
            };
        }
        if after_time >= last || self.tokens[after_time].kind != TokenKind::Operator {
            return Vec::new();
        }
        let expression = self.source(after_time + 1, last);
        if after_time + 1 >= last {
            return Vec::new();
        }
        match self.text(after_time) {
            ">" | ">=" => vec![Bound::Lower(expression)],
            "<" | "<=" => vec![Bound::Upper(expression)],
            "=" | "==" => vec![Bound::Lower(expression.clone()), Bound::Upper(expression)],
            _ => Vec::new(),
        }
    }

    fn mirrored_bounds(&self, first: usize, last: usize, aliases: &[String]) -> Vec<Bound> {
        // Find `op time` at the end of the conjunct, at depth 0.
        for operator in (first + 1..last).rev() {
            if self.tokens[operator].kind != TokenKind::Operator {
                continue;
            }
            if self.time_column(operator + 1, last, aliases) != Some(last) {
                continue;
            }
            let expression = self.source(first, operator);
            return match self.text(operator) {
                "<" | "<=" => vec![Bound::Lower(expression)],
                ">" | ">=" => vec![Bound::Upper(expression)],
                "=" | "==" => vec![Bound::Lower(expression.clone()), Bound::Upper(expression)],
                _ => Vec::new(),
            };
        }
        Vec::new()
    }

    /// If `first` starts a reference to the table's `time` column, the index after it.
    fn time_column(&self, first: usize, last: usize, aliases: &[String]) -> Option<usize> {
        let is_time = |index: usize| {
            index < last
                && matches!(
                    self.tokens[index].kind,
                    TokenKind::Word | TokenKind::QuotedIdentifier
                )
                && self.unquoted(index).eq_ignore_ascii_case("time")
        };
        if is_time(first) && !self.is_punctuation(first + 1, ".") {
            return Some(first + 1);
        }
        let qualifier_matches = first < last
            && matches!(
                self.tokens[first].kind,
                TokenKind::Word | TokenKind::QuotedIdentifier
            )
            && aliases.iter().any(|a| *a == self.unquoted(first));
        if qualifier_matches && self.is_punctuation(first + 1, ".") && is_time(first + 2) {
            return Some(first + 3);
        }
        None
    }

    /// The SQL text from token `first` to just before token `after`.
    fn source(&self, first: usize, after: usize) -> String {
        if first >= after {
            return String::new();
        }
        self.sql[self.tokens[first].start..self.tokens[after - 1].end].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(sql: &str) -> Vec<Bound> {
        let checked = super::super::check(sql, None, &super::super::GuardLimits::default())
            .expect("guard accepts");
        time_bounds(&checked.sql)
            .into_iter()
            .flat_map(|t| t.bounds)
            .collect()
    }

    // Checks the forms a dashboard writes: comparisons either way round, BETWEEN, an alias,
    // and a quoted column, each giving the expression text to evaluate.
    #[test]
    fn finds_simple_bounds() {
        assert_eq!(
            bounds("SELECT host, avg(v) FROM db.cpu WHERE time > now() - INTERVAL 1 hour AND host = 'a' GROUP BY host"),
            vec![Bound::Lower("now() - INTERVAL 1 hour".into())]
        );
        assert_eq!(
            bounds("SELECT * FROM db.cpu c WHERE c.time BETWEEN '2026-01-01' AND '2026-01-02' ORDER BY 1"),
            vec![
                Bound::Lower("'2026-01-01'".into()),
                Bound::Upper("'2026-01-02'".into())
            ]
        );
        assert_eq!(
            bounds("SELECT count(*) FROM db.cpu WHERE TIMESTAMPTZ '2026-01-01' <= \"time\""),
            vec![Bound::Lower("TIMESTAMPTZ '2026-01-01'".into())]
        );
        assert_eq!(
            bounds("SELECT 1 FROM db.cpu WHERE v > 1 AND time < '2026-05-01' LIMIT 3"),
            vec![Bound::Upper("'2026-05-01'".into())]
        );
    }

    // Checks that nothing is claimed where it would not hold for every row read: a top-level
    // OR or NOT, a join, the table used twice, a bound inside a subquery's own WHERE only.
    #[test]
    fn refuses_unprovable_bounds() {
        assert!(bounds("SELECT * FROM db.cpu WHERE time > '2026-01-01' OR v > 1").is_empty());
        assert!(bounds("SELECT * FROM db.cpu WHERE NOT time > '2026-01-01'").is_empty());
        assert!(bounds(
            "SELECT * FROM db.cpu a JOIN db.mem b ON a.time = b.time WHERE a.time > '2026-01-01'"
        )
        .is_empty());
        assert!(bounds("SELECT * FROM db.cpu, db.mem WHERE time > '2026-01-01'").is_empty());
        assert!(bounds(
            "SELECT * FROM db.cpu WHERE time > '2026-01-01' UNION ALL SELECT * FROM db.cpu"
        )
        .is_empty());
        assert!(bounds("SELECT * FROM db.cpu WHERE other.time > '2026-01-01'").is_empty());
        assert!(bounds("SELECT * FROM db.cpu WHERE v > 1").is_empty());
    }

    // Checks that a bound inside a subquery applies to the subquery's own table.
    #[test]
    fn subquery_bounds_belong_to_their_table() {
        let checked = super::super::check(
            "SELECT max(v) FROM (SELECT v FROM db.cpu WHERE time >= '2026-01-01') s",
            None,
            &super::super::GuardLimits::default(),
        )
        .unwrap();
        let found = time_bounds(&checked.sql);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].placeholder, checked.tables[0].0);
        assert_eq!(found[0].bounds, vec![Bound::Lower("'2026-01-01'".into())]);
    }
}
