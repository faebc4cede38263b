//! Counters of the router for `/metrics`: plain atomics, updated on the hot path with
//! relaxed ordering (no locks, no allocation).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::stanza::Kind;

/// Router counters; all monotonic.
#[derive(Debug, Default)]
pub struct Stats {
    stanzas_in: [AtomicU64; 3],
    stanzas_out: [AtomicU64; 3],
    logins_ok: AtomicU64,
    logins_failed: AtomicU64,
    tls_ok: AtomicU64,
    tls_failed: AtomicU64,
    refused_preauth: AtomicU64,
    push_sent: AtomicU64,
    push_refused: AtomicU64,
    push_undelivered: AtomicU64,
    muc_relayed: AtomicU64,
    muc_refused: [AtomicU64; MUC_LIMITS.len()],
}

/// The limits of the chat service a stanza can be refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MucLimit {
    /// `[muc] max_rooms` (`resource-constraint`).
    Rooms,
    /// `[muc] max_rooms_per_user` (`not-allowed`).
    RoomsPerUser,
    /// A room's `max_users` (`service-unavailable`).
    Occupants,
    /// `[muc] max_message_bytes`, or the elements of a stanza to a room.
    Size,
    /// `[muc] message_rate` (`resource-constraint`).
    MessageRate,
    /// `[muc] presence_rate`, for an entry or a change of nick (`resource-constraint`).
    PresenceRate,
}

const MUC_LIMITS: [&str; 6] = [
    "rooms",
    "rooms_per_user",
    "occupants",
    "size",
    "message_rate",
    "presence_rate",
];

const KINDS: [&str; 3] = ["message", "presence", "iq"];

fn index(kind: Kind) -> usize {
    match kind {
        Kind::Message => 0,
        Kind::Presence => 1,
        Kind::Iq => 2,
    }
}

/// The kind of a serialized stanza, from its first bytes.
fn kind_of(xml: &str) -> Option<usize> {
    let name = xml.strip_prefix('<')?;
    KINDS.iter().position(|k| {
        name.strip_prefix(k)
            .is_some_and(|rest| rest.starts_with([' ', '>', '/']))
    })
}

impl Stats {
    pub(crate) fn stanza_in(&self, kind: Kind) {
        self.stanzas_in[index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stanza_out(&self, xml: &str) {
        if let Some(i) = kind_of(xml) {
            self.stanzas_out[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn login(&self, ok: bool) {
        let c = if ok {
            &self.logins_ok
        } else {
            &self.logins_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_handshake(&self, ok: bool) {
        let c = if ok { &self.tls_ok } else { &self.tls_failed };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection closed at accept: its address had too many unbound streams.
    pub(crate) fn refused_preauth(&self) {
        self.refused_preauth.fetch_add(1, Ordering::Relaxed);
    }

    /// A push notification (XEP-0357) went to an app server.
    pub(crate) fn push_sent(&self) {
        self.push_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// An app server refused a notification (its registration was disabled).
    pub(crate) fn push_refused(&self) {
        self.push_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A notification did not reach its app server (offline, unreachable).
    pub(crate) fn push_undelivered(&self) {
        self.push_undelivered.fetch_add(1, Ordering::Relaxed);
    }

    /// A chat room (XEP-0045) sent `n` stanzas for one message.
    pub(crate) fn muc_messages(&self, n: usize) {
        self.muc_relayed
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The chat service refused a stanza for one of its limits.
    pub(crate) fn muc_refused(&self, limit: MucLimit) {
        self.muc_refused[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.push_str("# HELP impmesh_stanzas_in_total Stanzas received from clients, by kind.\n");
        out.push_str("# TYPE impmesh_stanzas_in_total counter\n");
        for (i, k) in KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "impmesh_stanzas_in_total{{kind=\"{k}\"}} {}",
                get(&self.stanzas_in[i])
            );
        }
        out.push_str("# HELP impmesh_stanzas_out_total Stanzas written to clients, by kind.\n");
        out.push_str("# TYPE impmesh_stanzas_out_total counter\n");
        for (i, k) in KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "impmesh_stanzas_out_total{{kind=\"{k}\"}} {}",
                get(&self.stanzas_out[i])
            );
        }
        out.push_str("# HELP impmesh_logins_total Client authentications, by result.\n");
        out.push_str("# TYPE impmesh_logins_total counter\n");
        let _ = writeln!(
            out,
            "impmesh_logins_total{{result=\"ok\"}} {}",
            get(&self.logins_ok)
        );
        let _ = writeln!(
            out,
            "impmesh_logins_total{{result=\"failed\"}} {}",
            get(&self.logins_failed)
        );
        out.push_str("# HELP impmesh_tls_handshakes_total Client TLS handshakes, by result.\n");
        out.push_str("# TYPE impmesh_tls_handshakes_total counter\n");
        let _ = writeln!(
            out,
            "impmesh_tls_handshakes_total{{result=\"ok\"}} {}",
            get(&self.tls_ok)
        );
        let _ = writeln!(
            out,
            "impmesh_tls_handshakes_total{{result=\"failed\"}} {}",
            get(&self.tls_failed)
        );
        out.push_str("# HELP impmesh_connections_refused_total Client connections closed at accept, by reason.\n");
        out.push_str("# TYPE impmesh_connections_refused_total counter\n");
        let _ = writeln!(
            out,
            "impmesh_connections_refused_total{{reason=\"preauth_per_address\"}} {}",
            get(&self.refused_preauth)
        );
        out.push_str("# HELP impmesh_push_notifications_total Push notifications (XEP-0357) to app servers, by result: sent, refused (registration disabled), undelivered.\n");
        out.push_str("# TYPE impmesh_push_notifications_total counter\n");
        let _ = writeln!(
            out,
            "impmesh_push_notifications_total{{result=\"sent\"}} {}",
            get(&self.push_sent)
        );
        let _ = writeln!(
            out,
            "impmesh_push_notifications_total{{result=\"refused\"}} {}",
            get(&self.push_refused)
        );
        let _ = writeln!(
            out,
            "impmesh_push_notifications_total{{result=\"undelivered\"}} {}",
            get(&self.push_undelivered)
        );
        out.push_str("# HELP impmesh_muc_messages_relayed_total Stanzas chat rooms (XEP-0045) sent to occupants for their messages.\n");
        out.push_str("# TYPE impmesh_muc_messages_relayed_total counter\n");
        let _ = writeln!(
            out,
            "impmesh_muc_messages_relayed_total {}",
            get(&self.muc_relayed)
        );
        out.push_str(
            "# HELP impmesh_muc_refused_total Stanzas chat rooms refused, by the limit they met.\n",
        );
        out.push_str("# TYPE impmesh_muc_refused_total counter\n");
        for (limit, c) in MUC_LIMITS.iter().zip(&self.muc_refused) {
            let _ = writeln!(
                out,
                "impmesh_muc_refused_total{{limit=\"{limit}\"}} {}",
                get(c)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_kinds_are_read_from_the_first_bytes() {
        assert_eq!(kind_of("<message to='a'/>"), Some(0));
        assert_eq!(kind_of("<presence/>"), Some(1));
        assert_eq!(kind_of("<iq type='get'>"), Some(2));
        assert_eq!(kind_of("<iqx/>"), None);
        assert_eq!(kind_of("<r xmlns='urn:xmpp:sm:3'/>"), None);
    }
}
