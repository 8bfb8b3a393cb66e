//! Sans-IO guard for the SQL of `POST /api/v1/query`: lets through only read-only DuckDB queries
//! whose tables are `database.measurement` references, and rewrites each reference to a
//! placeholder the query engine defines.
//!
//! DuckDB's own sandbox settings are not enough: with the data directory allowed, `COPY ... TO`
//! and file functions inside it still work. So [`check`] decides from the SQL text alone, before
//! DuckDB sees it, and fails closed: whatever it cannot classify is refused.
//!
//! # What passes
//!
//! 1. The text is at most [`GuardLimits::sql_bytes_max`] bytes, has no NUL and no invisible or
//!    non-ASCII space characters anywhere (DuckDB rewrites those to spaces before parsing), and
//!    tokenizes the way DuckDB tokenizes it (see the `lexer` module: nested `/* */` comments,
//!    `--` comments, `'...'` with `''`, `E'...'` with backslash escapes, `$tag$...$tag$`,
//!    `"..."` with `""`). Outside literals and comments only ASCII is accepted; prepared-statement
//!    parameters (`?`, `$1`, `$name`) are refused. Parentheses balance and nest at most
//!    [`NESTING_DEPTH_MAX`] deep.
//! 2. Exactly one statement; one trailing `;` is allowed and dropped.
//! 3. The statement starts with `SELECT`, `WITH`, `FROM` (DuckDB's FROM-first form), `(`, or
//!    `DESCRIBE`/`DESC`/`SUMMARIZE` followed by a query or one table name. Anything else is
//!    refused with [`GuardError::StatementNotAllowed`] naming the first word.
//! 4. The reserved keywords `CREATE INTO PIVOT_LONGER PIVOT_WIDER SHOW TABLE` are refused anywhere
//!    as unquoted words not right after a dot ([`GuardError::KeywordNotAllowed`]); being
//!    reserved, none of them can be an unquoted column name anyway. The words that start other
//!    statements (`COPY ATTACH DETACH INSTALL LOAD SET RESET PRAGMA CALL EXPORT IMPORT INSERT
//!    UPDATE DELETE ALTER DROP ...`, the `rules` module has the list) are *unreserved* in DuckDB:
//!    `SELECT avg(load) FROM t` is valid DuckDB SQL and reads column `load`. So they are names
//!    wherever they stand (select list, aggregates, WHERE, GROUP BY, ORDER BY, aliases, table
//!    and CTE names), and are refused only where a statement could begin — first in a
//!    parenthesized group, right after a CTE body (`WITH x AS (...) DELETE FROM t` is a DuckDB
//!    statement) or right after `DESCRIBE`/`SUMMARIZE` — unless the next token shows them to be
//!    an operand (`)`, `,`, `.`, `[`, an operator, or `IS`, `AND`, `AS`, `IN`, ...):
//!    `(COPY x TO 'f')`, `(SET x = 1)`, `(DELETE FROM t)` are refused, `(load > 1)`,
//!    `cast(load AS DOUBLE)`, `(set)` are not. At the statement's start item 3 refuses them.
//!    Any call (a name, or the last part of a dotted name, before `(`, whatever comments or
//!    whitespace lie between) of a file, network, catalog, settings or SQL-string function is
//!    refused ([`GuardError::FunctionNotAllowed`]): `read_*`, `*_scan`,
//!    `parquet_*`, `duckdb_*`, `pragma_*`, `glob`, `query`, `query_table`, `getenv`,
//!    `current_setting`, `sleep_ms` and more (the `rules` module has the lists). Names starting
//!    with `__shale_` are reserved for the engine ([`GuardError::ReservedIdentifier`]).
//! 5. Every relation is checked where DuckDB's grammar names one: FROM items (after `FROM`, `,`
//!    and any `JOIN`, in parenthesized joins, after `LATERAL`, with DuckDB's `alias: table` prefix
//!    alias), `DESCRIBE`/`SUMMARIZE` targets and CTE bodies. A FROM item may be:
//!    - `database.measurement`, or a bare `measurement` when a default database is given (the
//!      `x-arc-database` header); names are checked with [`crate::names`], quoted or not;
//!    - a bare name of a CTE in scope (it is left for DuckDB to resolve);
//!    - a parenthesized subquery or join, or `VALUES (...)`, checked recursively;
//!    - a call of `range`, `generate_series` or `unnest` ([`FROM_FUNCTIONS_ALLOWED`]), not
//!      schema-qualified; any other table function is [`GuardError::TableFunctionNotAllowed`].
//!
//!    A string literal in FROM is a file read in DuckDB and is refused
//!    ([`GuardError::StringInFrom`]); a bare name that is no CTE in scope, without a default
//!    database, is [`GuardError::UnqualifiedTable`]; three or more parts are
//!    [`GuardError::TooManyNameParts`]. `db.m.col` outside FROM is a column and passes untouched.
//!
//! # The rewritten SQL
//!
//! [`CheckedQuery::sql`] is the statement rebuilt from its own text: comments become single
//! spaces, leading and trailing whitespace and the trailing `;` are dropped, literals are
//! untouched, and each table reference becomes a double-quoted placeholder `"__shale_t<N>"` (one
//! per distinct table, numbered in order of first appearance), followed by `AS "<measurement>"`
//! when the query gave no alias, so that `SELECT cpu.host FROM metrics.cpu` keeps working.
//! `DESCRIBE metrics.cpu` becomes `DESCRIBE "__shale_t0"` (no alias is possible there).
//!
//! # Limitations (all fail closed)
//!
//! - Names containing `-` must be double-quoted (`"my-db".cpu`): unquoted, `my-db` is `my - db`.
//! - Table names are taken as written, case included (`Metrics.CPU` is database `Metrics`).
//! - `WITH RECURSIVE`, `TABLE x`, `SHOW`, the `PIVOT x ON ...` statement form, `FROM ... AT
//!   (VERSION => ...)`, `ROWS FROM (...)`, `EXPLAIN`, `VALUES` as a whole statement,
//!   schema-qualified table functions and prepared-statement parameters are refused. Standard
//!   `PIVOT (...)`/`UNPIVOT (...)` after a FROM item is accepted.
//! - Unquoted columns named like a reserved keyword (`table`, `show`, `into`, ...) must be
//!   double-quoted or qualified (`cpu.table`), as DuckDB itself requires. A column named like a
//!   statement word that stands first in parentheses and is followed by something other than an
//!   operator or expression keyword (`OVER (load ROWS ...)` naming a window `load`) is refused;
//!   quote it there. `x GLOB ('pattern')` with parentheses reads as a call of `glob` and is
//!   refused; write `x GLOB 'pattern'`.
//! - A `DESCRIBE`/`SUMMARIZE` target is always a table, never a CTE.
//!
//! # Why a tokenizer and not DuckDB's parser
//!
//! DuckDB can parse a query for us (`json_serialize_sql` returns the AST of a SELECT and an error
//! for anything else), and checking node types would make keyword lists unnecessary. The guard
//! stays a tokenizer all the same:
//!
//! - It is sans-IO: it decides before any DuckDB connection sees the text, and its checks (and
//!   the property tests that throw random text at it) run without DuckDB. Parsing through DuckDB
//!   would put a connection and a query in the guard path.
//! - The serialized AST is DuckDB's internal format, which changes between releases. A validator
//!   over it must know every node type to fail closed, so each upgrade could silently add an
//!   unchecked node (a new table function reference form, a new expression class).
//! - The rewrite needs the byte positions of table references in the user's text; the AST does
//!   not carry them for every node, and re-printing a deserialized AST would change the SQL the
//!   user wrote. A tokenizer is needed for the rewrite either way.
//! - The false refusals had one narrow cause, the statement words being refused everywhere
//!   although DuckDB's grammar treats them as unreserved names except where a statement begins.
//!   Checked against DuckDB 1.5.6: apart from a statement's first word, only the place after a
//!   WITH list takes a statement (`DELETE`, `UPDATE`, `INSERT INTO`, `MERGE INTO`); none parses
//!   in CTE bodies, subqueries, `IN (...)`, `EXISTS (...)`, set operations, `DESCRIBE`/
//!   `SUMMARIZE` targets or function arguments. Refusing the words in those places (and the
//!   nested ones, for defence in depth) loses no protection.
//!
//! # What the engine must still do
//!
//! The guard judges text; DuckDB must still run with the least it needs: extension autoloading
//! and autoinstalling off (`autoload_known_extensions`, `autoinstall_known_extensions`), no
//! parser extensions loaded (a failed parse would otherwise be split at `;` and offered to them),
//! `allow_parser_override_extension` left at its default, and `lock_configuration` on. It defines
//! each placeholder as a relation (a temporary view or table works for every statement form; a
//! CTE prepended to the query cannot precede a user's own `WITH` or a `DESCRIBE`).

