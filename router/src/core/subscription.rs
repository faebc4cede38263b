//! The presence subscription tables of RFC 6121 Appendix A, without I/O.
//!
//! A subscription between a user and a contact is one of nine states: the two halves
//! (`to`: the user sees the contact; `from`: the contact sees the user) and the two
//! pending requests (`pending_out`: the user asked the contact; `pending_in`: the
//! contact asked the user). A subscription stanza is processed twice, as the RFC
//! describes: outbound at the sender's server ([`outbound`], Appendix A.2) and inbound
//! at the receiver's ([`inbound`], Appendix A.3). Each returns the next state and what
//! the caller sends; the caller reads the state from the roster (and the stored
//! requests), writes back what changed and sends.
//!
//! Where the RFC leaves a choice, the rule taken is:
//! - outbound `subscribe` and `unsubscribe` are always routed (the contact's server
//!   answers a request that is already granted, §3.1.3, and an `unsubscribe` must reach
//!   a contact whose state the user's server may have lost);
//! - outbound `subscribed` and `unsubscribed` are routed only when they change the
//!   state (no pre-approval, §3.4, which is optional and not offered);
//! - inbound stanzas that change nothing are not delivered to the user (§3.1.6,
//!   §3.2.3, §3.3.3), except `subscribe` when the subscription already exists, which is
//!   answered with `subscribed` on the user's behalf (§3.1.3).

/// A presence subscription stanza type (RFC 6121 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Subscribe,
        Kind::Subscribed,
        Kind::Unsubscribe,
        Kind::Unsubscribed,
    ];

    /// The `type` attribute of a subscription stanza; `None` for any other presence.
    pub fn parse(ty: &str) -> Option<Kind> {
        Some(match ty {
            "subscribe" => Kind::Subscribe,
            "subscribed" => Kind::Subscribed,
            "unsubscribe" => Kind::Unsubscribe,
            "unsubscribed" => Kind::Unsubscribed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Subscribe => "subscribe",
            Kind::Subscribed => "subscribed",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Unsubscribed => "unsubscribed",
        }
    }
}

/// The state of one user's subscription with one contact, seen from the user.
///
/// Only the nine states of RFC 6121 Appendix A exist: a request is pending only
/// while its half is not granted ([`State::new`] keeps it so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct State {
    to: bool,
    from: bool,
    pending_out: bool,
    pending_in: bool,
}

impl State {
    /// A state from its four parts; a pending flag for a half already granted is
    /// dropped (the RFC has no such state).
    pub fn new(to: bool, from: bool, pending_out: bool, pending_in: bool) -> State {
        State {
            to,
            from,
            pending_out: pending_out && !to,
            pending_in: pending_in && !from,
        }
    }

    /// The user sees the contact's presence.
    pub fn to(self) -> bool {
        self.to
    }

    /// The contact sees the user's presence.
    pub fn from(self) -> bool {
        self.from
    }

    /// The user asked for the contact's presence and has no answer yet (`ask`).
    pub fn pending_out(self) -> bool {
        self.pending_out
    }

    /// The contact asked for the user's presence and has no answer yet.
    pub fn pending_in(self) -> bool {
        self.pending_in
    }

    /// Every state of the RFC's tables.
    pub fn all() -> impl Iterator<Item = State> {
        (0..16u8)
            .map(|b| State::new(b & 1 != 0, b & 2 != 0, b & 4 != 0, b & 8 != 0))
            .filter({
                let mut seen = std::collections::HashSet::new();
                move |s| seen.insert(*s)
            })
    }
}

/// What the sender's server does with a subscription stanza from its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    /// The user's state afterwards.
    pub next: State,
    /// The stanza goes on to the contact (for the contact's server's inbound half).
    pub route: bool,
    /// The contact was just allowed to see the user: send it the user's current
    /// presence from each available resource (§3.1.5).
    pub send_presence: bool,
    /// The contact may no longer see the user: send it unavailable from each available
    /// resource (§3.2.2).
    pub send_unavailable: bool,
}

/// What the receiver's server does with a subscription stanza for its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// The user's state afterwards.
    pub next: State,
    /// The stanza goes to the user's available resources (a `subscribe` is also kept
    /// while it is pending, for the user's next login).
    pub deliver: bool,
    /// An answer sent back to the sender on the user's behalf.
    pub reply: Option<Kind>,
    /// The sender may no longer see the user: it gets unavailable presence from each
    /// of the user's available resources (§3.3.3).
    pub send_unavailable: bool,
}

