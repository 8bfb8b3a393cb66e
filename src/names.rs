//! Validation of database, measurement and column names before they become paths and columns.
//!
//! Database and measurement names become directory components of the storage layout
//! (`<data>/<database>/<measurement>/...`) and parts of SQL table references, so they are held to a
//! strict ASCII alphabet. Column names (tag and field keys) only become Parquet column names, so
//! they may hold any printable UTF-8, minus a few names shale keeps for itself.
//!
//! # Rules chosen, and where they come from
//!
//! The database and measurement rules are Arc's (github.com/Basekick-Labs/arc), so that any name
//! Arc accepts on its write paths is accepted here and the reverse:
//!
//! - **database**: `^[A-Za-z][A-Za-z0-9_-]{0,63}$` — Arc's `isValidDatabaseName`
//!   (`internal/api/databases.go`): first byte an ASCII letter, the rest ASCII letters, digits,
//!   `_` or `-`, at most 64 bytes. Arc also refuses to create the databases `system`, `internal`
//!   and `_internal` (compared case-insensitively); shale reserves `system` and `internal` the same
//!   way for its own use (`_internal` already fails the alphabet).
//! - **measurement**: `^[A-Za-z][A-Za-z0-9_-]{0,127}$` — Arc's `isValidMeasurementName`
//!   (`internal/api/lineprotocol.go`), which exists so that control characters cannot reach object
//!   store listings. No dots or slashes, so neither `..` nor a path separator can occur.
//! - **column** (tag key or field key): Arc does not restrict these beyond line-protocol syntax;
//!   shale adds: non-empty, at most 128 bytes, no control characters (Unicode category Cc, which
//!   covers C0, DEL and C1), not `time` in any letter case (the timestamp column is called `time`,
//!   and DuckDB identifiers are case-insensitive), and not starting with `__` (reserved for columns
//!   shale may add later).
//!
//! Tag values and string field values are not names: any UTF-8 is accepted.

/// The longest database name, in bytes.
pub const DATABASE_BYTES_MAX: usize = 64;
/// The longest measurement name, in bytes.
pub const MEASUREMENT_BYTES_MAX: usize = 128;
/// The longest tag or field key, in bytes.
pub const COLUMN_BYTES_MAX: usize = 128;

/// The name of the timestamp column, which no tag or field may use.
pub const TIME_COLUMN: &str = "time";

/// Database names reserved for shale itself, compared ignoring ASCII case.
const RESERVED_DATABASES: [&str; 2] = ["system", "internal"];

/// Why a name was refused. The `Display` text is a fragment meant to follow the name, as in
/// `invalid measurement name "1cpu": must start with an ASCII letter`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is {bytes} bytes long, the limit is {bytes_max}")]
    TooLong { bytes: usize, bytes_max: usize },
    #[error("must start with an ASCII letter")]
    FirstNotLetter,
    #[error("contains {0:?}; only ASCII letters, digits, '_' and '-' are allowed")]
    InvalidCharacter(char),
    #[error("contains the control character {0:?}")]
    ControlCharacter(char),
    #[error("is reserved")]
    Reserved,
    #[error("must not start with \"__\" (reserved for internal columns)")]
    ReservedPrefix,
}

