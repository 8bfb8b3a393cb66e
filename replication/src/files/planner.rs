//! Sans-IO fetch planning: which files of the manifest this node lacks, which of them to fetch
//! now and from whom, and which local files a new manifest version removed.
//!
//! The [`Planner`] keeps the set of missing files of the newest observed manifest version and
//! maintains it from the difference between consecutive versions: the manifest's maps are
//! persistent maps that share every untouched subtree between versions, so
//! [`Planner::observe`] costs O(changed files x log n), not O(files). Only when no structure is
//! shared (the first version at start-up, a version installed from a snapshot) does the
//! difference degrade to one pass over both versions, which is the full rescan those moments
//! need anyway.
//!
//! Lossless and bounded: every missing path is in exactly one of three places, ready (waiting
//! for a fetch slot, in path order), in flight, or deferred (waiting for a retry). Tasks are
//! handed out only up to the concurrency, and what is not planned now stays ready for later,
//! because it is removed only when it is present or no longer in the manifest.
//!
//! Time is the caller's monotonic clock as a [`Duration`] since any fixed start.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use imbl::ordmap::DiffItem;

use crate::files::NodeId;
use crate::manifest::FileEntry;
use crate::manifest::FileMap;
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

/// Presence of a node that holds nothing.
struct NothingPresent;

impl Presence for NothingPresent {
    fn contains(&self, _path: &str, _blake3_hex: &str) -> bool {
        false
    }
}

/// Inputs of one planning round besides the planner's own state.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    /// This node; never a source.
    pub local: NodeId,
    pub peers: &'a [PeerInfo],
    /// Fetches allowed at once; tasks are handed out only up to it.
    pub concurrency: usize,
    pub now: Duration,
}

/// What a new manifest version changed for this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Paths the new version no longer has: their local copies are to be removed once no
    /// pinned version uses them.
    pub removed: Vec<Arc<str>>,
    /// Removed or re-registered paths that were being fetched: the fetch is to be stopped.
    pub cancelled: Vec<Arc<str>>,
}

/// How a planned task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The file is present now (fetched, or a local copy adopted) with the task's blake3.
    Present,
    /// Every source failed; `bad_sources` served bytes that contradict the manifest.
    Failed { bad_sources: Vec<NodeId> },
}

/// Retry timings.
#[derive(Clone, Copy, Debug)]
pub struct PlannerConfig {
    /// Wait before a failed file is tried again.
    pub retry: Duration,
    /// How long a source that served bad bytes for a file is skipped for that file.
    pub bad_source_forget: Duration,
}

/// The incremental planner. See the module documentation.
#[derive(Clone, Debug)]
pub struct Planner {
    config: PlannerConfig,
    /// Files of the newest observed version not present here. A persistent map, so the
    /// driver's present-version candidates keep O(1) copies of it.
    missing: FileMap,
    missing_bytes: u64,
    /// Missing paths waiting for a fetch slot, in path order.
    ready: BTreeSet<Arc<str>>,
    in_flight: HashSet<Arc<str>>,
    /// Missing paths waiting for a retry, by path and by time.
    deferred: HashMap<Arc<str>, Duration>,
    deferred_by_time: BTreeSet<(Duration, Arc<str>)>,
    /// Sources that served bad bytes for a missing path, and when they may serve it again.
    bad_sources: HashMap<Arc<str>, BTreeMap<NodeId, Duration>>,
    /// Missing paths whose latest plan found no usable source.
    unsourced: HashSet<Arc<str>>,
}

impl Planner {
    pub fn new(config: PlannerConfig) -> Planner {
        Planner {
            config,
            missing: FileMap::new(),
            missing_bytes: 0,
            ready: BTreeSet::new(),
            in_flight: HashSet::new(),
            deferred: HashMap::new(),
            deferred_by_time: BTreeSet::new(),
            bad_sources: HashMap::new(),
            unsourced: HashSet::new(),
        }
    }

