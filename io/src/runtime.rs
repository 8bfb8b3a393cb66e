//! Thread-per-core runtime: one glommio executor ("shard") per core, pinned, plus the small
//! single-threaded primitives shards use to coordinate with themselves.
//!
//! Each shard is an OS thread running a `glommio::LocalExecutor`. Nothing here is shared between
//! shards; the node decides what a shard runs through the future returned by its factory.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

/// How shards are placed on CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardPlacement {
    /// Shard `i` is pinned to the `i`-th CPU of the process's affinity set, wrapping around when
    /// there are more shards than CPUs (several nodes on one test machine share the cores).
    Pinned,
    /// Shards float; the kernel schedules them.
    Unbound,
}

/// Settings for [`spawn_shards`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub shard_count: usize,
    pub placement: ShardPlacement,
    /// Memory glommio registers with io_uring per shard for DMA buffers.
    pub io_memory_bytes: usize,
    /// io_uring submission queue depth per shard.
    pub ring_depth: usize,
    /// Thread name prefix: threads are named `<prefix>-<shard>`.
    pub thread_name_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("shard count must be at least 1")]
    NoShards,
    /// glommio's error type is not `Send`, so its message is kept instead.
    #[error("spawn shard {shard}: {message}")]
    Spawn { shard: usize, message: String },
    #[error("shard {shard} panicked")]
    Panicked { shard: usize },
}

/// Starts `config.shard_count` executors; shard `i` runs the future `make(i)` to completion.
/// Returns the join handles in shard order.
pub fn spawn_shards<T, F, Fut>(
    config: &RuntimeConfig,
    make: F,
) -> Result<Vec<ExecutorJoinHandle<T>>, RuntimeError>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = T> + 'static,
{
    if config.shard_count == 0 {
        return Err(RuntimeError::NoShards);
    }
    let cpus = allowed_cpus();
    let mut handles = Vec::with_capacity(config.shard_count);
    for shard in 0..config.shard_count {
        let placement = match config.placement {
            ShardPlacement::Pinned if !cpus.is_empty() => {
                Placement::Fixed(cpus[shard % cpus.len()])
            }
            _ => Placement::Unbound,
        };
        let make = make.clone();
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("{}-{}", config.thread_name_prefix, shard))
            .io_memory(config.io_memory_bytes)
            .ring_depth(config.ring_depth)
            .spawn(move || make(shard))
            .map_err(|error| RuntimeError::Spawn {
                shard,
                message: error.to_string(),
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Joins shard threads in order, returning their results.
pub fn join_shards<T: Send + 'static>(
    handles: Vec<ExecutorJoinHandle<T>>,
) -> Result<Vec<T>, RuntimeError> {
    let mut results = Vec::with_capacity(handles.len());
    for (shard, handle) in handles.into_iter().enumerate() {
        results.push(
            handle
                .join()
                .map_err(|_| RuntimeError::Panicked { shard })?,
        );
    }
    Ok(results)
}

/// The CPUs this process may run on, in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Raises RLIMIT_MEMLOCK so io_uring can register DMA buffers. The default of 8 MiB on many
/// distributions is too small for several shards. Returns the limit in force afterwards.
pub fn raise_memlock_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) != 0 {
            return 0;
        }
        let wanted = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &wanted) == 0 {
            return u64::MAX;
        }
        // Without privilege we may still raise the soft limit to the hard one.
        let soft = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &soft) == 0 {
            return limit.rlim_max;
        }
        limit.rlim_cur
    }
}

/// A one-shot, shard-local signal: any number of tasks wait until it is raised. Owned by one
/// shard thread (`!Send`); cross-thread shutdown reaches a shard through a channel and is
/// turned into a raise there.
#[derive(Clone, Default)]
pub struct LocalSignal {
    inner: Rc<SignalInner>,
}

#[derive(Default)]
struct SignalInner {
    raised: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl LocalSignal {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn raise(&self) {
        if self.inner.raised.replace(true) {
            return;
        }
        for waker in self.inner.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    pub fn is_raised(&self) -> bool {
        self.inner.raised.get()
    }

    /// Resolves once the signal is raised. Cancellation-safe.
    pub fn wait(&self) -> SignalWait {
        SignalWait {
            inner: self.inner.clone(),
        }
    }
}

pub struct SignalWait {
    inner: Rc<SignalInner>,
}

impl Future for SignalWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.raised.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.inner.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A shard-local "something changed" notification that can fire many times: waiters registered
/// before a `notify` are woken by it. Used for the flush and group-commit loops.
#[derive(Clone, Default)]
pub struct LocalNotify {
    inner: Rc<NotifyInner>,
}

#[derive(Default)]
struct NotifyInner {
    generation: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl LocalNotify {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn notify(&self) {
        self.inner.generation.set(self.inner.generation.get() + 1);
        for waker in self.inner.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Resolves at the next `notify` after this call. Cancellation-safe.
    pub fn notified(&self) -> Notified {
        Notified {
            inner: self.inner.clone(),
            generation: self.inner.generation.get(),
        }
    }
}

pub struct Notified {
    inner: Rc<NotifyInner>,
    generation: u64,
}

impl Future for Notified {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut waiters = self.inner.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks that every spawned shard runs its own future and that results come back in shard
    // order, with more shards than this machine may have cores.
    #[test]
    fn shards_run_and_join_in_order() {
        raise_memlock_limit();
        let config = RuntimeConfig {
            shard_count: 3,
            placement: ShardPlacement::Pinned,
            io_memory_bytes: 1 << 20,
            ring_depth: 64,
            thread_name_prefix: "test-shard".into(),
        };
        let handles = spawn_shards(&config, |shard| async move { shard * 10 }).unwrap();
        assert_eq!(join_shards(handles).unwrap(), vec![0, 10, 20]);
    }

    // Checks that a raised signal releases waiters that started before and after the raise.
    #[test]
    fn signal_releases_waiters() {
        let executor = glommio::LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(1 << 20)
            .make()
            .unwrap();
        executor.run(async {
            let signal = LocalSignal::new();
            let waiter = glommio::spawn_local({
                let signal = signal.clone();
                async move { signal.wait().await }
            });
            glommio::yield_if_needed().await;
            signal.raise();
            waiter.await;
            signal.wait().await;
            assert!(signal.is_raised());
        });
    }
}
