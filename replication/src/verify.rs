//! Verification of one database across peers: the sans-IO core (hour partitions and their
//! digests, the pages a node answers, the comparison of answers with the manifest and with each
//! other into a report). The wire format is in [`protocol`], the I/O (the `Verify` call's server,
//! the coordinator, the handle the HTTP API uses) in [`service`].
//!
//! How it goes: the coordinator reads its applied manifest version `I` and computes the digest
//! every hour partition should have. It asks every member, itself included, for the digests of
//! what it holds (phase 1, paged), and only where a digest differs asks for the per-file findings
//! of that partition (phase 2, paged). A node answers at its own applied index, waiting briefly
//! when it is behind `I`; files that exist in only one of the two versions are not compared.
//!
//! The hour partition of a path is its first six components, `<db>/<measurement>/<YYYY>/<MM>/
//! <DD>/<HH>`. Its digest is blake3 over the sorted `(path, blake3 hex)` pairs of the files a
//! node holds intact (every manifest file of the partition, for the expected digest), each field
//! length-prefixed so that pairs cannot run together.

pub mod protocol;
pub mod service;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::ops::Bound;

use serde::Serialize;

use crate::manifest::FileEntry;
use crate::manifest::Manifest;
use crate::raft_types::NodeId;
use protocol::FileFound;
use protocol::Found;
use protocol::PartitionDigest;

/// Components of a path that name its hour partition.
const PARTITION_COMPONENTS: usize = 6;

/// Domain separation of partition digests: a digest of another kind can never equal one.
const DIGEST_DOMAIN: &[u8] = b"shale verify partition digest v1\0";

/// The hour partition of a manifest path: its first six components. A path with fewer
/// components (none are written so) is its own directory's partition.
pub fn partition_of(path: &str) -> &str {
    let mut slashes = path.match_indices('/').map(|(at, _)| at);
    match slashes.nth(PARTITION_COMPONENTS - 1) {
        Some(at) => &path[..at],
        None => path.rsplit_once('/').map_or("", |(dir, _)| dir),
    }
}

/// The digest of a partition: blake3 over its `(path, blake3 hex)` pairs sorted by path, each
/// field prefixed by its length, so it depends on the set of pairs and not on their order.
pub fn partition_digest<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut pairs: Vec<(&str, &str)> = pairs.into_iter().collect();
    pairs.sort_unstable();
    let mut hasher = blake3::Hasher::new();
    hasher.update(DIGEST_DOMAIN);
    for (path, blake3_hex) in pairs {
        for field in [path, blake3_hex] {
            hasher.update(&(field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
    }
    hasher.finalize().to_hex().to_string()
}

/// What the manifest says one partition holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub digest: String,
    pub files: u64,
    pub bytes: u64,
}

/// The manifest files of `database`, in path order.
pub fn database_files<'a>(
    manifest: &'a Manifest,
    database: &'a str,
    after: Option<&str>,
) -> impl Iterator<Item = &'a FileEntry> + 'a {
    let prefix = format!("{database}/");
    // The range is resolved when the iterator is made, so it may borrow these locals.
    let start = match after {
        Some(after) if after >= prefix.as_str() => Bound::Excluded(after),
        _ => Bound::Included(prefix.as_str()),
    };
    let files = manifest.files().range::<_, str>((start, Bound::Unbounded));
    files
        .map(|(_, file)| &**file)
        .take_while(move |file| file.path.starts_with(&prefix))
        .filter(move |file| file.database == database)
}

/// The expected digest of every partition of `database` in `manifest`.
pub fn expected_partitions(manifest: &Manifest, database: &str) -> BTreeMap<String, Expected> {
    let mut pairs: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    let mut sizes: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for file in database_files(manifest, database, None) {
        let partition = partition_of(&file.path);
        pairs
            .entry(partition)
            .or_default()
            .push((&file.path, &file.blake3_hex));
        let size = sizes.entry(partition).or_default();
        size.0 += 1;
        size.1 += file.size_bytes;
    }
    pairs
        .into_iter()
        .map(|(partition, pairs)| {
            let (files, bytes) = sizes[partition];
            let expected = Expected {
                digest: partition_digest(pairs),
                files,
                bytes,
            };
            (partition.to_owned(), expected)
        })
        .collect()
}

