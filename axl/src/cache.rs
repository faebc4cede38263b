//! Answers that many peers ask for at once, kept briefly.
//!
//! When a cluster starts syncing with its peers, or tells them all that it changed,
//! up to 29 of them ask for the same `listUsers` pages and the same directory digest
//! within seconds. A page is fully named by (since, after, snapshot, page size): the
//! rows are those with a USN in (after, snapshot], so the same name always means the
//! same page (a user changed since has a USN above the snapshot, and reaches the peer
//! with its next "changes since snapshot"). The first asker reads the store and
//! serializes; the others get the same bytes, and those who ask while it is still
//! reading wait for it rather than read the same rows again (a cold start of a
//! 30-cluster mesh had each page read about five times over). A digest is valid at one
//! USN, so it is kept until the directory moves on.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use impmesh_store::Digest;

/// How long a page is served from memory.
pub const PAGE_TTL: Duration = Duration::from_secs(120);
/// The most page bytes kept (a full listing of 15,000 users is about 3 MB).
pub const MAX_BYTES: usize = 8 * 1024 * 1024;

/// Names one page of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub since_usn: i64,
    pub after_usn: i64,
    pub snapshot_usn: i64,
    pub page_size: u32,
    /// Whether the listing holds rooms too.
    pub rooms: bool,
}

#[derive(Default)]
struct Pages {
    by_key: HashMap<PageKey, (Instant, Bytes)>,
    /// Insertion order, oldest first: evicted first.
    order: VecDeque<PageKey>,
    bytes: usize,
}

/// Serialized pages and the last digest, shared by every connection of the service.
#[derive(Default)]
pub struct AnswerCache {
    pages: Mutex<Pages>,
    /// One turn per page being read: who asks for it meanwhile waits for the turn.
    reading: Mutex<HashMap<PageKey, Arc<tokio::sync::Mutex<()>>>>,
    digest: Mutex<Option<Digest>>,
    /// One digest computed at a time: peers that ask meanwhile wait and get it.
    digest_turn: tokio::sync::Mutex<()>,
}

