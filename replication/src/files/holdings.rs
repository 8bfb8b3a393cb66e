//! What this node holds and what is damaged: a read view of the presence index beside the
//! anti-entropy walker's findings, shared between the control thread, which writes it, and
//! readers on any thread (query workers, verification, the cluster API).
//!
//! The replicator mirrors every durable presence change here after it is durable, so a reader
//! never sees a file as held that a restart would not find recorded. The walker records a
//! damaged file before it moves it to quarantine and clears it only after the repaired copy is
//! recorded present, so a reader that finds a manifest file absent from disk can tell "not
//! fetched yet" (not held, not damaged) from "was here and is being repaired" (damaged) and
//! from "no good copy anywhere" (damaged and lost).
//!
//! Threads: every method takes a short mutex; [`Holdings::wait_usable`] blocks on a condition
//! variable and is only for threads that may block (query workers), never a glommio shard or
//! the tokio control thread.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::time::Duration;
use std::time::Instant;

use serde::Deserialize;
use serde::Serialize;

/// A file recorded present in the presence index, as verified when recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldFile {
    pub size_bytes: u64,
    pub blake3_hex: Arc<str>,
    /// When its bytes were last hashed and found equal to the manifest, milliseconds since the
    /// Unix epoch.
    pub verified_at_ms: i64,
}

/// What the walker (or a peer, or a query) found wrong with a local copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Recorded present, but no file is at its path.
    Missing,
    /// The file has another size than the manifest says.
    WrongSize { found_bytes: u64 },
    /// The bytes hash to another blake3 than the manifest says.
    Corrupt { found_blake3: String },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Missing => write!(f, "missing"),
            Finding::WrongSize { found_bytes } => write!(f, "wrong size ({found_bytes} bytes)"),
            Finding::Corrupt { found_blake3 } => write!(f, "corrupt (blake3 {found_blake3})"),
        }
    }
}

/// A manifest file whose local copy is damaged and not repaired yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    pub path: String,
    pub finding: Finding,
    /// The manifest's blake3 of the file.
    pub expected_blake3: String,
    /// When the damage was found, milliseconds since the Unix epoch.
    pub found_at_ms: i64,
    /// Where the damaged copy was moved, relative to the data directory, if there was one.
    pub quarantined_as: Option<String>,
    /// Every member was asked and none holds a copy matching the manifest.
    #[serde(default)]
    pub lost: bool,
}

/// Why [`Holdings::wait_usable`] gave up on a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// The file is damaged here and was not repaired before the deadline.
    Repairing(Damage),
    /// No member holds a good copy.
    Lost(Damage),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Repairing(damage) => write!(
                f,
                "file {} is {} on this node and was not repaired in time",
                damage.path, damage.finding
            ),
            Unusable::Lost(damage) => write!(
                f,
                "file {} is lost: {} here and no member holds a copy matching blake3 {}",
                damage.path, damage.finding, damage.expected_blake3
            ),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    held: BTreeMap<String, HeldFile>,
    damaged: BTreeMap<String, Damage>,
    /// Paths a reader found absent although recorded held; the walker checks them first.
    suspects: Vec<String>,
}

/// Counters of what anti-entropy found and did, written by the walker and the replicator.
#[derive(Debug, Default)]
pub struct Counters {
    pub missing_total: AtomicU64,
    pub wrong_size_total: AtomicU64,
    pub corrupt_total: AtomicU64,
    pub quarantined_total: AtomicU64,
    pub repaired_total: AtomicU64,
    /// Files found lost (no member holds a good copy), counted once per finding.
    pub lost_total: AtomicU64,
}