    /// Moves from `previous` (the version observed last; `None` at start) to `next`: files
    /// added and not present become missing, removed files stop being missing and are reported.
    /// Costs O(changes x log n) when the two versions share structure.
    pub fn observe(
        &mut self,
        previous: Option<&Manifest>,
        next: &Manifest,
        presence: &dyn Presence,
    ) -> Observed {
        let empty = FileMap::new();
        let previous = previous.map_or(&empty, Manifest::files);
        let mut observed = Observed::default();
        for item in previous.diff(next.files()) {
            match item {
                DiffItem::Add(path, entry) => self.add(path, entry, presence),
                DiffItem::Update { new, .. } => {
                    // A path registered again with other bytes (files are immutable, so this
                    // does not happen in practice): the old fetch is stale. The new copy's
                    // rename replaces the old file, so there is nothing to remove.
                    if self.forget(new.0) {
                        observed.cancelled.push(new.0.clone());
                    }
                    self.add(new.0, new.1, presence);
                }
                DiffItem::Remove(path, _) => {
                    if self.forget(path) {
                        observed.cancelled.push(path.clone());
                    }
                    observed.removed.push(path.clone());
                }
            }
        }
        observed
    }

    /// Makes `path` missing again although it was present (its local copy was found damaged
    /// and set aside): it is fetched like any missing file. The caller has removed it from the
    /// presence index first.
    pub fn mark_missing(&mut self, path: &Arc<str>, entry: &Arc<FileEntry>) {
        self.add(path, entry, &NothingPresent);
    }

    fn add(&mut self, path: &Arc<str>, entry: &Arc<FileEntry>, presence: &dyn Presence) {
        if presence.contains(path, &entry.blake3_hex) {
            return;
        }
        self.missing_bytes += entry.size_bytes;
        if let Some(old) = self.missing.insert(path.clone(), entry.clone()) {
            self.missing_bytes -= old.size_bytes;
        }
        if !self.in_flight.contains(path) && !self.deferred.contains_key(path) {
            self.ready.insert(path.clone());
        }
    }

    /// Drops every trace of `path`; answers whether it was in flight.
    fn forget(&mut self, path: &Arc<str>) -> bool {
        if let Some(old) = self.missing.remove(path) {
            self.missing_bytes -= old.size_bytes;
        }
        self.ready.remove(path);
        if let Some(until) = self.deferred.remove(path) {
            self.deferred_by_time.remove(&(until, path.clone()));
        }
        self.bad_sources.remove(path);
        self.unsourced.remove(path);
        self.in_flight.remove(path)
    }

    /// Hands out tasks for ready paths (and deferred ones whose retry time has come) while
    /// fewer than `input.concurrency` are in flight.
    pub fn next_tasks(&mut self, input: PlanInput<'_>) -> Vec<FetchTask> {
        while let Some((until, path)) = self.deferred_by_time.first().cloned() {
            if until > input.now {
                break;
            }
            self.deferred_by_time.pop_first();
            self.deferred.remove(&path);
            self.ready.insert(path);
        }
        let mut tasks = Vec::new();
        while self.in_flight.len() < input.concurrency.max(1) {
            let Some(path) = self.ready.pop_first() else {
                break;
            };
            let Some(entry) = self.missing.get(&path).cloned() else {
                debug_assert!(false, "ready path {path} is not missing");
                continue;
            };
            let sources = self.sources(&path, &entry, input);
            if sources.is_empty() {
                self.unsourced.insert(path.clone());
            } else {
                self.unsourced.remove(&path);
            }
            tasks.push(FetchTask {
                path: path.to_string(),
                size_bytes: entry.size_bytes,
                blake3_hex: entry.blake3_hex.clone(),
                sources,
            });
            self.in_flight.insert(path);
        }
        tasks
    }

    fn sources(&mut self, path: &Arc<str>, entry: &FileEntry, input: PlanInput<'_>) -> Vec<NodeId> {
        let bad = match self.bad_sources.get_mut(path) {
            Some(bad) => {
                bad.retain(|_, until| *until > input.now);
                if bad.is_empty() {
                    self.bad_sources.remove(path);
                    None
                } else {
                    Some(&*bad)
                }
            }
            None => None,
        };
        let usable =
            |node: NodeId| node != input.local && !bad.is_some_and(|b| b.contains_key(&node));
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
        sources
    }