/// Whether the manifest knows `database` at all: a file, or a table with declared columns.
pub fn database_exists(manifest: &Manifest, database: &str) -> bool {
    database_files(manifest, database, None).next().is_some()
        || manifest.tables().keys().any(|(d, _)| d == database)
}

/// Bounds of one answer page.
#[derive(Clone, Copy, Debug)]
pub struct PageLimits {
    /// Partitions of a digest page, files of a file page.
    pub entries_max: usize,
    /// Files examined for one digest page (whole partitions; at least one).
    pub files_max: usize,
    /// Path bytes in one page, which bounds the encoded answer with any path length.
    pub path_bytes_max: usize,
    /// Manifest bytes re-hashed for one deep page (at least one file or partition), so that
    /// a page answers well within the call's timeout.
    pub deep_bytes_max: u64,
}

impl Default for PageLimits {
    fn default() -> PageLimits {
        PageLimits {
            entries_max: 10_000,
            files_max: 100_000,
            path_bytes_max: 4 << 20,
            deep_bytes_max: 256 << 20,
        }
    }
}

/// A manifest file a node examines for a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: String,
    pub size_bytes: u64,
    pub blake3_hex: String,
}

impl Candidate {
    fn of(file: &FileEntry) -> Candidate {
        Candidate {
            path: file.path.clone(),
            size_bytes: file.size_bytes,
            blake3_hex: file.blake3_hex.clone(),
        }
    }
}

/// The files a node examines to answer one page, and where the next page starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagePlan {
    /// For a digest page, every file of each partition, grouped by partition in path order;
    /// for a file page, one group per partition that has files in this page.
    pub partitions: Vec<(String, Vec<Candidate>)>,
    pub next: Option<String>,
}

impl PagePlan {
    pub fn candidates(&self) -> impl Iterator<Item = &Candidate> {
        self.partitions.iter().flat_map(|(_, files)| files)
    }
}

/// Plans a digest page: whole partitions of `database` after the path `after`, within
/// `limits` (and at most `limit` partitions, the requester's bound).
pub fn plan_digest_page(
    manifest: &Manifest,
    database: &str,
    after: Option<&str>,
    limit: usize,
    deep: bool,
    limits: &PageLimits,
) -> PagePlan {
    let entries_max = limit.clamp(1, limits.entries_max);
    let mut partitions: Vec<(String, Vec<Candidate>)> = Vec::new();
    let (mut files, mut path_bytes, mut bytes) = (0usize, 0usize, 0u64);
    let mut full = false;
    for file in database_files(manifest, database, after) {
        let partition = partition_of(&file.path);
        let same = partitions.last().is_some_and(|(p, _)| p == partition);
        if !same {
            // A page ends only between partitions, so every digest covers a whole partition.
            full = !partitions.is_empty()
                && (partitions.len() >= entries_max
                    || files >= limits.files_max
                    || path_bytes >= limits.path_bytes_max
                    || (deep && bytes >= limits.deep_bytes_max));
            if full {
                break;
            }
            path_bytes += partition.len();
            partitions.push((partition.to_owned(), Vec::new()));
        }
        files += 1;
        bytes += file.size_bytes;
        if let Some((_, candidates)) = partitions.last_mut() {
            candidates.push(Candidate::of(file));
        }
    }
    let next = if full {
        partitions
            .last()
            .and_then(|(_, files)| files.last())
            .map(|file| file.path.clone())
    } else {
        None
    };
    PagePlan { partitions, next }
}

