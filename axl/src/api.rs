//! The admin API's types (`/admin/v1` on `[listen] admin`): what the node answers and
//! what the CLI reads, one definition for both sides (no untyped JSON between them).
//! Types that the store or the certificate layer already defines (alarms, trust
//! entries, certificate facts, a peer's sync position) are used as they are.

use serde::{Deserialize, Serialize};

pub use impmesh_certs::CertInfo;
pub use impmesh_store::alarms::{ActiveAlarm, AlarmEvent};
pub use impmesh_store::{
    ClusterName, NodeName, PeerState, PeerSync, TrustEntry, TrustKind, UserName,
};

/// The body of every answer that is not a success.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub cluster: String,
    pub domain: String,
    pub node: String,
    pub version: String,
    /// This cluster's directory USN (absent when the store did not answer).
    pub usn: Option<i64>,
    #[serde(flatten)]
    pub runtime: NodeRuntime,
}

/// What only the running node knows about itself (the part of [`NodeStatus`] that
/// the node, not the HTTPS service, fills in).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRuntime {
    pub uptime_secs: u64,
    /// Client sessions bound now.
    pub sessions: usize,
    pub listeners: Listeners,
    pub certificate: CertificateSummary,
    /// The fingerprint of the certificate shown to XMPP clients, when it is not the
    /// node certificate.
    pub client_certificate: Option<String>,
    /// `sqlite` or `postgres`.
    pub store: String,
}

/// Where the node listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listeners {
    pub c2s: Vec<String>,
    pub c2s_direct_tls: Vec<String>,
    pub https: String,
    pub admin: String,
    pub links: Option<String>,
    /// HTTPS for clients (file upload), when on.
    #[serde(default)]
    pub client_https: Option<String>,
    /// The TURN relay (UDP and TCP), when on.
    #[serde(default)]
    pub turn: Option<String>,
    /// The TURN relay's TLS port, when on.
    #[serde(default)]
    pub turns: Option<String>,
}

/// The node certificate in use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateSummary {
    pub sha256: String,
    pub subject: Option<String>,
    pub not_after: Option<String>,
    pub self_signed: Option<bool>,
}

/// `POST /users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    pub password: String,
}

/// `PUT /users/NAME/password`, `PUT /axl-users/NAME`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Password {
    pub password: String,
}

/// An account as `GET /users` lists it (users of this cluster and of its peers).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub username: UserName,
    pub jid: String,
    pub home_cluster: ClusterName,
    pub home_node: NodeName,
    pub created_at: i64,
    pub usn: i64,
}

impl User {
    /// An account of the store as the API lists it.
    pub fn new(u: impmesh_store::UserRecord, domain: &str) -> User {
        User {
            jid: format!("{}@{domain}", u.username),
            username: u.username,
            home_cluster: u.home_cluster,
            home_node: u.home_node,
            created_at: u.created_at,
            usn: u.usn,
        }
    }
}

/// An account's FAST tokens (XEP-0484), as `GET /users/{name}/tokens` lists them:
/// each client's token in use and the newer one it has not used yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tokens {
    pub username: String,
    pub tokens: Vec<impmesh_store::FastToken>,
}

/// A chat room (XEP-0045) of the node, as `GET /rooms` lists it and
/// `GET /rooms/{name}` shows it (with its occupants and affiliations).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Room {
    pub jid: String,
    /// Its configured name ('' when none).
    pub name: String,
    pub description: String,
    pub subject: Option<String>,
    pub persistent: bool,
    pub public: bool,
    pub members_only: bool,
    pub moderated: bool,
    pub password_protected: bool,
    /// Real JIDs visible to every occupant, not only moderators.
    pub non_anonymous: bool,
    pub max_users: usize,
    pub history_length: usize,
    /// Created and waiting for its owner's configuration.
    pub locked: bool,
    pub occupants: Vec<RoomOccupant>,
    pub affiliations: Vec<RoomAffiliation>,
}

/// Someone in a room.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomOccupant {
    pub nick: String,
    pub jid: String,
    pub role: String,
    pub affiliation: String,
    /// Sessions of the account sharing the nick.
    pub sessions: usize,
}

/// An account's standing in a room (owner, admin, member, outcast).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomAffiliation {
    pub jid: String,
    pub affiliation: String,
}

/// The body of `POST /rooms/{name}/destroy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomDestroy {
    /// The room occupants are told to go to instead.
    pub venue: Option<String>,
    pub reason: Option<String>,
}

