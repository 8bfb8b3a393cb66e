//! Tests of the SQL guard through its public API: queries it must accept and rewrite, escape
//! attempts it must refuse, and property tests.

use proptest::prelude::*;

use super::*;

fn limits() -> GuardLimits {
    GuardLimits::default()
}

/// Checks `sql`, panicking with the error if the guard refuses it.
fn must_check(sql: &str, default_database: Option<&str>) -> CheckedQuery {
    check(sql, default_database, &limits())
        .unwrap_or_else(|error| panic!("guard refused {sql:?}: {error}"))
}

/// Checks `sql`, panicking with the rewrite if the guard accepts it.
fn must_refuse(sql: &str, default_database: Option<&str>) -> GuardError {
    match check(sql, default_database, &limits()) {
        Ok(checked) => panic!("guard accepted {sql:?} as {:?}", checked.sql),
        Err(error) => error,
    }
}

fn table(database: &str, measurement: &str) -> TableRef {
    TableRef {
        database: database.to_string(),
        measurement: measurement.to_string(),
    }
}

fn placeholders(tables: &[(&str, &str)]) -> Vec<(String, TableRef)> {
    tables
        .iter()
        .enumerate()
        .map(|(index, (database, measurement))| {
            (format!("__shale_t{index}"), table(database, measurement))
        })
        .collect()
}

/// Asserts the exact rewrite and table list of an accepted query.
fn assert_rewrite(
    sql: &str,
    default_database: Option<&str>,
    expected: &str,
    tables: &[(&str, &str)],
) {
    let checked = must_check(sql, default_database);
    assert_eq!(checked.sql, expected, "rewrite of {sql:?}");
    assert_eq!(checked.tables, placeholders(tables), "tables of {sql:?}");
}

// ------------------------------------------------------------------------------------------------
// Accepted queries.

// The basic case: a qualified table becomes a placeholder aliased by its measurement, so
// `cpu.host` still resolves, and the rest of the text is kept as written.
#[test]
fn simple_select() {
    assert_rewrite(
        "SELECT cpu.host, usage FROM metrics.cpu WHERE time > now() - INTERVAL 1 hour",
        None,
        "SELECT cpu.host, usage FROM \"__shale_t0\" AS \"cpu\" WHERE time > now() - INTERVAL 1 hour",
        &[("metrics", "cpu")],
    );
    assert_rewrite("select 1", None, "select 1", &[]);
    assert_rewrite(
        "  SELECT * FROM metrics.cpu;  ",
        None,
        "SELECT * FROM \"__shale_t0\" AS \"cpu\"",
        &[("metrics", "cpu")],
    );
}

// A written alias, in any of DuckDB's forms, is kept and no second alias is added.
#[test]
fn aliases() {
    let expected_tables = [("metrics", "cpu")];
    assert_rewrite(
        "SELECT c.host FROM metrics.cpu AS c",
        None,
        "SELECT c.host FROM \"__shale_t0\" AS c",
        &expected_tables,
    );
    assert_rewrite(
        "SELECT c.host FROM metrics.cpu c",
        None,
        "SELECT c.host FROM \"__shale_t0\" c",
        &expected_tables,
    );
    assert_rewrite(
        "SELECT \"C\".a FROM metrics.cpu \"C\"(a, b)",
        None,
        "SELECT \"C\".a FROM \"__shale_t0\" \"C\"(a, b)",
        &expected_tables,
    );
    assert_rewrite(
        "SELECT * FROM metrics.cpu AS 'c'",
        None,
        "SELECT * FROM \"__shale_t0\" AS 'c'",
        &expected_tables,
    );
    // DuckDB's prefix alias.
    assert_rewrite(
        "SELECT * FROM c: metrics.cpu",
        None,
        "SELECT * FROM c: \"__shale_t0\"",
        &expected_tables,
    );
    // A quoted alias written right after the name stays a separate identifier.
    assert_rewrite(
        "SELECT * FROM metrics.cpu\"c\"",
        None,
        "SELECT * FROM \"__shale_t0\" \"c\"",
        &expected_tables,
    );
}

// Every join form names its tables after the JOIN keywords; ON and USING stay expressions.
#[test]
fn joins() {
    assert_rewrite(
        "SELECT * FROM metrics.cpu c JOIN metrics.mem m ON c.host = m.host \
         LEFT OUTER JOIN metrics.disk USING (host)",
        None,
        "SELECT * FROM \"__shale_t0\" c JOIN \"__shale_t1\" m ON c.host = m.host \
         LEFT OUTER JOIN \"__shale_t2\" AS \"disk\" USING (host)",
        &[("metrics", "cpu"), ("metrics", "mem"), ("metrics", "disk")],
    );
    assert_rewrite(
        "SELECT * FROM metrics.cpu, metrics.mem",
        None,
        "SELECT * FROM \"__shale_t0\" AS \"cpu\", \"__shale_t1\" AS \"mem\"",
        &[("metrics", "cpu"), ("metrics", "mem")],
    );
    for join in [
        "JOIN",
        "INNER JOIN",
        "RIGHT JOIN",
        "FULL OUTER JOIN",
        "ASOF JOIN",
        "ASOF LEFT JOIN",
        "SEMI JOIN",
        "ANTI JOIN",
    ] {
        let sql = format!("SELECT * FROM a.x {join} b.y ON x.t >= y.t");
        assert_eq!(
            must_check(&sql, None).tables,
            placeholders(&[("a", "x"), ("b", "y")]),
            "{sql}"
        );
    }
    for join in ["CROSS JOIN", "NATURAL JOIN", "POSITIONAL JOIN"] {
        let sql = format!("SELECT * FROM a.x {join} b.y WHERE 1 = 1");
        assert_eq!(
            must_check(&sql, None).tables,
            placeholders(&[("a", "x"), ("b", "y")]),
            "{sql}"
        );
    }
    // A parenthesized join, and ON conditions stacked after nested joins.
    assert_rewrite(
        "SELECT * FROM (a.x JOIN b.y USING (t)) j, a.x JOIN b.y JOIN c.z ON true ON left(x.h, 1) = 'a'",
        None,
        "SELECT * FROM (\"__shale_t0\" AS \"x\" JOIN \"__shale_t1\" AS \"y\" USING (t)) j, \
         \"__shale_t0\" AS \"x\" JOIN \"__shale_t1\" AS \"y\" JOIN \"__shale_t2\" AS \"z\" ON true \
         ON left(x.h, 1) = 'a'",
        &[("a", "x"), ("b", "y"), ("c", "z")],
    );
}

// A table used twice gets one placeholder and one entry, so the engine builds it once.
#[test]
fn same_table_twice() {
    assert_rewrite(
        "SELECT * FROM metrics.cpu a JOIN metrics.cpu b ON a.time = b.time \
         WHERE a.host IN (SELECT host FROM metrics.cpu)",
        None,
        "SELECT * FROM \"__shale_t0\" a JOIN \"__shale_t0\" b ON a.time = b.time \
         WHERE a.host IN (SELECT host FROM \"__shale_t0\" AS \"cpu\")",
        &[("metrics", "cpu")],
    );
}

