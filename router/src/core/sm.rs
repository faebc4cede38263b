//! XEP-0198 stream management as a state machine without I/O: the counters, the
//! unacknowledged window, acknowledgements and resumption.
//!
//! The window is flow control, not a tripwire: a session stops taking stanzas from its
//! queue while the window is full (by count or by bytes) and asks for an
//! acknowledgement; only a client that leaves that request unanswered for the ping
//! timeout is taken as gone. Stored offline messages ride in the same window, tagged
//! with their row, so a row is removed from the store only once the client has
//! acknowledged it (XEP-0198 §4).
//!
//! Counters are `u32` and wrap (XEP-0198 §5: "the value of 'h' ... MUST be reset to
//! zero ... when it exceeds 2^32 - 1"); comparisons use serial-number arithmetic.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::{Duration, Instant};

/// How much may be sent and not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub stanzas: usize,
    pub bytes: usize,
}

/// A stanza sent and not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unacked {
    pub seq: u32,
    pub stanza: Arc<str>,
    /// The offline-storage row it came from: removed from the store once acknowledged.
    pub offline: Option<i64>,
}

/// The client broke XEP-0198.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// `h` acknowledges stanzas that were never sent (XEP-0198 §4: `undefined-condition`).
    AckedUnsent { h: u32, sent: u32 },
}

/// XEP-0198 state of one session.
#[derive(Debug)]
pub struct StreamManagement {
    id: String,
    resumable: bool,
    /// Stanzas received from the client (our `h`).
    received: u32,
    /// Stanzas sent to the client so far.
    sent: u32,
    unacked: VecDeque<Unacked>,
    unacked_bytes: usize,
    /// Unacknowledged offline rows (they share the window but are kept apart from live
    /// traffic so that offline delivery can never fill the window alone).
    unacked_offline: usize,
    /// When the outstanding `<r/>` was sent.
    requested_at: Option<Instant>,
}

impl StreamManagement {
    pub fn new(id: String, resumable: bool) -> StreamManagement {
        StreamManagement {
            id,
            resumable,
            received: 0,
            sent: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            unacked_offline: 0,
            requested_at: None,
        }
    }

    /// The stanzas sent and not acknowledged yet, oldest first.
    pub fn unacked(&self) -> impl Iterator<Item = &Arc<str>> {
        self.unacked.iter().map(|u| &u.stanza)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn resumable(&self) -> bool {
        self.resumable
    }

    /// Our `h`: what an `<a/>` or `<resumed/>` tells the client.
    pub fn h(&self) -> u32 {
        self.received
    }

    /// A stanza arrived from the client.
    pub fn on_inbound(&mut self) {
        self.received = self.received.wrapping_add(1);
    }

    /// A stanza goes to the client; it stays unacknowledged until an `h` covers it.
    pub fn on_outbound(&mut self, stanza: Arc<str>, offline: Option<i64>) {
        self.sent = self.sent.wrapping_add(1);
        self.unacked_bytes += stanza.len();
        if offline.is_some() {
            self.unacked_offline += 1;
        }
        self.unacked.push_back(Unacked {
            seq: self.sent,
            stanza,
            offline,
        });
    }

    /// An `<a h='…'/>` (or the `h` of a resumption): drops what it covers and returns
    /// the offline rows it acknowledged.
    pub fn on_ack(&mut self, h: u32) -> Result<Vec<i64>, Violation> {
        if serial_gt(h, self.sent) {
            return Err(Violation::AckedUnsent { h, sent: self.sent });
        }
        let mut rows = vec![];
        while let Some(front) = self.unacked.front() {
            if serial_gt(front.seq, h) {
                break;
            }
            if let Some(item) = self.unacked.pop_front() {
                self.unacked_bytes -= item.stanza.len();
                if let Some(row) = item.offline {
                    self.unacked_offline -= 1;
                    rows.push(row);
                }
            }
        }
        // An answer: the client reads. What it has not acknowledged yet is asked for
        // again with the next write.
        self.requested_at = None;
        Ok(rows)
    }

    /// XEP-0198 §5: the client resumes having received `h`; returns the offline rows
    /// that covers and what must be sent again, oldest first.
    pub fn resume(&mut self, h: u32) -> Result<(Vec<i64>, Vec<Arc<str>>), Violation> {
        let rows = self.on_ack(h)?;
        self.requested_at = None;
        let again = self.unacked.iter().map(|u| u.stanza.clone()).collect();
        Ok((rows, again))
    }

    /// Whether the window is full: the session takes nothing more from its queue.
    pub fn is_full(&self, window: Window) -> bool {
        self.unacked.len() >= window.stanzas || self.unacked_bytes >= window.bytes
    }

    /// Room for offline messages: they may use half of the window, so live traffic
    /// always finds the other half.
    pub fn offline_room(&self, window: Window) -> usize {
        let half = Window {
            stanzas: window.stanzas.div_ceil(2),
            bytes: window.bytes.div_ceil(2),
        };
        if self.unacked_bytes >= half.bytes {
            return 0;
        }
        half.stanzas
            .saturating_sub(self.unacked_offline)
            .min(window.stanzas.saturating_sub(self.unacked.len()))
    }

    /// Whether to send `<r/>` now: something is unacknowledged and no request is
    /// outstanding. Marks the request as sent at `now`; any `<a/>` answers it.
    pub fn request_ack(&mut self, now: Instant) -> bool {
        if self.unacked.is_empty() || self.requested_at.is_some() {
            return false;
        }
        self.requested_at = Some(now);
        true
    }

    /// When a full window with an unanswered request means the client is gone.
    pub fn stalled_at(&self, window: Window, timeout: Duration) -> Option<Instant> {
        if !self.is_full(window) {
            return None;
        }
        self.requested_at.map(|t| t + timeout)
    }

    /// Everything unacknowledged, oldest first (when the session ends).
    pub fn into_unacked(self) -> VecDeque<Unacked> {
        self.unacked
    }
}

/// `a > b` in serial-number arithmetic (RFC 1982 over 32 bits).
fn serial_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(n: usize) -> Arc<str> {
        format!("<message id='{n}'/>").into()
    }