mod lexer;
mod rewriter;
mod rules;
pub mod time_bounds;

use std::fmt;

use crate::names::NameError;

pub use rules::FROM_FUNCTIONS_ALLOWED;

/// The largest SQL text [`GuardLimits::default`] accepts, in bytes.
pub const SQL_BYTES_MAX_DEFAULT: usize = 1 << 20;

/// How deeply parentheses may nest; deeper is refused with [`GuardError::TooDeep`]. The guard
/// recurses once per level, so this bounds its stack use (well under 1 MiB); real queries rarely
/// nest more than a dozen levels. A constant rather than a [`GuardLimits`] field so that callers
/// building `GuardLimits { sql_bytes_max }` keep compiling.
pub const NESTING_DEPTH_MAX: usize = 128;

/// Placeholders are this prefix followed by a number: `__shale_t0`, `__shale_t1`, ...
pub const PLACEHOLDER_PREFIX: &str = "__shale_t";

/// Identifiers starting with this (any ASCII case) are refused in queries, so that a user can
/// neither name a placeholder nor shadow one.
pub const RESERVED_IDENTIFIER_PREFIX: &str = "__shale_";

/// How much SQL [`check`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardLimits {
    /// Longer SQL is refused with [`GuardError::TooLong`].
    pub sql_bytes_max: usize,
}

