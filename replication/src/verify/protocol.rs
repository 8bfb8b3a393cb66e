//! The `Verify` call's wire format: one request and one answer per call (the transport's
//! `[protocol version][kind]` header and call framing around them).
//!
//! Both are `[VERIFY_PROTOCOL_VERSION u8][MessagePack with field names]`. Field names make an
//! added optional field readable by an older peer; a changed meaning needs a new version byte,
//! which an older peer refuses with a clear error instead of misreading.
//!
//! Two queries, both paged with a continuation (the last path the page covered):
//! - `Digests`: the digest of every hour partition of a database (see [`super::partition_of`]
//!   and [`super::partition_digest`]);
//! - `Files`: what this node finds for each manifest file of some partitions.

use serde::Deserialize;
use serde::Serialize;

/// Version byte of requests and answers.
pub const VERIFY_PROTOCOL_VERSION: u8 = 1;

/// What the coordinator asks a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    pub database: String,
    /// The coordinator's applied manifest index; a node below it waits for it briefly.
    pub index: u64,
    /// Re-hash the bytes on disk instead of trusting the cached blake3 of the presence index.
    pub deep: bool,
    pub query: Query,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Partition digests, in path order, starting after the path `after`.
    Digests {
        after: Option<String>,
        /// Partitions wanted at most; the node may answer fewer (its own bounds).
        limit: u32,
    },
    /// The files of `partitions`, in path order, starting after the path `after`.
    Files {
        partitions: Vec<String>,
        after: Option<String>,
        /// Files wanted at most; the node may answer fewer.
        limit: u32,
    },
}

/// A node's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyAnswer {
    /// The manifest index the node answered at (its applied index).
    pub index: u64,
    /// The node's applied index stayed below the request's after the wait.
    pub behind: bool,
    pub page: Page,
    /// Where the next page starts (the `after` of the next request); `None` on the last page.
    pub next: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Page {
    Digests(Vec<PartitionDigest>),
    Files(Vec<FileFound>),
}

/// One hour partition as a node finds it: the digest over the files it holds intact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionDigest {
    pub partition: String,
    /// 64 hex digits.
    pub digest: String,
    /// Manifest files of the partition (at the node's index), held or not.
    pub files: u64,
}

/// One manifest file as a node finds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFound {
    pub path: String,
    pub found: Found,
}

/// What a node found for a manifest file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Found {
    /// A copy of the manifest's size whose (cached or freshly hashed) blake3 is this.
    Blake3(String),
    /// Not held, or not on disk.
    Missing,
    /// On disk with another size than the manifest's.
    WrongSize(u64),
    /// On disk but could not be read or examined.
    Unreadable(String),
}

impl std::fmt::Display for Found {
    /// The form the report shows: a blake3, `MISSING`, `WRONG_SIZE <bytes>` or
    /// `UNREADABLE <error>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Blake3(hex) => write!(f, "{hex}"),
            Found::Missing => write!(f, "MISSING"),
            Found::WrongSize(bytes) => write!(f, "WRONG_SIZE {bytes}"),
            Found::Unreadable(error) => write!(f, "UNREADABLE {error}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty verify message")]
    Empty,
    #[error("verify protocol version {0} is not spoken here (this node speaks {VERIFY_PROTOCOL_VERSION})")]
    Version(u8),
    #[error("decode verify message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("encode verify message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// `[version][MessagePack]` of a request or an answer.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut bytes = vec![VERIFY_PROTOCOL_VERSION];
    rmp_serde::encode::write_named(&mut bytes, message)?;
    Ok(bytes)
}

/// The inverse of [`encode`]; refuses another version byte.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let (&version, body) = bytes.split_first().ok_or(ProtocolError::Empty)?;
    if version != VERIFY_PROTOCOL_VERSION {
        return Err(ProtocolError::Version(version));
    }
    Ok(rmp_serde::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    // A stored sample of each version-1 message must keep decoding to the same value, so a
    // change of the encoding that older peers cannot read shows up here and not in a mixed
    // cluster during a rolling upgrade.
    #[test]
    fn version_1_samples_still_decode() {
        let request = VerifyRequest {
            database: "db".into(),
            index: 7,
            deep: true,
            query: Query::Files {
                partitions: vec!["db/m/2026/01/01/00".into()],
                after: None,
                limit: 10,
            },
        };
        let request_sample = "0184a86461746162617365a26462a5696e64657807a464656570c3a571756572\
                              7981a546696c657383aa706172746974696f6e7391b264622f6d2f323032362f\
                              30312f30312f3030a56166746572c0a56c696d69740a";
        let answer = VerifyAnswer {
            index: 9,
            behind: false,
            page: Page::Files(vec![
                FileFound {
                    path: "db/m/2026/01/01/00/a".into(),
                    found: Found::WrongSize(3),
                },
                FileFound {
                    path: "db/m/2026/01/01/00/b".into(),
                    found: Found::Missing,
                },
            ]),
            next: Some("db/m/2026/01/01/00/b".into()),
        };
        let answer_sample = "0184a5696e64657809a6626568696e64c2a47061676581a546696c65739282a4\
                             70617468b464622f6d2f323032362f30312f30312f30302f61a5666f756e6481\
                             a957726f6e6753697a650382a470617468b464622f6d2f323032362f30312f30\
                             312f30302f62a5666f756e64a74d697373696e67a46e657874b464622f6d2f32\
                             3032362f30312f30312f30302f62";
        let compact = |s: &str| s.split_whitespace().collect::<String>();
        assert_eq!(
            decode::<VerifyRequest>(&unhex(&compact(request_sample))).unwrap(),
            request,
            "encoded now: {}",
            hex(&encode(&request).unwrap())
        );
        assert_eq!(
            decode::<VerifyAnswer>(&unhex(&compact(answer_sample))).unwrap(),
            answer,
            "encoded now: {}",
            hex(&encode(&answer).unwrap())
        );
    }

    // Another version byte is refused with a message naming both versions, never misread.
    #[test]
    fn another_version_is_refused() {
        let mut bytes = encode(&Found::Missing).unwrap();
        bytes[0] = 2;
        let error = decode::<Found>(&bytes).unwrap_err();
        assert!(matches!(error, ProtocolError::Version(2)), "{error}");
        assert!(matches!(
            decode::<Found>(&[]).unwrap_err(),
            ProtocolError::Empty
        ));
    }
}