// Subqueries anywhere (FROM, WHERE, the select list, EXISTS, LATERAL) are checked too.
#[test]
fn subqueries() {
    assert_rewrite(
        "SELECT s.host, (SELECT max(v) FROM a.x) FROM (SELECT host FROM a.y) s \
         WHERE EXISTS (FROM a.z WHERE z.host = s.host) AND s.host IN (SELECT host FROM a.y)",
        None,
        "SELECT s.host, (SELECT max(v) FROM \"__shale_t0\" AS \"x\") FROM (SELECT host FROM \
         \"__shale_t1\" AS \"y\") s WHERE EXISTS (FROM \"__shale_t2\" AS \"z\" WHERE z.host = \
         s.host) AND s.host IN (SELECT host FROM \"__shale_t1\" AS \"y\")",
        &[("a", "x"), ("a", "y"), ("a", "z")],
    );
    assert_rewrite(
        "SELECT * FROM a.x, LATERAL (SELECT * FROM a.y WHERE y.t = x.t) l",
        None,
        "SELECT * FROM \"__shale_t0\" AS \"x\", LATERAL (SELECT * FROM \"__shale_t1\" AS \"y\" \
         WHERE y.t = x.t) l",
        &[("a", "x"), ("a", "y")],
    );
    // Parenthesized queries in FROM, including set operations whose first operand is in
    // parentheses, and doubled parentheses.
    assert_rewrite(
        "SELECT * FROM ((SELECT 1 AS v FROM a.x) UNION ALL (SELECT 2 FROM a.y)) u, ((a.z))",
        None,
        "SELECT * FROM ((SELECT 1 AS v FROM \"__shale_t0\" AS \"x\") UNION ALL (SELECT 2 FROM \
         \"__shale_t1\" AS \"y\")) u, ((\"__shale_t2\" AS \"z\"))",
        &[("a", "x"), ("a", "y"), ("a", "z")],
    );
}

// CTE names are left for DuckDB to resolve while they are in scope, and only then.
#[test]
fn common_table_expressions() {
    assert_rewrite(
        "WITH x AS (SELECT host, avg(v) AS v FROM metrics.cpu GROUP BY host), \
         y AS MATERIALIZED (SELECT * FROM X WHERE v > 1) SELECT * FROM x JOIN y USING (host)",
        None,
        "WITH x AS (SELECT host, avg(v) AS v FROM \"__shale_t0\" AS \"cpu\" GROUP BY host), \
         y AS MATERIALIZED (SELECT * FROM X WHERE v > 1) SELECT * FROM x JOIN y USING (host)",
        &[("metrics", "cpu")],
    );
    // Visible in nested subqueries and in later CTE bodies; quoted names match unquoted ones
    // ignoring ASCII case, as in DuckDB.
    assert_rewrite(
        "WITH \"Recent\"(h) AS NOT MATERIALIZED (FROM metrics.cpu SELECT host) \
         SELECT * FROM (SELECT * FROM recent) r WHERE h IN (SELECT h FROM RECENT)",
        None,
        "WITH \"Recent\"(h) AS NOT MATERIALIZED (FROM \"__shale_t0\" AS \"cpu\" SELECT host) \
         SELECT * FROM (SELECT * FROM recent) r WHERE h IN (SELECT h FROM RECENT)",
        &[("metrics", "cpu")],
    );
    // A CTE is not visible in its own body, before its definition, or outside the parentheses
    // its WITH is in: there a bare name is a table of the default database.
    assert_rewrite(
        "WITH cpu AS (SELECT * FROM cpu), a AS (SELECT * FROM b), b AS (SELECT 1) \
         SELECT * FROM (WITH mem AS (SELECT 1) SELECT * FROM mem) s, mem, cpu",
        Some("metrics"),
        "WITH cpu AS (SELECT * FROM \"__shale_t0\" AS \"cpu\"), a AS (SELECT * FROM \
         \"__shale_t1\" AS \"b\"), b AS (SELECT 1) SELECT * FROM (WITH mem AS (SELECT 1) SELECT * \
         FROM mem) s, \"__shale_t2\" AS \"mem\", cpu",
        &[("metrics", "cpu"), ("metrics", "b"), ("metrics", "mem")],
    );
    // An inner CTE body sees an outer CTE of the same name (DuckDB resolves it the same way).
    assert_rewrite(
        "WITH x AS (SELECT 1) SELECT * FROM (WITH x AS (SELECT * FROM x) SELECT * FROM x)",
        None,
        "WITH x AS (SELECT 1) SELECT * FROM (WITH x AS (SELECT * FROM x) SELECT * FROM x)",
        &[],
    );
}

// DuckDB's FROM-first syntax: a FROM clause may start the query, alone or before SELECT.
#[test]
fn from_first() {
    assert_rewrite(
        "FROM metrics.cpu",
        None,
        "FROM \"__shale_t0\" AS \"cpu\"",
        &[("metrics", "cpu")],
    );
    assert_rewrite(
        "FROM metrics.cpu c SELECT c.host, count(*) GROUP BY ALL",
        None,
        "FROM \"__shale_t0\" c SELECT c.host, count(*) GROUP BY ALL",
        &[("metrics", "cpu")],
    );
}

// Quoted names are unquoted before validation, so hyphens and keywords can be written.
#[test]
fn quoted_identifiers() {
    assert_rewrite(
        "SELECT * FROM \"my-db\".\"disk-io\" JOIN \"metrics\" . cpu USING (host)",
        None,
        "SELECT * FROM \"__shale_t0\" AS \"disk-io\" JOIN \"__shale_t1\" AS \"cpu\" USING (host)",
        &[("my-db", "disk-io"), ("metrics", "cpu")],
    );
    // Any word may follow a dot, keywords included; case is kept as written.
    assert_rewrite(
        "SELECT * FROM Metrics.Select",
        None,
        "SELECT * FROM \"__shale_t0\" AS \"Select\"",
        &[("Metrics", "Select")],
    );
}

// With the x-arc-database header, a bare name is a measurement of that database.
#[test]
fn default_database() {
    assert_rewrite(
        "SELECT * FROM cpu JOIN \"disk-io\" d USING (host), other.mem",
        Some("metrics"),
        "SELECT * FROM \"__shale_t0\" AS \"cpu\" JOIN \"__shale_t1\" d USING (host), \
         \"__shale_t2\" AS \"mem\"",
        &[("metrics", "cpu"), ("metrics", "disk-io"), ("other", "mem")],
    );
}

