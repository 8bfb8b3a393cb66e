//! The word lists the SQL guard decides by: refused keywords and functions, the table functions
//! FROM may call, and DuckDB's reserved keywords.
//!
//! All lists hold ASCII upper case (keywords) or lower case (function names); callers compare
//! ignoring ASCII case, as DuckDB does.

/// Reserved keywords that write or read relations by name: `SELECT ... INTO`, `CREATE`, and
/// `TABLE x`, `SHOW x` and the PIVOT statement forms, which read a relation (even a file name) in
/// places a FROM clause is not seen. Being reserved, none of them can be an unquoted column name,
/// so they are refused as unquoted words anywhere in a query, not only at its start.
pub(super) const KEYWORDS_REFUSED: [&str; 6] = [
    "CREATE",
    "INTO",
    "PIVOT_LONGER",
    "PIVOT_WIDER",
    "SHOW",
    "TABLE",
];

/// The words that start a statement other than a query in DuckDB 1.5's grammar and are
/// *unreserved* keywords there (`duckdb_keywords()`), so that `load`, `set` or `copy` are also
/// ordinary unquoted column, table and alias names. DuckDB takes them as a statement only as its
/// first word (which the statement-start check covers) or after a WITH list (`WITH x AS (...)
/// DELETE FROM t`), so the guard refuses one only there and where a nested statement would have
/// to begin, and only when the next token does not show it to be an operand (see
/// `Rewriter::check_every_token`).
pub(super) const STATEMENT_WORDS: [&str; 32] = [
    "ABORT",
    "ALTER",
    "ATTACH",
    "BEGIN",
    "CALL",
    "CHECKPOINT",
    "COMMENT",
    "COMMIT",
    "COPY",
    "DEALLOCATE",
    "DELETE",
    "DETACH",
    "DROP",
    "EXECUTE",
    "EXPLAIN",
    "EXPORT",
    "FORCE",
    "IMPORT",
    "INSERT",
    "INSTALL",
    "LOAD",
    "MERGE",
    "PRAGMA",
    "PREPARE",
    "RESET",
    "ROLLBACK",
    "SET",
    "START",
    "TRUNCATE",
    "UPDATE",
    "USE",
    "VACUUM",
];

/// Keywords that may follow a column name first in a parenthesized group and continue the
/// expression (`(load IS NULL)`, `cast(load AS DOUBLE)`, `(load BETWEEN 1 AND 2)`,
/// `string_agg(load ORDER BY time)`, `last_value(load IGNORE NULLS)`, `UNPIVOT (load FOR k IN
/// ...)`, `overlay(load PLACING ...)`). None of them is the second word of a statement that a
/// [`STATEMENT_WORDS`] word starts, except `OR` in `INSERT OR REPLACE` and `ATTACH OR REPLACE`,
/// which the caller excludes.
pub(super) const EXPRESSION_CONTINUATIONS: [&str; 21] = [
    "AND", "AS", "AT", "BETWEEN", "COLLATE", "FOR", "GLOB", "IGNORE", "ILIKE", "IN", "IS",
    "ISNULL", "LIKE", "NOT", "NOTNULL", "OR", "ORDER", "OVERLAPS", "PLACING", "RESPECT", "SIMILAR",
];

/// Keywords a statement may start with. Everything else is refused and named in the error.
pub(super) const STATEMENT_KEYWORDS_ALLOWED: [&str; 6] =
    ["DESC", "DESCRIBE", "FROM", "SELECT", "SUMMARIZE", "WITH"];

/// Table functions a FROM clause may call. They generate rows from their arguments only.
pub const FROM_FUNCTIONS_ALLOWED: [&str; 3] = ["generate_series", "range", "unnest"];

/// Functions refused anywhere by exact name: they read files, run SQL given as a string, reveal
/// configuration or the catalog, write logs, or block a query thread.
const FUNCTIONS_REFUSED: [&str; 17] = [
    "checkpoint",
    "current_setting",
    "force_checkpoint",
    "format_type",
    "get_block_size",
    "getenv",
    "getvariable",
    "glob",
    "histogram_values",
    "pg_sleep",
    "query",
    "query_table",
    "sleep_ms",
    "sniff_csv",
    "sql_auto_complete",
    "which_secret",
    "write_log",
];

/// Function name prefixes refused anywhere: file readers (`read_csv`, `read_parquet`,
/// `read_text`, ...), catalog and settings functions (`duckdb_settings`, `pragma_table_info`),
/// scanners and attachers of other systems, logging and profiling switches, and catalog macros
/// (`pg_get_viewdef`) that run table functions internally.
const FUNCTION_PREFIXES_REFUSED: [&str; 20] = [
    "arrow_",
    "delta_",
    "disable_",
    "duckdb_",
    "ducklake_",
    "enable_",
    "http",
    "iceberg_",
    "json_execute",
    "load_",
    "mysql_",
    "parquet_",
    "pg_get_",
    "postgres_",
    "pragma_",
    "read_",
    "s3_",
    "sqlite_",
    "st_read",
    "truncate_duckdb",
];