/// The right to read the page named `key` from the store, held by one request at a
/// time; the next one in line gets it when this one is dropped (and usually finds the
/// page kept by then).
pub struct ReadTurn<'a> {
    cache: &'a AnswerCache,
    key: PageKey,
    held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for ReadTurn<'_> {
    fn drop(&mut self) {
        let mut reading = lock(&self.cache.reading);
        if reading
            .get(&self.key)
            .is_some_and(|t| Arc::ptr_eq(t, tokio::sync::OwnedMutexGuard::mutex(&self.held)))
        {
            reading.remove(&self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AnswerCache {
    /// The serialized answer for `key`, if one younger than [`PAGE_TTL`] is kept.
    pub fn page(&self, key: &PageKey) -> Option<Bytes> {
        let pages = lock(&self.pages);
        pages
            .by_key
            .get(key)
            .filter(|(at, _)| at.elapsed() < PAGE_TTL)
            .map(|(_, body)| body.clone())
    }

    /// Waits until no other request is reading the page named `key`, and makes this
    /// one the reader. Check [`AnswerCache::page`] again once it returns.
    pub async fn read_turn(&self, key: PageKey) -> ReadTurn<'_> {
        let turn = lock(&self.reading).entry(key).or_default().clone();
        ReadTurn {
            cache: self,
            key,
            held: turn.lock_owned().await,
        }
    }

    /// Keeps `body` as the answer for `key`, evicting the oldest pages (and every
    /// expired one) to stay within [`MAX_BYTES`].
    pub fn keep_page(&self, key: PageKey, body: Bytes) {
        if body.len() > MAX_BYTES {
            return;
        }
        let mut pages = lock(&self.pages);
        if pages.by_key.contains_key(&key) {
            return;
        }
        while let Some(oldest) = pages.order.front().copied() {
            let expired = pages
                .by_key
                .get(&oldest)
                .is_none_or(|(at, _)| at.elapsed() >= PAGE_TTL);
            if !expired && pages.bytes + body.len() <= MAX_BYTES {
                break;
            }
            pages.order.pop_front();
            if let Some((_, gone)) = pages.by_key.remove(&oldest) {
                pages.bytes -= gone.len();
            }
        }
        pages.bytes += body.len();
        pages.order.push_back(key);
        pages.by_key.insert(key, (Instant::now(), body));
    }

    /// Bytes of pages kept now.
    pub fn page_bytes(&self) -> usize {
        lock(&self.pages).bytes
    }

    /// The digest kept for `usn`, if it is that one.
    pub fn digest(&self, usn: i64) -> Option<Digest> {
        lock(&self.digest).clone().filter(|d| d.usn == usn)
    }

    pub fn keep_digest(&self, digest: Digest) {
        *lock(&self.digest) = Some(digest);
    }

    /// The digest at `usn` or later: the kept one, or one computed by `compute` while
    /// every other asker waits for it (one scan of the users per USN, however many
    /// peers ask at once).
    pub async fn digest_at<E, F>(&self, usn: i64, compute: F) -> Result<Digest, E>
    where
        F: AsyncFnOnce() -> Result<Digest, E>,
    {
        let fresh = |d: &Digest| d.usn >= usn;
        if let Some(d) = lock(&self.digest).clone().filter(fresh) {
            return Ok(d);
        }
        let _turn = self.digest_turn.lock().await;
        if let Some(d) = lock(&self.digest).clone().filter(fresh) {
            return Ok(d);
        }
        let d = compute().await?;
        self.keep_digest(d.clone());
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(after: i64) -> PageKey {
        PageKey {
            since_usn: 0,
            after_usn: after,
            snapshot_usn: 100,
            page_size: 10,
            rooms: false,
        }
    }

    #[test]
    fn pages_are_kept_by_their_full_name_and_bounded_in_bytes() {
        let cache = AnswerCache::default();
        cache.keep_page(key(0), Bytes::from_static(b"first"));
        assert_eq!(cache.page(&key(0)).as_deref(), Some(&b"first"[..]));
        assert!(cache.page(&key(10)).is_none());
        let other_snapshot = PageKey {
            snapshot_usn: 101,
            ..key(0)
        };
        assert!(cache.page(&other_snapshot).is_none());
        // A second answer for the same key keeps the first.
        cache.keep_page(key(0), Bytes::from_static(b"again"));
        assert_eq!(cache.page(&key(0)).as_deref(), Some(&b"first"[..]));

        // Filling past the bound evicts the oldest first.
        let big = Bytes::from(vec![0u8; MAX_BYTES / 2]);
        cache.keep_page(key(10), big.clone());
        cache.keep_page(key(20), big.clone());
        assert!(cache.page(&key(0)).is_none(), "the oldest went");
        assert!(cache.page(&key(10)).is_some());
        cache.keep_page(key(30), big);
        assert!(cache.page(&key(10)).is_none());
        assert!(cache.page_bytes() <= MAX_BYTES);
        // Larger than the whole bound: not kept.
        cache.keep_page(key(40), Bytes::from(vec![0u8; MAX_BYTES + 1]));
        assert!(cache.page(&key(40)).is_none());
    }

    #[tokio::test]
    async fn who_asks_while_a_page_is_read_waits_for_it_instead_of_reading_it_again() {
        let cache = Arc::new(AnswerCache::default());
        let first = cache.read_turn(key(0)).await;
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let (cache, reads) = (cache.clone(), reads.clone());
                tokio::spawn(async move {
                    let _turn = cache.read_turn(key(0)).await;
                    match cache.page(&key(0)) {
                        Some(body) => body,
                        None => {
                            reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            Bytes::from_static(b"read again")
                        }
                    }
                })
            })
            .collect();
        // Another page is not held up by this one.
        drop(cache.read_turn(key(10)).await);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(waiters.iter().all(|w| !w.is_finished()), "they wait");
        cache.keep_page(key(0), Bytes::from_static(b"read once"));
        drop(first);
        for w in waiters {
            assert_eq!(w.await.unwrap().as_ref(), b"read once");
        }
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(lock(&cache.reading).is_empty(), "every turn was given back");

        // A reader that fails (drops its turn without keeping a page) lets the next read.
        let failed = cache.read_turn(key(20)).await;
        let next = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let _turn = cache.read_turn(key(20)).await;
                cache.page(&key(20)).is_none()
            })
        };
        drop(failed);
        assert!(next.await.unwrap(), "the next one reads for itself");
    }

    /// Peers asking for the digest at once share one computation per USN.
    #[tokio::test]
    async fn the_digest_is_computed_once_per_usn() {
        let cache = Arc::new(AnswerCache::default());
        let computed = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let askers: Vec<_> = (0..20)
            .map(|_| {
                let (cache, computed) = (cache.clone(), computed.clone());
                tokio::spawn(async move {
                    cache
                        .digest_at(7, async || {
                            computed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            Ok::<_, ()>(Digest {
                                usn: 7,
                                count: 1,
                                sha256: "cd".into(),
                                rooms: None,
                            })
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for a in askers {
            assert_eq!(a.await.unwrap().usn, 7);
        }
        assert_eq!(computed.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A newer USN computes again.
        let d = cache
            .digest_at(8, async || {
                Ok::<_, ()>(Digest {
                    usn: 8,
                    count: 2,
                    sha256: "ef".into(),
                    rooms: None,
                })
            })
            .await
            .unwrap();
        assert_eq!(d.count, 2);
    }

    #[test]
    fn a_digest_is_served_only_at_its_usn() {
        let cache = AnswerCache::default();
        assert!(cache.digest(5).is_none());
        cache.keep_digest(Digest {
            usn: 5,
            count: 2,
            sha256: "ab".into(),
            rooms: None,
        });
        assert_eq!(cache.digest(5).map(|d| d.count), Some(2));
        assert!(cache.digest(6).is_none());
    }
}
