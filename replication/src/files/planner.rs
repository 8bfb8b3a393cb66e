//! Sans-IO fetch planning: given a manifest version, what is present locally, what is already
//! being fetched and which peers are up, which files to fetch and from whom.
//!
//! The plan is recomputed from the manifest each time instead of being kept as a queue of
//! events, so a bounded number of tasks loses nothing: what is not planned now is planned next
//! time, because it is still missing.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use crate::files::NodeId;
use crate::manifest::Manifest;

/// A peer that may serve files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: NodeId,
}

/// One file to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchTask {
    pub path: String,
    pub size_bytes: u64,
    pub blake3_hex: String,
    /// The origin first (it certainly has the file), then the other peers in an order that
    /// depends on the path, so that a catching-up node spreads its load over the peers. Empty
    /// when no peer can serve it now: only a local copy can then be adopted.
    pub sources: Vec<NodeId>,
}

/// What the planner needs to know about local state.
pub trait Presence {
    /// Whether `path` is present locally with this blake3.
    fn contains(&self, path: &str, blake3_hex: &str) -> bool;
}

impl Presence for crate::files::presence::PresenceIndex {
    fn contains(&self, path: &str, blake3_hex: &str) -> bool {
        crate::files::presence::PresenceIndex::contains(self, path, blake3_hex)
    }
}

/// Inputs besides the manifest and presence.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    /// This node; never a source.
    pub local: NodeId,
    pub peers: &'a [PeerInfo],
    /// Paths being fetched or waiting for a retry: missing, but not planned again.
    pub busy: &'a BTreeSet<String>,
    /// Sources that served bad bytes for a path (or had another idea of its size or hash).
    pub bad_sources: &'a BTreeMap<String, BTreeSet<NodeId>>,
    /// At most this many tasks.
    pub tasks_max: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub tasks: Vec<FetchTask>,
    /// Every manifest file not present, including busy ones and ones with no source left.
    pub missing_files: u64,
    pub missing_bytes: u64,
    /// Missing files that no usable source can serve right now.
    pub unsourced_files: u64,
}

/// Plans fetches for every file of `manifest` that `presence` lacks.
pub fn plan(manifest: &Manifest, presence: &dyn Presence, input: PlanInput<'_>) -> Plan {
    let mut result = Plan::default();
    for (path, entry) in manifest.files() {
        let path: &str = path;
        if presence.contains(path, &entry.blake3_hex) {
            continue;
        }
        result.missing_files += 1;
        result.missing_bytes += entry.size_bytes;
        if input.busy.contains(path) || result.tasks.len() >= input.tasks_max {
            continue;
        }
        let bad = input.bad_sources.get(path);
        let usable = |node: NodeId| node != input.local && !bad.is_some_and(|b| b.contains(&node));
        let mut sources = Vec::new();
        if usable(entry.origin_node) && input.peers.iter().any(|p| p.node_id == entry.origin_node) {
            sources.push(entry.origin_node);
        }
        let others: Vec<NodeId> = input
            .peers
            .iter()
            .map(|p| p.node_id)
            .filter(|&node| node != entry.origin_node && usable(node))
            .collect();
        if !others.is_empty() {
            // A stable rotation per path: the same file tries peers in the same order every time,
            // and different files start at different peers.
            let start = (blake3::hash(path.as_bytes()).as_bytes()[0] as usize) % others.len();
            sources.extend(others[start..].iter().chain(&others[..start]));
        }
        // A file without a usable source is still planned: its copy may be on disk already
        // (this node's own flush, or a fetch renamed just before a crash), and the fetch adopts
        // it after hashing. This is also how a standalone node records its own files.
        if sources.is_empty() {
            result.unsourced_files += 1;
        }
        result.tasks.push(FetchTask {
            path: path.to_string(),
            size_bytes: entry.size_bytes,
            blake3_hex: entry.blake3_hex.clone(),
            sources,
        });
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::file;
    use crate::manifest::ManifestCommand;
    use std::collections::HashMap;

    struct Present(HashMap<String, String>);

    impl Presence for Present {
        fn contains(&self, path: &str, blake3_hex: &str) -> bool {
            self.0.get(path).is_some_and(|h| h == blake3_hex)
        }
    }

    fn manifest(files: Vec<crate::manifest::FileEntry>) -> Manifest {
        let mut manifest = Manifest::default();
        manifest.apply(1, &ManifestCommand::Register { files });
        manifest
    }

    fn peers(ids: &[NodeId]) -> Vec<PeerInfo> {
        ids.iter().map(|&node_id| PeerInfo { node_id }).collect()
    }

    // Checks the planner's rules: present files (same blake3) are skipped, a present path with
    // another blake3 is fetched, busy paths count as missing but are not planned, the origin
    // comes first, this node and bad sources are never sources, an unreachable origin leaves the
    // other peers, and the task bound holds while the missing counts stay complete.
    #[test]
    fn plan_rules() {
        let mut a = file("a", 1, 2);
        a.origin_node = 2;
        let mut b = file("b", 3, 4);
        b.origin_node = 3;
        let mut c = file("c", 5, 6);
        c.origin_node = 1;
        let mut d = file("d", 7, 8);
        d.origin_node = 9; // Not a peer any more.
        let manifest = manifest(vec![a.clone(), b.clone(), c.clone(), d.clone()]);
        let present = Present(HashMap::from([
            ("a".to_owned(), a.blake3_hex.clone()),
            ("b".to_owned(), "0".repeat(64)),
        ]));
        let peers = peers(&[2, 3, 4]);
        let busy = BTreeSet::new();
        let mut bad = BTreeMap::new();
        bad.insert("b".to_owned(), BTreeSet::from([4]));
        let input = PlanInput {
            local: 1,
            peers: &peers,
            busy: &busy,
            bad_sources: &bad,
            tasks_max: 10,
        };
        let result = plan(&manifest, &present, input);
        let tasks: BTreeMap<&str, &FetchTask> =
            result.tasks.iter().map(|t| (t.path.as_str(), t)).collect();
        assert!(!tasks.contains_key("a"));
        assert_eq!(tasks["b"].sources, vec![3, 2]);
        assert_eq!(tasks["b"].blake3_hex, b.blake3_hex);
        // The local node is c's origin (a wiped disk): every peer may serve it.
        let mut c_sources = tasks["c"].sources.clone();
        c_sources.sort();
        assert_eq!(c_sources, vec![2, 3, 4]);
        let mut d_sources = tasks["d"].sources.clone();
        d_sources.sort();
        assert_eq!(d_sources, vec![2, 3, 4]);
        assert_eq!(result.missing_files, 3);
        assert_eq!(
            result.missing_bytes,
            b.size_bytes + c.size_bytes + d.size_bytes
        );

        let busy = BTreeSet::from(["c".to_owned()]);
        let bounded = plan(
            &manifest,
            &present,
            PlanInput {
                busy: &busy,
                tasks_max: 1,
                ..input
            },
        );
        assert_eq!(bounded.tasks.len(), 1);
        assert_eq!(bounded.tasks[0].path, "b");
        assert_eq!(bounded.missing_files, 3);

        let mut all_bad = BTreeMap::new();
        all_bad.insert("b".to_owned(), BTreeSet::from([2, 3, 4]));
        let stuck = plan(
            &manifest,
            &present,
            PlanInput {
                bad_sources: &all_bad,
                ..input
            },
        );
        let b_task = stuck.tasks.iter().find(|t| t.path == "b").unwrap();
        assert!(b_task.sources.is_empty());
        assert_eq!(stuck.unsourced_files, 1);
        assert_eq!(stuck.missing_files, 3);
    }
}
