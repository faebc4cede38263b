//! Gives freed memory back to the system when load drops.
//!
//! Rust's allocations go to mimalloc (`src/lib.rs`), which purges what it frees. The C
//! libraries (aws-lc's TLS handshakes, SQLite's page caches on sqlx's connection
//! threads) allocate through glibc, whose per-thread arenas keep freed chunks inside
//! their heaps: after 10,000 sessions logged in and closed, about 12 MiB stayed
//! resident for good (docs/benchmarks.md, "Memory after sessions end").
//! `malloc_trim` hands those pages back; it runs on a blocking thread every
//! [`PERIOD`], which costs well under a millisecond on an idle heap.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often glibc's arenas are trimmed.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Trims every [`PERIOD`] until `stop` is cancelled.
pub fn spawn(stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let _ = tokio::task::spawn_blocking(trim).await;
                }
            }
        }
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: `malloc_trim` takes a padding size and no pointers; glibc locks each
    // arena while it trims it, so it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
