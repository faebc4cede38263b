//! The node's TOML configuration: one file, sections by concern, every key optional
//! with its default next to it (see `ops/impmesh.toml.example`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The XMPP domain served.
    pub domain: String,
    /// Where the store, certificates and state live.
    pub data_dir: PathBuf,
    pub node: NodeSection,
    pub listen: ListenSection,
    pub store: StoreSection,
    pub limits: LimitsSection,
    pub sasl: SaslSection,
    pub registration: RegistrationSection,
    pub https: HttpsSection,
    pub tls: TlsSection,
    pub sync: SyncSection,
    pub contact: ContactSection,
    pub pep: PepSection,
    pub archive: ArchiveSection,
    pub upload: UploadSection,
    pub media: MediaSection,
    pub muc: MucSection,
    pub log: LogSection,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: "localhost".into(),
            data_dir: PathBuf::from("impmesh-data"),
            node: NodeSection::default(),
            listen: ListenSection::default(),
            store: StoreSection::default(),
            limits: LimitsSection::default(),
            sasl: SaslSection::default(),
            registration: RegistrationSection::default(),
            https: HttpsSection::default(),
            tls: TlsSection::default(),
            sync: SyncSection::default(),
            contact: ContactSection::default(),
            pep: PepSection::default(),
            archive: ArchiveSection::default(),
            upload: UploadSection::default(),
            media: MediaSection::default(),
            muc: MucSection::default(),
            log: LogSection::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Unique node name; defaults to the domain.
    pub name: Option<String>,
    /// The cluster's name; defaults to the domain.
    pub cluster: Option<String>,
    /// The host name or address peers and clients reach this node at (published to
    /// peers). Default: the HTTPS listener's address, or the node name when that is a
    /// wildcard address.
    pub host: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// Client-to-server with STARTTLS required.
    pub c2s: Vec<SocketAddr>,
    /// Client-to-server with TLS from the first byte (XEP-0368).
    pub c2s_direct_tls: Vec<SocketAddr>,
    /// HTTPS for peers and load balancers: the AXL-like API, /healthz, /readyz.
    pub https: SocketAddr,
    /// HTTPS for this cluster's admins and monitoring: the admin API and /metrics
    /// (and /healthz, /readyz). Loopback by default: admin surfaces stay off the
    /// peer-facing listener.
    pub admin: SocketAddr,
    /// Router links from the nodes of peer clusters (mutual TLS); `false`: no links.
    #[serde(deserialize_with = "address_or_off")]
    pub links: Option<SocketAddr>,
    /// HTTPS for clients with the client certificate: HTTP file upload (XEP-0363).
    pub client_https: SocketAddr,
    /// The TURN relay (STUN and TURN over UDP and TCP, RFC 8656); `false`: no relay.
    #[serde(deserialize_with = "address_or_off")]
    pub turn: Option<SocketAddr>,
    /// STUN and TURN over TLS (RFC 8656 §3.1), with the client certificate; `false`:
    /// no TLS port. The same relay as `turn`'s: off when `turn` is.
    #[serde(deserialize_with = "address_or_off")]
    pub turns: Option<SocketAddr>,
    /// The DSCP class of signalling (client connections, router links, HTTPS): AF31
    /// (26) by default, as the seeds recommend; 0 leaves them unmarked. Relayed
    /// media has its own, `[media] dscp`.
    pub dscp: u8,
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            c2s: vec![SocketAddr::from(([127, 0, 0, 1], 5222))],
            c2s_direct_tls: vec![SocketAddr::from(([127, 0, 0, 1], 5223))],
            https: SocketAddr::from(([127, 0, 0, 1], 8443)),
            admin: SocketAddr::from(([127, 0, 0, 1], 8444)),
            links: Some(SocketAddr::from(([127, 0, 0, 1], 7400))),
            client_https: SocketAddr::from(([127, 0, 0, 1], 5443)),
            turn: Some(SocketAddr::from(([127, 0, 0, 1], 3478))),
            turns: Some(SocketAddr::from(([127, 0, 0, 1], 5349))),
            dscp: 26,
        }
    }
}

/// A listener that is on by default: an address, or `false` for none (TOML has no
/// null, and leaving the key out keeps the default).
fn address_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum On {
        Address(SocketAddr),
        Switch(bool),
    }
    match On::deserialize(d) {
        Ok(On::Address(a)) => Ok(Some(a)),
        Ok(On::Switch(false)) => Ok(None),
        _ => Err(serde::de::Error::custom(
            "expected an address (\"IP:PORT\") or false (none)",
        )),
    }
}

/// Certificates besides the node identity.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// A separate certificate (PEM chain) for the client ports 5222/5223, e.g. one from
    /// a public CA for the XMPP domain; relative to data_dir. Without it the node
    /// identity serves every listener. Re-read at every certificate reload.
    pub client_certificate: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
}

/// The intercluster sync agent; durations in seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    /// Time between two periodic pulls of each peer (a peer's notifyChange pulls at once).
    pub period: u64,
    /// A periodic sync that has not completed for this long is stalled (alarm
    /// InterClusterSyncAgentPeerPeriodicSyncingFailure).
    pub stall_threshold: u64,
    /// Restart what stalled, in-process.
    pub auto_recovery: bool,
    /// Users per listUsers page.
    pub page_size: u32,
    /// Seconds between two resolutions of every DNS name of a peer.
    pub dns_check_interval: u64,
    /// Seconds between two digest comparisons with a peer (0: after every sync that
    /// found nothing new).
    pub anti_entropy_interval: u64,
    /// Peers at most (29: a mesh of 30 clusters); more are refused.
    pub max_peers: usize,
    /// Optional intercluster features this node does not announce (and so does not
    /// get from peers): for a mixed-release mesh, or to turn one off.
    pub disable_features: Vec<String>,
    /// Seconds a new node certificate waits for every active peer to pin it before it
    /// is used for peers anyway (0: at once, no overlap).
    pub certificate_overlap: u64,
}

impl Default for SyncSection {
    fn default() -> Self {
        let s = impmesh_sync_agent::Settings::default();
        SyncSection {
            period: s.period.as_secs(),
            stall_threshold: s.stall_threshold.as_secs(),
            auto_recovery: s.auto_recovery,
            page_size: s.page_size,
            dns_check_interval: s.dns_check_interval.as_secs(),
            anti_entropy_interval: s.anti_entropy_interval.as_secs(),
            max_peers: s.max_peers,
            disable_features: vec![],
            certificate_overlap: 48 * 3600,
        }
    }
}