// Literals are data: SQL inside them is neither rewritten nor checked, and comments are dropped
// (each becomes one space) without touching comment-like text in literals.
#[test]
fn literals_and_comments() {
    let sql = "SELECT 'FROM db.m', 'read_csv(''x'')', ';', '--', '/*', $$ COPY ; $$, \
               $t$ $$ ' $t$, E'\\' FROM x', \"a;b\" FROM metrics.cpu";
    let checked = must_check(sql, None);
    assert_eq!(
        checked.sql,
        sql.replace("FROM metrics.cpu", "FROM \"__shale_t0\" AS \"cpu\"")
    );
    assert_eq!(checked.tables, placeholders(&[("metrics", "cpu")]));

    assert_rewrite(
        "-- leading\nSELECT /* a /* nested */ comment */ host -- trailing\nFROM metrics.cpu /* x */",
        None,
        "SELECT   host  \nFROM \"__shale_t0\" AS \"cpu\"",
        &[("metrics", "cpu")],
    );
    // A comment inside a table reference disappears with the reference.
    assert_rewrite(
        "SELECT 1 FROM metrics/* x */./* y */cpu",
        None,
        "SELECT 1 FROM \"__shale_t0\" AS \"cpu\"",
        &[("metrics", "cpu")],
    );
}

// Everyday time-series SQL: time functions, windows, GROUP BY ALL, QUALIFY, DuckDB expression
// syntax, generator table functions, sampling and PIVOT all pass.
#[test]
fn time_series_queries() {
    let queries = [
        "SELECT time_bucket(INTERVAL '5 minutes', time) AS bucket, host, avg(usage_user) \
         FROM metrics.cpu WHERE time >= now() - INTERVAL 1 hour GROUP BY ALL ORDER BY bucket",
        "SELECT date_trunc('hour', time) AS hour, epoch_us(time), max(v) FROM metrics.cpu \
         WHERE time BETWEEN TIMESTAMP '2024-01-01' AND TIMESTAMP '2024-01-02' GROUP BY 1, 2",
        "SELECT host, usage, row_number() OVER (PARTITION BY host ORDER BY time DESC) AS rn \
         FROM metrics.cpu QUALIFY rn = 1",
        "SELECT host, lag(v) OVER w, avg(v) OVER (w ROWS BETWEEN 5 PRECEDING AND CURRENT ROW) \
         FROM metrics.cpu WINDOW w AS (PARTITION BY host ORDER BY time)",
        "SELECT extract(hour FROM time), substring(host FROM 2 FOR 3), trim(BOTH 'x' FROM host), \
         overlay(host PLACING 'y' FROM 1), position('a' IN host) FROM metrics.cpu",
        "SELECT * FROM metrics.cpu WHERE host IS DISTINCT FROM 'a' AND v IS NOT DISTINCT FROM 1",
        "SELECT v::DOUBLE, CAST(time AS TIMESTAMP WITH TIME ZONE), {'a': 1} AS s, [1, 2][1], \
         list_transform([1, 2], x -> x + 1), COLUMNS('usage_.*') FROM metrics.cpu",
        "SELECT * EXCLUDE (host), count(*) FILTER (WHERE v > 0) FROM metrics.cpu GROUP BY ALL",
        "SELECT * FROM metrics.cpu USING SAMPLE 10%",
        "SELECT * FROM metrics.cpu TABLESAMPLE reservoir(100 ROWS) REPEATABLE (1) WHERE v > 1",
        "SELECT r.range, u.x FROM range(10) r, unnest([1, 2]) AS u(x), \
         generate_series(TIMESTAMP '2024-01-01', TIMESTAMP '2024-01-02', INTERVAL 1 hour) g",
        "SELECT * FROM (VALUES (1, 'a'), (2, 'b')) v(id, name), VALUES (3) w(z)",
        "SELECT host FROM metrics.cpu UNION ALL SELECT host FROM metrics.cpu \
         ORDER BY 1 LIMIT 10 OFFSET 5",
        "SELECT * FROM metrics.cpu PIVOT (avg(v) FOR host IN ('a', 'b')) p",
        "SELECT * FROM metrics.cpu UNPIVOT INCLUDE NULLS (v FOR k IN (usage_user, usage_idle))",
        "SELECT #1, host FROM metrics.cpu ORDER BY #1 DESC NULLS LAST",
        "SELECT a: 1, lambda x: x FROM metrics.cpu",
        "SELECT 1e-3, .5, 1_000, 2.5E+2, 'a' || 'b', 7 // 2, 2 ** 3, 'x' ~~ 'y'",
    ];
    for sql in queries {
        let checked = must_check(sql, None);
        let expected_tables = if sql.contains("metrics.cpu") {
            placeholders(&[("metrics", "cpu")])
        } else {
            Vec::new()
        };
        assert_eq!(checked.tables, expected_tables, "{sql}");
        assert_eq!(
            checked.sql,
            sql.replace("FROM metrics.cpu", "FROM \"__shale_t0\" AS \"cpu\""),
            "{sql}"
        );
    }
}

// `db.m.col` is a column outside FROM and stays as written.
#[test]
fn three_part_column_reference() {
    assert_rewrite(
        "SELECT metrics.cpu.host FROM metrics.cpu",
        None,
        "SELECT metrics.cpu.host FROM \"__shale_t0\" AS \"cpu\"",
        &[("metrics", "cpu")],
    );
}

// DESCRIBE and SUMMARIZE of a table or a query, at the top or as a subquery, name their tables.
#[test]
fn describe_and_summarize() {
    assert_rewrite(
        "DESCRIBE metrics.cpu",
        None,
        "DESCRIBE \"__shale_t0\"",
        &[("metrics", "cpu")],
    );
    assert_rewrite(
        "SUMMARIZE cpu;",
        Some("metrics"),
        "SUMMARIZE \"__shale_t0\"",
        &[("metrics", "cpu")],
    );
    assert_rewrite(
        "SUMMARIZE SELECT host FROM metrics.cpu",
        None,
        "SUMMARIZE SELECT host FROM \"__shale_t0\" AS \"cpu\"",
        &[("metrics", "cpu")],
    );
    assert_rewrite(
        "SELECT column_name FROM (DESC metrics.cpu)",
        None,
        "SELECT column_name FROM (DESC \"__shale_t0\")",
        &[("metrics", "cpu")],
    );
}

// Literal tricks: a backslash does not end a standard string, so SQL after it is checked; an
// E-string's \' does not end it, so what follows is only text.
#[test]
fn string_escape_tricks() {
    // DuckDB reads '\' as a one-backslash string, so `(FROM "f.csv")` is code and is refused.
    assert_eq!(
        must_refuse("SELECT '\\' , (FROM \"f.csv\") --'", None),
        GuardError::UnqualifiedTable {
            name: "f.csv".to_string()
        }
    );
    // In an E-string \' is an escaped quote: all of it is one literal, harmless.
    assert_rewrite(
        "SELECT E'\\' , (FROM \"f.csv\") --'",
        None,
        "SELECT E'\\' , (FROM \"f.csv\") --'",
        &[],
    );
    // A dollar string ends only at its own tag.
    assert_eq!(
        must_refuse("SELECT $a$ $b$ $a$, (FROM \"f.csv\")", Some("metrics")),
        GuardError::InvalidMeasurement {
            name: "f.csv".to_string(),
            reason: crate::names::NameError::InvalidCharacter('.')
        }
    );
}

