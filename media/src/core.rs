//! The relay's protocol logic (RFC 8656 over RFC 8489), without I/O: it takes a packet
//! from a client or from a peer with the time, and says what to send and where. The
//! sockets (the listening ones and one relayed UDP socket per allocation), the clock
//! and the secrets' rotation belong to the caller; binding a relayed port goes
//! through [`Ports`]. Each input gives at most one packet out, borrowed from the
//! input or from the relay's buffer, so the hot path (ChannelData either way)
//! allocates nothing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use tokio::time::Instant;

use crate::auth;
use crate::policy::PeerPolicy;
use crate::stun::{self, Builder, Class, Message, TransactionId, attr, method};

/// How a client reaches the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// Streams carry ChannelData padded to four bytes (RFC 8656 §12.5).
    fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// The client's side of an allocation: its address, the relay's address it talks
/// to, and how (RFC 8656 §2: the 5-tuple).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
}

/// The address family of a relayed address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Why no relayed port was bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPort {
    /// The relay has no address of that family (440).
    Family,
    /// Every port of the range is taken (508).
    Exhausted,
}

/// Which port an allocation asks for (RFC 8656 §7.2, EVEN-PORT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Any,
    Even,
    /// An even port, and the one above it held for a later allocation (RTP and
    /// RTCP).
    EvenAndNext,
}

/// Binds relayed UDP ports: the caller's sockets.
pub trait Ports {
    /// A new relayed socket's address, and with [`Want::EvenAndNext`] the next
    /// port's, bound and held.
    fn bind(
        &mut self,
        family: Family,
        want: Want,
    ) -> Result<(SocketAddr, Option<SocketAddr>), NoPort>;
    /// The allocation on `relayed` is gone: close its socket.
    fn release(&mut self, relayed: SocketAddr);
}

/// The relay's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The REALM of the long-term credentials (the XMPP domain).
    pub realm: String,
    /// Allocation lifetimes (RFC 8656 §7.2: 10 minutes by default, at most an hour
    /// here).
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    /// Allocations one user may hold, and this relay in all.
    pub user_quota: usize,
    pub max_allocations: usize,
    /// From this many allocations on, new ones go to the alternate relay when one is
    /// set (see [`Relay::set_alternate`]).
    pub redirect_above: usize,
    /// Bytes per second one allocation relays, each way, with bursts of a second.
    pub bandwidth: u64,
    /// Which peers may be relayed to.
    pub policy: PeerPolicy,
}

/// RFC 8656 §9: permissions last five minutes, channel bindings ten.
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How long a port held by EVEN-PORT's R bit waits for the allocation that takes it
/// with its RESERVATION-TOKEN (RFC 8656 §7.2 suggests about 30 seconds).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How long a nonce is good for before a request gets 438 Stale Nonce.
const NONCE_LIFETIME: u64 = 3600;
/// Peers one allocation may have permissions for, and channels it may bind: beyond,
/// a request gets 508 (the tables stay bounded).
const MAX_PERMISSIONS: usize = 64;
const MAX_CHANNELS: usize = 64;

/// Why the relay refused or dropped something: counted, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Not STUN or ChannelData, or a malformed message.
    Malformed,
    /// A request without credentials, or with wrong ones (401).
    Unauthorized,
    /// Credentials past their expiry (401).
    Expired,
    /// A nonce past its time (438).
    StaleNonce,
    /// A peer address the policy forbids (403).
    ForbiddenPeer,
    /// The user's allocations are at their quota (486).
    Quota,
    /// The relay is at its capacity and has nowhere to send the client (508).
    Capacity,
    /// Other protocol errors (400, 420, 437, 441, 442, 443).
    BadRequest,
    /// Data to or from a peer without a permission, dropped.
    NoPermission,
    /// Data over the allocation's bandwidth, dropped.
    Bandwidth,
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::Malformed,
        Refusal::Unauthorized,
        Refusal::Expired,
        Refusal::StaleNonce,
        Refusal::ForbiddenPeer,
        Refusal::Quota,
        Refusal::Capacity,
        Refusal::BadRequest,
        Refusal::NoPermission,
        Refusal::Bandwidth,
    ];

    /// The label `/metrics` gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Expired => "expired",
            Refusal::StaleNonce => "stale_nonce",
            Refusal::ForbiddenPeer => "forbidden_peer",
            Refusal::Quota => "quota",
            Refusal::Capacity => "capacity",
            Refusal::BadRequest => "bad_request",
            Refusal::NoPermission => "no_permission",
            Refusal::Bandwidth => "bandwidth",
        }
    }
}