/// Plans a file page: the manifest files of `partitions` after the path `after`, within
/// `limits` (and at most `limit` files).
pub fn plan_file_page(
    manifest: &Manifest,
    database: &str,
    partitions: &[String],
    after: Option<&str>,
    limit: usize,
    deep: bool,
    limits: &PageLimits,
) -> PagePlan {
    let entries_max = limit.clamp(1, limits.entries_max);
    // Path order of the files is the order of `<partition>/` prefixes, not of the partition
    // names ("a/b-c/" sorts before "a/b/"), and a continuation is a path.
    let wanted: Vec<String> = partitions
        .iter()
        .filter(|p| p.starts_with(&format!("{database}/")))
        .map(|p| format!("{p}/"))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut plan: Vec<(String, Vec<Candidate>)> = Vec::new();
    let (mut count, mut path_bytes, mut bytes) = (0usize, 0usize, 0u64);
    let mut last: Option<String> = None;
    for prefix in &wanted {
        let partition = &prefix[..prefix.len() - 1];
        let start = match after {
            Some(after) if after >= prefix.as_str() => after,
            _ => prefix.as_str(),
        };
        let files = database_files(manifest, database, Some(start))
            .take_while(|file| file.path.starts_with(prefix.as_str()))
            .filter(|file| partition_of(&file.path) == partition);
        for file in files {
            if count > 0
                && (count >= entries_max
                    || path_bytes >= limits.path_bytes_max
                    || (deep && bytes >= limits.deep_bytes_max))
            {
                return PagePlan {
                    partitions: plan,
                    next: last,
                };
            }
            if plan.last().is_none_or(|(p, _)| p != partition) {
                plan.push((partition.to_owned(), Vec::new()));
            }
            if let Some((_, candidates)) = plan.last_mut() {
                candidates.push(Candidate::of(file));
            }
            count += 1;
            path_bytes += file.path.len();
            bytes += file.size_bytes;
            last = Some(file.path.clone());
        }
    }
    PagePlan {
        partitions: plan,
        next: None,
    }
}

/// What a node finds for a file from the presence index's cached blake3 and one stat:
/// `held_blake3` is the cached hash if the file is recorded held, `disk_size` the size on disk
/// (`Ok(None)`: no file there).
pub fn found_cached(
    candidate: &Candidate,
    held_blake3: Option<&str>,
    disk_size: Result<Option<u64>, String>,
) -> Found {
    let Some(held_blake3) = held_blake3 else {
        return Found::Missing;
    };
    match disk_size {
        Err(error) => Found::Unreadable(error),
        Ok(None) => Found::Missing,
        Ok(Some(size)) if size != candidate.size_bytes => Found::WrongSize(size),
        Ok(Some(_)) => Found::Blake3(held_blake3.to_owned()),
    }
}

/// What a node finds for a file whose bytes it hashed: `hashed` is the size and blake3 of the
/// file on disk (`Ok(None)`: no file there).
pub fn found_hashed(candidate: &Candidate, hashed: Result<Option<(u64, String)>, String>) -> Found {
    match hashed {
        Err(error) => Found::Unreadable(error),
        Ok(None) => Found::Missing,
        Ok(Some((size, _))) if size != candidate.size_bytes => Found::WrongSize(size),
        Ok(Some((_, blake3_hex))) => Found::Blake3(blake3_hex),
    }
}

/// The digests of a planned digest page from what the node found for its files (one finding
/// per candidate, in the plan's order). Only files with a blake3 enter a digest: a missing or
/// wrong-sized file leaves its partition's digest different from the manifest's.
pub fn digest_page(plan: &PagePlan, found: &[Found]) -> Vec<PartitionDigest> {
    assert_eq!(
        plan.candidates().count(),
        found.len(),
        "one finding per candidate"
    );
    let mut found = found.iter();
    plan.partitions
        .iter()
        .map(|(partition, files)| {
            let pairs: Vec<(&str, &str)> = files
                .iter()
                .zip(found.by_ref())
                .filter_map(|(file, found)| match found {
                    Found::Blake3(hex) => Some((file.path.as_str(), hex.as_str())),
                    _ => None,
                })
                .collect();
            PartitionDigest {
                partition: partition.clone(),
                digest: partition_digest(pairs),
                files: files.len() as u64,
            }
        })
        .collect()
}

