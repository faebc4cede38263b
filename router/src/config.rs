//! Router settings. The binary maps its TOML file onto these; every field has a default
//! chosen from what trusted servers ship (see `shared/anchors/security.md`).

use std::time::Duration;

use impmesh_store::{ClusterName, NodeName};

/// Everything the router needs to know.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The XMPP domain served (e.g. `example.com`).
    pub domain: String,
    /// Name of this node, stamped into user rows.
    pub node_name: NodeName,
    /// Name of this node's cluster.
    pub cluster_name: ClusterName,
    /// SASL mechanisms offered, in order of preference; unknown names are ignored.
    pub sasl_mechanisms: Vec<String>,
    /// In-band registration (XEP-0077).
    pub allow_registration: bool,
    /// Time between two in-band registrations from one address.
    pub registration_interval: Duration,
    pub limits: Limits,
    /// The optional intercluster features this node announces on its router links'
    /// stream headers (the same list as in `getClusterInfo`).
    pub link_features: Vec<String>,
    /// The DSCP class of the node's signalling: client connections, router links,
    /// the upload listener (AF31, 26, by default; 0 leaves them unmarked).
    pub dscp: u8,
    /// XEP-0157 contact addresses, as (field, URIs) with the field's name in the
    /// `http://jabber.org/network/serverinfo` form (`admin-addresses`, ...); only
    /// kinds with addresses.
    pub contact_addresses: Vec<(String, Vec<String>)>,
    /// Message archives (XEP-0313).
    pub archive: ArchiveSettings,
    /// HTTP file upload (XEP-0363); `None`: not offered.
    pub upload: Option<UploadSettings>,
    /// How long a FAST token (XEP-0484) lasts; `None`: FAST is not offered (SASL2
    /// and Bind 2 still are).
    pub fast_token_lifetime: Option<Duration>,
    /// Multi-user chat (XEP-0045); `None`: not offered.
    pub muc: Option<crate::muc::MucSettings>,
}

/// FAST tokens' default lifetime, as Prosody's: a device unused for three weeks logs
/// in with its password again.
pub const FAST_TOKEN_LIFETIME: Duration = Duration::from_secs(21 * 24 * 3600);

/// HTTP file upload (XEP-0363).
#[derive(Debug, Clone)]
pub struct UploadSettings {
    /// The start of this node's file URLs, `https://host[:port]` without a trailing
    /// slash (the client certificate must cover the host); `None`: the domain, with
    /// the listener's port.
    pub public_url: Option<String>,
    /// The host of the default URL (with the listener's port): the node's own name
    /// when the client certificate covers it, else the domain.
    pub default_host: String,
    /// The largest file, in bytes.
    pub max_file_bytes: u64,
    /// Bytes each account's files and open slots may hold together.
    pub quota_bytes: u64,
    /// How long a slot waits for its PUT.
    pub slot_ttl: std::time::Duration,
    /// Files are deleted this long after their slot was given; `None` keeps them.
    pub expiry: Option<std::time::Duration>,
    /// Where the files are kept.
    pub dir: std::path::PathBuf,
}

/// Message archives (XEP-0313).
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    pub enabled: bool,
    /// The preference of accounts that never set one.
    pub default: crate::core::archive::DefaultMode,
    /// Messages older than this are deleted (hourly); `None` keeps them.
    pub retention: Option<Duration>,
    /// Messages one query page holds at most (a larger `<max/>` gets this many).
    pub max_page: usize,
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        ArchiveSettings {
            enabled: true,
            default: crate::core::archive::DefaultMode::Always,
            retention: Some(Duration::from_secs(365 * 24 * 3600)),
            max_page: 250,
        }
    }
}

/// The part of a session's queue one sender may fill: a quarter, so at least four
/// senders (or the server's own pushes) always find room however one of them floods.
pub const QUEUE_SHARE: usize = 4;