impl Counters {
    pub fn found(&self, finding: &Finding) {
        let counter = match finding {
            Finding::Missing => &self.missing_total,
            Finding::WrongSize { .. } => &self.wrong_size_total,
            Finding::Corrupt { .. } => &self.corrupt_total,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Inner {
    counters: Counters,
    state: Mutex<State>,
    changed: Condvar,
    /// Wakes the walker when a suspect is reported (tokio side).
    suspect: tokio::sync::Notify,
}

/// See the module documentation. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Holdings(Arc<Inner>);

impl Holdings {
    pub fn new() -> Holdings {
        Holdings::default()
    }

    pub fn counters(&self) -> &Counters {
        &self.0.counters
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `path` as held (after its presence record is durable).
    pub fn set_held(&self, path: &str, file: HeldFile) {
        self.state().held.insert(path.to_owned(), file);
        self.0.changed.notify_all();
    }

    /// Records `paths` as no longer held (after the presence index stopped counting them).
    pub fn unset_held<'a>(&self, paths: impl IntoIterator<Item = &'a str>) {
        let mut state = self.state();
        for path in paths {
            state.held.remove(path);
        }
        drop(state);
        self.0.changed.notify_all();
    }

    /// Records (or updates) a damaged file.
    pub fn set_damaged(&self, damage: Damage) {
        self.state().damaged.insert(damage.path.clone(), damage);
        self.0.changed.notify_all();
    }

    /// Records where a damaged file's copy was moved; answers whether it was damaged.
    pub fn set_quarantined(&self, path: &str, quarantined_as: Option<String>) -> bool {
        let mut state = self.state();
        let Some(damage) = state.damaged.get_mut(path) else {
            return false;
        };
        damage.quarantined_as = quarantined_as;
        true
    }

    /// Marks a damaged file lost or not lost; answers whether it was damaged.
    pub fn set_lost(&self, path: &str, lost: bool) -> bool {
        let mut state = self.state();
        let Some(damage) = state.damaged.get_mut(path) else {
            return false;
        };
        damage.lost = lost;
        drop(state);
        self.0.changed.notify_all();
        true
    }

    /// Forgets the damage of `path` (repaired, or no longer in the manifest); answers it.
    pub fn clear_damaged(&self, path: &str) -> Option<Damage> {
        let damage = self.state().damaged.remove(path);
        self.0.changed.notify_all();
        damage
    }

    pub fn held(&self, path: &str) -> Option<HeldFile> {
        self.state().held.get(path).cloned()
    }

    /// Held files whose path starts with `prefix` (e.g. `"<database>/"`), in path order.
    pub fn held_under(&self, prefix: &str) -> Vec<(String, HeldFile)> {
        let state = self.state();
        state
            .held
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(path, _)| path.starts_with(prefix))
            .map(|(path, file)| (path.clone(), file.clone()))
            .collect()
    }

    pub fn held_count(&self) -> usize {
        self.state().held.len()
    }

    /// Bytes of every held file.
    pub fn held_bytes(&self) -> u64 {
        self.state().held.values().map(|file| file.size_bytes).sum()
    }

    /// The oldest verification time of a held file, milliseconds since the Unix epoch.
    pub fn oldest_verified_ms(&self) -> Option<i64> {
        self.state()
            .held
            .values()
            .map(|file| file.verified_at_ms)
            .min()
    }

    /// Records a fresh verification of a held file (in memory; the presence index keeps the
    /// time of the fetch or adoption).
    pub fn set_verified(&self, path: &str, at_ms: i64) {
        if let Some(file) = self.state().held.get_mut(path) {
            file.verified_at_ms = at_ms;
        }
    }

    pub fn damaged(&self, path: &str) -> Option<Damage> {
        self.state().damaged.get(path).cloned()
    }

    /// Every damaged file, in path order.
    pub fn damage_list(&self) -> Vec<Damage> {
        self.state().damaged.values().cloned().collect()
    }

    /// A reader found `path` absent from disk although it is recorded held: asks the walker to
    /// check it now.
    pub fn report_suspect(&self, path: &str) {
        let mut state = self.state();
        if !state.suspects.iter().any(|p| p == path) {
            state.suspects.push(path.to_owned());
        }
        drop(state);
        self.0.suspect.notify_one();
    }

    /// The suspects reported since the last call.
    pub fn take_suspects(&self) -> Vec<String> {
        std::mem::take(&mut self.state().suspects)
    }

    /// Resolves when a suspect is reported (or one was reported since the last wait).
    pub async fn suspect_reported(&self) {
        self.0.suspect.notified().await;
    }

    /// Blocks until each of `paths` is usable: not damaged, and (if it was damaged) held again.
    /// `on_disk` answers whether a path's final file exists; a path recorded held whose file is
    /// absent is reported to the walker and waited for like a damaged one. Gives up at
    /// `deadline` with the first path still damaged, and at once for a lost one. Answers
    /// whether it found anything to wait for (a caller that planned with a damaged file absent
    /// plans again). For threads that may block only.
    pub fn wait_usable(
        &self,
        paths: &[&str],
        on_disk: &dyn Fn(&str) -> bool,
        deadline: Instant,
    ) -> Result<bool, Unusable> {
        let mut reported = false;
        let mut state = self.state();
        loop {
            let mut waiting: Option<Damage> = None;
            for path in paths {
                if let Some(damage) = state.damaged.get(*path) {
                    if damage.lost {
                        return Err(Unusable::Lost(damage.clone()));
                    }
                    waiting.get_or_insert_with(|| damage.clone());
                } else if state.held.contains_key(*path) && !on_disk(path) {
                    // Gone from disk behind the walker's back: the walker records it damaged
                    // once it looks, which the report makes happen now.
                    if !reported {
                        state.suspects.push((*path).to_owned());
                        self.0.suspect.notify_one();
                    }
                    waiting.get_or_insert_with(|| Damage {
                        path: (*path).to_owned(),
                        finding: Finding::Missing,
                        expected_blake3: state.held[*path].blake3_hex.to_string(),
                        found_at_ms: 0,
                        quarantined_as: None,
                        lost: false,
                    });
                }
            }
            let Some(damage) = waiting else {
                return Ok(reported);
            };
            reported = true;
            let now = Instant::now();
            if now >= deadline {
                return Err(Unusable::Repairing(damage));
            }
            // Changes notify; the bounded wait also notices a file that reappears on disk.
            let wait = (deadline - now).min(Duration::from_millis(100));
            state = self
                .0
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(blake3: &str) -> HeldFile {
        HeldFile {
            size_bytes: 10,
            blake3_hex: Arc::from(blake3),
            verified_at_ms: 0,
        }
    }

    fn damage(path: &str) -> Damage {
        Damage {
            path: path.to_owned(),
            finding: Finding::Corrupt {
                found_blake3: "bb".into(),
            },
            expected_blake3: "aa".into(),
            found_at_ms: 1,
            quarantined_as: None,
            lost: false,
        }
    }

    // held_under must find exactly one database's files, including at the ends of the range.
    #[test]
    fn held_under_is_a_prefix_range() {
        let holdings = Holdings::new();
        for path in ["db/a", "db/b", "db2/a", "da/z", "db"] {
            holdings.set_held(path, held("aa"));
        }
        let found: Vec<String> = holdings
            .held_under("db/")
            .into_iter()
            .map(|(path, _)| path)
            .collect();
        assert_eq!(found, ["db/a", "db/b"]);
    }

    // A damaged file makes a waiter wait until it is cleared; a lost one fails at once; a
    // deadline gives up naming the file.
    #[test]
    fn waiting_for_damaged_files() {
        let holdings = Holdings::new();
        holdings.set_held("db/a", held("aa"));
        let on_disk = |_: &str| true;
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(holdings.wait_usable(&["db/a"], &on_disk, soon), Ok(false));

        holdings.set_damaged(damage("db/a"));
        let error = holdings
            .wait_usable(
                &["db/a"],
                &on_disk,
                Instant::now() + Duration::from_millis(50),
            )
            .unwrap_err();
        assert!(
            matches!(&error, Unusable::Repairing(d) if d.path == "db/a"),
            "{error}"
        );

        let clearer = {
            let holdings = holdings.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                holdings.clear_damaged("db/a");
            })
        };
        let far = Instant::now() + Duration::from_secs(10);
        assert_eq!(holdings.wait_usable(&["db/a"], &on_disk, far), Ok(true));
        clearer.join().unwrap();

        holdings.set_damaged(damage("db/a"));
        holdings.set_lost("db/a", true);
        let started = Instant::now();
        let error = holdings.wait_usable(&["db/a"], &on_disk, far).unwrap_err();
        assert!(matches!(error, Unusable::Lost(_)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    // A held file absent from disk is reported to the walker once and waited for.
    #[test]
    fn an_absent_held_file_is_reported_as_a_suspect() {
        let holdings = Holdings::new();
        holdings.set_held("db/a", held("aa"));
        let absent = |_: &str| false;
        let error = holdings
            .wait_usable(
                &["db/a"],
                &absent,
                Instant::now() + Duration::from_millis(30),
            )
            .unwrap_err();
        assert!(matches!(error, Unusable::Repairing(d) if d.finding == Finding::Missing));
        assert_eq!(holdings.take_suspects(), ["db/a"]);
        assert!(holdings.take_suspects().is_empty());
    }
}