/// The HTTPS service's limits; durations in seconds unless named otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpsSection {
    /// Largest request body, bytes (larger: 413).
    pub body_limit: usize,
    /// Milliseconds to wait before answering a failed authentication.
    pub failure_delay_ms: u64,
    /// Failed authentications from one address within the window before it gets 429.
    pub max_failures: u32,
    pub failure_window: u64,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections one address (IPv6: one /64) may hold open.
    pub max_connections_per_address: u32,
    /// Lifetime of a session opened by the channel-bound first contact.
    pub session_ttl: u64,
}

impl Default for HttpsSection {
    fn default() -> Self {
        let l = impmesh_axl::HttpsLimits::default();
        HttpsSection {
            body_limit: l.body_limit,
            failure_delay_ms: l.auth.failure_delay.as_millis() as u64,
            max_failures: l.auth.max_failures,
            failure_window: l.auth.failure_window.as_secs(),
            max_connections: l.max_connections,
            max_connections_per_address: l.max_connections_per_address,
            session_ttl: l.auth.session_ttl.as_secs(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `sqlite://FILE` (relative to data_dir) or `postgres://user:pass@host/db`.
    pub url: String,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            url: "sqlite://impmesh.db".into(),
        }
    }
}

/// The most `limits.max_connections` may be: each connection needs a file descriptor,
/// and a node with more is a cluster of several nodes.
pub const MAX_CONNECTIONS_CEILING: usize = 1 << 20;

/// Limits; durations in seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_stanza_bytes: usize,
    pub max_stanza_bytes_unauthenticated: usize,
    pub session_queue: usize,
    pub session_queue_bytes: usize,
    pub write_timeout: u64,
    pub read_rate: u32,
    pub read_burst: u32,
    pub handshake_timeout: u64,
    /// Client connections open at once, authenticated or not.
    pub max_connections: usize,
    pub preauth_connections_per_address: u32,
    pub link_handshakes_per_address: u32,
    pub ping_interval: u64,
    pub ping_timeout: u64,
    pub login_failures: u32,
    pub login_failure_window: u64,
    pub resume_timeout: u64,
    pub max_unacked: usize,
    pub max_unacked_bytes: usize,
    pub max_offline: u32,
    pub max_offline_bytes: u64,
    pub max_offline_per_sender: u32,
    pub outbox_ttl: u64,
    pub outbox_max_rows: u64,
    pub outbox_max_bytes: u64,
    pub link_window: usize,
    pub link_ack_timeout: u64,
    pub link_connections: usize,
    pub link_handshake_timeout: u64,
    pub link_read_timeout: u64,
    pub link_queue: usize,
    pub max_sessions_per_user: usize,
    /// PBKDF2 iterations of new SCRAM verifiers (existing ones keep theirs).
    pub scram_iterations: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let l = impmesh_router::Limits::default();
        LimitsSection {
            max_stanza_bytes: l.max_stanza_bytes,
            max_stanza_bytes_unauthenticated: l.max_stanza_bytes_unauthenticated,
            session_queue: l.session_queue,
            session_queue_bytes: l.session_queue_bytes,
            write_timeout: l.write_timeout.as_secs(),
            read_rate: l.read_rate,
            read_burst: l.read_burst,
            handshake_timeout: l.handshake_timeout.as_secs(),
            max_connections: l.max_connections,
            preauth_connections_per_address: l.preauth_connections_per_address,
            link_handshakes_per_address: l.link_handshakes_per_address,
            ping_interval: l.ping_interval.as_secs(),
            ping_timeout: l.ping_timeout.as_secs(),
            login_failures: l.login_failures,
            login_failure_window: l.login_failure_window.as_secs(),
            resume_timeout: l.resume_timeout.as_secs(),
            max_unacked: l.max_unacked,
            max_unacked_bytes: l.max_unacked_bytes,
            max_offline: l.max_offline,
            max_offline_bytes: l.max_offline_bytes,
            max_offline_per_sender: l.max_offline_per_sender,
            outbox_ttl: l.outbox_ttl.as_secs(),
            outbox_max_rows: l.outbox_max_rows,
            outbox_max_bytes: l.outbox_max_bytes,
            link_window: l.link_window,
            link_ack_timeout: l.link_ack_timeout.as_secs(),
            link_connections: l.link_connections,
            link_handshake_timeout: l.link_handshake_timeout.as_secs(),
            link_read_timeout: l.link_read_timeout.as_secs(),
            link_queue: l.link_queue,
            max_sessions_per_user: l.max_sessions_per_user,
            scram_iterations: impmesh_store::scram::DEFAULT_ITERATIONS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaslSection {
    /// Mechanisms offered, strongest first.
    pub mechanisms: Vec<String>,
    /// FAST tokens (XEP-0484) for one-round-trip reconnects over SASL2.
    pub fast: bool,
    /// Days a FAST token lasts (1 to 365); a client gets a new one past half of it.
    pub fast_token_days: u32,
}

impl Default for SaslSection {
    fn default() -> Self {
        SaslSection {
            mechanisms: impmesh_router::config::default_sasl_mechanisms(),
            fast: true,
            fast_token_days: 21,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationSection {
    /// XEP-0077 in-band registration: anyone who can reach the port can create accounts.
    pub enabled: bool,
    /// Seconds between two registrations from one address.
    pub min_interval: u64,
}

impl Default for RegistrationSection {
    fn default() -> Self {
        RegistrationSection {
            enabled: false,
            min_interval: 60,
        }
    }
}

/// XEP-0157: whom to contact about the service, as URIs (`mailto:`, `xmpp:`,
/// `https:`...), listed in the server's disco#info for clients and other servers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContactSection {
    pub abuse: Vec<String>,
    pub admin: Vec<String>,
    pub feedback: Vec<String>,
    pub sales: Vec<String>,
    pub security: Vec<String>,
    pub status: Vec<String>,
    pub support: Vec<String>,
}

/// Addresses of one kind at most.
const MAX_CONTACT_ADDRESSES: usize = 10;
/// Bytes of one address at most.
const MAX_CONTACT_ADDRESS_BYTES: usize = 1024;

impl ContactSection {
    /// Each kind, by its key, with its addresses.
    fn kinds(&self) -> [(&'static str, &Vec<String>); 7] {
        [
            ("abuse", &self.abuse),
            ("admin", &self.admin),
            ("feedback", &self.feedback),
            ("sales", &self.sales),
            ("security", &self.security),
            ("status", &self.status),
            ("support", &self.support),
        ]
    }

    /// Each kind with addresses, as (its field in XEP-0157's form, the addresses).
    pub fn addresses(&self) -> Vec<(String, Vec<String>)> {
        self.kinds()
            .into_iter()
            .filter(|(_, uris)| !uris.is_empty())
            .map(|(kind, uris)| (format!("{kind}-addresses"), uris.clone()))
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (kind, uris) in self.kinds() {
            if uris.len() > MAX_CONTACT_ADDRESSES {
                return Err(ConfigError::Invalid(format!(
                    "contact.{kind}: at most {MAX_CONTACT_ADDRESSES} addresses"
                )));
            }
            if let Some(bad) = uris.iter().find(|u| !is_uri(u)) {
                return Err(ConfigError::Invalid(format!(
                    "contact.{kind}: {bad:?} is not a URI (mailto:, xmpp:, https:, ...)"
                )));
            }
        }
        Ok(())
    }
}

/// Personal eventing (XEP-0163): what each account's PEP service keeps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PepSection {
    /// Largest item payload, bytes of XML (an avatar's base64 data must fit).
    pub max_item_bytes: usize,
    /// Items one node keeps at most; `pubsub#max_items` = `max` means this.
    pub max_items: u32,
    /// Nodes per account (OMEMO adds one per device of the account).
    pub max_nodes: usize,
    /// Bytes of item payloads per account, over all its nodes.
    pub max_account_bytes: u64,
}

impl Default for PepSection {
    fn default() -> Self {
        let l = impmesh_router::Limits::default();
        PepSection {
            max_item_bytes: l.pep_max_item_bytes,
            max_items: l.pep_max_items,
            max_nodes: l.pep_max_nodes,
            max_account_bytes: l.pep_max_account_bytes,
        }
    }
}

/// Message archives (XEP-0313) on each account's home node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveSection {
    pub enabled: bool,
    /// The preference of accounts that set none: `always`, `roster` or `never`.
    pub default: String,
    /// Days a message is kept; 0 keeps them forever.
    pub retention_days: u32,
    /// Messages one query page holds at most.
    pub max_page: usize,
}

impl Default for ArchiveSection {
    fn default() -> Self {
        ArchiveSection {
            enabled: true,
            default: "always".into(),
            retention_days: 365,
            max_page: 250,
        }
    }
}

/// Multi-user chat (XEP-0045, docs/muc.md): rooms for the users of the whole mesh,
/// served by this node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MucSection {
    /// On by default. In a cluster of several nodes each node serves the rooms made
    /// on it, which users homed on the cluster's other nodes cannot enter yet
    /// (docs/muc.md).
    pub enabled: bool,
    /// The service's domain; default `conference.` and the served domain.
    pub host: Option<String>,
    /// Rooms at most on the node.
    pub max_rooms: usize,
    /// Rooms one account may own at once.
    pub max_rooms_per_user: usize,
    /// Occupants of one room at most (its owners and admins may enter beyond).
    pub max_occupants: usize,
    /// Messages a room keeps for those who enter later.
    pub history_length: usize,
    /// Bytes of a message to a room or an occupant, at most (`policy-violation`).
    pub max_message_bytes: usize,
    /// Messages an occupant may send a second (to the room, privately, invitations),
    /// after a burst of `message_burst` (`resource-constraint`).
    pub message_rate: f64,
    pub message_burst: u32,
    /// Entries and changes of presence an occupant may make a second, after a burst
    /// of `presence_burst`: entries and changes of nick beyond are refused
    /// (`resource-constraint`), changes of status wait and only the newest is sent.
    pub presence_rate: f64,
    pub presence_burst: u32,
}

impl Default for MucSection {
    fn default() -> Self {
        let d = impmesh_router::MucSettings::new("");
        MucSection {
            enabled: true,
            host: None,
            max_rooms: d.max_rooms,
            max_rooms_per_user: d.max_rooms_per_user,
            max_occupants: d.max_occupants,
            history_length: d.history_length,
            max_message_bytes: d.max_message_bytes,
            message_rate: 1e6 / d.rates.messages.interval as f64,
            message_burst: d.rates.messages.burst,
            presence_rate: 1e6 / d.rates.presence.interval as f64,
            presence_burst: d.rates.presence.burst,
        }
    }
}

/// The TURN relay of this node (the bridged media plane, docs/media.md), on
/// `[listen] turn`, and the credentials XEP-0215 hands out for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaSection {
    /// The address relayed sockets bind to; default: `[listen] turn`'s (for a relay
    /// listening on every address, set the one peers reach).
    pub relay_ip: Option<std::net::IpAddr>,
    /// The address clients are given for relayed sockets, when the node is behind
    /// NAT (default: relay_ip).
    pub external_ip: Option<std::net::IpAddr>,
    /// The relayed ports (a firewall opens them, UDP).
    pub port_min: u16,
    pub port_max: u16,
    /// The host clients are told to reach the relay at (XEP-0215); default: the
    /// external or relay address, and for TURN over TLS the domain (the name the
    /// client certificate covers).
    pub host: Option<String>,
    /// Seconds a credential from XEP-0215 is valid.
    pub credential_lifetime: u64,
    /// Hours between rotations of the cluster's TURN secret (at least the credential
    /// lifetime: the previous secret stays valid through the next period).
    pub secret_rotation_hours: u64,
    /// Allocations one user may hold at once, and this relay in all.
    pub user_allocations: usize,
    pub max_allocations: usize,
    /// From this share of max_allocations on (percent), new allocations go to the
    /// least loaded healthy relay of the cluster (300 Try Alternate), when there is one.
    pub redirect_above_percent: u8,
    /// Seconds between two heartbeats of the relay in the cluster's registry (its
    /// address and load); a relay silent for three is not sent clients.
    pub heartbeat_secs: u64,
    /// Kilobits per second one allocation relays each way.
    pub bandwidth_kbps: u64,
    /// Peer address blocks relayed to although refused by default (loopback, private,
    /// link-local...), e.g. "10.0.0.0/8" for a relay inside a private network.
    pub allow_peers: Vec<String>,
    /// The DSCP class of relayed packets (46, EF, by default; 0 leaves them unmarked).
    pub dscp: u8,
}

impl Default for MediaSection {
    fn default() -> Self {
        MediaSection {
            relay_ip: None,
            external_ip: None,
            port_min: 49_152,
            port_max: 65_535,
            host: None,
            credential_lifetime: 3600,
            secret_rotation_hours: 24,
            user_allocations: 10,
            max_allocations: 10_000,
            redirect_above_percent: 80,
            heartbeat_secs: 10,
            bandwidth_kbps: 4000,
            allow_peers: vec![],
            dscp: 46,
        }
    }
}

impl MediaSection {
    fn validate(&self, listen_turn: Option<SocketAddr>) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.port_min == 0 || self.port_min > self.port_max {
            return invalid("media.port_min must be above 0 and at most media.port_max".into());
        }
        if !(60..=86_400).contains(&self.credential_lifetime) {
            return invalid(
                "media.credential_lifetime must be between 60 and 86400 seconds".into(),
            );
        }
        // The previous secret lives one more period; credentials are minted with it
        // for a few minutes after a rotation (src/media.rs), so the period must cover
        // a credential's lifetime and those minutes.
        if self.secret_rotation_hours == 0
            || self.secret_rotation_hours * 3600 < self.credential_lifetime + 300
        {
            return invalid(
                "media.secret_rotation_hours must cover media.credential_lifetime and 5 minutes more".into(),
            );
        }
        if let (Some(turn), None) = (listen_turn, self.relay_ip)
            && turn.ip().is_unspecified()
        {
            return invalid(format!(
                "[listen] turn = {turn} listens on every address: set media.relay_ip to the one relayed sockets use"
            ));
        }
        if self.user_allocations == 0 || self.max_allocations == 0 || self.bandwidth_kbps == 0 {
            return invalid(
                "media.user_allocations, media.max_allocations and media.bandwidth_kbps must be above 0".into(),
            );
        }
        if self.dscp > 63 {
            return invalid("media.dscp must be between 0 and 63".into());
        }
        if !(1..=100).contains(&self.redirect_above_percent) {
            return invalid("media.redirect_above_percent must be between 1 and 100".into());
        }
        if !(1..=300).contains(&self.heartbeat_secs) {
            return invalid("media.heartbeat_secs must be between 1 and 300".into());
        }
        for block in &self.allow_peers {
            block
                .parse::<impmesh_media::policy::Cidr>()
                .map_err(|e| ConfigError::Invalid(format!("media.allow_peers: {e}")))?;
        }
        Ok(())
    }
}

