//! Callers refused a certificate exchange lately: one alarm per caller (an IPv6
//! caller's /64), held for an hour after its last refusal, with a bounded memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// How long a refused caller's alarm stays after its last refused attempt.
pub const REFUSAL_ALARM_HOLD: Duration = Duration::from_secs(3600);
/// Callers tracked at most; beyond it the oldest is forgotten (its alarm then clears
/// at the next sweep), so a caller with many addresses cannot grow the map.
const MAX_TRACKED_CALLERS: usize = 1024;

/// The callers refused lately, by alarm subject, with when they last were.
#[derive(Debug, Default)]
pub struct Refusals {
    last: Mutex<HashMap<String, tokio::time::Instant>>,
}

/// The alarm subject of a caller: its address, an IPv6 caller's /64 (one host gets a
/// whole /64, so one alarm per host).
pub(crate) fn caller_subject(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

impl Refusals {
    /// Notes a refusal; true when the caller's alarm is not raised yet.
    pub(crate) fn note(&self, subject: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let new = !last.contains_key(subject);
        if new && last.len() >= MAX_TRACKED_CALLERS {
            let oldest = last.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                last.remove(&k);
            }
        }
        last.insert(subject.to_owned(), tokio::time::Instant::now());
        new
    }

    /// The callers whose last refusal is older than the hold, forgotten.
    pub(crate) fn expired(&self) -> Vec<String> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = last
            .iter()
            .filter(|(_, t)| t.elapsed() >= REFUSAL_ALARM_HOLD)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            last.remove(k);
        }
        gone
    }

    pub(crate) fn tracks(&self, subject: &str) -> bool {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_caller_is_one_subject_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(caller_subject(a), caller_subject(b));
        assert_eq!(caller_subject("192.0.2.7".parse().unwrap()), "192.0.2.7");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_caller_is_one_alarm_until_an_hour_of_quiet() {
        let r = Refusals::default();
        assert!(r.note("192.0.2.7"), "the first refusal raises");
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert!(!r.note("192.0.2.7"), "a second one does not");
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert!(
            r.expired().is_empty(),
            "an hour since the first, not the last"
        );
        tokio::time::advance(Duration::from_secs(1801)).await;
        assert_eq!(r.expired(), ["192.0.2.7"]);
        assert!(r.note("192.0.2.7"), "raised again after the clear");
    }

    #[test]
    fn the_tracked_callers_are_bounded() {
        let r = Refusals::default();
        for i in 0..(MAX_TRACKED_CALLERS + 10) {
            r.note(&format!("caller{i}"));
        }
        assert_eq!(r.last.lock().unwrap().len(), MAX_TRACKED_CALLERS);
    }
}
