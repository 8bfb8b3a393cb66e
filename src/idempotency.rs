//! Idempotency keys: a write may carry `Idempotency-Key`; the key travels in its WAL record
//! (`ingest::IngestPayload`), so every node that holds the record (the origin, its replicas,
//! a taker after a takeover, the origin again after a restart) learns the key's outcome, and a
//! retry with the same key on any of them within `cluster.idempotency_window_ms` answers the
//! original outcome and stores nothing.
//!
//! Thread: shared by every shard of a node (a `Mutex` taken for a lookup or an insert, only
//! for keyed writes and for keyed records arriving).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Where a keyed write's rows are: its WAL record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub origin: u64,
    pub shard: u32,
    pub lsn: u64,
    pub rows: u64,
}

/// What this node knows of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// Stored: the answer a retry gets.
    Done(Seen),
    /// A write with this key is being stored on this node right now.
    Pending,
}

#[derive(Default)]
struct Table {
    entries: HashMap<String, (Known, i64)>,
    /// Keys by the time they were recorded, oldest first, for expiry.
    order: VecDeque<(i64, String)>,
}

/// The keys of one node.
pub struct Keys {
    table: Mutex<Table>,
    window_ms: std::sync::atomic::AtomicI64,
    keys_max: usize,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            table: Mutex::new(Table::default()),
            window_ms: std::sync::atomic::AtomicI64::new(600_000),
            keys_max: 1_000_000,
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Keys {
    /// Sets how long a key is remembered (`cluster.idempotency_window_ms`).
    pub fn set_window_ms(&self, window_ms: u64) {
        self.window_ms.store(
            i64::try_from(window_ms).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn window_ms(&self) -> i64 {
        self.window_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops keys older than the window, and the oldest beyond `keys_max`.
    fn expire(&self, table: &mut Table, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.window_ms());
        while let Some((at, _)) = table.order.front() {
            if *at >= horizon && table.order.len() <= self.keys_max {
                break;
            }
            let (at, key) = table.order.pop_front().expect("checked above");
            if table
                .entries
                .get(&key)
                .is_some_and(|(_, recorded)| *recorded == at)
            {
                table.entries.remove(&key);
            }
        }
    }

    /// What this node knows of `key` within the window.
    pub fn get(&self, key: &str) -> Option<Known> {
        let now = now_ms();
        let mut table = self.lock();
        self.expire(&mut table, now);
        table.entries.get(key).map(|(known, _)| *known)
    }

    /// Marks `key` as being written here; false if it is known already (done or pending).
    pub fn begin(&self, key: &str) -> bool {
        let now = now_ms();
        let mut table = self.lock();
        self.expire(&mut table, now);
        if table.entries.contains_key(key) {
            return false;
        }
        table.entries.insert(key.to_owned(), (Known::Pending, now));
        table.order.push_back((now, key.to_owned()));
        true
    }

    /// Forgets a pending key whose write stored nothing (refused before its WAL append).
    pub fn abort(&self, key: &str) {
        let mut table = self.lock();
        if table
            .entries
            .get(key)
            .is_some_and(|(known, _)| *known == Known::Pending)
        {
            table.entries.remove(key);
        }
    }

    /// Records a stored keyed write, made `at_ms` (the record's time): from this node's own
    /// writes, its WAL replay, and replicated records. The first outcome recorded stands.
    pub fn record(&self, key: &str, seen: Seen, at_ms: i64) {
        let now = now_ms();
        if at_ms < now.saturating_sub(self.window_ms()) {
            return;
        }
        let mut table = self.lock();
        self.expire(&mut table, now);
        match table.entries.get_mut(key) {
            Some((Known::Done(_), _)) => {}
            Some((known, _)) => *known = Known::Done(seen),
            None => {
                table
                    .entries
                    .insert(key.to_owned(), (Known::Done(seen), at_ms));
                table.order.push_back((at_ms, key.to_owned()));
            }
        }
    }
}

/// Checks an `Idempotency-Key` header value: 1 to 128 printable ASCII characters.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > crate::ingest::IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(format!(
            "Idempotency-Key must be 1 to {} bytes",
            crate::ingest::IDEMPOTENCY_KEY_BYTES_MAX
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("Idempotency-Key must be printable ASCII without spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A key is pending while its write runs (a concurrent duplicate is refused), done once
    // stored (the first outcome stands against a later record), forgotten when its write
    // stored nothing, and expires after the window.
    #[test]
    fn keys_follow_their_writes_and_expire() {
        let keys = Keys::default();
        let seen = Seen {
            origin: 1,
            shard: 0,
            lsn: 7,
            rows: 3,
        };
        assert!(keys.begin("a"));
        assert!(!keys.begin("a"));
        assert_eq!(keys.get("a"), Some(Known::Pending));
        keys.record("a", seen, now_ms());
        assert_eq!(keys.get("a"), Some(Known::Done(seen)));
        keys.record("a", Seen { lsn: 9, ..seen }, now_ms());
        assert_eq!(keys.get("a"), Some(Known::Done(seen)));
        assert!(keys.begin("b"));
        keys.abort("b");
        assert_eq!(keys.get("b"), None);
        keys.record("old", seen, now_ms() - 700_000);
        assert_eq!(keys.get("old"), None);
        keys.set_window_ms(0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(keys.get("a"), None);
        assert!(check_key("ok-1").is_ok());
        assert!(check_key("").is_err() && check_key("a b").is_err());
        assert!(check_key(&"x".repeat(129)).is_err());
    }
}