    const WINDOW: Window = Window {
        stanzas: 4,
        bytes: 1 << 20,
    };

    #[test]
    fn xep0198_acks_drop_what_they_cover_and_return_offline_rows() {
        let mut sm = StreamManagement::new("id".into(), true);
        sm.on_outbound(xml(1), Some(10));
        sm.on_outbound(xml(2), None);
        sm.on_outbound(xml(3), Some(11));
        assert_eq!(sm.on_ack(2), Ok(vec![10]));
        assert_eq!(sm.on_ack(2), Ok(vec![]));
        assert_eq!(sm.on_ack(3), Ok(vec![11]));
        assert!(sm.into_unacked().is_empty());
    }

    #[test]
    fn xep0198_acking_more_than_was_sent_is_a_violation() {
        let mut sm = StreamManagement::new("id".into(), false);
        sm.on_outbound(xml(1), None);
        assert_eq!(sm.on_ack(2), Err(Violation::AckedUnsent { h: 2, sent: 1 }));
        // Nothing was dropped by the bad ack.
        assert_eq!(sm.into_unacked().len(), 1);
    }

    #[test]
    fn xep0198_counters_wrap_at_u32_max() {
        let mut sm = StreamManagement::new("id".into(), true);
        sm.sent = u32::MAX - 1;
        sm.received = u32::MAX;
        sm.on_inbound();
        assert_eq!(sm.h(), 0);
        for n in 0..4 {
            sm.on_outbound(xml(n), None);
        }
        // Sequence numbers u32::MAX, 0, 1, 2.
        assert_eq!(sm.on_ack(0), Ok(vec![]));
        let left: Vec<u32> = sm.unacked.iter().map(|u| u.seq).collect();
        assert_eq!(left, [1, 2]);
        assert!(sm.on_ack(3).is_err());
        assert_eq!(sm.on_ack(2), Ok(vec![]));
        assert!(sm.unacked.is_empty());
    }

    #[test]
    fn xep0198_resume_returns_what_the_client_missed_in_order() {
        let mut sm = StreamManagement::new("id".into(), true);
        for n in 1..=5 {
            sm.on_outbound(xml(n), (n % 2 == 0).then_some(n as i64));
        }
        let (rows, again) = sm.resume(3).unwrap();
        assert_eq!(rows, [2]);
        assert_eq!(again, [xml(4), xml(5)]);
        assert!(sm.resume(9).is_err());
    }

    #[test]
    fn the_window_fills_by_count_or_bytes_and_offline_gets_half() {
        let mut sm = StreamManagement::new("id".into(), false);
        assert_eq!(sm.offline_room(WINDOW), 2);
        sm.on_outbound(xml(1), Some(1));
        sm.on_outbound(xml(2), Some(2));
        assert_eq!(sm.offline_room(WINDOW), 0, "offline uses half the window");
        assert!(!sm.is_full(WINDOW));
        sm.on_outbound(xml(3), None);
        sm.on_outbound(xml(4), None);
        assert!(sm.is_full(WINDOW));
        sm.on_ack(2).unwrap();
        assert_eq!(sm.offline_room(WINDOW), 2);
        let tiny = Window {
            stanzas: 100,
            bytes: 10,
        };
        let mut sm = StreamManagement::new("id".into(), false);
        assert!(!sm.is_full(tiny));
        sm.on_outbound(xml(1), None);
        assert!(sm.is_full(tiny), "one stanza over the byte window fills it");
        assert_eq!(sm.offline_room(tiny), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_window_with_an_unanswered_request_stalls_after_the_timeout() {
        let timeout = Duration::from_secs(60);
        let mut sm = StreamManagement::new("id".into(), true);
        for n in 0..4 {
            sm.on_outbound(xml(n), None);
        }
        assert_eq!(sm.stalled_at(WINDOW, timeout), None, "no request yet");
        let now = Instant::now();
        assert!(sm.request_ack(now));
        assert!(!sm.request_ack(now), "one request at a time");
        assert_eq!(sm.stalled_at(WINDOW, timeout), Some(now + timeout));
        tokio::time::advance(Duration::from_secs(30)).await;
        // A partial answer makes room and ends the wait; the next request starts anew.
        sm.on_ack(1).unwrap();
        assert_eq!(sm.stalled_at(WINDOW, timeout), None);
        sm.on_outbound(xml(5), None);
        assert!(sm.request_ack(Instant::now()));
        assert_eq!(
            sm.stalled_at(WINDOW, timeout),
            Some(now + Duration::from_secs(90))
        );
    }
}