/// The findings of a planned file page (one per candidate, in the plan's order).
pub fn file_page(plan: &PagePlan, found: Vec<Found>) -> Vec<FileFound> {
    assert_eq!(
        plan.candidates().count(),
        found.len(),
        "one finding per candidate"
    );
    plan.candidates()
        .zip(found)
        .map(|(file, found)| FileFound {
            path: file.path.clone(),
            found,
        })
        .collect()
}

/// The partitions whose digest a node answered differently from the manifest's (or answered
/// for only one side), and the files and bytes of those that matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DigestComparison {
    pub differing: Vec<String>,
    pub matching: BTreeSet<String>,
    pub files_matching: u64,
    pub bytes_matching: u64,
}

pub fn compare_digests(
    expected: &BTreeMap<String, Expected>,
    answered: &BTreeMap<String, PartitionDigest>,
) -> DigestComparison {
    let mut comparison = DigestComparison::default();
    for (partition, want) in expected {
        match answered.get(partition) {
            Some(got) if got.digest == want.digest => {
                comparison.matching.insert(partition.clone());
                comparison.files_matching += want.files;
                comparison.bytes_matching += want.bytes;
            }
            _ => comparison.differing.push(partition.clone()),
        }
    }
    comparison.differing.extend(
        answered
            .keys()
            .filter(|partition| !expected.contains_key(*partition))
            .cloned(),
    );
    comparison.differing.sort_unstable();
    comparison
}

/// A node's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Consistent,
    Inconsistent,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Consistent => "CONSISTENT",
            Status::Inconsistent => "INCONSISTENT",
            Status::Error => "ERROR",
        }
    }
}

/// A file a node holds otherwise than the manifest says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub path: String,
    pub expected_blake3: String,
    /// A blake3, `MISSING`, `WRONG_SIZE <bytes>` or `UNREADABLE <error>`.
    pub found: String,
}

/// One node's part of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    pub node_id: NodeId,
    pub name: String,
    pub status: Status,
    /// The index the node answered at; `None` if it never answered.
    pub manifest_index: Option<u64>,
    pub behind: bool,
    pub files_compared: u64,
    pub bytes_compared: u64,
    /// Files of the coordinator's version not compared because the node's version (older or
    /// newer) does not list them.
    pub files_skipped: u64,
    pub mismatches: Vec<Mismatch>,
    /// Mismatches found, listed or not (the list is bounded).
    pub mismatches_total: u64,
    pub error: Option<String>,
}

/// Most mismatches listed per node; the rest are counted.
pub const MISMATCHES_LISTED_MAX: usize = 10_000;

/// A file the nodes that compared it do not all find alike (e.g. two hold different bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    pub path: String,
    pub expected_blake3: String,
    /// Every node that compared the file, with what it found.
    pub found: Vec<NodeFound>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeFound {
    pub node_id: NodeId,
    pub found: String,
}

/// The answer to a verify request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub database: String,
    pub manifest_index: u64,
    pub deep: bool,
    /// INCONSISTENT if any node is, else ERROR if any node is, else CONSISTENT.
    pub status: Status,
    pub elapsed_ms: u64,
    /// Request and answer bytes of the calls to peers (this node's own part is not sent).
    pub bytes_exchanged: u64,
    pub nodes: Vec<NodeReport>,
    pub disagreements: Vec<Disagreement>,
}

/// Everything gathered from one node, before it becomes its [`NodeReport`].
#[derive(Clone, Debug, Default)]
pub struct NodeFindings {
    pub node_id: NodeId,
    pub name: String,
    /// The index of the node's first answer.
    pub index: Option<u64>,
    pub behind: bool,
    pub digests: DigestComparison,
    /// Findings in the differing partitions, by path.
    pub files: BTreeMap<String, Found>,
    pub error: Option<String>,
}

impl NodeFindings {
    /// What this node found for `file` of the coordinator's version, if it compared it.
    fn found_for(&self, file: &FileEntry) -> Option<Found> {
        if self.digests.matching.contains(partition_of(&file.path)) {
            return Some(Found::Blake3(file.blake3_hex.clone()));
        }
        self.files.get(&file.path).cloned()
    }
}