/// What the relay counted.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub allocations_created: u64,
    pub redirects: u64,
    pub packets_to_peers: u64,
    pub bytes_to_peers: u64,
    pub packets_to_clients: u64,
    pub bytes_to_clients: u64,
    pub refusals: HashMap<Refusal, u64>,
}

/// One packet to send.
#[derive(Debug, PartialEq, Eq)]
pub enum Send<'a> {
    /// To a client, over the 5-tuple it came on.
    Client { tuple: FiveTuple, bytes: &'a [u8] },
    /// To a peer, from an allocation's relayed socket.
    Peer {
        relayed: SocketAddr,
        peer: SocketAddr,
        bytes: &'a [u8],
    },
}

/// Bytes each way, refilled at `rate` per second up to a second's worth.
#[derive(Debug)]
struct Bucket {
    tokens: u64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        Bucket {
            tokens: rate,
            at: now,
        }
    }

    fn take(&mut self, rate: u64, bytes: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        if elapsed > Duration::ZERO {
            let refill =
                u64::try_from(elapsed.as_micros().saturating_mul(u128::from(rate)) / 1_000_000)
                    .unwrap_or(u64::MAX);
            self.tokens = self.tokens.saturating_add(refill).min(rate);
            self.at = now;
        }
        let bytes = bytes as u64;
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Allocation {
    tuple: FiveTuple,
    user: String,
    /// The credential it was made with: later requests with the same username are
    /// checked with this key even past the credential's expiry, so a call outlives
    /// it (as coturn does; the allocation's lifetime bounds it).
    username: String,
    key: [u8; 16],
    relayed: SocketAddr,
    expires: Instant,
    /// The Allocate request that made it, to answer its retransmissions alike.
    made_by: TransactionId,
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, (SocketAddr, Instant)>,
    by_peer: HashMap<SocketAddr, u16>,
    up: Bucket,
    down: Bucket,
}

impl Allocation {
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.get(&ip).is_some_and(|e| *e > now)
    }
}

/// The relay: its allocations and what it counted.
#[derive(Debug)]
pub struct Relay {
    config: Config,
    /// The cluster's secrets, current first.
    secrets: Vec<Vec<u8>>,
    /// Signs nonces (stateless: the nonce carries its expiry and a MAC over it and the
    /// client's address).
    nonce_key: [u8; 32],
    allocations: HashMap<FiveTuple, Allocation>,
    by_relayed: HashMap<SocketAddr, FiveTuple>,
    per_user: HashMap<String, usize>,
    /// Ports held by EVEN-PORT's R bit, by their RESERVATION-TOKEN, with the user
    /// who holds them (a hold counts in the user's quota until it is taken or lapses).
    reservations: HashMap<[u8; 8], (SocketAddr, Instant, String)>,
    /// Where to send new allocations while this relay is above its load.
    alternate: Option<SocketAddr>,
    stats: Stats,
    buf: Vec<u8>,
}

/// Attributes the relay understands in requests; others below 0x8000 get 420.
const KNOWN: &[u16] = &[
    attr::USERNAME,
    attr::REALM,
    attr::NONCE,
    attr::LIFETIME,
    attr::REQUESTED_TRANSPORT,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::RESERVATION_TOKEN,
    // Relayed sockets keep Linux's path MTU discovery ("want"): DF set on every
    // datagram that fits the path (RFC 8656 §7.2, docs/media.md).
    attr::DONT_FRAGMENT,
    attr::XOR_PEER_ADDRESS,
    attr::CHANNEL_NUMBER,
    attr::DATA,
];

/// An authenticated request's user and key.
struct Authed {
    user: String,
    username: String,
    key: [u8; 16],
}

impl Relay {
    /// A relay checking credentials against `secrets` (current first), with a key of
    /// its own for nonces.
    pub fn new(config: Config, secrets: Vec<Vec<u8>>) -> Relay {
        Relay {
            config,
            secrets,
            nonce_key: rand::random(),
            allocations: HashMap::new(),
            by_relayed: HashMap::new(),
            per_user: HashMap::new(),
            reservations: HashMap::new(),
            alternate: None,
            stats: Stats::default(),
            buf: Vec::with_capacity(1500),
        }
    }

    /// The secrets credentials are checked against (after a rotation).
    pub fn set_secrets(&mut self, secrets: Vec<Vec<u8>>) {
        self.secrets = secrets;
    }