impl Default for GuardLimits {
    fn default() -> Self {
        GuardLimits {
            sql_bytes_max: SQL_BYTES_MAX_DEFAULT,
        }
    }
}

/// A table a query reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableRef {
    pub database: String,
    pub measurement: String,
}

impl fmt::Display for TableRef {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}.{}", self.database, self.measurement)
    }
}

/// A query that passed the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedQuery {
    /// The SQL with every table reference replaced by a double-quoted placeholder identifier
    /// (`"__shale_t0"`, ...; the same table always gets the same placeholder), comments removed
    /// and string literals untouched. See the module documentation for the exact form.
    pub sql: String,
    /// Placeholder name (without quotes) and the table it stands for, in first-appearance order.
    pub tables: Vec<(String, TableRef)>,
}

/// Why a query was refused. The messages are meant for the user who wrote the query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("SQL is {bytes} bytes, the limit is {bytes_max}")]
    TooLong { bytes: usize, bytes_max: usize },
    #[error("SQL is empty: send one SELECT statement")]
    Empty,
    #[error("parentheses nest deeper than {depth_max} levels")]
    TooDeep { depth_max: usize },
    #[error("unterminated {what} starting at byte {offset}")]
    Unterminated { what: &'static str, offset: usize },
    #[error(
        "unexpected character {character:?} at byte {offset}: outside string literals, quoted \
         identifiers and comments only ASCII letters, digits, operators and punctuation are \
         accepted"
    )]
    UnexpectedCharacter { character: char, offset: usize },
    #[error(
        "invisible or non-ASCII space character U+{code_point:04X} at byte {offset} is not \
         accepted, even inside strings"
    )]
    InvisibleCharacter { code_point: u32, offset: usize },
    #[error("empty quoted identifier \"\" at byte {offset}")]
    EmptyQuotedIdentifier { offset: usize },
    #[error("malformed number {text} at byte {offset}")]
    MalformedNumber { text: String, offset: usize },
    #[error(
        "query parameters ($1, $name, ?) are not supported (byte {offset}): write the values into \
         the SQL"
    )]
    Parameter { offset: usize },
    #[error("unbalanced parentheses at byte {offset}")]
    UnbalancedParentheses { offset: usize },
    #[error("only one statement per request")]
    MultipleStatements,
    #[error("statement {keyword} is not allowed: only read-only SELECT queries are accepted")]
    StatementNotAllowed { keyword: String },
    #[error(
        "{keyword} is not allowed: only read-only SELECT queries are accepted (double-quote it if \
         it names a column)"
    )]
    KeywordNotAllowed { keyword: String },
    #[error("function {name} is not allowed: queries may only read database.measurement tables")]
    FunctionNotAllowed { name: String },
    #[error(
        "table function {name} is not allowed in FROM: besides database.measurement tables only \
         range, generate_series and unnest are"
    )]
    TableFunctionNotAllowed { name: String },
    #[error(
        "a string in FROM reads a file and is not allowed: {literal}; write database.measurement"
    )]
    StringInFrom { literal: String },
    #[error(
        "table reference \"{name}\" must be written as database.measurement (or set the \
         x-arc-database header)"
    )]
    UnqualifiedTable { name: String },
    #[error("table reference {name} has {parts} parts: write database.measurement")]
    TooManyNameParts { name: String, parts: usize },
    #[error("invalid database name {name:?}: {reason}")]
    InvalidDatabase { name: String, reason: NameError },
    #[error("invalid measurement name {name:?}: {reason}")]
    InvalidMeasurement { name: String, reason: NameError },
    #[error(
        "identifier {name:?} is reserved: names starting with {RESERVED_IDENTIFIER_PREFIX} are \
         used internally"
    )]
    ReservedIdentifier { name: String },
    #[error("unsupported SQL near {near}: {reason}")]
    Unsupported { near: String, reason: &'static str },
}

