//! The bandwidth cap of file fetches: a sans-IO token bucket, and a shared async wrapper that
//! sleeps on tokio's clock. Reading from a stream only as fast as the bucket allows makes the
//! transport's flow control slow the sender down, so the cap holds end to end.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

/// Tokens are bytes. The bucket may go into debt by one request, so a chunk larger than the
/// burst still passes, and the debt is paid by waiting before the next one.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_bytes_per_second: u64,
    burst_bytes: u64,
    tokens: f64,
    /// Time of the last refill, on the caller's clock.
    refilled_at: Duration,
}

impl TokenBucket {
    /// A bucket that starts full. `rate_bytes_per_second` of 0 means unlimited.
    pub fn new(rate_bytes_per_second: u64, burst_bytes: u64, now: Duration) -> TokenBucket {
        TokenBucket {
            rate_bytes_per_second,
            burst_bytes,
            tokens: burst_bytes as f64,
            refilled_at: now,
        }
    }

    /// Takes `bytes` at time `now` and returns how long the caller must wait before using them.
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        if self.rate_bytes_per_second == 0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_sub(self.refilled_at).as_secs_f64();
        self.refilled_at = self.refilled_at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate_bytes_per_second as f64)
            .min(self.burst_bytes as f64);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate_bytes_per_second as f64)
        }
    }
}

/// One bucket shared by every fetch of a node (the cap is per node, not per fetch).
#[derive(Clone, Debug)]
pub struct Throttle {
    bucket: Arc<Mutex<TokenBucket>>,
    start: tokio::time::Instant,
}

impl Throttle {
    pub fn new(rate_bytes_per_second: u64, burst_bytes: u64) -> Throttle {
        Throttle {
            bucket: Arc::new(Mutex::new(TokenBucket::new(
                rate_bytes_per_second,
                burst_bytes,
                Duration::ZERO,
            ))),
            start: tokio::time::Instant::now(),
        }
    }

    /// Waits until `bytes` may be used. Cancellation-safe, but the bytes stay taken.
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            bucket.take(bytes, self.start.elapsed())
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks the cap on a simulated clock: a consumer that always uses its bytes as soon as it
    // may never gets more than rate * time + burst, and does get close to the rate, whatever
    // the chunk size (chunks larger than the burst included).
    #[test]
    fn bucket_holds_the_rate() {
        for chunk in [1_000u64, 64_000, 3_000_000] {
            let rate = 10_000_000u64;
            let burst = 1_000_000u64;
            let mut bucket = TokenBucket::new(rate, burst, Duration::ZERO);
            let mut now = Duration::ZERO;
            let mut used = 0u64;
            while now < Duration::from_secs(10) {
                now += bucket.take(chunk, now);
                used += chunk;
                let allowed = rate as f64 * now.as_secs_f64() + burst as f64 + chunk as f64;
                assert!(used as f64 <= allowed, "chunk {chunk}: {used} > {allowed}");
            }
            let achieved = used as f64 / now.as_secs_f64();
            assert!(achieved > 0.95 * rate as f64, "chunk {chunk}: {achieved}");
        }
        let mut unlimited = TokenBucket::new(0, 0, Duration::ZERO);
        assert_eq!(unlimited.take(u64::MAX, Duration::ZERO), Duration::ZERO);
    }
}