/// Checks a database name: `^[A-Za-z][A-Za-z0-9_-]{0,63}$` and not a reserved name.
pub fn validate_database(name: &str) -> Result<(), NameError> {
    validate_path_component(name, DATABASE_BYTES_MAX)?;
    if RESERVED_DATABASES
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved))
    {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// Checks a measurement name: `^[A-Za-z][A-Za-z0-9_-]{0,127}$`.
pub fn validate_measurement(name: &str) -> Result<(), NameError> {
    validate_path_component(name, MEASUREMENT_BYTES_MAX)
}

/// Checks a tag key or field key: non-empty, at most 128 bytes, no control characters, not `time`
/// (any case) and not starting with `__`.
pub fn validate_column(name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() > COLUMN_BYTES_MAX {
        return Err(NameError::TooLong {
            bytes: bytes.len(),
            bytes_max: COLUMN_BYTES_MAX,
        });
    }
    if bytes.is_ascii() {
        // The common case: a byte loop instead of decoding characters.
        if let Some(&byte) = bytes.iter().find(|&&byte| byte < 0x20 || byte == 0x7f) {
            return Err(NameError::ControlCharacter(char::from(byte)));
        }
    } else if let Some(control) = name.chars().find(|character| character.is_control()) {
        return Err(NameError::ControlCharacter(control));
    }
    if name.eq_ignore_ascii_case(TIME_COLUMN) {
        return Err(NameError::Reserved);
    }
    if name.starts_with("__") {
        return Err(NameError::ReservedPrefix);
    }
    Ok(())
}

/// The shared rule for names that become directory components.
fn validate_path_component(name: &str, bytes_max: usize) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(NameError::Empty);
    };
    if bytes.len() > bytes_max {
        return Err(NameError::TooLong {
            bytes: bytes.len(),
            bytes_max,
        });
    }
    if !first.is_ascii_alphabetic() {
        return Err(if first.is_ascii() {
            NameError::FirstNotLetter
        } else {
            // Report the whole character rather than its first UTF-8 byte.
            NameError::InvalidCharacter(name.chars().next().unwrap_or('\u{fffd}'))
        });
    }
    let is_allowed = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-';
    if let Some(index) = bytes.iter().position(|&byte| !is_allowed(byte)) {
        let character = name[index..].chars().next().unwrap_or('\u{fffd}');
        return Err(NameError::InvalidCharacter(character));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Database names follow Arc's create-time rule; reserved names are refused in any case.
    #[test]
    fn database_names() {
        for good in ["a", "telegraf", "Prod-db_2", &"a".repeat(64)] {
            assert_eq!(validate_database(good), Ok(()), "{good}");
        }
        assert_eq!(validate_database(""), Err(NameError::Empty));
        assert_eq!(
            validate_database(&"a".repeat(65)),
            Err(NameError::TooLong {
                bytes: 65,
                bytes_max: 64
            })
        );
        assert_eq!(validate_database("1db"), Err(NameError::FirstNotLetter));
        assert_eq!(validate_database("_db"), Err(NameError::FirstNotLetter));
        assert_eq!(
            validate_database("a.b"),
            Err(NameError::InvalidCharacter('.'))
        );
        assert_eq!(
            validate_database("a/b"),
            Err(NameError::InvalidCharacter('/'))
        );
        assert_eq!(
            validate_database("ünï"),
            Err(NameError::InvalidCharacter('ü'))
        );
        assert_eq!(
            validate_database("aé"),
            Err(NameError::InvalidCharacter('é'))
        );
        assert_eq!(validate_database("System"), Err(NameError::Reserved));
        assert_eq!(validate_database("internal"), Err(NameError::Reserved));
    }

    // Measurement names become directories, so dots, slashes and spaces are refused.
    #[test]
    fn measurement_names() {
        for good in ["cpu", "disk-io", "m_1", &"m".repeat(128)] {
            assert_eq!(validate_measurement(good), Ok(()), "{good}");
        }
        assert_eq!(validate_measurement("1cpu"), Err(NameError::FirstNotLetter));
        assert_eq!(validate_measurement(".."), Err(NameError::FirstNotLetter));
        assert_eq!(
            validate_measurement("a..b"),
            Err(NameError::InvalidCharacter('.'))
        );
        assert_eq!(
            validate_measurement("cpu load"),
            Err(NameError::InvalidCharacter(' '))
        );
        assert!(matches!(
            validate_measurement(&"m".repeat(129)),
            Err(NameError::TooLong { .. })
        ));
        // `system` is only reserved as a database name.
        assert_eq!(validate_measurement("system"), Ok(()));
    }

    // Column names allow any printable text but not the timestamp's name or the internal prefix.
    #[test]
    fn column_names() {
        for good in [
            "host",
            "usage idle",
            "a=b,c",
            "température",
            "_x",
            "times",
            &"k".repeat(128),
        ] {
            assert_eq!(validate_column(good), Ok(()), "{good}");
        }
        assert_eq!(validate_column(""), Err(NameError::Empty));
        assert!(matches!(
            validate_column(&"k".repeat(129)),
            Err(NameError::TooLong { .. })
        ));
        assert_eq!(validate_column("time"), Err(NameError::Reserved));
        assert_eq!(validate_column("TIME"), Err(NameError::Reserved));
        assert_eq!(validate_column("__id"), Err(NameError::ReservedPrefix));
        assert_eq!(
            validate_column("a\tb"),
            Err(NameError::ControlCharacter('\t'))
        );
        assert_eq!(
            validate_column("a\u{7f}"),
            Err(NameError::ControlCharacter('\u{7f}'))
        );
        assert_eq!(
            validate_column("é\u{85}"),
            Err(NameError::ControlCharacter('\u{85}'))
        );
    }
}