/// Checks one query and rewrites its table references; see the module documentation for the
/// rules. `default_database` is the `x-arc-database` header, if the request had one: bare table
/// names then mean `default_database.name`.
pub fn check(
    sql: &str,
    default_database: Option<&str>,
    limits: &GuardLimits,
) -> Result<CheckedQuery, GuardError> {
    if sql.len() > limits.sql_bytes_max {
        return Err(GuardError::TooLong {
            bytes: sql.len(),
            bytes_max: limits.sql_bytes_max,
        });
    }
    lexer::check_invisible_characters(sql)?;
    let lexed = lexer::lex(sql)?;
    let mut tokens = &lexed.tokens[..];
    let is_semicolon = |token: &lexer::Token| {
        token.kind == lexer::TokenKind::Punctuation && sql.as_bytes()[token.start] == b';'
    };
    if let Some(position) = tokens.iter().position(is_semicolon) {
        if position + 1 != tokens.len() {
            return Err(GuardError::MultipleStatements);
        }
        tokens = &tokens[..position];
    }
    if tokens.is_empty() {
        return Err(GuardError::Empty);
    }
    rewriter::rewrite(
        sql,
        tokens,
        &lexed.comments,
        default_database,
        NESTING_DEPTH_MAX,
    )
}

/// How many characters of user text an error message quotes.
const EXCERPT_CHARS_MAX: usize = 64;

/// `text`, cut to [`EXCERPT_CHARS_MAX`] characters for an error message.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests;
