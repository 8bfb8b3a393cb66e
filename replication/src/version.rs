//! Published manifest versions: a lock-free pointer to the latest applied manifest, and waiters
//! for an applied index (read-your-writes).
//!
//! Threads: the state machine (control thread) publishes; any thread reads. Reading is one atomic
//! load; a reader pins a version simply by holding its `Arc`.
//!
//! Pins: every published version is recorded in a [`PinRegistry`] as a weak reference, so the
//! file replicator can ask which is the oldest version anyone still holds, and remove a file
//! that a newer version deleted only once no older version (one that still lists the file) is
//! alive. A version nobody holds can never be held again (new holders clone an existing `Arc`,
//! and only the newest version is handed out afresh), so "not alive" is a stable answer.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::Weak;

use arc_swap::ArcSwap;

use crate::manifest::Manifest;

/// An immutable manifest as of one applied Raft log index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestVersion {
    /// The Raft log index this version reflects; versions only grow.
    pub index: u64,
    pub manifest: Manifest,
}

/// Weak references to published versions, oldest first, to find the oldest version still
/// pinned. Registering is O(1); [`PinRegistry::oldest_pinned_index`] drops the released versions
/// at the front, so its cost is amortized O(1) per version, plus an occasional sweep of released
/// versions behind a long-lived pin.
#[derive(Debug, Default)]
pub struct PinRegistry {
    versions: Mutex<PinQueue>,
}

#[derive(Debug, Default)]
struct PinQueue {
    versions: VecDeque<(u64, Weak<ManifestVersion>)>,
    /// Length after the last sweep; the next sweep runs when the queue has doubled.
    swept_len: usize,
}

impl PinRegistry {
    /// Records a version about to be handed out. Versions must be registered in index order.
    pub fn register(&self, version: &Arc<ManifestVersion>) {
        let mut queue = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last, _)) = queue.versions.back() {
            assert!(
                *last <= version.index,
                "version {} registered after {last}",
                version.index
            );
        }
        queue
            .versions
            .push_back((version.index, Arc::downgrade(version)));
        if queue.versions.len() > 2 * queue.swept_len.max(512) {
            queue
                .versions
                .retain(|(_, version)| version.strong_count() > 0);
            queue.swept_len = queue.versions.len();
        }
    }

    /// The index of the oldest registered version someone still holds, `None` if none is.
    pub fn oldest_pinned_index(&self) -> Option<u64> {
        let mut queue = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((index, version)) = queue.versions.front() {
            if version.strong_count() > 0 {
                return Some(*index);
            }
            queue.versions.pop_front();
        }
        None
    }
}

/// The shared cell between the state machine and its readers.
#[derive(Debug)]
pub struct Published {
    current: ArcSwap<ManifestVersion>,
    pins: PinRegistry,
    /// Senders woken once the applied index reaches the key; `None` once closed. Dropping the
    /// senders (at shutdown) wakes their waiters with an error.
    waiters: Mutex<Option<BTreeMap<u64, Vec<flume::Sender<()>>>>>,
}

impl Published {
    pub(crate) fn new(manifest: Manifest) -> Published {
        let version = Arc::new(ManifestVersion {
            index: manifest.applied_index(),
            manifest,
        });
        let pins = PinRegistry::default();
        pins.register(&version);
        Published {
            current: ArcSwap::new(version),
            pins,
            waiters: Mutex::new(Some(BTreeMap::new())),
        }
    }

    /// The index of the oldest published version still held by anyone (the current version
    /// always is, by this cell).
    pub(crate) fn oldest_pinned_index(&self) -> u64 {
        self.pins
            .oldest_pinned_index()
            .unwrap_or_else(|| self.current.load().index)
    }

    pub(crate) fn current(&self) -> Arc<ManifestVersion> {
        self.current.load_full()
    }