// Comment tricks: text inside comments never counts, comments nest as in DuckDB, and `--` inside
// a string is not a comment.
#[test]
fn comment_tricks() {
    // Harmless: the COPY is inside a comment, and the output no longer contains it.
    assert_rewrite("SELECT 1 /* ; COPY */", None, "SELECT 1", &[]);
    assert_rewrite("SELECT '--' , 1", None, "SELECT '--' , 1", &[]);
    // A tokenizer without nesting would end the comment at the first */ and see `; COPY`;
    // DuckDB nests, so the comment is unterminated.
    assert_eq!(
        must_refuse("SELECT 1 /* /* */ ; COPY (SELECT 1) TO '/tmp/x'", None),
        GuardError::Unterminated {
            what: "block comment",
            offset: 9
        }
    );
    // `--` inside a string does not hide what follows it.
    assert_eq!(
        must_refuse("SELECT '--', read_csv('/etc/passwd')", None),
        GuardError::FunctionNotAllowed {
            name: "read_csv".to_string()
        }
    );
    // A line comment ends at \r as well as \n.
    assert_eq!(
        must_refuse("SELECT 1 -- x\r; DROP TABLE t", None),
        GuardError::MultipleStatements
    );
}

// ------------------------------------------------------------------------------------------------
// Refused queries.

fn function_not_allowed(name: &str) -> GuardError {
    GuardError::FunctionNotAllowed {
        name: name.to_string(),
    }
}

fn statement_not_allowed(keyword: &str) -> GuardError {
    GuardError::StatementNotAllowed {
        keyword: keyword.to_string(),
    }
}

// File readers are refused as table functions and as scalar calls, in any case, qualified or
// quoted, and with comments or whitespace between the name and its parenthesis.
#[test]
fn file_functions() {
    for (sql, name) in [
        ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
        ("SELECT read_csv('/etc/passwd')", "read_csv"),
        ("SELECT * FROM ReAd_CsV('/etc/passwd')", "ReAd_CsV"),
        ("SELECT * FROM read_csv /**/ ('x')", "read_csv"),
        ("SELECT * FROM read_csv\n\t('x')", "read_csv"),
        ("SELECT * FROM \"read_csv\"('x')", "read_csv"),
        ("SELECT * FROM main.read_csv('x')", "read_csv"),
        ("SELECT ('/etc/passwd').read_text()", "read_text"),
        ("SELECT * FROM read_parquet('data/**')", "read_parquet"),
        (
            "SELECT * FROM parquet_scan('data/x.parquet')",
            "parquet_scan",
        ),
        ("SELECT * FROM glob('/*')", "glob"),
        (
            "SELECT * FROM query('COPY (SELECT 1) TO ''/tmp/x''')",
            "query",
        ),
        ("SELECT * FROM query_table('x')", "query_table"),
        ("SELECT getenv('HOME')", "getenv"),
        (
            "SELECT current_setting('allowed_directories')",
            "current_setting",
        ),
        ("SELECT * FROM duckdb_settings()", "duckdb_settings"),
        (
            "SELECT (SELECT count(*) FROM duckdb_secrets())",
            "duckdb_secrets",
        ),
        ("SELECT * FROM pragma_table_info('x')", "pragma_table_info"),
        ("SELECT sleep_ms(100000)", "sleep_ms"),
        (
            "SELECT * FROM metrics.cpu WHERE EXISTS (SELECT 1 FROM iceberg_scan('s3://b/t'))",
            "iceberg_scan",
        ),
    ] {
        assert_eq!(must_refuse(sql, None), function_not_allowed(name), "{sql}");
    }
}

// A string in FROM is a file read in DuckDB; so is DESCRIBE/SUMMARIZE of a string.
#[test]
fn string_in_from() {
    for sql in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM metrics.cpu, 'data/x.parquet'",
        "SELECT * FROM metrics.cpu JOIN 'x.csv' USING (host)",
        "SUMMARIZE '/etc/passwd'",
        "SELECT * FROM t: 'x.csv'",
    ] {
        assert!(
            matches!(must_refuse(sql, None), GuardError::StringInFrom { .. }),
            "{sql}"
        );
    }
}