/// The answer to `POST /rooms/{name}/destroy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomDestroyed {
    pub jid: String,
    /// Sessions told the room is gone.
    pub told: usize,
}

/// The answer to `DELETE /users/{name}/tokens[/{client}]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokensRevoked {
    pub username: String,
    pub revoked: u64,
}

/// The answer to a change of one account (its normalised name).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Username {
    pub username: String,
}

/// An AXL user as `GET /axl-users` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AxlUser {
    pub username: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<impmesh_store::AxlUser> for AxlUser {
    fn from(u: impmesh_store::AxlUser) -> AxlUser {
        AxlUser {
            username: u.username,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}

/// `POST /certificates/csr`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrRequest {
    pub cn: String,
    #[serde(default)]
    pub sans: Vec<String>,
}

/// A PEM document (the answer to a CSR).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pem {
    pub pem: String,
}

/// `POST /certificates/import`: either `cert` (PEM, with `key` and `chain` when they
/// are not in it) or `p12` (a PKCS#12 archive, base64) with its `password`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportCertificate {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub chain: Option<String>,
    pub p12: Option<String>,
    pub password: Option<String>,
}

/// The certificate now in use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fingerprint {
    pub fingerprint: String,
}

/// `POST /certificates/end-overlap`: whether a rotation was under way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverlapEnded {
    pub ended: bool,
}

/// `POST /trust`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddTrust {
    pub pem: String,
    pub kind: TrustKind,
    /// The peer a pinned certificate belongs to.
    pub peer: Option<String>,
}

/// `DELETE /trust/FINGERPRINT`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrustRemoved {
    pub removed: String,
}

/// `POST /peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPeer {
    pub address: String,
    pub user: String,
    pub password: String,
}

/// The answer to `POST /peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerAdded {
    pub cluster: String,
    pub address: String,
    pub state: PeerState,
}

/// `POST /peers/CLUSTER/sync`: a full resync, after exchanging certificates again when
/// `with_certificates` (with the peer's AXL credential).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceSync {
    #[serde(default)]
    pub with_certificates: bool,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// The answer to an action on one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerAction {
    Accepted(String),
    Deleted(String),
    Syncing(String),
}

/// One check of the troubleshooter (`GET /troubleshoot`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// What was found (the reason when not ok).
    pub detail: String,
}

/// A peer as `GET /peers` shows it: the sync agent's view and the router's links.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Peer {
    #[serde(flatten)]
    pub status: PeerStatus,
    pub links: Vec<LinkStatus>,
}

/// Everything the sync agent knows about one peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub cluster: String,
    pub address: String,
    pub state: PeerState,
    pub added_here: bool,
    pub added_at: i64,
    pub accepted_at: Option<i64>,
    /// Users of the peer in our directory.
    pub associated_users: i64,
    pub sync: PeerSync,
    pub live: LiveStatus,
    /// Pinned certificates of the peer.
    pub pinned: Vec<String>,
    /// Times the stall watchdog restarted this peer's sync.
    pub stall_restarts: u32,
}

/// What a peer's sync is doing (`peer status`, `impmesh_peer_sync_state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncState {
    /// The task started and has not tried yet.
    #[default]
    Connecting,
    /// The first sync, or the one after a failure, is under way.
    Syncing,
    /// The last sync completed.
    InSync,
    /// The last attempt failed (the reason is beside it); retried with backoff.
    Failed,
    /// The peer added us and is not accepted here.
    Pending,
    /// An active peer without a running task (the node is stopping).
    Stopped,
    /// The peer removed this cluster.
    Removed,
}

impl SyncState {
    /// The name `peer status` and `/metrics` show.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Connecting => "connecting",
            SyncState::Syncing => "syncing",
            SyncState::InSync => "in-sync",
            SyncState::Failed => "failed",
            SyncState::Pending => "pending",
            SyncState::Stopped => "stopped",
            SyncState::Removed => "removed",
        }
    }
}

/// Whether the certificates a peer announces are the pinned ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertificateStatus {
    /// Before the first contact of this task.
    #[default]
    Unknown,
    /// Every certificate the peer announces is pinned here.
    InSync,
    /// The peer announces a certificate that is not pinned here.
    OutOfSync,
    /// The peer's certificate did not verify against the pinned ones.
    Failed,
}