/// HTTP file upload (XEP-0363): slots from each account's home node, files on that
/// node, served on `[listen] client_https`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadSection {
    pub enabled: bool,
    /// The start of this node's file URLs, `https://HOST[:PORT]`; the client
    /// certificate must cover HOST. Default: the domain and the listener's port.
    pub public_url: Option<String>,
    /// The largest file, bytes.
    pub max_file_bytes: u64,
    /// Bytes each account's files and open slots may hold together.
    pub quota_bytes: u64,
    /// Seconds a slot waits for its upload.
    pub slot_ttl: u64,
    /// Days a file is kept; 0 keeps files until their account is deleted.
    pub expiry_days: u32,
}

impl Default for UploadSection {
    fn default() -> Self {
        UploadSection {
            enabled: true,
            public_url: None,
            max_file_bytes: 100 * 1024 * 1024,
            quota_bytes: 1024 * 1024 * 1024,
            slot_ttl: 300,
            expiry_days: 30,
        }
    }
}

impl UploadSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.public_url
            && upload_url_host(url).is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "upload.public_url {url:?} is not https://HOST[:PORT] with a DNS name for HOST"
            )));
        }
        if self.max_file_bytes == 0 || self.quota_bytes < self.max_file_bytes {
            return Err(ConfigError::Invalid(
                "upload.max_file_bytes is above 0 and at most upload.quota_bytes".into(),
            ));
        }
        if !(1..=86_400).contains(&self.slot_ttl) {
            return Err(ConfigError::Invalid(
                "upload.slot_ttl is 1 to 86400 seconds".into(),
            ));
        }
        Ok(())
    }
}