    /// Records how the task for `path` (with `blake3_hex`) ended. Answers whether the outcome
    /// counted: an outcome for a path no longer in flight (cancelled) or for other bytes than
    /// the manifest now names changes nothing.
    pub fn settle(
        &mut self,
        path: &str,
        blake3_hex: &str,
        settled: Settled,
        now: Duration,
    ) -> bool {
        let Some((path, entry)) = self
            .missing
            .get_key_value(path)
            .map(|(path, entry)| (path.clone(), entry.clone()))
        else {
            return false;
        };
        if entry.blake3_hex != blake3_hex || !self.in_flight.remove(&path) {
            return false;
        }
        match settled {
            Settled::Present => {
                self.forget(&path);
            }
            Settled::Failed { bad_sources } => {
                let forget_at = now + self.config.bad_source_forget;
                let bad = self.bad_sources.entry(path.clone()).or_default();
                for node in bad_sources {
                    bad.insert(node, forget_at);
                }
                if bad.is_empty() {
                    self.bad_sources.remove(&path);
                }
                let until = now + self.config.retry;
                self.deferred.insert(path.clone(), until);
                self.deferred_by_time.insert((until, path));
            }
        }
        true
    }

    /// When the next deferred path becomes ready, if any waits.
    pub fn wake_at(&self) -> Option<Duration> {
        self.deferred_by_time.first().map(|(until, _)| *until)
    }

    /// The missing files of the newest observed version (an O(1) copy).
    pub fn missing(&self) -> FileMap {
        self.missing.clone()
    }

    pub fn is_missing(&self, path: &str) -> bool {
        self.missing.contains_key(path)
    }

    pub fn missing_files(&self) -> u64 {
        self.missing.len() as u64
    }

    pub fn missing_bytes(&self) -> u64 {
        self.missing_bytes
    }

    /// Missing files whose latest plan found no usable source.
    pub fn unsourced_files(&self) -> u64 {
        self.unsourced.len() as u64
    }

    pub fn in_flight_files(&self) -> u64 {
        self.in_flight.len() as u64
    }