/// RFC 6121 Appendix A.2: the user sends `kind` to a contact while in `state`.
pub fn outbound(state: State, kind: Kind) -> Outbound {
    let State {
        to,
        from,
        pending_out,
        pending_in,
    } = state;
    let next = match kind {
        // A.2.1: a request is pending until answered, unless already granted.
        Kind::Subscribe => State::new(to, from, true, pending_in),
        // A.2.2: the user cancels its own subscription (or its request).
        Kind::Unsubscribe => State::new(false, from, false, pending_in),
        // A.2.3: approving needs a pending request (no pre-approval).
        Kind::Subscribed if pending_in => State::new(to, true, pending_out, false),
        Kind::Subscribed => state,
        // A.2.4: denying a request, or cancelling the contact's subscription.
        Kind::Unsubscribed => State::new(to, false, pending_out, false),
    };
    let changed = next != state;
    Outbound {
        next,
        route: match kind {
            Kind::Subscribe | Kind::Unsubscribe => true,
            Kind::Subscribed | Kind::Unsubscribed => changed,
        },
        send_presence: kind == Kind::Subscribed && next.from && !from,
        send_unavailable: kind == Kind::Unsubscribed && from,
    }
}

/// RFC 6121 Appendix A.3: the user receives `kind` from a contact while in `state`.
pub fn inbound(state: State, kind: Kind) -> Inbound {
    let State {
        to,
        from,
        pending_out,
        pending_in,
    } = state;
    let (next, reply) = match kind {
        // A.3.1: already granted: answered on the user's behalf (§3.1.3).
        Kind::Subscribe if from => (state, Some(Kind::Subscribed)),
        Kind::Subscribe => (State::new(to, from, pending_out, true), None),
        // A.3.2: the contact cancels its subscription to the user (or its request).
        Kind::Unsubscribe => (State::new(to, false, pending_out, false), None),
        // A.3.3: an approval counts only for a request the user made.
        Kind::Subscribed if pending_out => (State::new(true, from, false, pending_in), None),
        Kind::Subscribed => (state, None),
        // A.3.4: the contact cancels (or denies) the user's subscription.
        Kind::Unsubscribed => (State::new(false, from, false, pending_in), None),
    };
    Inbound {
        next,
        deliver: next != state,
        reply,
        send_unavailable: kind == Kind::Unsubscribe && from,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC's names for the nine states.
    fn named(name: &str) -> State {
        let (half, pending) = name.split_once('+').unwrap_or((name, ""));
        let (to, from) = match half {
            "None" => (false, false),
            "To" => (true, false),
            "From" => (false, true),
            "Both" => (true, true),
            other => panic!("unknown state {other}"),
        };
        let (out, inn) = match pending {
            "" => (false, false),
            "PendingOut" => (true, false),
            "PendingIn" => (false, true),
            "PendingOutIn" => (true, true),
            other => panic!("unknown pending {other}"),
        };
        let s = State::new(to, from, out, inn);
        assert_eq!(
            (s.pending_out, s.pending_in),
            (out, inn),
            "{name} is not a state"
        );
        s
    }

    const STATES: [&str; 9] = [
        "None",
        "None+PendingOut",
        "None+PendingIn",
        "None+PendingOutIn",
        "To",
        "To+PendingIn",
        "From",
        "From+PendingOut",
        "Both",
    ];

    #[test]
    fn there_are_nine_states() {
        assert_eq!(State::all().count(), 9);
        for name in STATES {
            assert!(State::all().any(|s| s == named(name)));
        }
    }

    /// Checks one column of a table: `expected[i]` is the state after `kind` in
    /// `STATES[i]` ("" for no change).
    fn column<T>(
        f: impl Fn(State, Kind) -> T,
        next: impl Fn(&T) -> State,
        kind: Kind,
        expected: [&str; 9],
    ) {
        for (from, to) in STATES.into_iter().zip(expected) {
            let before = named(from);
            let want = if to.is_empty() { before } else { named(to) };
            assert_eq!(next(&f(before, kind)), want, "{kind:?} in {from}");
        }
    }

    #[test]
    fn rfc6121_a2_outbound_table() {
        let next = |o: &Outbound| o.next;
        column(
            outbound,
            next,
            Kind::Subscribe,
            [
                "None+PendingOut",
                "",
                "None+PendingOutIn",
                "",
                "",
                "",
                "From+PendingOut",
                "",
                "",
            ],
        );
        column(
            outbound,
            next,
            Kind::Unsubscribe,
            [
                "",
                "None",
                "",
                "None+PendingIn",
                "None",
                "None+PendingIn",
                "",
                "From",
                "From",
            ],
        );
        column(
            outbound,
            next,
            Kind::Subscribed,
            ["", "", "From", "From+PendingOut", "", "Both", "", "", ""],
        );
        column(
            outbound,
            next,
            Kind::Unsubscribed,
            [
                "",
                "",
                "None",
                "None+PendingOut",
                "",
                "To",
                "None",
                "None+PendingOut",
                "To",
            ],
        );
    }

    #[test]
    fn rfc6121_a3_inbound_table() {
        let next = |i: &Inbound| i.next;
        column(
            inbound,
            next,
            Kind::Subscribe,
            [
                "None+PendingIn",
                "None+PendingOutIn",
                "",
                "",
                "To+PendingIn",
                "",
                "",
                "",
                "",
            ],
        );
        column(
            inbound,
            next,
            Kind::Unsubscribe,
            [
                "",
                "",
                "None",
                "None+PendingOut",
                "",
                "To",
                "None",
                "None+PendingOut",
                "To",
            ],
        );
        column(
            inbound,
            next,
            Kind::Subscribed,
            ["", "To", "", "To+PendingIn", "", "", "", "Both", ""],
        );
        column(
            inbound,
            next,
            Kind::Unsubscribed,
            [
                "",
                "None",
                "",
                "None+PendingIn",
                "None",
                "None+PendingIn",
                "",
                "From",
                "From",
            ],
        );
    }

    #[test]
    fn what_goes_out_with_each_step() {
        // §3.1.3: a request for a subscription that exists is answered for the user.
        for s in ["From", "From+PendingOut", "Both"] {
            let i = inbound(named(s), Kind::Subscribe);
            assert_eq!((i.reply, i.deliver), (Some(Kind::Subscribed), false), "{s}");
        }
        // A duplicate request is kept once and not shown again.
        assert!(!inbound(named("None+PendingIn"), Kind::Subscribe).deliver);
        assert!(inbound(named("None"), Kind::Subscribe).deliver);
        // An approval nobody asked for is ignored (§3.1.6) and not routed outbound.
        assert!(!inbound(named("None"), Kind::Subscribed).deliver);
        assert!(!outbound(named("None"), Kind::Subscribed).route);
        // Requests and cancellations always travel.
        for s in STATES {
            assert!(outbound(named(s), Kind::Subscribe).route, "{s}");
            assert!(outbound(named(s), Kind::Unsubscribe).route, "{s}");
        }
        // Approving shows the user's presence to the contact (§3.1.5) ...
        let o = outbound(named("None+PendingIn"), Kind::Subscribed);
        assert!(o.route && o.send_presence && !o.send_unavailable);
        // ... cancelling it sends unavailable (§3.2.2) ...
        let o = outbound(named("Both"), Kind::Unsubscribed);
        assert!(o.route && o.send_unavailable && !o.send_presence);
        // ... and denying a request sends nothing but the denial.
        let o = outbound(named("None+PendingIn"), Kind::Unsubscribed);
        assert!(o.route && !o.send_unavailable);
        // A contact that cancels its subscription sees the user go (§3.3.3); one that
        // only withdraws its request had nothing to see.
        assert!(inbound(named("From"), Kind::Unsubscribe).send_unavailable);
        assert!(inbound(named("Both"), Kind::Unsubscribe).send_unavailable);
        assert!(!inbound(named("None+PendingIn"), Kind::Unsubscribe).send_unavailable);
    }

    #[test]
    fn the_two_halves_agree() {
        // Whatever the user sends, the contact's server, running the inbound half on
        // the mirrored state, reaches the mirror of the user's next state: both
        // rosters stay consistent when each runs its half.
        let mirror = |s: State| State::new(s.from, s.to, s.pending_in, s.pending_out);
        for s in State::all() {
            for kind in Kind::ALL {
                let out = outbound(s, kind);
                if !out.route {
                    continue;
                }
                let inn = inbound(mirror(s), kind);
                let contact_next = match inn.reply {
                    // The auto-reply comes back to the user as inbound `subscribed`.
                    Some(reply) => {
                        assert_eq!(mirror(inn.next), out.next, "{kind:?} in {s:?}");
                        let back = inbound(out.next, reply).next;
                        assert!(back.to, "{kind:?} in {s:?}: the reply grants it");
                        continue;
                    }
                    None => inn.next,
                };
                assert_eq!(mirror(contact_next), out.next, "{kind:?} in {s:?}");
            }
        }
    }

    #[test]
    fn types_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(Kind::parse("probe"), None);
        assert_eq!(Kind::parse(""), None);
    }
}
