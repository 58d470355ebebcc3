//! The agent-wide download rate limit (`depot.max_bytes_per_sec`, SPEC §4): every download
//! takes its bytes from one budget, so the agent as a whole stays under the limit however many
//! blobs it fetches at once.
//!
//! A virtual clock (the "generic cell rate algorithm" of ATM networks, also what token buckets
//! reduce to): each byte advances a shared point in time by `1 / rate`; a download that got its
//! bytes ahead of that point sleeps until it. The point may lag behind now by at most
//! [`BURST`], so an idle agent can take a short burst and the long-run rate never exceeds the
//! limit by more than one burst's worth. While a download sleeps it reads nothing, so TCP's flow
//! control slows the depot down too.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far behind the present the virtual clock may fall: the burst an idle agent may take.
const BURST: Duration = Duration::from_millis(100);

/// A byte budget shared by every download of the agent.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: u64,
    /// The moment up to which the budget is spent.
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// The limit, in bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Accounts for `bytes` just received and waits until the budget allows them. Returns how
    /// long it waited (time the caller's stall and minimum-speed checks must not count).
    pub async fn take(&self, bytes: u64) -> Duration {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let due = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
            *next = start + cost;
            *next
        };
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due).await;
            due - now
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_long_run_rate_holds_across_concurrent_takers() {
        // 4 downloads share 1 MiB/s; 8 MiB in 64 KiB chunks take 8 s of (paused, exact) time,
        // less the one burst an idle limiter allows.
        let limiter = std::sync::Arc::new(RateLimiter::new(1 << 20));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let limiter = limiter.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..32 {
                    limiter.take(64 << 10).await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(8) - BURST, "{took:?}");
        assert!(
            took <= Duration::from_secs(8) + Duration::from_millis(10),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limiter_allows_one_burst_not_more() {
        let limiter = RateLimiter::new(1 << 20);
        tokio::time::sleep(Duration::from_secs(10)).await;
        // 100 ms worth of bytes pass at once after a long idle time; the next chunk waits.
        assert_eq!(limiter.take(100 << 10).await, Duration::ZERO);
        assert!(limiter.take(100 << 10).await > Duration::from_millis(90));
    }
}
