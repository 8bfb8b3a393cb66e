//! The structural pass of the SQL guard: finds every relation a query reads, checks it, and
//! replaces each `database.measurement` reference by a placeholder.
//!
//! It is not a full SQL parser. It walks the tokens once, left to right, descending into every
//! parenthesized group, and understands exactly the places where DuckDB's grammar names a
//! relation: FROM items (after `FROM`, `,` and `JOIN`, including DuckDB's FROM-first form), the
//! target of `DESCRIBE`/`SUMMARIZE`, and common table expressions. Everything it does not
//! recognize in those places is refused rather than passed on.
//!
//! Common table expression scope follows DuckDB: a CTE is visible to the CTEs after it in the
//! same `WITH` list and to the rest of the query (or parenthesized subquery) that the `WITH`
//! starts, including nested subqueries; it is not visible in its own body. A bare name is left
//! for DuckDB to resolve only when such a CTE is in scope (names compared ignoring ASCII case, as
//! DuckDB compares them), so DuckDB can never resolve it to a catalog table or a file.

use std::collections::HashMap;
use std::ops::Range;

use super::lexer::{Token, TokenKind};
use super::rules::{
    is_from_function_allowed, is_function_refused, is_one_of, is_reserved,
    EXPRESSION_CONTINUATIONS, FROM_ARGUMENT_FUNCTIONS, FROM_CLAUSE_ENDS, JOIN_WORDS,
    KEYWORDS_REFUSED, QUERY_CONTINUATIONS, QUERY_STARTS, STATEMENT_KEYWORDS_ALLOWED,
    STATEMENT_WORDS,
};
use super::{
    excerpt, CheckedQuery, GuardError, TableRef, PLACEHOLDER_PREFIX, RESERVED_IDENTIFIER_PREFIX,
};
use crate::names;

/// The reason given when a FROM item is none of the accepted forms.
const FROM_ITEM_EXPECTED: &str = "a FROM item must be database.measurement, a CTE name, a \
    subquery, VALUES or one of range, generate_series, unnest";

/// What `FROM` means during a walk over tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A query or an expression: `FROM` starts a FROM clause.
    Query,
    /// The arguments of `extract`, `substring`, `trim` or `overlay`: `FROM` separates arguments.
    FromArguments,
    /// An `ON` condition or a `TABLESAMPLE` clause: the walk stops where the FROM clause goes on.
    FromExpression,
}

/// Where a table name was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    /// A FROM item; `add_alias` when no alias was written, so that `cpu.host` keeps working.
    From { add_alias: bool },
    /// The target of `DESCRIBE` or `SUMMARIZE`, where no alias may follow.
    Describe,
}

/// Tokens `first..=last` become `text` in the output.
#[derive(Debug)]
struct Replacement {
    first: usize,
    last: usize,
    text: String,
}

/// Checks and rewrites one statement. `tokens` must be the statement's tokens without a trailing
/// `;`, and not empty.
pub(super) fn rewrite(
    sql: &str,
    tokens: &[Token],
    comments: &[Range<usize>],
    default_database: Option<&str>,
    nesting_depth_max: usize,
) -> Result<CheckedQuery, GuardError> {
    assert!(!tokens.is_empty(), "rewrite needs at least one token");
    let mut rewriter = Rewriter {
        sql,
        tokens,
        close_of: match_parentheses(sql, tokens, nesting_depth_max)?,
        default_database,
        tables: Vec::new(),
        table_index: HashMap::new(),
        ctes: Vec::new(),
        cte_counts: HashMap::new(),
        replacements: Vec::new(),
    };
    rewriter.check_statement_start()?;
    rewriter.check_every_token()?;
    rewriter.scan_query(0, tokens.len())?;
    debug_assert!(rewriter.ctes.is_empty());
    let sql = rewriter.render(comments);
    Ok(CheckedQuery {
        sql,
        tables: rewriter.tables,
    })
}

/// For each `(` token the index of its `)`; `usize::MAX` for other tokens.
fn match_parentheses(
    sql: &str,
    tokens: &[Token],
    nesting_depth_max: usize,
) -> Result<Vec<usize>, GuardError> {
    let mut close_of = vec![usize::MAX; tokens.len()];
    let mut open = Vec::new();
    for (index, token) in tokens.iter().enumerate() {
        if token.kind != TokenKind::Punctuation {
            continue;
        }
        match sql.as_bytes()[token.start] {
            b'(' => {
                open.push(index);
                if open.len() > nesting_depth_max {
                    return Err(GuardError::TooDeep {
                        depth_max: nesting_depth_max,
                    });
                }
            }
            b')' => {
                let opening = open.pop().ok_or(GuardError::UnbalancedParentheses {
                    offset: token.start,
                })?;
                close_of[opening] = index;
            }
            _ => {}
        }
    }
    match open.pop() {
        Some(opening) => Err(GuardError::UnbalancedParentheses {
            offset: tokens[opening].start,
        }),
        None => Ok(close_of),
    }
}