/// Function name suffixes refused anywhere: `*_scan` (`parquet_scan`, `iceberg_scan`, ...),
/// `*_attach`, `*_query` and `*_execute` (which run SQL on another system).
const FUNCTION_SUFFIXES_REFUSED: [&str; 4] = ["_attach", "_execute", "_query", "_scan"];

/// Whether a function call by this name is refused. Names outside ASCII are refused too: DuckDB
/// has no such built-in function, and refusing them avoids any question of how DuckDB folds
/// their case.
pub(super) fn is_function_refused(name: &str) -> bool {
    if !name.is_ascii() {
        return true;
    }
    let lower = name.to_ascii_lowercase();
    FUNCTIONS_REFUSED.contains(&lower.as_str())
        || FUNCTION_PREFIXES_REFUSED
            .iter()
            .any(|prefix| lower.starts_with(prefix))
        || FUNCTION_SUFFIXES_REFUSED
            .iter()
            .any(|suffix| lower.ends_with(suffix))
}

/// Whether a FROM clause may call this table function.
pub(super) fn is_from_function_allowed(name: &str) -> bool {
    FROM_FUNCTIONS_ALLOWED
        .iter()
        .any(|allowed| name.eq_ignore_ascii_case(allowed))
}

/// DuckDB 1.5's reserved keywords together with its type- and function-name keywords
/// (`third_party/libpg_query/grammar/keywords/*.list`): none of these can be an unquoted table
/// name, CTE name or alias (the grammar's `ColId`). The guard relies on this to tell
/// `FROM db.m x` (alias) from `FROM db.m JOIN ...`, and refuses an unquoted reserved word where a
/// table name should be (`FROM ONLY "file.csv"` would otherwise read a file).
const RESERVED: [&str; 110] = [
    "ALL",
    "ANALYSE",
    "ANALYZE",
    "AND",
    "ANTI",
    "ANY",
    "ARRAY",
    "AS",
    "ASC",
    "ASOF",
    "ASYMMETRIC",
    "AT",
    "AUTHORIZATION",
    "BINARY",
    "BOTH",
    "BY",
    "CASE",
    "CAST",
    "CHECK",
    "COLLATE",
    "COLLATION",
    "COLUMN",
    "COLUMNS",
    "CONCURRENTLY",
    "CONSTRAINT",
    "CREATE",
    "CROSS",
    "DEFAULT",
    "DEFERRABLE",
    "DESC",
    "DESCRIBE",
    "DISTINCT",
    "DO",
    "ELSE",
    "END",
    "EXCEPT",
    "FALSE",
    "FETCH",
    "FOR",
    "FOREIGN",
    "FREEZE",
    "FROM",
    "FULL",
    "GENERATED",
    "GLOB",
    "GROUP",
    "HAVING",
    "ILIKE",
    "IN",
    "INITIALLY",
    "INNER",
    "INTERSECT",
    "INTO",
    "IS",
    "ISNULL",
    "JOIN",
    "LAMBDA",
    "LATERAL",
    "LEADING",
    "LEFT",
    "LIKE",
    "LIMIT",
    "MAP",
    "NATURAL",
    "NOT",
    "NOTNULL",
    "NULL",
    "OFFSET",
    "ON",
    "ONLY",
    "OR",
    "ORDER",
    "OUTER",
    "OVERLAPS",
    "PIVOT",
    "PIVOT_LONGER",
    "PIVOT_WIDER",
    "PLACING",
    "POSITIONAL",
    "PRIMARY",
    "QUALIFY",
    "REFERENCES",
    "RETURNING",
    "RIGHT",
    "SELECT",
    "SEMI",
    "SHOW",
    "SIMILAR",
    "SOME",
    "STRUCT",
    "SUMMARIZE",
    "SYMMETRIC",
    "TABLE",
    "TABLESAMPLE",
    "THEN",
    "TO",
    "TRAILING",
    "TRUE",
    "TRY_CAST",
    "UNION",
    "UNIQUE",
    "UNPACK",
    "UNPIVOT",
    "USING",
    "VARIADIC",
    "VERBOSE",
    "WHEN",
    "WHERE",
    "WINDOW",
    "WITH",
];

/// Whether an unquoted word is a keyword that cannot name a table, CTE or alias.
pub(super) fn is_reserved(word: &str) -> bool {
    is_one_of(word, &RESERVED)
}

/// Words that may precede `JOIN` in a join: `LEFT OUTER JOIN`, `NATURAL JOIN`, `ASOF LEFT JOIN`.
pub(super) const JOIN_WORDS: [&str; 11] = [
    "ANTI",
    "ASOF",
    "CROSS",
    "FULL",
    "INNER",
    "LEFT",
    "NATURAL",
    "OUTER",
    "POSITIONAL",
    "RIGHT",
    "SEMI",
];