/// The host of an upload URL, `https://HOST[:PORT]` with a DNS name (the client
/// certificate has DNS names only) and nothing after; `None` for anything else.
pub fn upload_url_host(url: &str) -> Option<&str> {
    let authority = url.strip_prefix("https://")?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    (port_ok && !host.starts_with('*') && impmesh_certs::is_dns_name(host)).then_some(host)
}

/// An absolute URI as RFC 3986 §3.1 starts one (a scheme, then `:`), of printable
/// characters without spaces.
fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && s.len() <= MAX_CONTACT_ADDRESS_BYTES
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A tracing filter (`info`, `impmesh_router=debug`); `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// A configuration error, with the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Loads `path` (or the defaults), then applies a `--data-dir` override.
    pub fn load(path: Option<&Path>, data_dir: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.to_owned(), e))?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Parse(_, e) => ConfigError::Parse(path.to_owned(), e),
                    other => other,
                })?
            }
            None => Config::default(),
        };
        if let Some(dir) = data_dir {
            config.data_dir = dir.to_owned();
        }
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(PathBuf::from("config"), e))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.contact.validate()?;
        self.upload.validate()?;
        self.media.validate(self.listen.turn)?;
        let m = &self.muc;
        if m.host
            .as_deref()
            .is_some_and(|h| xmpp_domain_ok(h).is_none() || h == self.domain)
            || m.max_rooms == 0
            || m.max_rooms_per_user == 0
            || !(1..=100_000).contains(&m.max_occupants)
            || m.history_length > 1000
            || !(1..=262_144).contains(&m.max_message_bytes)
        {
            return Err(ConfigError::Invalid(
                "muc.host must be a domain other than the served one; muc.max_rooms and muc.max_rooms_per_user at least 1, muc.max_occupants between 1 and 100000, muc.history_length at most 1000, muc.max_message_bytes between 1 and 262144 (the largest client stanza)".into(),
            ));
        }
        // Entering a room sends the newcomer every occupant's presence, the history
        // and the subject at once: they must fit in its session's queue.
        if m.enabled && m.max_occupants + m.history_length + 16 > self.limits.session_queue {
            return Err(ConfigError::Invalid(format!(
                "muc.max_occupants + muc.history_length + 16 must be at most limits.session_queue ({}): entering a room sends the newcomer every occupant at once (rooms are on by default: lower muc.max_occupants, raise limits.session_queue, or set muc.enabled = false)",
                self.limits.session_queue
            )));
        }
        let rate_ok = |r: f64| r.is_finite() && (0.001..=1_000_000.0).contains(&r);
        if !rate_ok(m.message_rate)
            || !rate_ok(m.presence_rate)
            || !(1..=100_000).contains(&m.message_burst)
            || !(1..=100_000).contains(&m.presence_burst)
        {
            return Err(ConfigError::Invalid(
                "muc.message_rate and muc.presence_rate must be between 0.001 and 1000000 a second, muc.message_burst and muc.presence_burst between 1 and 100000".into(),
            ));
        }
        if self.listen.dscp > 63 {
            return Err(ConfigError::Invalid(
                "listen.dscp must be between 0 and 63".into(),
            ));
        }
        if impmesh_router::core::archive::DefaultMode::parse(&self.archive.default).is_none()
            || !(1..=1000).contains(&self.archive.max_page)
        {
            return Err(ConfigError::Invalid(format!(
                "archive.default must be always, roster or never (not {:?}), archive.max_page between 1 and 1000",
                self.archive.default
            )));
        }
        // An event carries one item and must fit in a stanza, with room for its envelope.
        let p = &self.pep;
        if p.max_item_bytes < 1024
            || p.max_item_bytes + 4096 > self.limits.max_stanza_bytes
            || !(1..=10_000).contains(&p.max_items)
            || !(1..=10_000).contains(&p.max_nodes)
        {
            return Err(ConfigError::Invalid(format!(
                "pep.max_item_bytes must be between 1024 and limits.max_stanza_bytes - 4096 ({}), pep.max_items and pep.max_nodes between 1 and 10000",
                self.limits.max_stanza_bytes.saturating_sub(4096)
            )));
        }
        if xmpp_domain_ok(&self.domain).is_none() {
            return Err(ConfigError::Invalid(format!(
                "domain {:?} is not a valid XMPP domain",
                self.domain
            )));
        }
        for m in &self.sasl.mechanisms {
            if impmesh_router::sasl::Mechanism::parse(m).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "unknown SASL mechanism {m:?} (known: SCRAM-SHA-256-PLUS, SCRAM-SHA-1-PLUS, SCRAM-SHA-256, SCRAM-SHA-1, PLAIN)"
                )));
            }
        }
        if !(1..=365).contains(&self.sasl.fast_token_days) {
            return Err(ConfigError::Invalid(
                "sasl.fast_token_days must be between 1 and 365".into(),
            ));
        }
        if self.limits.max_stanza_bytes < 1024 || self.limits.session_queue == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_stanza_bytes must be at least 1024 and limits.session_queue at least 1"
                    .into(),
            ));
        }
        if !(1..=MAX_CONNECTIONS_CEILING).contains(&self.limits.max_connections) {
            return Err(ConfigError::Invalid(format!(
                "limits.max_connections must be between 1 and {MAX_CONNECTIONS_CEILING}"
            )));
        }
        if let Some(f) = self
            .sync
            .disable_features
            .iter()
            .find(|f| !impmesh_axl::features::is_known(f))
        {
            return Err(ConfigError::Invalid(format!(
                "sync.disable_features: unknown feature {f:?} (known: {})",
                impmesh_axl::features::ALL.join(", ")
            )));
        }
        let l = &self.limits;
        if l.scram_iterations < impmesh_store::scram::MIN_ITERATIONS {
            return Err(ConfigError::Invalid(format!(
                "limits.scram_iterations must be at least {} (RFC 7677)",
                impmesh_store::scram::MIN_ITERATIONS
            )));
        }
        let share = impmesh_router::config::QUEUE_SHARE;
        if l.session_queue_bytes / share < l.max_stanza_bytes
            || l.max_unacked == 0
            || l.max_offline_per_sender == 0
        {
            return Err(ConfigError::Invalid(format!(
                "limits.session_queue_bytes must hold {share} stanzas of max_stanza_bytes (one sender's share must fit one), and limits.max_unacked and limits.max_offline_per_sender must be at least 1"
            )));
        }
        if self.limits.link_window == 0 || self.limits.outbox_max_rows == 0 {
            return Err(ConfigError::Invalid(
                "limits.link_window and limits.outbox_max_rows must be at least 1".into(),
            ));
        }
        let l = &self.limits;
        if l.link_connections == 0 || l.link_queue == 0 || l.link_handshake_timeout == 0 {
            return Err(ConfigError::Invalid(
                "limits.link_connections, limits.link_queue and limits.link_handshake_timeout must be at least 1".into(),
            ));
        }
        if l.link_read_timeout < 60 {
            return Err(ConfigError::Invalid(format!(
                "limits.link_read_timeout is {} s; a sending node writes a keepalive every 30 s, so it must be at least 60",
                l.link_read_timeout
            )));
        }
        if self.https.body_limit < 1024 || self.https.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "https.body_limit must be at least 1024 and https.max_connections at least 1"
                    .into(),
            ));
        }
        if self.tls.client_certificate.is_some() != self.tls.client_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.client_certificate and tls.client_key go together".into(),
            ));
        }
        let max_page = impmesh_axl::soap::MAX_PAGE_SIZE;
        if self.sync.period == 0 || !(1..=max_page).contains(&self.sync.page_size) {
            return Err(ConfigError::Invalid(format!(
                "sync.period must be at least 1 and sync.page_size 1 to {max_page}"
            )));
        }
        if self.sync.stall_threshold <= self.sync.period {
            return Err(ConfigError::Invalid(
                "sync.stall_threshold must be longer than sync.period".into(),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid("log.format is text or json".into()));
        }
        Ok(())
    }

    /// The router's view of this configuration.
    /// The relay's listeners: UDP and TCP, and TLS when on; none when the relay is
    /// off (`[listen] turn = false`, which turns its TLS port off too).
    pub fn relay_listeners(&self) -> Option<(SocketAddr, Option<SocketAddr>)> {
        self.listen.turn.map(|turn| (turn, self.listen.turns))
    }

    pub fn router_config(&self) -> impmesh_router::RouterConfig {
        let l = &self.limits;
        let mut rc = impmesh_router::RouterConfig::new(&self.domain);
        rc.node_name = self.node_name().into();
        rc.cluster_name = self.cluster_name().into();
        rc.sasl_mechanisms = self.sasl.mechanisms.clone();
        rc.fast_token_lifetime = self
            .sasl
            .fast
            .then(|| Duration::from_secs(u64::from(self.sasl.fast_token_days) * 86_400));
        rc.allow_registration = self.registration.enabled;
        rc.registration_interval = Duration::from_secs(self.registration.min_interval);
        rc.link_features = impmesh_axl::features::announced(&self.sync.disable_features);
        rc.dscp = self.listen.dscp;
        rc.contact_addresses = self.contact.addresses();
        let a = &self.archive;
        rc.archive = impmesh_router::ArchiveSettings {
            enabled: a.enabled,
            default: impmesh_router::core::archive::DefaultMode::parse(&a.default)
                .unwrap_or(impmesh_router::core::archive::DefaultMode::Always),
            retention: (a.retention_days > 0)
                .then(|| Duration::from_secs(u64::from(a.retention_days) * 86_400)),
            max_page: a.max_page,
        };
        let m = &self.muc;
        rc.muc = m.enabled.then(|| impmesh_router::MucSettings {
            host: m
                .host
                .as_deref()
                .map(str::to_lowercase)
                .unwrap_or_else(|| format!("conference.{}", self.domain)),
            max_rooms: m.max_rooms,
            max_rooms_per_user: m.max_rooms_per_user,
            max_occupants: m.max_occupants,
            history_length: m.history_length,
            max_message_bytes: m.max_message_bytes,
            rates: impmesh_router::core::muc::Rates {
                messages: impmesh_router::core::muc::Rate::per_second(
                    m.message_rate,
                    m.message_burst,
                ),
                presence: impmesh_router::core::muc::Rate::per_second(
                    m.presence_rate,
                    m.presence_burst,
                ),
            },
        });
        let u = &self.upload;
        rc.upload = u.enabled.then(|| impmesh_router::UploadSettings {
            public_url: u.public_url.clone(),
            default_host: self.domain.clone(),
            max_file_bytes: u.max_file_bytes,
            quota_bytes: u.quota_bytes,
            slot_ttl: Duration::from_secs(u.slot_ttl),
            expiry: (u.expiry_days > 0)
                .then(|| Duration::from_secs(u64::from(u.expiry_days) * 86_400)),
            dir: self.data_dir.join("uploads"),
        });
        rc.limits = impmesh_router::Limits {
            max_stanza_bytes: l.max_stanza_bytes,
            max_stanza_bytes_unauthenticated: l.max_stanza_bytes_unauthenticated,
            session_queue: l.session_queue,
            session_queue_bytes: l.session_queue_bytes,
            write_timeout: Duration::from_secs(l.write_timeout.max(1)),
            read_rate: l.read_rate,
            read_burst: l.read_burst,
            handshake_timeout: Duration::from_secs(l.handshake_timeout),
            max_connections: l.max_connections,
            preauth_connections_per_address: l.preauth_connections_per_address,
            link_handshakes_per_address: l.link_handshakes_per_address,
            ping_interval: Duration::from_secs(l.ping_interval),
            ping_timeout: Duration::from_secs(l.ping_timeout),
            login_failures: l.login_failures,
            login_failure_window: Duration::from_secs(l.login_failure_window),
            resume_timeout: Duration::from_secs(l.resume_timeout),
            max_unacked: l.max_unacked,
            max_unacked_bytes: l.max_unacked_bytes,
            max_offline: l.max_offline,
            max_offline_bytes: l.max_offline_bytes,
            max_offline_per_sender: l.max_offline_per_sender,
            outbox_ttl: Duration::from_secs(l.outbox_ttl),
            outbox_max_rows: l.outbox_max_rows,
            outbox_max_bytes: l.outbox_max_bytes,
            link_window: l.link_window,
            link_ack_timeout: Duration::from_secs(l.link_ack_timeout.max(1)),
            link_connections: l.link_connections,
            link_handshake_timeout: Duration::from_secs(l.link_handshake_timeout),
            link_read_timeout: Duration::from_secs(l.link_read_timeout),
            link_queue: l.link_queue,
            max_sessions_per_user: l.max_sessions_per_user,
            pep_max_item_bytes: self.pep.max_item_bytes,
            pep_max_items: self.pep.max_items,
            pep_max_nodes: self.pep.max_nodes,
            pep_max_account_bytes: self.pep.max_account_bytes,
            ..impmesh_router::Limits::default()
        };
        rc
    }

    /// The HTTPS service's view of this configuration.
    pub fn https_limits(&self) -> impmesh_axl::HttpsLimits {
        let h = &self.https;
        impmesh_axl::HttpsLimits {
            body_limit: h.body_limit,
            max_connections: h.max_connections,
            max_connections_per_address: h.max_connections_per_address,
            max_peers: self.sync.max_peers,
            dscp: self.listen.dscp,
            auth: impmesh_axl::auth::AuthLimits {
                failure_delay: Duration::from_millis(h.failure_delay_ms),
                max_failures: h.max_failures,
                failure_window: Duration::from_secs(h.failure_window),
                session_ttl: Duration::from_secs(h.session_ttl),
            },
            ..impmesh_axl::HttpsLimits::default()
        }
    }

    /// The sync agent's view of this configuration.
    pub fn sync_settings(&self) -> impmesh_sync_agent::Settings {
        impmesh_sync_agent::Settings {
            period: Duration::from_secs(self.sync.period),
            stall_threshold: Duration::from_secs(self.sync.stall_threshold),
            auto_recovery: self.sync.auto_recovery,
            page_size: self.sync.page_size,
            dns_check_interval: Duration::from_secs(self.sync.dns_check_interval),
            anti_entropy_interval: Duration::from_secs(self.sync.anti_entropy_interval),
            max_peers: self.sync.max_peers,
            features: impmesh_axl::features::announced(&self.sync.disable_features),
        }
    }

    /// Where peers and clients reach this node.
    pub fn advertised_host(&self) -> String {
        if let Some(host) = &self.node.host {
            return host.clone();
        }
        let ip = self.listen.https.ip();
        if ip.is_unspecified() {
            self.node_name()
        } else {
            ip.to_string()
        }
    }

    pub fn node_name(&self) -> String {
        self.node
            .name
            .clone()
            .unwrap_or_else(|| self.domain.clone())
    }

    pub fn cluster_name(&self) -> String {
        self.node
            .cluster
            .clone()
            .unwrap_or_else(|| self.domain.clone())
    }
}

fn xmpp_domain_ok(domain: &str) -> Option<()> {
    jid::BareJid::new(domain).ok()?;
    (!domain.contains(['@', '/'])).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_matches_the_defaults() {
        let text = include_str!("../ops/impmesh.toml.example");
        let config = Config::parse(text).expect("ops/impmesh.toml.example must parse");
        let defaults = Config::default();
        assert_eq!(format!("{config:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::parse("domian = 'x'").is_err());
        assert!(Config::parse("[limits]\nmax_stanza = 1").is_err());
        assert!(Config::parse("domain = 'a@b'").is_err());
        assert!(Config::parse("[sasl]\nmechanisms = ['DIGEST-MD5']").is_err());
        assert!(Config::parse("[sasl]\nfast_token_days = 0").is_err());
        let fast = Config::parse("[sasl]\nfast = false").unwrap();
        assert_eq!(fast.router_config().fast_token_lifetime, None);
        assert_eq!(
            Config::parse("")
                .unwrap()
                .router_config()
                .fast_token_lifetime,
            Some(Duration::from_secs(21 * 86_400))
        );
        let c = Config::parse("domain = 'example.com'\n[registration]\nenabled = true").unwrap();
        assert!(c.router_config().allow_registration);
        assert_eq!(c.node_name(), "example.com");
    }

    #[test]
    fn upload_urls_are_bare_https_origins_with_a_dns_name() {
        assert_eq!(
            upload_url_host("https://files.example.com"),
            Some("files.example.com")
        );
        assert_eq!(
            upload_url_host("https://n1.example.com:5443"),
            Some("n1.example.com")
        );
        for bad in [
            "http://example.com",
            "https://example.com/",
            "https://example.com:0",
            "https://example.com:99999",
            "https://*.example.com",
            "https://ex ample.com",
            "https://",
        ] {
            assert_eq!(upload_url_host(bad), None, "{bad}");
            let text = format!("[upload]\npublic_url = {bad:?}");
            assert!(Config::parse(&text).is_err(), "{bad}");
        }
        assert!(Config::parse("[upload]\nmax_file_bytes = 10\nquota_bytes = 5").is_err());
        let off = Config::parse("[upload]\nenabled = false").unwrap();
        assert!(off.router_config().upload.is_none());
    }

    /// `[muc]` is on by default; its host defaults to `conference.DOMAIN`, and a host
    /// that is the served domain is refused.
    #[test]
    fn muc_is_on_by_default_and_checked() {
        assert!(Config::default().router_config().muc.is_some());
        let off = Config::parse("[muc]\nenabled = false").unwrap();
        assert!(off.router_config().muc.is_none());
        let on = Config::parse("domain = \"example.com\"\n[muc]\nenabled = true").unwrap();
        let m = on.router_config().muc.unwrap();
        assert_eq!(m.host, "conference.example.com");
        assert_eq!((m.max_occupants, m.history_length), (200, 20));
        let own =
            Config::parse("[muc]\nenabled = true\nhost = \"rooms.localhost\"\nmax_occupants = 5")
                .unwrap();
        assert_eq!(own.router_config().muc.unwrap().host, "rooms.localhost");
        // The rates as given, and by default as the router has them.
        assert_eq!(m.rates, impmesh_router::core::muc::Rates::default());
        assert_eq!(m.max_message_bytes, 65_536);
        let fast = Config::parse(
            "[muc]\nenabled = true\nmessage_rate = 4.0\nmessage_burst = 2\npresence_rate = 0.1\npresence_burst = 3",
        )
        .unwrap();
        let r = fast.router_config().muc.unwrap().rates;
        assert_eq!((r.messages.interval, r.messages.burst), (250_000, 2));
        assert_eq!((r.presence.interval, r.presence.burst), (10_000_000, 3));
        for bad in [
            "host = \"localhost\"",
            "host = \"not a domain\"",
            "max_occupants = 0",
            "max_rooms = 0",
            "history_length = 5000",
            "max_message_bytes = 0",
            "message_rate = 0.0",
            "presence_rate = -1.0",
            "presence_rate = nan",
            "message_burst = 0",
        ] {
            assert!(Config::parse(&format!("[muc]\n{bad}")).is_err(), "{bad}");
        }
        // A room must fit in a session's queue when entered, with rooms on by default.
        for bad in [
            "[muc]\nmax_occupants = 1000",
            "[limits]\nsession_queue = 200",
            "[limits]\nsession_queue = 200\n[muc]\nenabled = true",
        ] {
            let refused = Config::parse(bad).unwrap_err().to_string();
            assert!(refused.contains("limits.session_queue"), "{bad}: {refused}");
        }
        assert!(Config::parse("[limits]\nsession_queue = 200\n[muc]\nenabled = false").is_ok());
        assert!(Config::parse("[limits]\nsession_queue = 236").is_ok());
    }

    /// The router links' limits come from `[limits]`, checked.
    #[test]
    fn link_limits_come_from_the_configuration() {
        let c = Config::parse(
            "[limits]\nlink_connections = 7\nlink_queue = 9\nlink_handshake_timeout = 3\nlink_read_timeout = 120",
        )
        .unwrap();
        let l = c.router_config().limits;
        assert_eq!((l.link_connections, l.link_queue), (7, 9));
        assert_eq!(l.link_handshake_timeout, Duration::from_secs(3));
        assert_eq!(l.link_read_timeout, Duration::from_secs(120));
        let short = Config::parse("[limits]\nlink_read_timeout = 30").unwrap_err();
        assert!(short.to_string().contains("at least 60"), "{short}");
        assert!(Config::parse("[limits]\nlink_queue = 0").is_err());
    }

    /// `[archive]` reaches the router; retention 0 keeps messages forever.
    #[test]
    fn archive_settings_come_from_the_configuration() {
        let d = Config::default().router_config().archive;
        assert!(d.enabled);
        assert_eq!(d.retention, Some(Duration::from_secs(365 * 86_400)));
        let c = Config::parse("[archive]\ndefault = \"roster\"\nretention_days = 0\nmax_page = 20")
            .unwrap();
        let a = c.router_config().archive;
        assert_eq!(
            a.default,
            impmesh_router::core::archive::DefaultMode::Roster
        );
        assert_eq!((a.retention, a.max_page), (None, 20));
        assert!(Config::parse("[archive]\ndefault = \"sometimes\"").is_err());
    }

    /// `[media]` is checked: ports, lifetimes against the rotation, peer blocks.
    #[test]
    fn media_settings_are_checked() {
        let c = Config::parse(
            "[listen]\nturn = \"0.0.0.0:3478\"\n[media]\nrelay_ip = \"198.51.100.7\"\nallow_peers = [\"10.0.0.0/8\"]\ndscp = 34",
        )
        .unwrap();
        assert_eq!(c.listen.turn, Some("0.0.0.0:3478".parse().unwrap()));
        assert_eq!(c.media.dscp, 34);
        assert_eq!(
            Config::default().listen.turn,
            Some("127.0.0.1:3478".parse().unwrap())
        );
        assert!(Config::parse("[listen]\nturn = \"0.0.0.0:3478\"").is_err());
        // A listener on by default is turned off with `false` (leaving it out keeps it).
        let c = Config::parse("[listen]\nturn = false\nturns = false\nlinks = false").unwrap();
        assert_eq!(
            (c.listen.turn, c.listen.turns, c.listen.links),
            (None, None, None)
        );
        let c = Config::parse("[listen]\nturns = \"127.0.0.1:15349\"").unwrap();
        assert_eq!(c.listen.turns, Some("127.0.0.1:15349".parse().unwrap()));
        assert!(c.listen.turn.is_some());
        // No relay: no TLS port either.
        assert!(
            Config::parse("[listen]\nturn = false")
                .unwrap()
                .relay_listeners()
                .is_none()
        );
        assert!(Config::parse("[listen]\nturn = true").is_err());
        assert!(Config::parse("[listen]\nturn = \"nowhere\"").is_err());
        // Signalling is AF31 unless told, for the router and the HTTPS service alike.
        let d = Config::default();
        assert_eq!((d.router_config().dscp, d.https_limits().dscp), (26, 26));
        let c = Config::parse("[listen]\ndscp = 0").unwrap();
        assert_eq!((c.router_config().dscp, c.https_limits().dscp), (0, 0));
        assert!(Config::parse("[listen]\ndscp = 64").is_err());
        for bad in [
            "port_min = 60000\nport_max = 50000",
            "credential_lifetime = 30",
            "credential_lifetime = 7200\nsecret_rotation_hours = 1",
            "credential_lifetime = 3600\nsecret_rotation_hours = 1",
            "allow_peers = [\"10.0.0.0/33\"]",
            "dscp = 64",
            "user_allocations = 0",
            "redirect_above_percent = 0",
            "heartbeat_secs = 0",
        ] {
            assert!(Config::parse(&format!("[media]\n{bad}")).is_err(), "{bad}");
        }
    }

    /// `[pep]` reaches the router, and an item that could not fit a stanza is refused.
    #[test]
    fn pep_limits_come_from_the_configuration() {
        let c =
            Config::parse("[pep]\nmax_item_bytes = 2048\nmax_items = 5\nmax_nodes = 7").unwrap();
        let l = c.router_config().limits;
        assert_eq!(
            (l.pep_max_item_bytes, l.pep_max_items, l.pep_max_nodes),
            (2048, 5, 7)
        );
        assert!(Config::parse("[pep]\nmax_item_bytes = 300000").is_err());
        assert!(Config::parse("[pep]\nmax_nodes = 0").is_err());
        let d = Config::default().router_config().limits;
        assert_eq!(d.pep_max_item_bytes, 128 * 1024);
    }

    /// XEP-0157 contact addresses reach the router as the form's fields, checked.
    #[test]
    fn contact_addresses_come_from_the_configuration() {
        let c = Config::parse(
            "[contact]\nadmin = ['mailto:ops@example.com', 'xmpp:ops@example.com']\nabuse = ['https://example.com/abuse']",
        )
        .unwrap();
        assert_eq!(
            c.router_config().contact_addresses,
            [
                (
                    "abuse-addresses".to_owned(),
                    vec!["https://example.com/abuse".to_owned()]
                ),
                (
                    "admin-addresses".to_owned(),
                    vec![
                        "mailto:ops@example.com".to_owned(),
                        "xmpp:ops@example.com".to_owned()
                    ]
                ),
            ]
        );
        assert!(
            Config::default()
                .router_config()
                .contact_addresses
                .is_empty()
        );
        for bad in ["ops@example.com", "mailto:", "1x:y", "mailto:a b", ""] {
            let e = Config::parse(&format!("[contact]\nsupport = [{bad:?}]")).unwrap_err();
            assert!(e.to_string().contains("contact.support"), "{bad}: {e}");
        }
        let many: Vec<String> = (0..11)
            .map(|i| format!("'mailto:{i}@example.com'"))
            .collect();
        let e = Config::parse(&format!("[contact]\nadmin = [{}]", many.join(","))).unwrap_err();
        assert!(e.to_string().contains("at most 10"), "{e}");
        assert!(Config::parse("[contact]\nboss = ['mailto:a@b']").is_err());
    }

    /// `limits.max_connections` reaches the router, within 1 and the ceiling.
    #[test]
    fn the_connection_limit_comes_from_the_configuration() {
        let c = Config::parse("[limits]\nmax_connections = 100").unwrap();
        assert_eq!(c.router_config().limits.max_connections, 100);
        for bad in [0, MAX_CONNECTIONS_CEILING + 1] {
            let e = Config::parse(&format!("[limits]\nmax_connections = {bad}")).unwrap_err();
            assert!(e.to_string().contains("max_connections"), "{e}");
        }
    }
}