// Every statement other than a query is refused and named, in any letter case.
#[test]
fn statements() {
    for (sql, keyword) in [
        ("COPY (SELECT 1) TO '/tmp/x'", "COPY"),
        ("CoPy (SELECT 1) TO '/tmp/x'", "COPY"),
        ("ATTACH 'x.db'", "ATTACH"),
        ("INSTALL httpfs", "INSTALL"),
        ("LOAD httpfs", "LOAD"),
        ("SET enable_external_access = true", "SET"),
        ("RESET memory_limit", "RESET"),
        ("PRAGMA database_list", "PRAGMA"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
        ("DROP TABLE t", "DROP"),
        ("INSERT INTO t VALUES (1)", "INSERT"),
        ("UPDATE t SET a = 1", "UPDATE"),
        ("DELETE FROM t", "DELETE"),
        ("ALTER TABLE t ADD COLUMN c INT", "ALTER"),
        ("CALL pragma_version()", "CALL"),
        ("EXPORT DATABASE '/tmp/x'", "EXPORT"),
        ("IMPORT DATABASE '/tmp/x'", "IMPORT"),
        ("CHECKPOINT", "CHECKPOINT"),
        ("VACUUM", "VACUUM"),
        ("USE other", "USE"),
        ("BEGIN", "BEGIN"),
        ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN"),
        ("TABLE \"x.csv\"", "TABLE"),
        ("SHOW TABLES", "SHOW"),
        ("VALUES (1)", "VALUES"),
        ("PIVOT metrics.cpu ON host USING avg(v)", "PIVOT"),
    ] {
        assert_eq!(
            must_refuse(sql, None),
            statement_not_allowed(keyword),
            "{sql}"
        );
    }
}

// Reserved writing keywords are refused inside a query wherever they stand, and statement words
// wherever a nested statement would begin (first in parentheses, or after DESCRIBE) unless the
// next token makes them an operand.
#[test]
fn keywords_inside_queries() {
    for (sql, keyword) in [
        ("SELECT * INTO x FROM metrics.cpu", "INTO"),
        (
            "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
            "INSERT",
        ),
        (
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            "DELETE",
        ),
        (
            "WITH x AS MATERIALIZED (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x",
            "UPDATE",
        ),
        ("SELECT * FROM (TABLE \"x.csv\")", "TABLE"),
        ("SELECT * FROM (SHOW \"x.csv\")", "SHOW"),
        (
            "SELECT 1 FROM metrics.cpu WHERE (COPY metrics.cpu TO 'x')",
            "COPY",
        ),
        (
            "SELECT * FROM metrics.cpu, (COPY (SELECT 1) TO 'x')",
            "COPY",
        ),
        ("SELECT 1 WHERE 1 IN (SET threads = 1)", "SET"),
        ("SELECT EXISTS (ATTACH 'x.db' AS x)", "ATTACH"),
        ("SELECT (INSTALL httpfs)", "INSTALL"),
        ("SELECT (FORCE INSTALL httpfs)", "FORCE"),
        ("SELECT (LOAD 'httpfs')", "LOAD"),
        ("SELECT 1 UNION (PRAGMA database_list)", "PRAGMA"),
        ("SELECT (CALL pragma_version())", "CALL"),
        ("SELECT * FROM (EXPORT DATABASE 'x')", "EXPORT"),
        ("SELECT (RESET threads)", "RESET"),
        ("SELECT (DETACH x)", "DETACH"),
        ("SELECT (ATTACH OR REPLACE 'x.db')", "ATTACH"),
        ("SELECT (DROP TABLE t)", "DROP"),
        ("SELECT * FROM (EXPLAIN SELECT 1)", "EXPLAIN"),
        ("DESCRIBE COPY (SELECT 1) TO 'x'", "COPY"),
        ("SUMMARIZE load 'x'", "LOAD"),
        // DuckDB runs these: a WITH list may precede DELETE, UPDATE, INSERT and MERGE.
        ("WITH x AS (SELECT 1) DELETE FROM t", "DELETE"),
        (
            "WITH x AS NOT MATERIALIZED (SELECT 1) UPDATE t SET a = 1",
            "UPDATE",
        ),
        ("WITH x AS (SELECT 1) MERGE INTO t USING x ON true", "MERGE"),
    ] {
        assert_eq!(
            must_refuse(sql, None),
            GuardError::KeywordNotAllowed {
                keyword: keyword.to_string()
            },
            "{sql}"
        );
    }
    // Quoted, or after a dot (where DuckDB's grammar only allows a name), such a word is an
    // ordinary column or table name.
    must_check(
        "SELECT \"set\", \"load\", \"table\" FROM metrics.system",
        None,
    );
    assert_rewrite(
        "SELECT race.load, race . update FROM metrics.race",
        None,
        "SELECT race.load, race . update FROM \"__shale_t0\" AS \"race\"",
        &[("metrics", "race")],
    );
    assert_rewrite(
        "SELECT * FROM metrics.copy",
        None,
        "SELECT * FROM \"__shale_t0\" AS \"copy\"",
        &[("metrics", "copy")],
    );
}

/// Every word that starts a statement in DuckDB but is an unreserved keyword there, so it may be
/// an unquoted column name (the `rules` module's list, in lower case).
fn statement_words() -> Vec<String> {
    rules::STATEMENT_WORDS
        .iter()
        .map(|word| word.to_ascii_lowercase())
        .collect()
}

/// Runs `sql` on `connection` and returns its rows, each formatted as one string, sorted.
fn duckdb_rows(connection: &duckdb::Connection, sql: &str) -> Vec<String> {
    let mut statement = connection
        .prepare(sql)
        .unwrap_or_else(|error| panic!("DuckDB refused {sql:?}: {error}"));
    let mut rows = statement.query([]).unwrap();
    let mut formatted = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        let columns = row.as_ref().column_count();
        let values: Vec<String> = (0..columns)
            .map(|column| format!("{:?}", row.get::<_, duckdb::types::Value>(column).unwrap()))
            .collect();
        formatted.push(values.join(", "));
    }
    formatted.sort();
    formatted
}