    /// Makes `manifest` the current version and wakes the waiters it satisfies.
    pub(crate) fn publish(&self, manifest: Manifest) {
        let index = manifest.applied_index();
        let version = Arc::new(ManifestVersion { index, manifest });
        // Registered before it can be handed out, so no holder of it is ever unknown.
        self.pins.register(&version);
        self.current.store(version);
        // Stored before the lock is taken, so a waiter that checks under the lock either sees the
        // new version or is registered before this drain runs.
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiters) = waiters.as_mut() else {
            return;
        };
        let pending = waiters.split_off(&(index + 1));
        for sender in std::mem::replace(waiters, pending).into_values().flatten() {
            let _ = sender.try_send(());
        }
    }

    /// Returns `None` if `index` is already applied, else a receiver that yields once it is, or
    /// fails once the service is closed.
    pub(crate) fn wait_for(&self, index: u64) -> Option<flume::Receiver<()>> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if self.current.load().index >= index {
            return None;
        }
        let (sender, receiver) = flume::bounded(1);
        // Once closed the sender is dropped right here, so the receiver fails at once.
        if let Some(waiters) = waiters.as_mut() {
            waiters.entry(index).or_default().push(sender);
        }
        Some(receiver)
    }

    /// Drops every waiter so that it observes shutdown instead of waiting forever.
    pub(crate) fn close(&self) {
        *self.waiters.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::file;
    use crate::manifest::ManifestCommand;

    #[test]
    fn waiters_wake_when_their_index_is_published() {
        // Read-your-writes waits for an index; it must wake exactly when that index is applied,
        // and a waiter registered for an already-applied index must not wait at all.
        let mut manifest = Manifest::default();
        let published = Published::new(manifest.clone());
        let wait_2 = published.wait_for(2).expect("not applied yet");
        let wait_5 = published.wait_for(5).expect("not applied yet");

        manifest.apply(
            2,
            &ManifestCommand::Register {
                files: vec![file("a", 1, 2)],
            },
        );
        published.publish(manifest.clone());
        assert_eq!(wait_2.try_recv(), Ok(()));
        assert!(wait_5.try_recv().is_err());
        assert_eq!(published.current().index, 2);
        assert!(published.current().manifest.file("a").is_some());
        assert!(published.wait_for(2).is_none());

        published.close();
        // Only the current version is held, by the cell itself.
        assert_eq!(published.oldest_pinned_index(), 2);
        assert_eq!(wait_5.try_recv(), Err(flume::TryRecvError::Disconnected));
        let late = published.wait_for(9).expect("not applied");
        assert_eq!(late.try_recv(), Err(flume::TryRecvError::Disconnected));
    }

    // Checks the pin registry the replicator's deletions rely on: the oldest pinned index is the
    // oldest version someone holds, it moves forward exactly when that holder lets go, and
    // released versions behind a long-lived pin are swept so the queue stays bounded.
    #[test]
    fn oldest_pinned_index_follows_the_holders() {
        let mut manifest = Manifest::default();
        let published = Published::new(manifest.clone());
        assert_eq!(published.oldest_pinned_index(), 0);
        let mut held = Vec::new();
        for index in 1..=3 {
            manifest.note_applied(index);
            published.publish(manifest.clone());
            held.push(published.current());
        }
        assert_eq!(published.oldest_pinned_index(), 1);
        let second = held.remove(1);
        held.remove(0);
        assert_eq!(published.oldest_pinned_index(), 2);
        drop(second);
        assert_eq!(published.oldest_pinned_index(), 3);
        drop(held);
        assert_eq!(
            published.oldest_pinned_index(),
            3,
            "the current version stays"
        );

        let registry = PinRegistry::default();
        let first = Arc::new(ManifestVersion {
            index: 1,
            manifest: Manifest::default(),
        });
        registry.register(&first);
        for index in 2..10_000 {
            registry.register(&Arc::new(ManifestVersion {
                index,
                manifest: Manifest::default(),
            }));
        }
        assert!(registry.versions.lock().unwrap().versions.len() < 2_000);
        assert_eq!(registry.oldest_pinned_index(), Some(1));
        drop(first);
        assert_eq!(registry.oldest_pinned_index(), None);
    }
}
