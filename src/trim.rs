//! Gives freed memory back to the system when load drops.
//!
//! Rust's allocations go to mimalloc (`src/lib.rs`), which purges what it frees. The C
//! libraries (aws-lc's TLS handshakes, SQLite's page caches on sqlx's connection
//! threads) allocate through glibc, whose per-thread arenas keep freed chunks inside
//! their heaps: after 10,000 sessions logged in and closed, about 12 MiB stayed
//! resident for good (docs/benchmarks.md, "Memory after sessions end").
//! `malloc_trim` hands those pages back; it runs on a blocking thread every
//! [`PERIOD`], which costs well under a millisecond on an idle heap.
//!
//! mimalloc keeps a heap per thread and purges a page only when the thread that owns
//! it runs the allocator again: a runtime worker that went idle after a burst kept
//! what its sessions had freed (about 8 MiB after 10,000 sessions closed). So each
//! worker collects its own heap when it parks (has nothing to do), at most every
//! [`PERIOD`] ([`on_park`]).
//!
//! Transparent huge pages are off for the process ([`disable_huge_pages`]), and
//! mimalloc is built not to ask for them on its arena (its `no_thp` feature): a 2 MiB
//! huge page stays resident whole while any of its 512 small pages is in use, so the
//! pages freed when sessions end stayed resident (60 s after 10,000 sessions closed,
//! 34–52 MiB against 24 MiB now; a fresh node 28–31 MiB against 21.5:
//! docs/benchmarks.md, "Memory after sessions end").

use std::cell::Cell;
use std::time::{Duration, Instant};

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

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`, which the
/// kernel checks at every page fault and khugepaged respects; pages already faulted in
/// as huge pages before the call stay so), unless `MIMALLOC_ALLOW_THP` is set (to any
/// value): then the system's setting applies. `None` when left to the system,
/// otherwise what the call gave (its error read at once, before anything else can
/// overwrite `errno`).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn disable_huge_pages() -> Option<std::io::Result<()>> {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return None;
    }
    let zero: libc::c_ulong = 0;
    // SAFETY: `prctl` takes integers only here (variadic: each passed as the
    // `unsigned long` the kernel reads, and the unused ones must be zero) and changes a
    // flag of the calling process.
    let done = unsafe {
        libc::prctl(
            libc::PR_SET_THP_DISABLE,
            1 as libc::c_ulong,
            zero,
            zero,
            zero,
        )
    };
    Some(if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    })
}

#[cfg(not(target_os = "linux"))]
pub fn disable_huge_pages() -> Option<std::io::Result<()>> {
    None
}

/// Run by each runtime worker when it parks: at most every [`PERIOD`] per worker, its
/// mimalloc heap's free pages go back to the system.
pub fn on_park() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = LAST.with(|last| {
        let due = last.get().is_none_or(|t| now.duration_since(t) >= PERIOD);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        collect();
    }
}

#[allow(unsafe_code)]
fn collect() {
    // SAFETY: `mi_collect` takes no pointers; it frees the calling thread's empty pages
    // (returning them to the system), which mimalloc allows at any time on that thread.
    // Forced: also the frees other threads handed this heap, and purged at once. The
    // lazy collection left 35–45 MiB of 10,000 closed sessions resident in some runs
    // once the session future shrank (docs/benchmarks.md, "Memory after sessions end").
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The flag the kernel checks at each fault is set (this test's process only).
    #[test]
    #[allow(unsafe_code)]
    fn huge_pages_are_off_after_start() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return;
        }
        assert!(matches!(super::disable_huge_pages(), Some(Ok(()))));
        let zero: libc::c_ulong = 0;
        // SAFETY: PR_GET_THP_DISABLE takes integers only (passed as `unsigned long`,
        // zero) and reads a flag of this process.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, zero, zero, zero, zero) };
        assert_eq!(disabled, 1);
    }
}