// Issue 7: a field named like a statement word (`load`, `set`, `copy`, `call`, `export`,
// `install`, `attach`, `pragma`, ...) is queryable unquoted, as DuckDB itself allows: as a bare
// column in the select list, inside aggregates, in WHERE, GROUP BY, ORDER BY, as an output alias,
// first in parentheses before an operator or expression keyword, and in window clauses. The
// rewrite only replaces the table; run on DuckDB it gives the same rows as the same query with the
// word double-quoted, so DuckDB reads the word as the column. The old guard refused all of these.
#[test]
fn statement_words_are_column_names() {
    let templates = [
        "SELECT w FROM metrics.cpu",
        "SELECT host, avg(w), max(w) AS w, min((w)) FROM metrics.cpu GROUP BY host",
        "SELECT host FROM metrics.cpu WHERE w > 1 AND (w IS NOT NULL OR w BETWEEN 0 AND 1)",
        "SELECT host, w, count(*) FROM metrics.cpu GROUP BY host, w ORDER BY w DESC",
        "SELECT host AS w FROM metrics.cpu ORDER BY w",
        "SELECT cast(w AS INTEGER), (w), (w)::VARCHAR, (w + 1) * 2, [w], {'k': w}, cpu.w \
         FROM metrics.cpu",
        "SELECT host, w, usage FROM metrics.cpu WHERE w > 1 GROUP BY ALL ORDER BY ALL",
        "SELECT sum(w) OVER (PARTITION BY host ORDER BY w) FROM metrics.cpu",
        "SELECT host, first(w ORDER BY usage), string_agg(w::VARCHAR, ',' ORDER BY w) \
         FROM metrics.cpu GROUP BY host",
        "SELECT host FROM metrics.cpu WHERE w IN (1, 3) OR (w NOT IN (5) AND w::VARCHAR LIKE '%')",
    ];
    let connection = duckdb::Connection::open_in_memory().unwrap();
    for word in statement_words() {
        // The premise: DuckDB itself takes the word as a name.
        let category: String = connection
            .query_row(
                "SELECT keyword_category FROM duckdb_keywords() WHERE keyword_name = ?",
                [&word],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(category, "unreserved", "{word}");
        connection
            .execute_batch(&format!(
                "DROP TABLE IF EXISTS \"__shale_t0\"; \
                 CREATE TABLE \"__shale_t0\" AS SELECT * FROM (VALUES ('a', 1.0, 2.0), \
                 ('b', 3.0, 4.0), ('a', 5.0, 6.0)) v(host, \"{word}\", usage)"
            ))
            .unwrap();
        for template in templates {
            let sql = replace_word(template, "w", &word);
            let expected = sql.replace("FROM metrics.cpu", "FROM \"__shale_t0\" AS \"cpu\"");
            assert_rewrite(&sql, None, &expected, &[("metrics", "cpu")]);
            let quoted = replace_word(template, "w", &format!("\"{word}\""))
                .replace("FROM metrics.cpu", "FROM \"__shale_t0\" AS \"cpu\"");
            assert_eq!(
                duckdb_rows(&connection, &expected),
                duckdb_rows(&connection, &quoted),
                "{sql}"
            );
        }
    }
}

/// `template` with every whole word `from` (outside quotes) replaced by `to`.
fn replace_word(template: &str, from: &str, to: &str) -> String {
    let mut output = String::new();
    let mut word = String::new();
    let mut quoted = false;
    for character in template.chars().chain(std::iter::once(' ')) {
        if !quoted && (character.is_ascii_alphanumeric() || character == '_') {
            word.push(character);
            continue;
        }
        if !word.is_empty() {
            output.push_str(if word == from { to } else { &word });
            word.clear();
        }
        if character == '\'' {
            quoted = !quoted;
        }
        output.push(character);
    }
    output.pop();
    output
}

// Statement words name tables, CTEs and table aliases too: with a default database a bare
// `load` is measurement `load`, `WITH set AS (...)` is a CTE, `metrics.cpu copy` an alias. The
// old guard refused every one of these.
#[test]
fn statement_words_are_relation_names() {
    for word in statement_words() {
        assert_rewrite(
            &format!("SELECT * FROM {word} JOIN metrics.cpu AS {word}2 USING (host)"),
            Some("metrics"),
            &format!(
                "SELECT * FROM \"__shale_t0\" AS \"{word}\" JOIN \"__shale_t1\" AS {word}2 \
                 USING (host)"
            ),
            &[("metrics", &word), ("metrics", "cpu")],
        );
        assert_rewrite(
            &format!("DESCRIBE {word}"),
            Some("metrics"),
            "DESCRIBE \"__shale_t0\"",
            &[("metrics", &word)],
        );
        assert_rewrite(
            &format!(
                "WITH {word} AS (SELECT host FROM metrics.cpu {word}) SELECT {word}.host FROM \
                 {word}"
            ),
            None,
            &format!(
                "WITH {word} AS (SELECT host FROM \"__shale_t0\" {word}) SELECT {word}.host FROM \
                 {word}"
            ),
            &[("metrics", "cpu")],
        );
    }
}

// More than one statement is refused; one trailing semicolon is not.
#[test]
fn one_statement() {
    for sql in [
        "SELECT 1; DROP TABLE x",
        "SELECT 1;;",
        "SELECT (1; SELECT 2)",
        "SELECT 1; SELECT 2;",
    ] {
        assert_eq!(
            must_refuse(sql, None),
            GuardError::MultipleStatements,
            "{sql}"
        );
    }
    assert_rewrite("SELECT 1; -- done", None, "SELECT 1", &[]);
}

// Table references must be database.measurement with valid names; a bare name needs a CTE in
// scope or a default database.
#[test]
fn table_names() {
    assert_eq!(
        must_refuse("SELECT * FROM cpu", None),
        GuardError::UnqualifiedTable {
            name: "cpu".to_string()
        }
    );
    assert_eq!(
        must_refuse("SELECT * FROM a.b.c", None),
        GuardError::TooManyNameParts {
            name: "a.b.c".to_string(),
            parts: 3
        }
    );
    assert_eq!(
        must_refuse("DESCRIBE main.a.b", None),
        GuardError::TooManyNameParts {
            name: "main.a.b".to_string(),
            parts: 3
        }
    );
    assert_eq!(
        must_refuse("SELECT * FROM system.cpu", None),
        GuardError::InvalidDatabase {
            name: "system".to_string(),
            reason: crate::names::NameError::Reserved
        }
    );
    assert_eq!(
        must_refuse("SELECT * FROM \"x.csv\"", Some("metrics")),
        GuardError::InvalidMeasurement {
            name: "x.csv".to_string(),
            reason: crate::names::NameError::InvalidCharacter('.')
        }
    );
    assert_eq!(
        must_refuse("SELECT * FROM cpu", Some("1bad")),
        GuardError::InvalidDatabase {
            name: "1bad".to_string(),
            reason: crate::names::NameError::FirstNotLetter
        }
    );
    // Unquoted, `my-db.cpu` is `my - db.cpu`: refused with a hint to quote.
    let error = must_refuse("SELECT * FROM my-db.cpu", None);
    assert!(
        matches!(&error, GuardError::Unsupported { reason, .. } if reason.contains("double-quoted")),
        "{error:?}"
    );
}

// Ways DuckDB could resolve a bare name to a file or catalog table are closed: names outside
// their CTE's scope, keywords where a table name goes, and reserved placeholder names.
#[test]
fn relation_escapes() {
    for sql in [
        "SELECT * FROM \"f.csv\"",
        // Out of the subquery its WITH is in.
        "SELECT * FROM (WITH \"f.csv\" AS (SELECT 1) SELECT 1), \"f.csv\"",
        // In its own body.
        "WITH \"f.csv\" AS (SELECT * FROM \"f.csv\") SELECT * FROM \"f.csv\"",
        // Before its definition.
        "WITH a AS (SELECT * FROM \"f.csv\"), \"f.csv\" AS (SELECT 1) SELECT * FROM a",
        // DESCRIBE targets are never CTEs.
        "WITH \"f.csv\" AS (SELECT 1) SELECT * FROM (DESCRIBE \"f.csv\")",
        "SELECT * FROM (DESC \"f.csv\")",
    ] {
        assert_eq!(
            must_refuse(sql, None),
            GuardError::UnqualifiedTable {
                name: "f.csv".to_string()
            },
            "{sql}"
        );
    }
    for sql in [
        "SELECT * FROM ONLY \"f.csv\"",
        "WITH only AS (SELECT 1) SELECT * FROM ONLY \"f.csv\"",
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT * FROM t",
        "SELECT * FROM metrics.cpu AT (VERSION => 1)",
        "WITH rows AS (SELECT 1) SELECT * FROM ROWS FROM (range(3))",
        "SELECT * FROM metrics.cpu JOIN",
        "SELECT * FROM",
        "SELECT 1 JOIN metrics.cpu",
        "SELECT (SUMMARIZE metrics.cpu) IS NULL, SUMMARIZE",
        "SELECT * FROM (PIVOT metrics.cpu ON host USING avg(v))",
    ] {
        assert!(
            matches!(must_refuse(sql, None), GuardError::Unsupported { .. }),
            "{sql}: {:?}",
            check(sql, None, &limits())
        );
    }
    for sql in [
        "SELECT * FROM \"__shale_t0\"",
        "SELECT * FROM metrics.cpu AS __SHALE_T1",
        "WITH __shale_t0 AS (SELECT 1) SELECT * FROM metrics.cpu",
    ] {
        assert!(
            matches!(
                must_refuse(sql, Some("metrics")),
                GuardError::ReservedIdentifier { .. }
            ),
            "{sql}"
        );
    }
}

// Table functions in FROM other than the three generators are refused, and so is qualifying one.
#[test]
fn table_functions() {
    for (sql, name) in [
        ("SELECT * FROM histogram(metrics, v)", "histogram"),
        ("SELECT * FROM my_macro(1)", "my_macro"),
        ("SELECT * FROM main.range(3)", "main.range"),
        ("SELECT * FROM json_each('{}')", "json_each"),
        ("SELECT * FROM LATERAL test_all_types()", "test_all_types"),
    ] {
        assert_eq!(
            must_refuse(sql, None),
            GuardError::TableFunctionNotAllowed {
                name: name.to_string()
            },
            "{sql}"
        );
    }
}

// Lexical refusals carry the reason and where it happened.
#[test]
fn lexical_errors() {
    assert_eq!(
        must_refuse("SELECT 'abc", None),
        GuardError::Unterminated {
            what: "string literal",
            offset: 7
        }
    );
    assert_eq!(
        must_refuse("SELECT \"abc", None),
        GuardError::Unterminated {
            what: "quoted identifier",
            offset: 7
        }
    );
    assert_eq!(
        must_refuse("SELECT $x$abc", None),
        GuardError::Unterminated {
            what: "dollar-quoted string",
            offset: 7
        }
    );
    assert_eq!(
        must_refuse("SELECT * FROM metrics.cpu WHERE v = ?", None),
        GuardError::Parameter { offset: 36 }
    );
    assert_eq!(
        must_refuse("SELECT 1 AS x\u{a0}FROM \"f.csv\"", None),
        GuardError::InvisibleCharacter {
            code_point: 0xa0,
            offset: 13
        }
    );
    assert_eq!(
        must_refuse("SELECT (1", None),
        GuardError::UnbalancedParentheses { offset: 7 }
    );
    assert_eq!(
        must_refuse("SELECT 1)", None),
        GuardError::UnbalancedParentheses { offset: 8 }
    );
    assert_eq!(must_refuse("", None), GuardError::Empty);
    assert_eq!(must_refuse(" ; ", None), GuardError::Empty);
    assert_eq!(
        must_refuse("/* only */ -- comments", None),
        GuardError::Empty
    );
}

// Limits: the byte limit is checked first, and nesting is bounded so the guard's recursion is.
#[test]
fn limits_are_enforced() {
    let long = format!("SELECT '{}'", "x".repeat(2_000_000));
    assert_eq!(
        must_refuse(&long, None),
        GuardError::TooLong {
            bytes: long.len(),
            bytes_max: 1 << 20
        }
    );
    let small = GuardLimits { sql_bytes_max: 8 };
    assert!(check("SELECT 1", None, &small).is_ok());
    assert!(matches!(
        check("SELECT 12", None, &small),
        Err(GuardError::TooLong {
            bytes: 9,
            bytes_max: 8
        })
    ));

    let nested = |depth: usize| {
        format!(
            "SELECT * FROM {}SELECT 1 FROM metrics.cpu{}",
            "(".repeat(depth),
            ")".repeat(depth)
        )
    };
    let checked = must_check(&nested(NESTING_DEPTH_MAX), None);
    assert_eq!(checked.tables, placeholders(&[("metrics", "cpu")]));
    assert_eq!(
        must_refuse(&nested(NESTING_DEPTH_MAX + 1), None),
        GuardError::TooDeep {
            depth_max: NESTING_DEPTH_MAX
        }
    );
    // Deep nesting of every recursive form stays within the limit without exhausting the stack.
    for shape in [
        ("SELECT 1 FROM metrics.cpu WHERE x IN (", "SELECT 1", ")"),
        (
            "SELECT * FROM (metrics.cpu JOIN ",
            "metrics.mem ON true",
            ")",
        ),
        ("WITH a AS (", "SELECT 1) SELECT 1", ")"),
        ("SELECT (", "1", ")"),
        ("SELECT extract(hour FROM (", "1", "))"),
    ] {
        let depth = NESTING_DEPTH_MAX / 2;
        let sql = format!(
            "{}{}{}",
            shape.0.repeat(depth),
            shape.1,
            shape.2.repeat(depth)
        );
        let _ = check(&sql, Some("metrics"), &limits());
    }
}

// Error messages read as the operator-facing sentences the API returns.
#[test]
fn error_messages() {
    assert_eq!(
        statement_not_allowed("COPY").to_string(),
        "statement COPY is not allowed: only read-only SELECT queries are accepted"
    );
    assert_eq!(
        function_not_allowed("read_csv").to_string(),
        "function read_csv is not allowed: queries may only read database.measurement tables"
    );
    assert_eq!(
        GuardError::UnqualifiedTable {
            name: "x".to_string()
        }
        .to_string(),
        "table reference \"x\" must be written as database.measurement (or set the \
         x-arc-database header)"
    );
    assert_eq!(
        GuardError::TooLong {
            bytes: 2_000_000,
            bytes_max: 1_048_576
        }
        .to_string(),
        "SQL is 2000000 bytes, the limit is 1048576"
    );
    assert_eq!(
        GuardError::MultipleStatements.to_string(),
        "only one statement per request"
    );
    assert_eq!(
        must_refuse("SELECT * FROM system.cpu", None).to_string(),
        "invalid database name \"system\": is reserved"
    );
    let long_name = "x".repeat(200);
    let message = must_refuse(&format!("SELECT * FROM {long_name}"), None).to_string();
    assert!(message.len() < 200, "{message}");
}

// ------------------------------------------------------------------------------------------------
// Property tests.

/// Fragments of ordinary SQL, each complete (no fragment opens a literal or comment it does not
/// close), so that anything placed between two of them is code.
const BENIGN_FRAGMENTS: [&str; 43] = [
    "SELECT",
    "FROM",
    "metrics.cpu",
    "load",
    "set",
    "copy",
    "cpu",
    "c",
    "WHERE",
    "host",
    "=",
    "'a'",
    "'FROM x; --'",
    "1",
    "2.5",
    ",",
    "(",
    ")",
    "(SELECT 1)",
    "AND",
    "OR",
    "NOT",
    "IN",
    "AS",
    "JOIN",
    "ON",
    "USING",
    "GROUP BY",
    "ORDER BY",
    "LIMIT",
    "WITH",
    "x",
    "avg(v)",
    "now()",
    "INTERVAL 1 hour",
    "/* c */",
    "-- c\n",
    "$$ $$",
    "E'\\''",
    "\"q\"",
    "::",
    ".",
    "*",
];

const REFUSED_FUNCTIONS: [&str; 31] = [
    "read_csv",
    "read_csv_auto",
    "read_parquet",
    "parquet_scan",
    "parquet_metadata",
    "parquet_schema",
    "read_json",
    "read_json_auto",
    "read_ndjson_objects",
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
    "pragma_version",
    "sleep_ms",
];

/// A call of a refused function in some spelling: random letter case, optionally quoted or
/// schema-qualified, with optional blanks or comments before the parenthesis.
fn refused_call() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(&REFUSED_FUNCTIONS[..]),
        proptest::collection::vec(any::<bool>(), 32),
        0..4usize,
        proptest::sample::select(vec!["", " ", "/**/", "\n", " /* ( */ ", "--\n"]),
        proptest::sample::select(vec!["", "'/etc/passwd'", "'x', header := true", "1"]),
    )
        .prop_map(|(name, upper, form, gap, arguments)| {
            let cased: String = name
                .chars()
                .zip(upper)
                .map(|(character, upper)| {
                    if upper {
                        character.to_ascii_uppercase()
                    } else {
                        character
                    }
                })
                .collect();
            let name = match form {
                0 => cased,
                1 => format!("\"{cased}\""),
                2 => format!("main.{cased}"),
                _ => format!("'x'.{cased}"),
            };
            format!("{name}{gap}({arguments})")
        })
}

