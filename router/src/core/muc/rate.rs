//! How often an occupant may speak and change its presence in a room: a burst at
//! once, then a steady rate (the generic cell rate algorithm, on the microsecond
//! clock the room is given). One occupant's flood costs the others nothing beyond
//! its allowance: messages over it are refused, presence changes over it wait, and
//! only the newest waiting one is sent when the allowance returns.

/// A rate: `burst` events at once, then one every `interval` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub interval: i64,
    pub burst: u32,
}

impl Rate {
    /// `per_second` events a second (more than zero), `burst` at once (at least one).
    pub fn per_second(per_second: f64, burst: u32) -> Rate {
        let interval = (1e6 / per_second).round();
        Rate {
            // Out-of-range rates (zero, negative, not a number) allow nothing more
            // than the burst a day, rather than everything.
            interval: if interval.is_finite() && interval >= 1.0 {
                interval.min(86_400e6) as i64
            } else if per_second > 1e6 {
                1
            } else {
                86_400_000_000
            },
            burst: burst.max(1),
        }
    }
}

/// What an occupant may do how often (`[muc] message_rate` and `presence_rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Messages to the room, private messages and invitations.
    pub messages: Rate,
    /// Entries, changes of status and of nick (leaving is always allowed).
    pub presence: Rate,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            messages: Rate::per_second(1.0, 10),
            presence: Rate::per_second(0.5, 10),
        }
    }
}

/// One occupant's use of a rate: the time by which its allowance is whole again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Allowance {
    full_at: i64,
}

impl Allowance {
    /// Uses one event of the allowance at `now`, if there is one left.
    pub(super) fn take(&mut self, rate: Rate, now: i64) -> bool {
        let slack = rate.interval.saturating_mul(i64::from(rate.burst) - 1);
        // A clock stepped back holds an occupant for at most one burst, not for the
        // length of the step.
        let most = now.saturating_add(slack).saturating_add(rate.interval);
        self.full_at = self.full_at.min(most);
        let full_at = self.full_at.max(now);
        if full_at.saturating_sub(now) > slack {
            return false;
        }
        self.full_at = full_at.saturating_add(rate.interval);
        true
    }

    /// The first time [`Allowance::take`] succeeds.
    pub(super) fn ready_at(&self, rate: Rate) -> i64 {
        self.full_at
            .saturating_sub(rate.interval.saturating_mul(i64::from(rate.burst) - 1))
    }

    /// Whether the allowance is whole at `now` (nothing to remember).
    pub(super) fn is_full(&self, now: i64) -> bool {
        self.full_at <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval() {
        let rate = Rate::per_second(2.0, 3);
        assert_eq!(rate.interval, 500_000);
        let mut a = Allowance::default();
        let t = 1_000_000_000;
        assert!((0..3).all(|_| a.take(rate, t)));
        assert!(!a.take(rate, t));
        assert_eq!(a.ready_at(rate), t + 500_000);
        assert!(!a.take(rate, t + 499_999));
        assert!(a.take(rate, t + 500_000));
        assert!(!a.take(rate, t + 500_000));
        // Idle long enough, the whole burst is back, and no more.
        assert!(a.is_full(t + 2_000_000));
        assert!((0..3).all(|_| a.take(rate, t + 10_000_000)));
        assert!(!a.take(rate, t + 10_000_000));
        // The clock goes back an hour: one burst's wait at most.
        let back = t + 10_000_000 - 3_600_000_000;
        assert!(!a.take(rate, back));
        assert!(a.take(rate, back + 500_000));
    }

    #[test]
    fn rates_out_of_range_are_bounded() {
        assert_eq!(Rate::per_second(1e9, 1).interval, 1);
        assert_eq!(Rate::per_second(0.0, 1).interval, 86_400_000_000);
        assert_eq!(Rate::per_second(-1.0, 0).interval, 86_400_000_000);
        assert_eq!(Rate::per_second(f64::NAN, 0).burst, 1);
        let mut a = Allowance::default();
        let rate = Rate::per_second(0.0, 1);
        assert!(a.take(rate, 0));
        assert!(!a.take(rate, 86_399_999_999));
    }
}