/// Turns every node's findings into the report: each node compared with the manifest at the
/// coordinator's version, then the nodes with each other on every file any of them got wrong.
pub fn build_report(
    database: &str,
    manifest: &Manifest,
    deep: bool,
    findings: &[NodeFindings],
) -> VerifyReport {
    let expected = expected_partitions(manifest, database);
    let mut nodes = Vec::with_capacity(findings.len());
    let mut named: BTreeSet<&str> = BTreeSet::new();
    for node in findings {
        let mut report = NodeReport {
            node_id: node.node_id,
            name: node.name.clone(),
            status: Status::Consistent,
            manifest_index: node.index,
            behind: node.behind,
            files_compared: node.digests.files_matching,
            bytes_compared: node.digests.bytes_matching,
            files_skipped: 0,
            mismatches: Vec::new(),
            mismatches_total: 0,
            error: node.error.clone(),
        };
        for partition in &node.digests.differing {
            if !expected.contains_key(partition) {
                continue;
            }
            let prefix = format!("{partition}/");
            let files = database_files(manifest, database, Some(&prefix))
                .take_while(|file| file.path.starts_with(&prefix))
                .filter(|file| partition_of(&file.path) == partition);
            for file in files {
                let Some(found) = node.files.get(&file.path) else {
                    report.files_skipped += 1;
                    continue;
                };
                report.files_compared += 1;
                report.bytes_compared += file.size_bytes;
                if *found == Found::Blake3(file.blake3_hex.clone()) {
                    continue;
                }
                report.mismatches_total += 1;
                named.insert(&file.path);
                if report.mismatches.len() < MISMATCHES_LISTED_MAX {
                    report.mismatches.push(Mismatch {
                        path: file.path.clone(),
                        expected_blake3: file.blake3_hex.clone(),
                        found: found.to_string(),
                    });
                }
            }
        }
        report.status = if report.mismatches_total > 0 {
            Status::Inconsistent
        } else if report.error.is_some() || report.behind {
            Status::Error
        } else {
            Status::Consistent
        };
        if report.behind && report.error.is_none() {
            report.error = Some(format!(
                "behind: answered at manifest index {} below {}",
                node.index.unwrap_or(0),
                manifest.applied_index()
            ));
        }
        nodes.push(report);
    }
    let mut disagreements = Vec::new();
    for path in named {
        let Some(file) = manifest.file(path) else {
            continue;
        };
        let found: Vec<NodeFound> = findings
            .iter()
            .filter_map(|node| {
                node.found_for(file).map(|found| NodeFound {
                    node_id: node.node_id,
                    found: found.to_string(),
                })
            })
            .collect();
        let distinct: BTreeSet<&str> = found.iter().map(|f| f.found.as_str()).collect();
        if distinct.len() > 1 {
            disagreements.push(Disagreement {
                path: path.to_owned(),
                expected_blake3: file.blake3_hex.clone(),
                found,
            });
        }
    }
    let status = if nodes.iter().any(|n| n.status == Status::Inconsistent) {
        Status::Inconsistent
    } else if nodes.iter().any(|n| n.status == Status::Error) {
        Status::Error
    } else {
        Status::Consistent
    };
    VerifyReport {
        database: database.to_owned(),
        manifest_index: manifest.applied_index(),
        deep,
        status,
        elapsed_ms: 0,
        bytes_exchanged: 0,
        nodes,
        disagreements,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestCommand;

    fn entry(path: &str, size: u64, content: &str) -> FileEntry {
        let mut file = crate::manifest::tests::file(path, 1, 2);
        file.path = path.to_owned();
        file.database = path.split('/').next().unwrap().to_owned();
        file.measurement = path.split('/').nth(1).unwrap_or("m").to_owned();
        file.size_bytes = size;
        file.blake3_hex = blake3::hash(content.as_bytes()).to_hex().to_string();
        file
    }

    fn manifest(files: Vec<FileEntry>) -> Manifest {
        let mut manifest = Manifest::default();
        let count = files.len() as u64;
        let response = manifest.apply(1, &ManifestCommand::Register { files });
        assert!(
            matches!(response, crate::manifest::ManifestResponse::Applied { files_added, .. } if files_added == count),
            "{response:?}"
        );
        manifest
    }

    fn paths(hours: u32, per_hour: u32) -> Vec<FileEntry> {
        let mut files = Vec::new();
        for hour in 0..hours {
            for n in 0..per_hour {
                let path = format!("db/cpu/2026/01/01/{hour:02}/n1-s0-{n}.parquet");
                files.push(entry(&path, 100 + n as u64, &path));
            }
        }
        files
    }

    /// Every candidate found intact (its manifest blake3).
    fn all_intact(plan: &PagePlan) -> Vec<Found> {
        plan.candidates()
            .map(|c| Found::Blake3(c.blake3_hex.clone()))
            .collect()
    }

    // The hour partition is the first six components, whatever the file name.
    #[test]
    fn partition_is_the_first_six_components() {
        assert_eq!(
            partition_of("db/cpu/2026/01/02/13/n1-s0-5-9.parquet"),
            "db/cpu/2026/01/02/13"
        );
        assert_eq!(partition_of("db/short.parquet"), "db");
        assert_eq!(partition_of("plain"), "");
    }

    // The digest is a function of the set of pairs: any order gives the same digest, and
    // fields cannot run together (moving a character from the path to the hash changes it).
    #[test]
    fn digest_is_order_independent_and_unambiguous() {
        let pairs = [("a/1", "aa"), ("a/2", "bb"), ("a/3", "cc")];
        let forward = partition_digest(pairs);
        let mut reversed = pairs;
        reversed.reverse();
        assert_eq!(partition_digest(reversed), forward);
        assert_eq!(
            partition_digest([("a/2", "bb"), ("a/1", "aa"), ("a/3", "cc")]),
            forward
        );
        assert_ne!(
            partition_digest([("ab", "c")]),
            partition_digest([("a", "bc")])
        );
        assert_ne!(partition_digest([("a/1", "aa")]), forward);
        assert_eq!(partition_digest([]).len(), 64);
    }

    // A changed or missing file changes exactly its own partition's digest, which is all the
    // coordinator descends into.
    #[test]
    fn a_damaged_file_changes_exactly_its_partition() {
        let manifest = manifest(paths(4, 3));
        let expected = expected_partitions(&manifest, "db");
        assert_eq!(expected.len(), 4);
        assert!(expected.values().all(|e| e.files == 3));
        let plan = plan_digest_page(&manifest, "db", None, 1000, false, &PageLimits::default());
        assert_eq!(plan.next, None);
        let mut found = all_intact(&plan);
        let intact: BTreeMap<String, PartitionDigest> = digest_page(&plan, &found)
            .into_iter()
            .map(|d| (d.partition.clone(), d))
            .collect();
        let comparison = compare_digests(&expected, &intact);
        assert!(comparison.differing.is_empty(), "{comparison:?}");
        assert_eq!(comparison.files_matching, 12);

        // Hour 01's second file missing, hour 03's first with other bytes.
        found[4] = Found::Missing;
        found[9] = Found::Blake3("ff".repeat(32));
        let damaged: BTreeMap<String, PartitionDigest> = digest_page(&plan, &found)
            .into_iter()
            .map(|d| (d.partition.clone(), d))
            .collect();
        let comparison = compare_digests(&expected, &damaged);
        assert_eq!(
            comparison.differing,
            ["db/cpu/2026/01/01/01", "db/cpu/2026/01/01/03"]
        );
        assert_eq!(comparison.files_matching, 6);
        // A wrong size also leaves the pair out.
        found[4] = Found::WrongSize(7);
        let wrong_size = digest_page(&plan, &found);
        assert_eq!(wrong_size[1], damaged[&wrong_size[1].partition]);
    }

    // Pages respect every bound, end only between partitions for digests, and their
    // continuations cover every file exactly once.
    #[test]
    fn pages_are_bounded_and_cover_everything_once() {
        let mut files = paths(30, 7);
        // Another database sharing a prefix must never leak in.
        files.push(entry("db2/cpu/2026/01/01/00/x.parquet", 1, "x"));
        files.push(entry("d/cpu/2026/01/01/00/x.parquet", 1, "y"));
        let manifest = manifest(files);
        let limits = PageLimits {
            entries_max: 4,
            files_max: 1_000,
            path_bytes_max: 1 << 20,
            deep_bytes_max: 250,
        };
        let mut after: Option<String> = None;
        let mut partitions = Vec::new();
        loop {
            let plan = plan_digest_page(&manifest, "db", after.as_deref(), 100, false, &limits);
            assert!(!plan.partitions.is_empty() && plan.partitions.len() <= 4);
            assert!(plan.partitions.iter().all(|(_, files)| files.len() == 7));
            partitions.extend(plan.partitions.iter().map(|(p, _)| p.clone()));
            match plan.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(partitions.len(), 30);
        assert_eq!(
            partitions.iter().collect::<BTreeSet<_>>().len(),
            30,
            "no partition twice"
        );
        // Deep pages stop at the byte bound (each partition holds 7 x ~103 bytes).
        let deep = plan_digest_page(&manifest, "db", None, 100, true, &limits);
        assert_eq!(deep.partitions.len(), 1);
        // The requester's own limit is a bound too.
        let small = plan_digest_page(&manifest, "db", None, 2, false, &limits);
        assert_eq!(small.partitions.len(), 2);

        let wanted: Vec<String> = partitions.iter().step_by(3).cloned().collect();
        let mut after: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let plan = plan_file_page(
                &manifest,
                "db",
                &wanted,
                after.as_deref(),
                5,
                false,
                &limits,
            );
            let page: Vec<Candidate> = plan.candidates().cloned().collect();
            assert!(!page.is_empty() && page.len() <= 4, "{}", page.len());
            seen.extend(page.into_iter().map(|c| c.path));
            match plan.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), wanted.len() * 7);
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "path order, no repeats"
        );
        assert!(seen
            .iter()
            .all(|p| wanted.iter().any(|w| partition_of(p) == w)));
    }

    // The report names exactly the damaged files per node with what was found, skips files
    // that exist in only one version, says when a node is behind, and lists files the nodes
    // disagree on with every node's finding.
    #[test]
    fn report_names_mismatches_and_disagreements() {
        let files = paths(3, 2);
        let manifest = manifest(files.clone());
        let expected = expected_partitions(&manifest, "db");
        let all: BTreeMap<String, PartitionDigest> = expected
            .iter()
            .map(|(p, e)| {
                let digest = PartitionDigest {
                    partition: p.clone(),
                    digest: e.digest.clone(),
                    files: e.files,
                };
                (p.clone(), digest)
            })
            .collect();
        let healthy = NodeFindings {
            node_id: 1,
            name: "one".into(),
            index: Some(1),
            digests: compare_digests(&expected, &all),
            ..NodeFindings::default()
        };

        // Node 2: hour 00's first file missing.
        let mut two_digests = all.clone();
        let hour0 = "db/cpu/2026/01/01/00".to_string();
        two_digests.get_mut(&hour0).unwrap().digest = "00".repeat(32);
        let damaged = &files[0];
        let two = NodeFindings {
            node_id: 2,
            name: "two".into(),
            index: Some(1),
            digests: compare_digests(&expected, &two_digests),
            files: BTreeMap::from([
                (damaged.path.clone(), Found::Missing),
                (
                    files[1].path.clone(),
                    Found::Blake3(files[1].blake3_hex.clone()),
                ),
                // Only in the node's newer version: ignored.
                (
                    "db/cpu/2026/01/01/00/new.parquet".into(),
                    Found::Blake3("ab".repeat(32)),
                ),
            ]),
            ..NodeFindings::default()
        };
        // Node 3: behind, its version lacks hour 00's second file; holds other bytes of the
        // first.
        let three = NodeFindings {
            node_id: 3,
            name: "three".into(),
            index: Some(0),
            behind: true,
            digests: compare_digests(&expected, &two_digests),
            files: BTreeMap::from([(damaged.path.clone(), Found::Blake3("cd".repeat(32)))]),
            ..NodeFindings::default()
        };
        let failed = NodeFindings {
            node_id: 4,
            name: "four".into(),
            error: Some("unreachable".into()),
            ..NodeFindings::default()
        };
        let report = build_report("db", &manifest, false, &[healthy, two, three, failed]);
        assert_eq!(report.status, Status::Inconsistent);
        let [one, two, three, four] = &report.nodes[..] else {
            panic!("four nodes: {report:?}");
        };
        assert_eq!((one.status, one.files_compared), (Status::Consistent, 6));
        assert_eq!(one.bytes_compared, 3 * (100 + 101));
        assert_eq!(two.status, Status::Inconsistent);
        assert_eq!(two.files_compared, 6);
        assert_eq!(
            two.mismatches,
            [Mismatch {
                path: damaged.path.clone(),
                expected_blake3: damaged.blake3_hex.clone(),
                found: "MISSING".into(),
            }]
        );
        assert_eq!(three.status, Status::Inconsistent);
        assert!(three.behind);
        assert!(three.error.as_deref().unwrap().contains("behind"));
        assert_eq!((three.files_compared, three.files_skipped), (5, 1));
        assert_eq!(three.mismatches[0].found, "cd".repeat(32));
        assert_eq!(four.status, Status::Error);
        assert_eq!(four.files_compared, 0);

        assert_eq!(report.disagreements.len(), 1);
        let disagreement = &report.disagreements[0];
        assert_eq!(disagreement.path, damaged.path);
        let found: Vec<(u64, &str)> = disagreement
            .found
            .iter()
            .map(|f| (f.node_id, f.found.as_str()))
            .collect();
        let cd = "cd".repeat(32);
        assert_eq!(
            found,
            [
                (1, damaged.blake3_hex.as_str()),
                (2, "MISSING"),
                (3, cd.as_str())
            ]
        );

        // Only behind or failed: ERROR; all healthy: CONSISTENT.
        let behind = NodeFindings {
            node_id: 5,
            index: Some(0),
            behind: true,
            digests: compare_digests(&expected, &all),
            ..NodeFindings::default()
        };
        let report = build_report("db", &manifest, false, &[behind]);
        assert_eq!(report.status, Status::Error);
        assert_eq!(report.nodes[0].files_compared, 6);
        let fine = NodeFindings {
            node_id: 1,
            index: Some(1),
            digests: compare_digests(&expected, &all),
            ..NodeFindings::default()
        };
        assert_eq!(
            build_report("db", &manifest, false, &[fine]).status,
            Status::Consistent
        );
    }

    // A cached finding trusts the presence index's hash only for a held file on disk with the
    // manifest's size; a hashed finding reports what the bytes are.
    #[test]
    fn findings_from_the_cache_and_from_the_bytes() {
        let candidate = Candidate {
            path: "db/m/2026/01/01/00/a".into(),
            size_bytes: 10,
            blake3_hex: "aa".into(),
        };
        assert_eq!(found_cached(&candidate, None, Ok(Some(10))), Found::Missing);
        assert_eq!(
            found_cached(&candidate, Some("aa"), Ok(None)),
            Found::Missing
        );
        assert_eq!(
            found_cached(&candidate, Some("aa"), Ok(Some(9))),
            Found::WrongSize(9)
        );
        assert_eq!(
            found_cached(&candidate, Some("aa"), Ok(Some(10))),
            Found::Blake3("aa".into())
        );
        assert_eq!(
            found_hashed(&candidate, Ok(Some((10, "bb".into())))),
            Found::Blake3("bb".into())
        );
        assert_eq!(found_hashed(&candidate, Ok(None)), Found::Missing);
        assert_eq!(
            found_hashed(&candidate, Ok(Some((11, "bb".into())))),
            Found::WrongSize(11)
        );
        assert_eq!(Found::WrongSize(11).to_string(), "WRONG_SIZE 11");
    }
}