/// Characters that exercise every lexer state, for random text.
fn sql_character() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            'S', 'E', 'L', 'C', 'T', 'F', 'R', 'O', 'M', 'e', 'x', 'a', 'b', 'q', '_', '$', '1', '0',
            ' ', '\n', '\r', '\'', '"', '(', ')', ',', ';', '.', ':', '-', '/', '*', '\\', '?', '#',
            '+', '=', '[', ']', '{', '}',
        ]),
        1 => any::<char>(),
    ]
}

/// A statement word in random letter case.
fn statement_word() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(&rules::STATEMENT_WORDS[..]),
        proptest::collection::vec(any::<bool>(), 16),
    )
        .prop_map(|(word, upper)| {
            word.chars()
                .zip(upper)
                .map(|(character, upper)| {
                    if upper {
                        character
                    } else {
                        character.to_ascii_lowercase()
                    }
                })
                .collect()
        })
}

/// Places where a statement word is a column or alias name (`@` marks it); all valid DuckDB.
const COLUMN_PLACES: [&str; 12] = [
    "SELECT @ FROM metrics.cpu",
    "SELECT avg(@), max( @ ) FROM metrics.cpu",
    "SELECT host FROM metrics.cpu WHERE (@ > 1) AND @ IS NOT NULL",
    "SELECT host, @ FROM metrics.cpu GROUP BY host, @ ORDER BY @ DESC",
    "SELECT host AS @ FROM metrics.cpu",
    "SELECT (@)::VARCHAR, cast(@ AS DOUBLE), (@ BETWEEN 1 AND 2) FROM metrics.cpu",
    "SELECT host FROM metrics.cpu WHERE (@ IN (1, 2) OR @ LIKE 'x')",
    "SELECT cpu.@, [@], {'k': @}, (@, @) FROM metrics.cpu",
    "SELECT sum(@) OVER (PARTITION BY @ ORDER BY @) FROM metrics.cpu",
    "SELECT * FROM metrics.cpu AS @",
    "WITH @ AS (SELECT 1) SELECT * FROM @",
    "SELECT substring(@ FROM 2), trim(@ FROM host) FROM metrics.cpu",
];