    /// Where new allocations go while this relay holds `redirect_above` allocations
    /// or more (`None`: nowhere, they are made here up to `max_allocations`). Stream
    /// clients over TLS are not redirected: the alternate names a UDP and TCP port.
    pub fn set_alternate(&mut self, alternate: Option<SocketAddr>) {
        self.alternate = alternate;
    }

    pub fn allocations(&self) -> usize {
        self.allocations.len()
    }

    /// What counts against `max_allocations` and `redirect_above`: the allocations
    /// and the ports held for later ones.
    pub fn load(&self) -> usize {
        self.allocations.len() + self.reservations.len()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn refuse(&mut self, why: Refusal) {
        *self.stats.refusals.entry(why).or_default() += 1;
    }

    /// Counts a request with attributes it must understand and does not, and leaves
    /// its 420 response in the buffer (RFC 8489 §6.3.1.1).
    fn reject_unknown(&mut self, m: &Message<'_>, unknown: &[u16]) {
        self.refuse(Refusal::BadRequest);
        let mut b = Builder::new(&mut self.buf, m.method, Class::Error, m.transaction);
        b.error_code(420, "Unknown Attribute")
            .unknown_attributes(unknown);
    }

    /// Counts a refused request and leaves its error response in the buffer, signed
    /// when the request was authenticated.
    fn reject(
        &mut self,
        why: Refusal,
        m: &Message<'_>,
        code: u16,
        reason: &str,
        key: Option<&[u8; 16]>,
    ) {
        self.refuse(why);
        error(&mut self.buf, m, code, reason, key);
    }

    /// A packet from a client. `unix` is the wall clock in seconds (credentials
    /// expire by it).
    pub fn from_client<'a>(
        &'a mut self,
        tuple: FiveTuple,
        packet: &'a [u8],
        now: Instant,
        unix: u64,
        ports: &mut dyn Ports,
    ) -> Option<Send<'a>> {
        if let Some((channel, data)) = stun::channel_data(packet) {
            return self.channel_to_peer(tuple, channel, data, now);
        }
        let Ok(m) = Message::parse(packet) else {
            self.refuse(Refusal::Malformed);
            return None;
        };
        match (m.class, m.method) {
            (Class::Request, method::BINDING) => {
                // A Binding request to a server carries no attribute it must understand.
                let unknown = m.unknown_required(&[]);
                if !unknown.is_empty() {
                    self.reject_unknown(&m, &unknown);
                    return Some(Send::Client {
                        tuple,
                        bytes: &self.buf,
                    });
                }
                let mut b = Builder::new(
                    &mut self.buf,
                    method::BINDING,
                    Class::Success,
                    m.transaction,
                );
                b.xor_address(attr::XOR_MAPPED_ADDRESS, tuple.client);
                if m.has_fingerprint() {
                    b.fingerprint();
                }
                drop(b);
                Some(Send::Client {
                    tuple,
                    bytes: &self.buf,
                })
            }
            (Class::Indication, method::SEND) => self.send_indication(tuple, &m, now),
            (
                Class::Request,
                method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND,
            ) => {
                self.request(tuple, &m, now, unix, ports);
                Some(Send::Client {
                    tuple,
                    bytes: &self.buf,
                })
            }
            (Class::Request, _) => {
                self.reject(Refusal::BadRequest, &m, 400, "Bad Request", None);
                Some(Send::Client {
                    tuple,
                    bytes: &self.buf,
                })
            }
            // Other indications and responses are not for a server.
            _ => None,
        }
    }

    /// A datagram from a peer to a relayed address.
    pub fn from_peer<'a>(
        &'a mut self,
        relayed: SocketAddr,
        peer: SocketAddr,
        data: &'a [u8],
        now: Instant,
    ) -> Option<Send<'a>> {
        let tuple = *self.by_relayed.get(&relayed)?;
        // What could not fit a Data indication's length field (a header, an IPv6
        // XOR-PEER-ADDRESS, DATA's header) is dropped, not sent with a wrong length.
        if data.len() > stun::MAX_MESSAGE - (stun::HEADER_LEN + 24 + 4) {
            self.refuse(Refusal::Malformed);
            return None;
        }
        let rate = self.config.bandwidth;
        let a = self.allocations.get_mut(&tuple)?;
        if !a.permitted(peer.ip(), now) {
            self.refuse(Refusal::NoPermission);
            return None;
        }
        if !a.down.take(rate, data.len(), now) {
            self.refuse(Refusal::Bandwidth);
            return None;
        }
        match a.by_peer.get(&peer).copied() {
            Some(channel) if a.channels.get(&channel).is_some_and(|(_, e)| *e > now) => {
                stun::write_channel_data(&mut self.buf, channel, data, tuple.transport.is_stream());
            }
            _ => {
                let mut b = Builder::new(
                    &mut self.buf,
                    method::DATA,
                    Class::Indication,
                    rand::random(),
                );
                b.xor_address(attr::XOR_PEER_ADDRESS, peer)
                    .attr(attr::DATA, data);
            }
        }
        self.stats.packets_to_clients += 1;
        self.stats.bytes_to_clients += data.len() as u64;
        Some(Send::Client {
            tuple,
            bytes: &self.buf,
        })
    }

    /// A stream from a client closed: its allocation goes (RFC 8656 §3.1).
    pub fn closed(&mut self, tuple: FiveTuple, ports: &mut dyn Ports) {
        self.remove(tuple, ports);
    }

    /// Drops what has expired: allocations, permissions, channels. Call it every few
    /// seconds.
    pub fn expire(&mut self, now: Instant, ports: &mut dyn Ports) {
        let unclaimed: Vec<[u8; 8]> = self
            .reservations
            .iter()
            .filter(|(_, (_, e, _))| *e <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in unclaimed {
            if let Some((relayed, _, user)) = self.reservations.remove(&token) {
                self.uncount(&user);
                ports.release(relayed);
            }
        }
        let gone: Vec<FiveTuple> = self
            .allocations
            .values()
            .filter(|a| a.expires <= now)
            .map(|a| a.tuple)
            .collect();
        for t in gone {
            self.remove(t, ports);
        }
        for a in self.allocations.values_mut() {
            a.permissions.retain(|_, e| *e > now);
            let stale: Vec<u16> = a
                .channels
                .iter()
                .filter(|(_, (_, e))| *e <= now)
                .map(|(c, _)| *c)
                .collect();
            for c in stale {
                if let Some((peer, _)) = a.channels.remove(&c) {
                    a.by_peer.remove(&peer);
                }
            }
        }
    }

    fn remove(&mut self, tuple: FiveTuple, ports: &mut dyn Ports) {
        if let Some(a) = self.allocations.remove(&tuple) {
            self.by_relayed.remove(&a.relayed);
            self.uncount(&a.user);
            ports.release(a.relayed);
        }
    }

    /// One allocation or hold fewer for `user`.
    fn uncount(&mut self, user: &str) {
        if let Some(n) = self.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
    }

    /// Whether a 5-tuple has an allocation (a stream without one is closed sooner).
    pub fn has_allocation(&self, tuple: FiveTuple) -> bool {
        self.allocations.contains_key(&tuple)
    }

    fn channel_to_peer<'a>(
        &mut self,
        tuple: FiveTuple,
        channel: u16,
        data: &'a [u8],
        now: Instant,
    ) -> Option<Send<'a>> {
        let a = self.allocations.get(&tuple)?;
        let (peer, expires) = *a.channels.get(&channel)?;
        if expires <= now {
            self.refuse(Refusal::NoPermission);
            return None;
        }
        // (Bound to an address the policy allowed: ChannelBind checked the port.)
        self.forward_to_peer(tuple, peer, data, now)
    }

    /// Data from a client to `peer`, if the allocation has a permission for it and
    /// room in its bandwidth.
    fn forward_to_peer<'a>(
        &mut self,
        tuple: FiveTuple,
        peer: SocketAddr,
        data: &'a [u8],
        now: Instant,
    ) -> Option<Send<'a>> {
        let rate = self.config.bandwidth;
        let a = self.allocations.get_mut(&tuple)?;
        if !a.permitted(peer.ip(), now) {
            self.refuse(Refusal::NoPermission);
            return None;
        }
        if !a.up.take(rate, data.len(), now) {
            self.refuse(Refusal::Bandwidth);
            return None;
        }
        let relayed = a.relayed;
        self.stats.packets_to_peers += 1;
        self.stats.bytes_to_peers += data.len() as u64;
        Some(Send::Peer {
            relayed,
            peer,
            bytes: data,
        })
    }

    fn send_indication<'a>(
        &mut self,
        tuple: FiveTuple,
        m: &Message<'a>,
        now: Instant,
    ) -> Option<Send<'a>> {
        let peer = m.xor_address(attr::XOR_PEER_ADDRESS).ok().flatten()?;
        let data = m.get(attr::DATA)?;
        // The permission is per address; the port is checked here (the node's own
        // addresses on relay ports only).
        if !self.config.policy.allows_addr(peer) {
            self.refuse(Refusal::ForbiddenPeer);
            return None;
        }
        self.forward_to_peer(tuple, peer, data, now)
    }

    /// A nonce for a client, good for NONCE_LIFETIME.
    fn nonce(&self, client: IpAddr, unix: u64) -> String {
        let expiry = unix.saturating_add(NONCE_LIFETIME);
        format!("{expiry:x}-{}", hex(&self.nonce_mac(client, expiry)))
    }

    fn nonce_mac(&self, client: IpAddr, expiry: u64) -> [u8; 8] {
        let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(&self.nonce_key)
            .expect("HMAC takes keys of any length");
        mac.update(&expiry.to_be_bytes());
        match client {
            IpAddr::V4(ip) => mac.update(&ip.octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 8];
        out.copy_from_slice(&full[..8]);
        out
    }

    /// Whether a nonce is one of ours for this client: `Some(true)` fresh,
    /// `Some(false)` stale, `None` not ours.
    fn nonce_fresh(&self, nonce: &str, client: IpAddr, unix: u64) -> Option<bool> {
        let (expiry, mac) = nonce.split_once('-')?;
        let expiry = u64::from_str_radix(expiry, 16).ok()?;
        let want = hex(&self.nonce_mac(client, expiry));
        use subtle::ConstantTimeEq as _;
        if want.as_bytes().ct_eq(mac.as_bytes()).into() {
            Some(expiry >= unix)
        } else {
            None
        }
    }

    /// Checks a request's long-term credentials (RFC 8489 §9.2.4). On failure the
    /// error response is in the buffer.
    fn authenticate(&mut self, tuple: FiveTuple, m: &Message<'_>, unix: u64) -> Option<Authed> {
        let challenge = |relay: &mut Relay, code: u16, reason: &str, why: Refusal| {
            relay.refuse(why);
            let nonce = relay.nonce(tuple.client.ip(), unix);
            let realm = relay.config.realm.clone();
            let mut b = Builder::new(&mut relay.buf, m.method, Class::Error, m.transaction);
            b.error_code(code, reason)
                .attr(attr::REALM, realm.as_bytes())
                .attr(attr::NONCE, nonce.as_bytes());
        };
        let (Ok(Some(username)), Ok(Some(realm)), Ok(Some(nonce))) = (
            m.text(attr::USERNAME),
            m.text(attr::REALM),
            m.text(attr::NONCE),
        ) else {
            if m.has_integrity() {
                // Integrity without the attributes it needs: 400 (§9.2.4).
                self.reject(Refusal::BadRequest, m, 400, "Bad Request", None);
            } else {
                challenge(self, 401, "Unauthorized", Refusal::Unauthorized);
            }
            return None;
        };
        if !m.has_integrity() {
            self.reject(Refusal::BadRequest, m, 400, "Bad Request", None);
            return None;
        }
        match self.nonce_fresh(nonce, tuple.client.ip(), unix) {
            Some(true) => {}
            Some(false) => {
                challenge(self, 438, "Stale Nonce", Refusal::StaleNonce);
                return None;
            }
            None => {
                challenge(self, 401, "Unauthorized", Refusal::Unauthorized);
                return None;
            }
        }
        if realm != self.config.realm {
            challenge(self, 401, "Unauthorized", Refusal::Unauthorized);
            return None;
        }
        // The credential this 5-tuple's allocation was made with.
        if let Some(a) = self.allocations.get(&tuple)
            && a.username == username
        {
            if m.check_integrity(&a.key) {
                return Some(Authed {
                    user: a.user.clone(),
                    username: a.username.clone(),
                    key: a.key,
                });
            }
            challenge(self, 401, "Unauthorized", Refusal::Unauthorized);
            return None;
        }
        let secrets: Vec<&[u8]> = self.secrets.iter().map(Vec::as_slice).collect();
        let (user, keys) = match auth::keys(&secrets, username, realm, unix) {
            Ok(k) => k,
            Err(auth::Refused::Expired) => {
                challenge(self, 401, "Unauthorized", Refusal::Expired);
                return None;
            }
            Err(auth::Refused::Malformed) => {
                challenge(self, 401, "Unauthorized", Refusal::Unauthorized);
                return None;
            }
        };
        let Some(key) = keys.into_iter().find(|k| m.check_integrity(k)) else {
            challenge(self, 401, "Unauthorized", Refusal::Unauthorized);
            return None;
        };
        Some(Authed {
            user,
            username: username.to_owned(),
            key,
        })
    }

    /// A request that needs credentials: the answer is left in the buffer.
    fn request(
        &mut self,
        tuple: FiveTuple,
        m: &Message<'_>,
        now: Instant,
        unix: u64,
        ports: &mut dyn Ports,
    ) {
        let unknown = m.unknown_required(KNOWN);
        if !unknown.is_empty() {
            self.reject_unknown(m, &unknown);
            return;
        }
        let Some(authed) = self.authenticate(tuple, m, unix) else {
            return;
        };
        if m.method == method::ALLOCATE {
            self.allocate(tuple, m, authed, now, ports);
            return;
        }
        // The other requests act on the 5-tuple's allocation, by the user who made it
        // (RFC 8656 §7.3, §9, §11).
        let Some(a) = self.allocations.get(&tuple) else {
            self.reject(
                Refusal::BadRequest,
                m,
                437,
                "Allocation Mismatch",
                Some(&authed.key),
            );
            return;
        };
        // The same user (its credentials may have been renewed meanwhile).
        if a.user != authed.user {
            self.reject(
                Refusal::BadRequest,
                m,
                441,
                "Wrong Credentials",
                Some(&authed.key),
            );
            return;
        }
        match m.method {
            method::REFRESH => self.refresh(tuple, m, &authed, now, ports),
            method::CREATE_PERMISSION => self.create_permission(tuple, m, &authed, now),
            _ => self.channel_bind(tuple, m, &authed, now),
        }
    }

    fn lifetime(&self, m: &Message<'_>) -> Result<Duration, ()> {
        let asked = m.u32_attr(attr::LIFETIME).map_err(|_| ())?;
        Ok(match asked {
            None => self.config.default_lifetime,
            Some(s) => Duration::from_secs(u64::from(s))
                .max(self.config.default_lifetime)
                .min(self.config.max_lifetime),
        })
    }

    fn allocate(
        &mut self,
        tuple: FiveTuple,
        m: &Message<'_>,
        authed: Authed,
        now: Instant,
        ports: &mut dyn Ports,
    ) {
        let key = authed.key;
        if let Some(a) = self.allocations.get(&tuple) {
            if a.made_by == m.transaction {
                // A retransmission: the same answer (§7.2).
                let (relayed, left) = (a.relayed, a.expires.saturating_duration_since(now));
                success_allocate(&mut self.buf, m, tuple, relayed, left, None, &key);
            } else {
                self.reject(
                    Refusal::BadRequest,
                    m,
                    437,
                    "Allocation Mismatch",
                    Some(&key),
                );
            }
            return;
        }
        match m.get(attr::REQUESTED_TRANSPORT) {
            Some([17, ..]) => {}
            Some(_) => {
                self.reject(
                    Refusal::BadRequest,
                    m,
                    442,
                    "Unsupported Transport Protocol",
                    Some(&key),
                );
                return;
            }
            None => {
                self.reject(Refusal::BadRequest, m, 400, "Bad Request", Some(&key));
                return;
            }
        }
        let family = match m.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None | Some([0x01, ..]) => Family::V4,
            Some([0x02, ..]) => Family::V6,
            Some(_) => {
                self.reject(
                    Refusal::BadRequest,
                    m,
                    440,
                    "Address Family not Supported",
                    Some(&key),
                );
                return;
            }
        };
        let want = match m.get(attr::EVEN_PORT) {
            None => Want::Any,
            Some([flags, ..]) if flags & 0x80 != 0 => Want::EvenAndNext,
            Some(_) => Want::Even,
        };
        let token: Option<[u8; 8]> = match m.get(attr::RESERVATION_TOKEN) {
            None => None,
            // A token with EVEN-PORT, or not eight bytes: 400 (§7.2).
            Some(t) if t.len() == 8 && want == Want::Any => t.try_into().ok(),
            Some(_) => {
                self.reject(Refusal::BadRequest, m, 400, "Bad Request", Some(&key));
                return;
            }
        };
        let Ok(lifetime) = self.lifetime(m) else {
            self.reject(Refusal::BadRequest, m, 400, "Bad Request", Some(&key));
            return;
        };
        // A hold of the user's own that this request takes is already counted.
        let taking_own_hold = token
            .and_then(|t| self.reservations.get(&t))
            .is_some_and(|(_, expires, holder)| *holder == authed.user && *expires > now);
        let held = self.per_user.get(&authed.user).copied().unwrap_or(0);
        if held - usize::from(taking_own_hold && held > 0) >= self.config.user_quota {
            self.reject(
                Refusal::Quota,
                m,
                486,
                "Allocation Quota Reached",
                Some(&key),
            );
            return;
        }
        let load = self.load();
        // Not a client over TLS (the alternate is a UDP and TCP port), nor one taking
        // a port held here (the alternate does not hold it).
        let movable = tuple.transport != Transport::Tls && token.is_none();
        if let Some(alternate) = self
            .alternate
            .filter(|_| load >= self.config.redirect_above && movable)
        {
            // Above its load: the least loaded relay of the cluster takes it (§7.2,
            // RFC 8489 §10: after authentication, so the redirect cannot be forged).
            self.stats.redirects += 1;
            let mut b = Builder::new(&mut self.buf, m.method, Class::Error, m.transaction);
            b.error_code(300, "Try Alternate")
                .address(attr::ALTERNATE_SERVER, alternate)
                .integrity(&key);
            return;
        }
        if load >= self.config.max_allocations {
            self.reject(
                Refusal::Capacity,
                m,
                508,
                "Insufficient Capacity",
                Some(&key),
            );
            return;
        }
        let bound = match token {
            // The port an earlier allocation held: unknown or lapsed tokens get 508.
            Some(token) => match self.reservations.remove(&token) {
                Some((relayed, expires, holder)) => {
                    self.uncount(&holder);
                    if expires > now {
                        Ok((relayed, None))
                    } else {
                        ports.release(relayed);
                        Err(NoPort::Exhausted)
                    }
                }
                None => Err(NoPort::Exhausted),
            },
            None => ports.bind(family, want),
        };
        let (relayed, next) = match bound {
            Ok(bound) => bound,
            Err(NoPort::Family) => {
                self.reject(
                    Refusal::BadRequest,
                    m,
                    440,
                    "Address Family not Supported",
                    Some(&key),
                );
                return;
            }
            Err(NoPort::Exhausted) => {
                self.reject(
                    Refusal::Capacity,
                    m,
                    508,
                    "Insufficient Capacity",
                    Some(&key),
                );
                return;
            }
        };
        let rate = self.config.bandwidth;
        *self.per_user.entry(authed.user.clone()).or_default() += 1;
        self.by_relayed.insert(relayed, tuple);
        self.allocations.insert(
            tuple,
            Allocation {
                tuple,
                user: authed.user,
                username: authed.username,
                key,
                relayed,
                expires: now + lifetime,
                made_by: m.transaction,
                permissions: HashMap::new(),
                channels: HashMap::new(),
                by_peer: HashMap::new(),
                up: Bucket::new(rate, now),
                down: Bucket::new(rate, now),
            },
        );
        self.stats.allocations_created += 1;
        let token = next.map(|next| {
            let token: [u8; 8] = rand::random();
            let holder = self
                .allocations
                .get(&tuple)
                .map(|a| a.user.clone())
                .unwrap_or_default();
            *self.per_user.entry(holder.clone()).or_default() += 1;
            self.reservations
                .insert(token, (next, now + RESERVATION_LIFETIME, holder));
            token
        });
        success_allocate(&mut self.buf, m, tuple, relayed, lifetime, token, &key);
    }

    fn refresh(
        &mut self,
        tuple: FiveTuple,
        m: &Message<'_>,
        authed: &Authed,
        now: Instant,
        ports: &mut dyn Ports,
    ) {
        let asked = m.u32_attr(attr::LIFETIME);
        let lifetime = match (asked, self.lifetime(m)) {
            (Ok(Some(0)), _) => Duration::ZERO,
            (_, Ok(l)) => l,
            _ => {
                self.reject(
                    Refusal::BadRequest,
                    m,
                    400,
                    "Bad Request",
                    Some(&authed.key),
                );
                return;
            }
        };
        if lifetime.is_zero() {
            self.remove(tuple, ports);
        } else if let Some(a) = self.allocations.get_mut(&tuple) {
            a.expires = now + lifetime;
        }
        let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        let mut b = Builder::new(&mut self.buf, m.method, Class::Success, m.transaction);
        b.u32_attr(attr::LIFETIME, secs).integrity(&authed.key);
    }

    /// The peers a request names, each allowed for this allocation; on refusal the
    /// error is in the buffer. A permission is for an address whatever the port the
    /// request names (RFC 8656 §9.1; clients often send port 0), so only the address is
    /// checked then; a channel is for one transport address, port included.
    fn peers(
        &mut self,
        tuple: FiveTuple,
        m: &Message<'_>,
        key: &[u8; 16],
        with_port: bool,
    ) -> Option<Vec<SocketAddr>> {
        let peers = match m.xor_addresses(attr::XOR_PEER_ADDRESS) {
            Ok(p) if !p.is_empty() => p,
            _ => {
                self.reject(Refusal::BadRequest, m, 400, "Bad Request", Some(key));
                return None;
            }
        };
        let relayed_v4 = self
            .allocations
            .get(&tuple)
            .is_some_and(|a| a.relayed.is_ipv4());
        if peers.iter().any(|p| p.is_ipv4() != relayed_v4) {
            self.reject(
                Refusal::BadRequest,
                m,
                443,
                "Peer Address Family Mismatch",
                Some(key),
            );
            return None;
        }
        let policy = &self.config.policy;
        let allowed = |p: &SocketAddr| {
            if with_port {
                policy.allows_addr(*p)
            } else {
                policy.allows(p.ip())
            }
        };
        if !peers.iter().all(allowed) {
            self.reject(Refusal::ForbiddenPeer, m, 403, "Forbidden", Some(key));
            return None;
        }
        Some(peers)
    }

    fn create_permission(
        &mut self,
        tuple: FiveTuple,
        m: &Message<'_>,
        authed: &Authed,
        now: Instant,
    ) {
        let Some(peers) = self.peers(tuple, m, &authed.key, false) else {
            return;
        };
        let Some(a) = self.allocations.get_mut(&tuple) else {
            return;
        };
        let new = peers
            .iter()
            .filter(|p| !a.permissions.contains_key(&p.ip()))
            .count();
        if a.permissions.len() + new > MAX_PERMISSIONS {
            self.reject(
                Refusal::Capacity,
                m,
                508,
                "Insufficient Capacity",
                Some(&authed.key),
            );
            return;
        }
        for p in peers {
            a.permissions.insert(p.ip(), now + PERMISSION_LIFETIME);
        }
        let mut b = Builder::new(&mut self.buf, m.method, Class::Success, m.transaction);
        b.integrity(&authed.key);
    }

    fn channel_bind(&mut self, tuple: FiveTuple, m: &Message<'_>, authed: &Authed, now: Instant) {
        let channel = match m.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => 0,
        };
        let Some(peers) = self.peers(tuple, m, &authed.key, true) else {
            return;
        };
        let Some(a) = self.allocations.get_mut(&tuple) else {
            return;
        };
        let peer = peers[0];
        // The channel must be in range and bound to no other peer, the peer to no
        // other channel (§11.2).
        let clash = !stun::is_channel(channel)
            || peers.len() != 1
            || a.channels.get(&channel).is_some_and(|(p, _)| *p != peer)
            || a.by_peer.get(&peer).is_some_and(|c| *c != channel);
        if clash {
            self.reject(
                Refusal::BadRequest,
                m,
                400,
                "Bad Request",
                Some(&authed.key),
            );
            return;
        }
        let new_permission = !a.permissions.contains_key(&peer.ip());
        if (!a.channels.contains_key(&channel) && a.channels.len() >= MAX_CHANNELS)
            || (new_permission && a.permissions.len() >= MAX_PERMISSIONS)
        {
            self.reject(
                Refusal::Capacity,
                m,
                508,
                "Insufficient Capacity",
                Some(&authed.key),
            );
            return;
        }
        a.channels.insert(channel, (peer, now + CHANNEL_LIFETIME));
        a.by_peer.insert(peer, channel);
        a.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
        let mut b = Builder::new(&mut self.buf, m.method, Class::Success, m.transaction);
        b.integrity(&authed.key);
    }
}

fn success_allocate(
    buf: &mut Vec<u8>,
    m: &Message<'_>,
    tuple: FiveTuple,
    relayed: SocketAddr,
    lifetime: Duration,
    token: Option<[u8; 8]>,
    key: &[u8],
) {
    let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
    let mut b = Builder::new(buf, m.method, Class::Success, m.transaction);
    b.xor_address(attr::XOR_RELAYED_ADDRESS, relayed)
        .u32_attr(attr::LIFETIME, secs)
        .xor_address(attr::XOR_MAPPED_ADDRESS, tuple.client);
    if let Some(token) = token {
        b.attr(attr::RESERVATION_TOKEN, &token);
    }
    b.integrity(key);
}

/// An error response, signed when the request was authenticated.
fn error(buf: &mut Vec<u8>, m: &Message<'_>, code: u16, reason: &str, key: Option<&[u8; 16]>) {
    let mut b = Builder::new(buf, m.method, Class::Error, m.transaction);
    b.error_code(code, reason);
    if let Some(key) = key {
        b.integrity(key);
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