impl CertificateStatus {
    /// The name `peer status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateStatus::Unknown => "unknown",
            CertificateStatus::InSync => "in-sync",
            CertificateStatus::OutOfSync => "out-of-sync",
            CertificateStatus::Failed => "failed",
        }
    }
}

/// What a peer task last saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveStatus {
    pub state: SyncState,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    pub last_attempt_at: Option<i64>,
    pub last_success_at: Option<i64>,
    pub consecutive_failures: u32,
    pub certificate_status: CertificateStatus,
    pub certificate_reason: Option<String>,
    /// The node fingerprints the peer announced last.
    pub peer_fingerprints: Vec<String>,
    /// The peer's USN when last asked.
    pub peer_usn: Option<i64>,
    /// How many users the peer has, by its last listing.
    pub peer_users: Option<i64>,
    /// The peer's clock minus ours, seconds (from its last answer's `Date`).
    pub clock_skew_secs: Option<i64>,
    /// The intercluster protocol version the peer speaks, and its optional features.
    pub peer_protocol: Option<u32>,
    pub peer_features: Vec<String>,
    /// Features this node uses that the peer does not announce (not used with it).
    pub missing_features: Vec<String>,
    /// Every DNS name of the peer (its address, its certificates' SANs): resolved now,
    /// or failing (with the last good addresses still in use).
    pub dns: Vec<NameStatus>,
    /// Directory entries of the peer refused since the task started: a user homed
    /// elsewhere than the peer or its nodes, or an invalid name (see the log).
    pub refused_entries: u64,
    /// The peer's USN applied to our directory, and the peer's users in it, after the
    /// last sync (for `/metrics`: kept here, not read from the store per scrape).
    pub applied_usn: Option<i64>,
    pub users_here: Option<i64>,
}

/// The outcome of resolving one name, for `peer status` and the troubleshooter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameStatus {
    pub name: String,
    /// Whether DNS answered now.
    pub ok: bool,
    /// The addresses in use: DNS's answer, or the last good one during an outage.
    pub addresses: Vec<String>,
    /// DNS's error, when it failed.
    pub error: Option<String>,
    /// When the addresses in use were resolved, for a stale answer.
    pub resolved_at: Option<i64>,
}

/// Which way a router link carries stanzas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkDirection {
    /// This node sends over it.
    Out,
    /// The remote node sends to this one.
    In,
}

impl LinkDirection {
    /// `out` or `in`, as the JSON and `/metrics` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkDirection::Out => "out",
            LinkDirection::In => "in",
        }
    }
}

/// One router link to or from a node of a peer. The router reports its links in its
/// own type (`impmesh_router::LinkStatus`); this is the admin API's contract, mapped
/// from it in one place (src/control.rs), so the router can change what it tracks
/// without changing `/admin/v1`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The remote node.
    pub node: String,
    pub direction: LinkDirection,
    pub up: bool,
    pub since: i64,
    /// Stanzas carried so far.
    pub stanzas: u64,
    /// Stanzas waiting (outgoing links): queued in memory and stored in the outbox.
    pub queued: usize,
    /// Of those, in the durable outbox: rows and bytes.
    pub outbox_rows: u64,
    pub outbox_bytes: u64,
    /// Sent and not acknowledged: now, and the most there ever were.
    pub in_flight: u64,
    pub peak_in_flight: u64,
    /// The other node's protocol version and features, from its stream header.
    pub peer_protocol: Option<u32>,
    pub peer_features: Vec<String>,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire names admins and scripts see stay as documented (docs/axl.md).
    #[test]
    fn states_and_actions_keep_their_wire_names() {
        let json = |v: serde_json::Value| v.to_string();
        assert_eq!(json(serde_json::json!(SyncState::InSync)), "\"in-sync\"");
        assert_eq!(
            json(serde_json::json!(CertificateStatus::OutOfSync)),
            "\"out-of-sync\""
        );
        assert_eq!(json(serde_json::json!(LinkDirection::Out)), "\"out\"");
        for d in [LinkDirection::Out, LinkDirection::In] {
            assert_eq!(json(serde_json::json!(d)), format!("\"{}\"", d.as_str()));
        }
        assert_eq!(
            json(serde_json::json!(PeerAction::Accepted("b.example".into()))),
            r#"{"accepted":"b.example"}"#
        );
        let back: PeerAction = serde_json::from_str(r#"{"syncing":"c"}"#).unwrap();
        assert!(matches!(back, PeerAction::Syncing(c) if c == "c"));
    }
}