/// Places where a statement word would start a nested statement: first in parentheses or after
/// a CTE body, followed by a name, a string, `(` or a keyword of a statement.
const STATEMENT_PLACES: [&str; 10] = [
    "SELECT (@ x)",
    "SELECT * FROM metrics.cpu WHERE host IN (@ 'x')",
    "SELECT * FROM (@ (SELECT 1) TO 'x')",
    "SELECT EXISTS (@ FROM t)",
    "SELECT 1 UNION (@ DATABASE 'x')",
    "WITH a AS (@ x) SELECT 1",
    "WITH a AS (SELECT 1) @ x",
    "WITH a AS MATERIALIZED (SELECT 1) @ FROM t",
    "SELECT avg((@ x.y = 1))",
    "SELECT ((@ OR REPLACE x))",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    // Wherever a refused function call lands among benign fragments, and however it is spelled,
    // the query never passes.
    #[test]
    fn refused_function_never_passes(
        fragments in proptest::collection::vec(proptest::sample::select(&BENIGN_FRAGMENTS[..]), 0..24),
        position in any::<proptest::sample::Index>(),
        call in refused_call(),
        default_database in proptest::option::of(Just("metrics")),
    ) {
        let mut parts: Vec<String> = fragments.iter().map(|fragment| fragment.to_string()).collect();
        let at = position.index(parts.len() + 1);
        parts.insert(at, call);
        let sql = parts.join(" ");
        let result = check(&sql, default_database, &limits());
        prop_assert!(result.is_err(), "accepted {:?} as {:?}", sql, result);
    }

    // Arbitrary text never panics the guard, and whatever it accepts comes out as one statement
    // without comments that still tokenizes, mentioning every placeholder it lists.
    #[test]
    fn arbitrary_text_never_panics(
        text in prop_oneof![
            any::<String>(),
            proptest::collection::vec(sql_character(), 0..80)
                .prop_map(|characters| characters.into_iter().collect::<String>()),
            proptest::collection::vec(proptest::sample::select(&BENIGN_FRAGMENTS[..]), 0..24)
                .prop_map(|fragments| fragments.join(" ")),
        ],
        default_database in proptest::option::of(Just("metrics")),
    ) {
        if let Ok(checked) = check(&text, default_database, &limits()) {
            let lexed = lexer::lex(&checked.sql);
            prop_assert!(lexed.is_ok(), "{:?} became {:?}", text, checked.sql);
            let lexed = lexed.unwrap_or_default();
            prop_assert!(lexed.comments.is_empty(), "{:?} became {:?}", text, checked.sql);
            let semicolon = lexed.tokens.iter().any(|token| &checked.sql[token.start..token.end] == ";");
            prop_assert!(!semicolon, "{:?} became {:?}", text, checked.sql);
            for (placeholder, _) in &checked.tables {
                let quoted = format!("\"{placeholder}\"");
                prop_assert!(checked.sql.contains(&quoted));
            }
        }
    }

    // A statement word's place decides: wherever it is a column, alias, table or CTE name the
    // query passes, and wherever it would start a nested statement it is refused, whatever its
    // letter case and whatever comments lie before it.
    #[test]
    fn statement_word_place_decides(
        word in statement_word(),
        column_place in proptest::sample::select(&COLUMN_PLACES[..]),
        statement_place in proptest::sample::select(&STATEMENT_PLACES[..]),
        gap in proptest::sample::select(vec![" ", "/* x */", "\n", "--\n"]),
    ) {
        let spelled = format!("{gap}{word}");
        let sql = column_place.replace('@', &spelled);
        let result = check(&sql, None, &limits());
        prop_assert!(result.is_ok(), "refused {:?}: {:?}", sql, result);
        let sql = statement_place.replace('@', &spelled);
        let result = check(&sql, None, &limits());
        prop_assert!(result.is_err(), "accepted {:?} as {:?}", sql, result);
    }
}