struct Rewriter<'a> {
    sql: &'a str,
    tokens: &'a [Token],
    close_of: Vec<usize>,
    default_database: Option<&'a str>,
    /// Placeholder name and table, in first-appearance order.
    tables: Vec<(String, TableRef)>,
    /// Index into `tables` by table, so that repeated references share a placeholder.
    table_index: HashMap<TableRef, usize>,
    /// The CTE names in scope at the current point of the walk, lower-cased, innermost last.
    ctes: Vec<String>,
    /// How many times each name occurs in `ctes`, for constant-time lookups.
    cte_counts: HashMap<String, usize>,
    replacements: Vec<Replacement>,
}

impl<'a> Rewriter<'a> {
    // --------------------------------------------------------------------------------------------
    // Token helpers. Every look-ahead takes the end of the current region, so that nothing after a
    // closing parenthesis is mistaken for part of the group.

    fn text(&self, index: usize) -> &'a str {
        let token = self.tokens[index];
        &self.sql[token.start..token.end]
    }

    fn kind(&self, index: usize, end: usize) -> Option<TokenKind> {
        (index < end).then(|| self.tokens[index].kind)
    }

    fn is_word(&self, index: usize, end: usize, word: &str) -> bool {
        self.kind(index, end) == Some(TokenKind::Word)
            && self.text(index).eq_ignore_ascii_case(word)
    }

    fn is_word_in(&self, index: usize, end: usize, words: &[&str]) -> bool {
        self.kind(index, end) == Some(TokenKind::Word) && is_one_of(self.text(index), words)
    }

    /// An unquoted word that may name a table, CTE or alias (DuckDB's `ColId`).
    fn is_name_word(&self, index: usize, end: usize) -> bool {
        self.kind(index, end) == Some(TokenKind::Word) && !is_reserved(self.text(index))
    }

    fn is_punctuation(&self, index: usize, end: usize, character: u8) -> bool {
        self.kind(index, end) == Some(TokenKind::Punctuation)
            && self.sql.as_bytes()[self.tokens[index].start] == character
    }

    /// The name an identifier token stands for: a word as written, a quoted identifier unquoted.
    fn identifier(&self, index: usize) -> String {
        let text = self.text(index);
        match self.tokens[index].kind {
            TokenKind::QuotedIdentifier => text[1..text.len() - 1].replace("\"\"", "\""),
            _ => text.to_string(),
        }
    }

    /// The source text of tokens `first..after`, for error messages.
    fn source(&self, first: usize, after: usize) -> String {
        excerpt(&self.sql[self.tokens[first].start..self.tokens[after - 1].end])
    }

    fn unsupported(&self, index: usize, end: usize, reason: &'static str) -> GuardError {
        let near = if index < end {
            excerpt(self.text(index))
        } else if end < self.tokens.len() {
            // The region ended at its closing parenthesis.
            ")".to_string()
        } else {
            "end of query".to_string()
        };
        GuardError::Unsupported { near, reason }
    }

    fn unexpected_in_from(&self, index: usize, end: usize) -> GuardError {
        let hyphen =
            self.kind(index, end) == Some(TokenKind::Operator) && self.text(index).starts_with('-');
        if hyphen {
            return self.unsupported(
                index,
                end,
                "names containing '-' must be double-quoted, as in \"my-db\".cpu",
            );
        }
        self.unsupported(
            index,
            end,
            "a FROM item must be followed by an alias, a join, a comma or the next clause",
        )
    }

    // --------------------------------------------------------------------------------------------
    // Whole-statement checks.

    fn check_statement_start(&self) -> Result<(), GuardError> {
        let end = self.tokens.len();
        if self.is_punctuation(0, end, b'(') || self.is_word_in(0, end, &STATEMENT_KEYWORDS_ALLOWED)
        {
            return Ok(());
        }
        Err(GuardError::StatementNotAllowed {
            keyword: excerpt(&self.text(0).to_ascii_uppercase()),
        })
    }

    /// Checks that hold for every token wherever it stands, so that no nesting the structural
    /// pass might misjudge can hide them: refused keywords, statement words where a nested
    /// statement would begin, refused function calls (a name, or the last part of a dotted name,
    /// right before `(`), and the reserved name prefix.
    fn check_every_token(&self) -> Result<(), GuardError> {
        let end = self.tokens.len();
        // DuckDB accepts `WITH x AS (...) DELETE ...` (and UPDATE, INSERT, MERGE), so the token
        // after a parenthesized group that follows `AS` or `MATERIALIZED` (a CTE body, or a
        // window definition) is a place where a statement may begin.
        let mut after_cte_body = vec![false; end + 1];
        for (open, &close) in self.close_of.iter().enumerate() {
            if close != usize::MAX
                && open > 0
                && self.is_word_in(open - 1, open, &["AS", "MATERIALIZED"])
            {
                after_cte_body[close + 1] = true;
            }
        }
        for (index, token) in self.tokens.iter().enumerate() {
            if !matches!(token.kind, TokenKind::Word | TokenKind::QuotedIdentifier) {
                continue;
            }
            let name = self.identifier(index);
            // After a dot a word is a name part (`race.load`), never a keyword.
            let qualified = index > 0 && self.is_punctuation(index - 1, end, b'.');
            if token.kind == TokenKind::Word && !qualified {
                let refused = is_one_of(&name, &KEYWORDS_REFUSED)
                    || (is_one_of(&name, &STATEMENT_WORDS)
                        && (after_cte_body[index] || self.may_start_statement(index))
                        && !self.is_operand(index));
                if refused {
                    return Err(GuardError::KeywordNotAllowed {
                        keyword: name.to_ascii_uppercase(),
                    });
                }
            }
            let reserved = name
                .get(..RESERVED_IDENTIFIER_PREFIX.len())
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case(RESERVED_IDENTIFIER_PREFIX));
            if reserved {
                return Err(GuardError::ReservedIdentifier {
                    name: excerpt(&name),
                });
            }
            if self.is_punctuation(index + 1, end, b'(') && is_function_refused(&name) {
                return Err(GuardError::FunctionNotAllowed {
                    name: excerpt(&name),
                });
            }
        }
        Ok(())
    }

    /// Whether a statement could begin at `index` if DuckDB's grammar nested statements anywhere:
    /// the statement's first token, the first token inside parentheses (a subquery or CTE body),
    /// or the target of `DESCRIBE`/`DESC`/`SUMMARIZE`. DuckDB 1.5 accepts no statement other than
    /// a query in any of these places, so this only keeps a second line of defence there. (The
    /// place after a WITH list, where DuckDB does accept one, is found by the caller.)
    fn may_start_statement(&self, index: usize) -> bool {
        index == 0
            || self.is_punctuation(index - 1, index, b'(')
            || self.is_word_in(index - 1, index, &["DESC", "DESCRIBE", "SUMMARIZE"])
    }

    /// Whether the token after the word at `index` shows that the word is an operand (a column,
    /// table or alias name) rather than the first word of a statement: nothing, `)`, `,`, `.`,
    /// `[`, an operator, or a keyword that continues an expression ([`EXPRESSION_CONTINUATIONS`];
    /// `OR` not before `REPLACE` or `IGNORE`, and `FROM` only inside the parentheses of
    /// `extract`, `substring`, `trim` or `overlay`). Statements go on with a name, a string, `(`
    /// or a keyword of their own, none of which count.
    fn is_operand(&self, index: usize) -> bool {
        let end = self.tokens.len();
        let next = index + 1;
        match self.kind(next, end) {
            None | Some(TokenKind::Operator) => true,
            Some(TokenKind::Punctuation) => {
                matches!(
                    self.sql.as_bytes()[self.tokens[next].start],
                    b')' | b',' | b'.' | b'['
                )
            }
            Some(TokenKind::Word) => {
                if self.is_word(next, end, "OR") {
                    return !self.is_word_in(next + 1, end, &["IGNORE", "REPLACE"]);
                }
                if self.is_word(next, end, "FROM") {
                    return index > 0
                        && self.is_punctuation(index - 1, end, b'(')
                        && self.is_from_argument_function(index - 1, 0);
                }
                self.is_word_in(next, end, &EXPRESSION_CONTINUATIONS)
            }
            Some(_) => false,
        }
    }

    // --------------------------------------------------------------------------------------------
    // Queries.

    /// A query, or any parenthesized group: `start..end` is the whole group.
    fn scan_query(&mut self, start: usize, end: usize) -> Result<(), GuardError> {
        if self.is_word_in(start, end, &["DESC", "DESCRIBE", "SUMMARIZE"]) {
            return self.scan_describe(start, end);
        }
        self.scan_query_body(start, end)
    }

    /// A query that may start with `WITH`. The CTEs it defines stay in scope until `end`.
    fn scan_query_body(&mut self, start: usize, end: usize) -> Result<(), GuardError> {
        if !self.is_word(start, end, "WITH") {
            self.walk(start, end, Mode::Query)?;
            return Ok(());
        }
        let scope_mark = self.ctes.len();
        let body_start = self.scan_with(start, end)?;
        let body_ok = self.is_word_in(body_start, end, &["FROM", "SELECT", "VALUES"])
            || self.is_punctuation(body_start, end, b'(');
        if !body_ok {
            return Err(self.unsupported(
                body_start,
                end,
                "a WITH clause must be followed by SELECT or FROM",
            ));
        }
        self.walk(body_start, end, Mode::Query)?;
        for name in self.ctes.drain(scope_mark..) {
            if let Some(count) = self.cte_counts.get_mut(&name) {
                *count -= 1;
                if *count == 0 {
                    self.cte_counts.remove(&name);
                }
            }
        }
        Ok(())
    }

    /// `WITH name [(columns)] [USING KEY (...)] AS [[NOT] MATERIALIZED] (query), ...`. Each name
    /// enters the scope after its own body. Returns the index after the list.
    fn scan_with(&mut self, start: usize, end: usize) -> Result<usize, GuardError> {
        let mut index = start + 1;
        if self.is_word(index, end, "RECURSIVE") {
            return Err(self.unsupported(
                index,
                end,
                "recursive CTEs are not supported; range and generate_series produce sequences",
            ));
        }
        loop {
            let name = match self.kind(index, end) {
                Some(TokenKind::QuotedIdentifier) => self.identifier(index),
                Some(TokenKind::Word) if self.is_name_word(index, end) => self.identifier(index),
                _ => {
                    return Err(self.unsupported(
                        index,
                        end,
                        "expected the name of a common table expression",
                    ))
                }
            };
            index += 1;
            if self.is_punctuation(index, end, b'(') {
                let close = self.close_of[index];
                self.walk(index + 1, close, Mode::Query)?;
                index = close + 1;
            }
            if self.is_word(index, end, "USING")
                && self.is_word(index + 1, end, "KEY")
                && self.is_punctuation(index + 2, end, b'(')
            {
                let close = self.close_of[index + 2];
                self.walk(index + 3, close, Mode::Query)?;
                index = close + 1;
            }
            if !self.is_word(index, end, "AS") {
                return Err(self.unsupported(
                    index,
                    end,
                    "expected AS in a common table expression",
                ));
            }
            index += 1;
            if self.is_word(index, end, "MATERIALIZED") {
                index += 1;
            } else if self.is_word(index, end, "NOT")
                && self.is_word(index + 1, end, "MATERIALIZED")
            {
                index += 2;
            }
            if !self.is_punctuation(index, end, b'(') {
                return Err(self.unsupported(
                    index,
                    end,
                    "expected a parenthesized query in a common table expression",
                ));
            }
            let close = self.close_of[index];
            self.scan_query(index + 1, close)?;
            index = close + 1;
            let name = name.to_ascii_lowercase();
            *self.cte_counts.entry(name.clone()).or_insert(0) += 1;
            self.ctes.push(name);
            if !self.is_punctuation(index, end, b',') {
                return Ok(index);
            }
            index += 1;
        }
    }

    /// `DESCRIBE`/`DESC`/`SUMMARIZE` followed by a query or by one table name. The name is always
    /// taken as a table, never as a CTE: resolving it to a placeholder is the safe side.
    fn scan_describe(&mut self, start: usize, end: usize) -> Result<(), GuardError> {
        let target = start + 1;
        if self.is_word_in(target, end, &["FROM", "SELECT", "VALUES", "WITH"])
            || self.is_punctuation(target, end, b'(')
        {
            return self.scan_query_body(target, end);
        }
        match self.kind(target, end) {
            Some(TokenKind::String) => Err(GuardError::StringInFrom {
                literal: excerpt(self.text(target)),
            }),
            Some(TokenKind::QuotedIdentifier) | Some(TokenKind::Word)
                if self.tokens[target].kind == TokenKind::QuotedIdentifier
                    || self.is_name_word(target, end) =>
            {
                let after = self.path_end(target, end);
                if after != end {
                    return Err(self.unsupported(
                        after,
                        end,
                        "DESCRIBE and SUMMARIZE take one table name or a query",
                    ));
                }
                self.table_reference(target, after, Site::Describe)
            }
            _ => Err(self.unsupported(
                target,
                end,
                "DESCRIBE and SUMMARIZE take a table (database.measurement) or a query",
            )),
        }
    }

    /// Walks `start..end`, descending into parenthesized groups and handing FROM clauses to
    /// [`Self::scan_from_clause`]. In [`Mode::FromExpression`] it stops at the first token where
    /// the surrounding FROM clause goes on and returns its index; otherwise it returns `end`.
    fn walk(&mut self, start: usize, end: usize, mode: Mode) -> Result<usize, GuardError> {
        let mut index = start;
        while index < end {
            if mode == Mode::FromExpression && self.is_from_expression_end(index, end) {
                return Ok(index);
            }
            match self.tokens[index].kind {
                TokenKind::Punctuation if self.is_punctuation(index, end, b'(') => {
                    let close = self.close_of[index];
                    if self.is_from_argument_function(index, start) {
                        self.walk(index + 1, close, Mode::FromArguments)?;
                    } else {
                        self.scan_query(index + 1, close)?;
                    }
                    index = close + 1;
                }
                TokenKind::Word => {
                    let word = self.text(index);
                    if word.eq_ignore_ascii_case("FROM")
                        && mode != Mode::FromArguments
                        && !self.is_distinct_from(index, start)
                    {
                        if mode == Mode::FromExpression {
                            // Not `IS DISTINCT FROM`, so not part of an expression.
                            return Ok(index);
                        }
                        index = self.scan_from_clause(index + 1, end)?;
                        continue;
                    }
                    if word.eq_ignore_ascii_case("JOIN") {
                        return Err(self.unsupported(index, end, "JOIN outside a FROM clause"));
                    }
                    if is_one_of(word, &["DESCRIBE", "PIVOT", "SUMMARIZE", "UNPIVOT"]) {
                        return Err(self.unsupported(
                            index,
                            end,
                            "DESCRIBE and SUMMARIZE must start a query, and PIVOT/UNPIVOT must \
                             follow a FROM item",
                        ));
                    }
                    index += 1;
                }
                _ => index += 1,
            }
        }
        Ok(end)
    }

    /// Whether the `(` at `open` holds the arguments of `extract`, `substring`, `trim` or
    /// `overlay`, whose grammar uses `FROM` between arguments. A schema-qualified call is a plain
    /// function call, so it does not count.
    fn is_from_argument_function(&self, open: usize, region_start: usize) -> bool {
        open > region_start
            && self.is_word_in(open - 1, open, &FROM_ARGUMENT_FUNCTIONS)
            && !(open - 1 > region_start && self.is_punctuation(open - 2, open, b'.'))
    }

    /// Whether the `FROM` at `index` is part of `IS [NOT] DISTINCT FROM`.
    fn is_distinct_from(&self, index: usize, region_start: usize) -> bool {
        index >= region_start + 2
            && self.is_word(index - 1, index, "DISTINCT")
            && (self.is_word(index - 2, index, "IS")
                || (index >= region_start + 3
                    && self.is_word(index - 2, index, "NOT")
                    && self.is_word(index - 3, index, "IS")))
    }

    // --------------------------------------------------------------------------------------------
    // FROM clauses.

    /// A FROM clause from its first item up to the clause that follows it, which is returned.
    fn scan_from_clause(&mut self, start: usize, end: usize) -> Result<usize, GuardError> {
        let mut index = self.scan_from_item(start, end)?;
        while index < end {
            if self.is_punctuation(index, end, b',') {
                index += 1;
                // DuckDB accepts a trailing comma after the last item.
                if index == end || self.is_from_clause_end(index, end) {
                    return Ok(index);
                }
                index = self.scan_from_item(index, end)?;
            } else if let Some(length) = self.join_length(index, end) {
                index = self.scan_from_item(index + length, end)?;
            } else if self.is_word_in(index, end, &["ON", "TABLESAMPLE"]) {
                // `ON` conditions may be stacked after nested joins (`a JOIN b JOIN c ON x ON y`).
                index = self.walk(index + 1, end, Mode::FromExpression)?;
            } else if self.is_word(index, end, "USING") && self.is_punctuation(index + 1, end, b'(')
            {
                let close = self.close_of[index + 1];
                self.walk(index + 2, close, Mode::Query)?;
                index = close + 1;
            } else if self.is_word_in(index, end, &["PIVOT", "UNPIVOT"]) {
                index = self.scan_pivot(index, end)?;
            } else if self.is_from_clause_end(index, end) {
                return Ok(index);
            } else {
                return Err(self.unexpected_in_from(index, end));
            }
        }
        Ok(end)
    }

    /// Whether the token at `index` ends a FROM clause: the next clause of the query.
    fn is_from_clause_end(&self, index: usize, end: usize) -> bool {
        self.is_word_in(index, end, &FROM_CLAUSE_ENDS)
            || (self.is_word(index, end, "USING") && self.is_word(index + 1, end, "SAMPLE"))
    }

    /// Whether an `ON` or `TABLESAMPLE` expression ends at `index`.
    fn is_from_expression_end(&self, index: usize, end: usize) -> bool {
        self.is_punctuation(index, end, b',')
            || self.is_word_in(
                index,
                end,
                &["ON", "PIVOT", "TABLESAMPLE", "UNPIVOT", "USING"],
            )
            || self.is_from_clause_end(index, end)
            || self.join_length(index, end).is_some()
    }

    /// The number of tokens in a join keyword sequence starting at `index` (`LEFT OUTER JOIN` is
    /// 3), or `None`. `left(s, 2)` is a function call, not a join.
    fn join_length(&self, index: usize, end: usize) -> Option<usize> {
        // At most three words come before JOIN (`NATURAL LEFT OUTER JOIN`); allow one more.
        for length in 0..5 {
            if self.is_word(index + length, end, "JOIN") {
                return Some(length + 1);
            }
            if !self.is_word_in(index + length, end, &JOIN_WORDS) {
                return None;
            }
        }
        None
    }

    /// One FROM item, with its alias. Returns the index after it.
    fn scan_from_item(&mut self, start: usize, end: usize) -> Result<usize, GuardError> {
        let mut index = start;
        if self.is_word(index, end, "LATERAL") {
            index += 1;
        }
        // DuckDB's prefix alias: `FROM c: db.cpu`.
        let prefix_alias = self.is_punctuation(index + 1, end, b':')
            && (self.is_name_word(index, end)
                || matches!(
                    self.kind(index, end),
                    Some(TokenKind::QuotedIdentifier | TokenKind::String)
                ));
        if prefix_alias {
            index += 2;
        }
        let Some(kind) = self.kind(index, end) else {
            return Err(self.unsupported(index, end, "expected a table after FROM or JOIN"));
        };
        match kind {
            TokenKind::Punctuation if self.is_punctuation(index, end, b'(') => {
                let close = self.close_of[index];
                self.scan_parenthesized_from_item(index, close)?;
                self.after_from_item(close + 1, end, prefix_alias)
            }
            TokenKind::String => Err(GuardError::StringInFrom {
                literal: excerpt(self.text(index)),
            }),
            TokenKind::Word if self.is_word(index, end, "VALUES") => {
                let after = self.scan_values(index, end)?;
                self.after_from_item(after, end, prefix_alias)
            }
            TokenKind::QuotedIdentifier | TokenKind::Word
                if kind == TokenKind::QuotedIdentifier || self.is_name_word(index, end) =>
            {
                let after_path = self.path_end(index, end);
                let hyphen_next = self.kind(after_path, end) == Some(TokenKind::Operator)
                    && self.text(after_path).starts_with('-')
                    && self.tokens[after_path].start == self.tokens[after_path - 1].end;
                if hyphen_next {
                    return Err(self.unexpected_in_from(after_path, end));
                }
                if self.is_punctuation(after_path, end, b'(') {
                    self.check_from_function(index, after_path)?;
                    let close = self.close_of[after_path];
                    self.scan_query(after_path + 1, close)?;
                    let mut after = close + 1;
                    if self.is_word(after, end, "WITH")
                        && self.is_word(after + 1, end, "ORDINALITY")
                    {
                        after += 2;
                    }
                    return self.after_from_item(after, end, prefix_alias);
                }
                let (after, has_alias) = if prefix_alias {
                    (after_path, true)
                } else {
                    self.skip_alias(after_path, end)?
                };
                self.table_reference(
                    index,
                    after_path,
                    Site::From {
                        add_alias: !has_alias,
                    },
                )?;
                Ok(after)
            }
            _ => Err(self.unsupported(index, end, FROM_ITEM_EXPECTED)),
        }
    }

    fn after_from_item(
        &mut self,
        index: usize,
        end: usize,
        prefix_alias: bool,
    ) -> Result<usize, GuardError> {
        if prefix_alias {
            return Ok(index);
        }
        Ok(self.skip_alias(index, end)?.0)
    }

    /// A parenthesized FROM item `open..=close`: a subquery, or a parenthesized join.
    fn scan_parenthesized_from_item(
        &mut self,
        open: usize,
        close: usize,
    ) -> Result<(), GuardError> {
        let first = open + 1;
        if first == close {
            return Err(self.unsupported(first, close, "empty parentheses in FROM"));
        }
        // `(VALUES (1) v JOIN ...)` is a join whose first item is a VALUES list: an alias follows
        // the rows. `(VALUES (1), (2))` is a query.
        let values_join =
            self.is_word(first, close, "VALUES") && self.values_rows_end(first, close) < close;
        if self.is_word_in(first, close, &QUERY_STARTS) && !values_join {
            return self.scan_query(first, close);
        }
        if self.is_punctuation(first, close, b'(') {
            // `((...))` is whatever the inner group is; `((SELECT 1) UNION ...)` is a query;
            // anything else after the inner group (an alias, a join) makes a parenthesized join.
            let inner_close = self.close_of[first];
            if inner_close + 1 == close {
                return self.scan_parenthesized_from_item(first, inner_close);
            }
            if self.is_word_in(inner_close + 1, close, &QUERY_CONTINUATIONS) {
                return self.scan_query(first, close);
            }
        }
        let after = self.scan_from_clause(first, close)?;
        if after != close {
            return Err(self.unexpected_in_from(after, close));
        }
        Ok(())
    }

    /// `VALUES (...), (...)` as a FROM item. Returns the index after the last row.
    fn scan_values(&mut self, start: usize, end: usize) -> Result<usize, GuardError> {
        let rows_end = self.values_rows_end(start, end);
        if rows_end == start + 1 {
            return Err(self.unsupported(
                rows_end,
                end,
                "expected a parenthesized row after VALUES",
            ));
        }
        let mut index = start + 1;
        while index < rows_end {
            let close = self.close_of[index];
            self.walk(index + 1, close, Mode::Query)?;
            // Skip the comma between rows.
            index = close + 2;
        }
        Ok(rows_end)
    }

    /// The index after the rows of `VALUES (...), (...)` starting at `start` (the VALUES word).
    fn values_rows_end(&self, start: usize, end: usize) -> usize {
        let mut index = start + 1;
        while self.is_punctuation(index, end, b'(') {
            let after = self.close_of[index] + 1;
            if !(self.is_punctuation(after, end, b',') && self.is_punctuation(after + 1, end, b'('))
            {
                return after;
            }
            index = after + 1;
        }
        index
    }

    /// `PIVOT (...)` or `UNPIVOT [INCLUDE|EXCLUDE NULLS] (...)` after a FROM item, with an
    /// optional alias.
    fn scan_pivot(&mut self, start: usize, end: usize) -> Result<usize, GuardError> {
        let mut index = start + 1;
        if self.is_word(start, end, "UNPIVOT")
            && self.is_word_in(index, end, &["EXCLUDE", "INCLUDE"])
            && self.is_word(index + 1, end, "NULLS")
        {
            index += 2;
        }
        if !self.is_punctuation(index, end, b'(') {
            return Err(self.unsupported(index, end, "expected ( after PIVOT or UNPIVOT"));
        }
        let close = self.close_of[index];
        self.walk(index + 1, close, Mode::Query)?;
        Ok(self.skip_alias(close + 1, end)?.0)
    }

    /// An optional alias: `AS name`, `AS 'name'`, a bare name that is not a keyword, or a quoted
    /// identifier, each optionally followed by a column list; also `AS (column definitions)`
    /// after a table function. Returns the index after it and whether there was one.
    fn skip_alias(&mut self, start: usize, end: usize) -> Result<(usize, bool), GuardError> {
        let mut index = start;
        if self.is_word(index, end, "AS") {
            index += 1;
            let named = self.is_name_word(index, end)
                || matches!(
                    self.kind(index, end),
                    Some(TokenKind::QuotedIdentifier | TokenKind::String)
                );
            if named {
                index += 1;
            } else if !self.is_punctuation(index, end, b'(') {
                return Err(self.unsupported(index, end, "expected an alias after AS"));
            }
        } else if self.is_name_word(index, end)
            || self.kind(index, end) == Some(TokenKind::QuotedIdentifier)
        {
            index += 1;
        } else {
            return Ok((start, false));
        }
        if self.is_punctuation(index, end, b'(') {
            let close = self.close_of[index];
            self.walk(index + 1, close, Mode::Query)?;
            index = close + 1;
        }
        Ok((index, true))
    }

    /// The index after a dotted name starting at `start` (`a`, `a.b`, `"a"."b".c`).
    fn path_end(&self, start: usize, end: usize) -> usize {
        let mut index = start + 1;
        while self.is_punctuation(index, end, b'.')
            && matches!(
                self.kind(index + 1, end),
                Some(TokenKind::Word | TokenKind::QuotedIdentifier)
            )
        {
            index += 2;
        }
        index
    }

    /// A table function call in FROM, named by the dotted name `first..after`.
    fn check_from_function(&self, first: usize, after: usize) -> Result<(), GuardError> {
        let name = self.identifier(after - 1);
        if is_function_refused(&name) {
            return Err(GuardError::FunctionNotAllowed {
                name: excerpt(&name),
            });
        }
        if after - 1 != first || !is_from_function_allowed(&name) {
            return Err(GuardError::TableFunctionNotAllowed {
                name: self.source(first, after),
            });
        }
        Ok(())
    }

    /// A table name written as tokens `first..after` (one part, or parts joined by dots).
    fn table_reference(
        &mut self,
        first: usize,
        after: usize,
        site: Site,
    ) -> Result<(), GuardError> {
        let parts: Vec<String> = (first..after)
            .step_by(2)
            .map(|index| self.identifier(index))
            .collect();
        let (database, measurement) = match parts.as_slice() {
            [name] => {
                let is_cte = matches!(site, Site::From { .. })
                    && self.cte_counts.contains_key(&name.to_ascii_lowercase());
                if is_cte {
                    return Ok(());
                }
                match self.default_database {
                    Some(database) => (database.to_string(), name.clone()),
                    None => {
                        return Err(GuardError::UnqualifiedTable {
                            name: excerpt(name),
                        })
                    }
                }
            }
            [database, measurement] => (database.clone(), measurement.clone()),
            _ => {
                return Err(GuardError::TooManyNameParts {
                    name: self.source(first, after),
                    parts: parts.len(),
                })
            }
        };
        names::validate_database(&database).map_err(|reason| GuardError::InvalidDatabase {
            name: excerpt(&database),
            reason,
        })?;
        names::validate_measurement(&measurement).map_err(|reason| {
            GuardError::InvalidMeasurement {
                name: excerpt(&measurement),
                reason,
            }
        })?;
        let table = TableRef {
            database,
            measurement,
        };
        let next_index = self.tables.len();
        let index = *self.table_index.entry(table.clone()).or_insert(next_index);
        if index == next_index {
            let placeholder = format!("{PLACEHOLDER_PREFIX}{index}");
            self.tables.push((placeholder, table.clone()));
        }
        // Validated measurement names hold no quote, so they can be quoted as they are.
        let mut text = format!("\"{}\"", self.tables[index].0);
        if site == (Site::From { add_alias: true }) {
            text.push_str(&format!(" AS \"{}\"", table.measurement));
        }
        self.replacements.push(Replacement {
            first,
            last: after - 1,
            text,
        });
        Ok(())
    }

    // --------------------------------------------------------------------------------------------
    // Output.

    /// The statement rebuilt from its tokens and the whitespace between them: replacements
    /// applied, each comment turned into one space, leading and trailing whitespace dropped.
    fn render(&mut self, comments: &[Range<usize>]) -> String {
        self.replacements
            .sort_by_key(|replacement| replacement.first);
        let mut output = String::with_capacity(self.sql.len() + 32 * self.replacements.len());
        let mut comment_cursor = 0;
        let mut replacements = self.replacements.iter().peekable();
        let mut index = 0;
        while index < self.tokens.len() {
            if index > 0 {
                let gap = self.tokens[index - 1].end..self.tokens[index].start;
                push_gap(&mut output, self.sql, gap, comments, &mut comment_cursor);
            }
            if let Some(replacement) =
                replacements.next_if(|replacement| replacement.first == index)
            {
                output.push_str(&replacement.text);
                index = replacement.last + 1;
                // Keep the placeholder apart from a quoted alias written right after the name
                // (`db.m"c"` must not become the one identifier `"__shale_t0""c"`).
                let quoted_next = index < self.tokens.len()
                    && self.tokens[index].start == self.tokens[index - 1].end
                    && self.tokens[index].kind == TokenKind::QuotedIdentifier;
                if quoted_next {
                    output.push(' ');
                }
                continue;
            }
            output.push_str(self.text(index));
            index += 1;
        }
        debug_assert!(replacements.next().is_none());
        output
    }
}

/// Appends the text between two tokens, each comment in it replaced by one space. Comments before
/// `gap` (inside replaced tokens) are skipped.
fn push_gap(
    output: &mut String,
    sql: &str,
    gap: Range<usize>,
    comments: &[Range<usize>],
    cursor: &mut usize,
) {
    let mut position = gap.start;
    while let Some(comment) = comments
        .get(*cursor)
        .filter(|comment| comment.start < gap.end)
    {
        if comment.start >= gap.start {
            output.push_str(&sql[position..comment.start]);
            output.push(' ');
            position = comment.end;
        }
        *cursor += 1;
    }
    output.push_str(&sql[position..gap.end]);
}