    /// Checks that every missing path is in exactly one of ready, in flight and deferred, and
    /// that nothing else is. O(missing); for tests.
    pub fn check_invariants(&self) {
        let mut total = 0u64;
        for (path, entry) in self.missing.iter() {
            let places = [
                self.ready.contains(path),
                self.in_flight.contains(path),
                self.deferred.contains_key(path),
            ];
            assert_eq!(
                places.iter().filter(|p| **p).count(),
                1,
                "{path}: ready, in flight, deferred = {places:?}"
            );
            total += entry.size_bytes;
        }
        assert_eq!(total, self.missing_bytes);
        assert_eq!(
            self.ready.len() + self.in_flight.len() + self.deferred.len(),
            self.missing.len()
        );
        assert_eq!(self.deferred.len(), self.deferred_by_time.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::file;
    use crate::manifest::ManifestCommand;

    struct Present(HashMap<String, String>);

    impl Presence for Present {
        fn contains(&self, path: &str, blake3_hex: &str) -> bool {
            self.0.get(path).is_some_and(|h| h == blake3_hex)
        }
    }

    fn nothing() -> Present {
        Present(HashMap::new())
    }

    fn manifest(files: Vec<FileEntry>) -> Manifest {
        let mut manifest = Manifest::default();
        manifest.apply(1, &ManifestCommand::Register { files });
        manifest
    }

    fn peers(ids: &[NodeId]) -> Vec<PeerInfo> {
        ids.iter().map(|&node_id| PeerInfo { node_id }).collect()
    }

    fn planner() -> Planner {
        Planner::new(PlannerConfig {
            retry: Duration::from_secs(1),
            bad_source_forget: Duration::from_secs(60),
        })
    }

    fn input(peers: &[PeerInfo], concurrency: usize, now_s: u64) -> PlanInput<'_> {
        PlanInput {
            local: 1,
            peers,
            concurrency,
            now: Duration::from_secs(now_s),
        }
    }

    fn paths(tasks: &[FetchTask]) -> Vec<&str> {
        tasks.iter().map(|t| t.path.as_str()).collect()
    }

    // Checks the source rules: present files (same blake3) are skipped, a present path with
    // another blake3 is fetched, the origin comes first, this node is never a source, a former
    // origin that is no peer leaves the other peers, and a file with no usable source is still
    // planned (to adopt a local copy) and counted as unsourced.
    #[test]
    fn sources_and_presence() {
        let mut a = file("a", 1, 2);
        a.origin_node = 2;
        let mut b = file("b", 3, 4);
        b.origin_node = 3;
        let mut c = file("c", 5, 6);
        c.origin_node = 1;
        let mut d = file("d", 7, 8);
        d.origin_node = 9; // Not a peer any more.
        let next = manifest(vec![a.clone(), b.clone(), c.clone(), d.clone()]);
        let present = Present(HashMap::from([
            ("a".to_owned(), a.blake3_hex.clone()),
            ("b".to_owned(), "0".repeat(64)),
        ]));
        let mut planner = planner();
        let observed = planner.observe(None, &next, &present);
        assert_eq!(observed, Observed::default());
        assert_eq!(planner.missing_files(), 3);
        assert_eq!(
            planner.missing_bytes(),
            b.size_bytes + c.size_bytes + d.size_bytes
        );
        let peers = peers(&[2, 3, 4]);
        let tasks = planner.next_tasks(input(&peers, 10, 0));
        assert_eq!(paths(&tasks), ["b", "c", "d"]);
        assert_eq!(tasks[0].sources[0], 3);
        assert_eq!(tasks[0].blake3_hex, b.blake3_hex);
        for task in &tasks {
            let mut sources = task.sources.clone();
            sources.sort();
            assert_eq!(sources, vec![2, 3, 4], "{}", task.path);
        }
        assert_eq!(planner.unsourced_files(), 0);
        planner.check_invariants();

        let mut alone = self::planner();
        alone.observe(None, &next, &present);
        let tasks = alone.next_tasks(input(&[], 10, 0));
        assert!(tasks.iter().all(|t| t.sources.is_empty()));
        assert_eq!(alone.unsourced_files(), 3);
    }

    // Checks that the queue is bounded and lossless: at most `concurrency` tasks are in flight,
    // a failed file waits for its retry time and then comes back, a bad source is skipped for
    // that file until it is forgotten, and a file leaves the planner only once present.
    #[test]
    fn bounded_lossless_retry_and_bad_sources() {
        let mut files: Vec<FileEntry> = (0..5).map(|i| file(&format!("f{i}"), i, i)).collect();
        for f in &mut files {
            f.origin_node = 2;
        }
        let next = manifest(files.clone());
        let mut planner = planner();
        planner.observe(None, &next, &nothing());
        let peers = peers(&[2, 3]);

        let first = planner.next_tasks(input(&peers, 2, 0));
        assert_eq!(paths(&first), ["f0", "f1"]);
        assert!(planner.next_tasks(input(&peers, 2, 0)).is_empty());
        planner.check_invariants();

        assert!(planner.settle("f0", &files[0].blake3_hex, Settled::Present, Duration::ZERO));
        let failed = Settled::Failed {
            bad_sources: vec![2],
        };
        assert!(planner.settle("f1", &files[1].blake3_hex, failed, Duration::ZERO));
        // An outcome for a path not in flight any more changes nothing.
        assert!(!planner.settle("f0", &files[0].blake3_hex, Settled::Present, Duration::ZERO));
        assert_eq!(planner.missing_files(), 4);
        assert_eq!(planner.wake_at(), Some(Duration::from_secs(1)));
        planner.check_invariants();

        let second = planner.next_tasks(input(&peers, 2, 0));
        assert_eq!(paths(&second), ["f2", "f3"]);
        for task in &second {
            assert!(planner.settle(
                &task.path,
                &task.blake3_hex,
                Settled::Present,
                Duration::ZERO
            ));
        }
        // f1 is deferred until second 1; before that only f4 is handed out.
        assert_eq!(paths(&planner.next_tasks(input(&peers, 2, 0))), ["f4"]);
        let retried = planner.next_tasks(input(&peers, 2, 1));
        assert_eq!(paths(&retried), ["f1"]);
        assert_eq!(retried[0].sources, vec![3], "the bad origin is skipped");
        planner.check_invariants();
        assert!(planner.settle(
            "f1",
            &files[1].blake3_hex,
            Settled::Failed {
                bad_sources: vec![]
            },
            Duration::from_secs(1)
        ));
        // Once the bad mark is forgotten, the origin serves again.
        let later = planner.next_tasks(input(&peers, 2, 61));
        assert_eq!(later[0].sources[0], 2);
        assert!(planner.settle(
            "f4",
            &files[4].blake3_hex,
            Settled::Present,
            Duration::from_secs(61)
        ));
        assert!(planner.settle(
            "f1",
            &files[1].blake3_hex,
            Settled::Present,
            Duration::from_secs(61)
        ));
        assert_eq!(planner.missing_files(), 0);
        assert_eq!(planner.missing_bytes(), 0);
        assert_eq!(planner.wake_at(), None);
        planner.check_invariants();
    }

    // Checks the incremental path against a full rescan: after a sequence of registrations and
    // removals applied to one manifest (so versions share structure, as published versions
    // do), the planner that only saw differences has exactly the missing files that a planner
    // observing the last version from scratch has; removed files are reported, and removing a
    // file being fetched cancels it.
    #[test]
    fn differences_match_a_full_rescan_and_report_removals() {
        let mut manifest = Manifest::default();
        let mut planner = planner();
        let present = Present(HashMap::from([(
            "p3".to_owned(),
            file("p3", 3, 3).blake3_hex,
        )]));
        planner.observe(None, &manifest.clone(), &present);
        let mut previous = manifest.clone();
        let peers = peers(&[2]);
        let mut removed_all = Vec::new();
        let mut cancelled_all = Vec::new();
        for step in 0..20u64 {
            let index = step + 2;
            let command = if step % 4 == 3 {
                ManifestCommand::Batch {
                    add: vec![file(&format!("p{}", 100 + step), step, step)],
                    remove: vec![format!("p{}", step - 3), format!("p{}", step - 2)],
                }
            } else {
                ManifestCommand::Register {
                    files: vec![file(&format!("p{step}"), step, step)],
                }
            };
            manifest.apply(index, &command);
            let observed = planner.observe(Some(&previous), &manifest, &present);
            removed_all.extend(observed.removed);
            cancelled_all.extend(observed.cancelled);
            previous = manifest.clone();
            // One fetch in flight at a time, never settled: the removals cancel some.
            planner.next_tasks(input(&peers, 1, 0));
            planner.check_invariants();
        }
        let mut fresh = self::planner();
        fresh.observe(None, &manifest, &present);
        let keys = |map: FileMap| map.keys().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(keys(planner.missing()), keys(fresh.missing()));
        assert_eq!(planner.missing_bytes(), fresh.missing_bytes());
        assert!(!planner.is_missing("p3"), "present files are not missing");
        let removed: BTreeSet<String> = removed_all.iter().map(|p| p.to_string()).collect();
        let expected: BTreeSet<String> = (0..20u64)
            .filter(|s| s % 4 == 3)
            .flat_map(|s| [format!("p{}", s - 3), format!("p{}", s - 2)])
            .collect();
        assert_eq!(removed, expected);
        assert!(!cancelled_all.is_empty());
        assert!(cancelled_all.iter().all(|p| removed.contains(&**p)));
        for path in &removed {
            assert!(!planner.is_missing(path));
        }
    }
}