/// Sizes, rates, queues and timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest top-level element after authentication (Prosody and ejabberd: 256 KiB).
    pub max_stanza_bytes: usize,
    /// Largest top-level element before authentication (Prosody: 10 000 bytes).
    pub max_stanza_bytes_unauthenticated: usize,
    /// Stanzas waiting for one session's task, and their bytes; beyond either, senders
    /// get `resource-constraint` errors (the recipient is never punished for it). One
    /// sender may fill a quarter of each ([`QUEUE_SHARE`]).
    pub session_queue: usize,
    pub session_queue_bytes: usize,
    /// A write to a client or a peer node that does not complete within this time ends
    /// the connection: a reader that stopped reading releases its memory.
    pub write_timeout: Duration,
    /// Sustained read rate per connection, bytes/s (token bucket).
    pub read_rate: u32,
    /// Burst allowed above the sustained rate, bytes.
    pub read_burst: u32,
    /// Time to finish TLS, SASL and binding after connecting.
    pub handshake_timeout: Duration,
    /// Client connections open at once, at most, authenticated or not (an admission
    /// limit before any handshake work, STYLE 5): when all are taken, each listener
    /// holds at most one more connection, unserved, until one closes, and the kernel's
    /// backlog holds the rest.
    pub max_connections: usize,
    /// Client connections from one address (IPv6: one /64) not yet bound to a session;
    /// more are closed at once. Carrier-grade NAT puts many clients behind one
    /// address, but each spends a second or so before binding.
    pub preauth_connections_per_address: u32,
    /// Router-link handshakes in progress from one address at once (a peer node has
    /// one link to us, and a reconnection may overlap the old one).
    pub link_handshakes_per_address: u32,
    /// Idle time after which the server pings a client (XEP-0199).
    pub ping_interval: Duration,
    /// Time a pinged client has to show any sign of life.
    pub ping_timeout: Duration,
    /// Failed logins from one address within `login_failure_window` before further
    /// attempts from it are refused until the window passes.
    pub login_failures: u32,
    pub login_failure_window: Duration,
    /// XEP-0198 resumption window.
    pub resume_timeout: Duration,
    /// XEP-0198 window: stanzas sent and not acknowledged, at most, and their bytes
    /// (Prosody: 500, ejabberd: 5 000). A full window is flow control: the session
    /// waits for the client's acknowledgement, then for `ping_timeout`.
    pub max_unacked: usize,
    pub max_unacked_bytes: usize,
    /// Offline messages kept per user (ejabberd: 100), their bytes, and how many of
    /// them one sender may hold (its byte share is the same fraction).
    pub max_offline: u32,
    pub max_offline_bytes: u64,
    pub max_offline_per_sender: u32,
    /// How long a message for a remote user waits in the outbox while its router link
    /// is down before it is bounced to the sender.
    pub outbox_ttl: Duration,
    /// Messages kept in the outbox for one remote node, at most, and their bytes:
    /// beyond either, messages for it are bounced with `resource-constraint` (a peer
    /// that is down for a day cannot fill the disk).
    pub outbox_max_rows: u64,
    pub outbox_max_bytes: u64,
    /// Stanzas sent over one router link and not acknowledged yet, at most (the ack
    /// window): a backlog is streamed from the outbox under it, never read whole.
    pub link_window: usize,
    /// A link whose oldest unacknowledged stanza has waited this long for an
    /// acknowledgement is taken as dead (a black-holed connection) and reopened.
    pub link_ack_timeout: Duration,
    /// Router-link connections open at once, at most (an admission limit before TLS).
    pub link_connections: usize,
    /// Time a router link has for TLS and its stream headers.
    pub link_handshake_timeout: Duration,
    /// An incoming router link silent this long is closed (the sender's keepalive is a
    /// space every 30 s, so at least 60).
    pub link_read_timeout: Duration,
    /// Stanzas queued in memory for one remote node (beyond, they are bounced with
    /// `remote-server-timeout`; while the link is down they go to the outbox).
    pub link_queue: usize,
    /// Sessions (resources) per user (ejabberd: 10).
    pub max_sessions_per_user: usize,
    /// Time a closing stream waits for the peer's `</stream:stream>`.
    pub close_timeout: Duration,
    /// Largest PEP item payload (XEP-0163), bytes of XML: an avatar's data fits.
    pub pep_max_item_bytes: usize,
    /// Items a PEP node keeps at most (`pubsub#max_items` = `max`).
    pub pep_max_items: u32,
    /// PEP nodes per account (OMEMO adds one per device).
    pub pep_max_nodes: usize,
    /// Bytes of PEP item payloads per account, over all its nodes.
    pub pep_max_account_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 262_144,
            max_stanza_bytes_unauthenticated: 10_000,
            session_queue: 1_000,
            session_queue_bytes: 4 * 1024 * 1024,
            write_timeout: Duration::from_secs(30),
            read_rate: 65_536,
            read_burst: 524_288,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 65_536,
            preauth_connections_per_address: 32,
            link_handshakes_per_address: 8,
            ping_interval: Duration::from_secs(300),
            ping_timeout: Duration::from_secs(60),
            login_failures: 5,
            login_failure_window: Duration::from_secs(60),
            resume_timeout: Duration::from_secs(300),
            max_unacked: 1_000,
            max_unacked_bytes: 4 * 1024 * 1024,
            max_offline: 1_000,
            max_offline_bytes: 16 * 1024 * 1024,
            max_offline_per_sender: 250,
            outbox_ttl: Duration::from_secs(24 * 3600),
            outbox_max_rows: 250_000,
            outbox_max_bytes: 256 * 1024 * 1024,
            link_window: 8_192,
            link_ack_timeout: Duration::from_secs(60),
            link_connections: 1024,
            link_handshake_timeout: Duration::from_secs(10),
            link_read_timeout: Duration::from_secs(90),
            link_queue: 4096,
            max_sessions_per_user: 10,
            close_timeout: Duration::from_secs(5),
            pep_max_item_bytes: 128 * 1024,
            pep_max_items: 256,
            pep_max_nodes: 200,
            pep_max_account_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The mechanisms offered by default, strongest first.
pub fn default_sasl_mechanisms() -> Vec<String> {
    [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "PLAIN",
    ]
    .map(String::from)
    .to_vec()
}

impl Limits {
    /// The offline quota of one user.
    pub fn offline_quota(&self) -> impmesh_store::OfflineQuota {
        impmesh_store::OfflineQuota {
            messages: self.max_offline,
            bytes: self.max_offline_bytes,
            per_sender: self.max_offline_per_sender,
        }
    }

    /// The XEP-0198 window.
    pub fn sm_window(&self) -> crate::core::sm::Window {
        crate::core::sm::Window {
            stanzas: self.max_unacked.max(1),
            bytes: self.max_unacked_bytes.max(1),
        }
    }
}

impl RouterConfig {
    /// A one-node configuration for `domain` with every default.
    pub fn new(domain: &str) -> RouterConfig {
        RouterConfig {
            domain: domain.to_owned(),
            node_name: domain.into(),
            cluster_name: domain.into(),
            sasl_mechanisms: default_sasl_mechanisms(),
            allow_registration: false,
            registration_interval: Duration::from_secs(60),
            limits: Limits::default(),
            link_features: vec![],
            dscp: 26,
            contact_addresses: vec![],
            archive: ArchiveSettings::default(),
            upload: None,
            fast_token_lifetime: Some(FAST_TOKEN_LIFETIME),
            muc: None,
        }
    }
}
