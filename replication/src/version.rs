//! Published manifest versions: a lock-free pointer to the latest applied manifest, and waiters
//! for an applied index (read-your-writes).
//!
//! Threads: the state machine (control thread) publishes; any thread reads. Reading is one atomic
//! load; a reader pins a version simply by holding its `Arc`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;

use arc_swap::ArcSwap;

use crate::manifest::Manifest;

/// An immutable manifest as of one applied Raft log index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestVersion {
    /// The Raft log index this version reflects; versions only grow.
    pub index: u64,
    pub manifest: Manifest,
}

/// The shared cell between the state machine and its readers.
#[derive(Debug)]
pub struct Published {
    current: ArcSwap<ManifestVersion>,
    /// Senders woken once the applied index reaches the key; `None` once closed. Dropping the
    /// senders (at shutdown) wakes their waiters with an error.
    waiters: Mutex<Option<BTreeMap<u64, Vec<flume::Sender<()>>>>>,
}

impl Published {
    pub(crate) fn new(manifest: Manifest) -> Published {
        Published {
            current: ArcSwap::from_pointee(ManifestVersion {
                index: manifest.applied_index(),
                manifest,
            }),
            waiters: Mutex::new(Some(BTreeMap::new())),
        }
    }

    pub(crate) fn current(&self) -> Arc<ManifestVersion> {
        self.current.load_full()
    }

    /// Makes `manifest` the current version and wakes the waiters it satisfies.
    pub(crate) fn publish(&self, manifest: Manifest) {
        let index = manifest.applied_index();
        self.current
            .store(Arc::new(ManifestVersion { index, manifest }));
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
        assert_eq!(wait_5.try_recv(), Err(flume::TryRecvError::Disconnected));
        let late = published.wait_for(9).expect("not applied");
        assert_eq!(late.try_recv(), Err(flume::TryRecvError::Disconnected));
    }
}