/// Words that end a FROM clause (the clauses that may follow it, a set operation, FROM-first
/// syntax's SELECT). `USING` ends it only before `SAMPLE`; that case is checked apart.
pub(super) const FROM_CLAUSE_ENDS: [&str; 16] = [
    "EXCEPT",
    "FETCH",
    "FOR",
    "GROUP",
    "HAVING",
    "INTERSECT",
    "INTO",
    "LIMIT",
    "OFFSET",
    "ORDER",
    "QUALIFY",
    "RETURNING",
    "SELECT",
    "UNION",
    "WHERE",
    "WINDOW",
];

/// Functions whose parentheses use `FROM` as an argument separator (`extract(hour FROM time)`,
/// `substring(s FROM 2)`, `trim(BOTH 'x' FROM s)`, `overlay(s PLACING t FROM 2)`), so a `FROM`
/// directly inside them does not start a FROM clause.
pub(super) const FROM_ARGUMENT_FUNCTIONS: [&str; 4] = ["EXTRACT", "OVERLAY", "SUBSTRING", "TRIM"];

/// Words that continue a query after a parenthesized first operand: `(SELECT 1) UNION ...`.
pub(super) const QUERY_CONTINUATIONS: [&str; 8] = [
    "EXCEPT",
    "FETCH",
    "FOR",
    "INTERSECT",
    "LIMIT",
    "OFFSET",
    "ORDER",
    "UNION",
];

/// Words that start a query inside parentheses, so `( ... )` in FROM is a subquery and not a
/// parenthesized join. `TABLE`, `SHOW` and the PIVOT forms are refused later, wherever they are.
pub(super) const QUERY_STARTS: [&str; 12] = [
    "DESC",
    "DESCRIBE",
    "FROM",
    "PIVOT",
    "PIVOT_LONGER",
    "PIVOT_WIDER",
    "SELECT",
    "SHOW",
    "SUMMARIZE",
    "TABLE",
    "VALUES",
    "WITH",
];

/// Whether `word` equals one of `list`, ignoring ASCII case. `list` must be sorted and upper case
/// (the keyword lists here are, and a test keeps them so): this runs for most tokens of a query,
/// so it is a binary search that upper-cases `word` on the fly instead of allocating.
pub(super) fn is_one_of(word: &str, list: &[&str]) -> bool {
    debug_assert!(list.windows(2).all(|pair| pair[0] < pair[1]), "{list:?}");
    list.binary_search_by(|entry| {
        entry
            .bytes()
            .cmp(word.bytes().map(|byte| byte.to_ascii_uppercase()))
    })
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The refused-function test covers exact names, prefixes and suffixes in any case, and leaves
    // ordinary functions (including ones whose names merely contain a refused word) alone.
    #[test]
    fn refused_functions() {
        for refused in [
            "read_csv",
            "READ_CSV_AUTO",
            "ReAd_PaRqUeT",
            "parquet_scan",
            "parquet_metadata",
            "read_json_objects",
            "read_ndjson_auto",
            "read_text",
            "read_blob",
            "glob",
            "sniff_csv",
            "iceberg_scan",
            "delta_scan",
            "sqlite_scan",
            "postgres_scan",
            "mysql_scan",
            "read_xlsx",
            "st_read",
            "getenv",
            "current_setting",
            "duckdb_settings",
            "duckdb_extensions",
            "duckdb_secrets",
            "which_secret",
            "load_extension",
            "query",
            "query_table",
            "pragma_table_info",
            "json_execute_serialized_sql",
            "sleep_ms",
            "pg_get_viewdef",
            "postgres_query",
            "enable_logging",
            "\u{e9}",
        ] {
            assert!(is_function_refused(refused), "{refused}");
        }
        for allowed in [
            "avg",
            "date_trunc",
            "time_bucket",
            "epoch_us",
            "now",
            "count",
            "row_number",
            "range",
            "unnest",
            "thread",
            "spread",
            "queryable",
            "pg_typeof",
        ] {
            assert!(!is_function_refused(allowed), "{allowed}");
        }
    }

    // The lists are written sorted and upper case so that a reviewer can compare them with
    // DuckDB's keyword files; this keeps them that way.
    #[test]
    fn lists_are_sorted_and_upper_case() {
        for list in [
            &KEYWORDS_REFUSED[..],
            &STATEMENT_WORDS,
            &EXPRESSION_CONTINUATIONS,
            &STATEMENT_KEYWORDS_ALLOWED,
            &RESERVED,
            &JOIN_WORDS,
            &FROM_CLAUSE_ENDS,
            &FROM_ARGUMENT_FUNCTIONS,
            &QUERY_CONTINUATIONS,
            &QUERY_STARTS,
        ] {
            assert!(list.windows(2).all(|pair| pair[0] < pair[1]), "{list:?}");
            assert!(list.iter().all(|word| word.to_ascii_uppercase() == *word));
        }
        for list in [
            &FUNCTIONS_REFUSED[..],
            &FUNCTION_PREFIXES_REFUSED,
            &FUNCTION_SUFFIXES_REFUSED,
            &FROM_FUNCTIONS_ALLOWED,
        ] {
            assert!(list.windows(2).all(|pair| pair[0] < pair[1]), "{list:?}");
            assert!(list.iter().all(|word| word.to_ascii_lowercase() == *word));
        }
    }
}
