//! The relay's logic stepped by hand: a client's requests built with the codec,
//! answers read back, peers and ports simulated.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::auth::{Credential, mint};
use crate::policy::{Cidr, PeerPolicy};
use crate::stun::{Builder, Class, Message, attr, long_term_key, method};

const REALM: &str = "example.com";
const SECRET: &[u8] = b"cluster secret";
const UNIX: u64 = 1_800_000_000;

/// Ports from 50000 up, all on one address; records what was released.
#[derive(Default)]
struct FakePorts {
    next: u16,
    released: Vec<SocketAddr>,
    full: bool,
}

impl Ports for FakePorts {
    fn bind(
        &mut self,
        family: Family,
        want: Want,
    ) -> Result<(SocketAddr, Option<SocketAddr>), NoPort> {
        if family == Family::V6 {
            return Err(NoPort::Family);
        }
        if self.full {
            return Err(NoPort::Exhausted);
        }
        self.next += 1;
        if want != Want::Any && self.next % 2 == 1 {
            self.next += 1;
        }
        let addr = |n: u16| SocketAddr::from(([203, 0, 113, 1], 50_000 + n));
        let first = addr(self.next);
        if want == Want::EvenAndNext {
            self.next += 1;
            return Ok((first, Some(addr(self.next))));
        }
        Ok((first, None))
    }

    fn release(&mut self, relayed: SocketAddr) {
        self.released.push(relayed);
    }
}

fn config() -> Config {
    Config {
        realm: REALM.into(),
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        user_quota: 2,
        max_allocations: 10,
        redirect_above: 8,
        bandwidth: 100_000,
        policy: PeerPolicy {
            allow: vec!["127.0.0.0/8".parse::<Cidr>().unwrap()],
            own: vec!["203.0.113.1".parse().unwrap()],
            relay_ports: Some(50_000..=60_000),
        },
    }
}

fn relay() -> Relay {
    Relay::new(config(), vec![SECRET.to_vec()])
}

fn tuple(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::from(([198, 51, 100, 5], port)),
        server: SocketAddr::from(([203, 0, 113, 1], 3478)),
        transport: Transport::Udp,
    }
}

/// A client of the relay: its credential and the nonce it was last given.
struct Client {
    tuple: FiveTuple,
    cred: Credential,
    nonce: Option<String>,
    tx: u8,
}

/// An answer, parsed and owned.
#[derive(Debug)]
struct Answer {
    class: Class,
    method: u16,
    code: Option<u16>,
    bytes: Vec<u8>,
}

impl Answer {
    fn message(&self) -> Message<'_> {
        Message::parse(&self.bytes).unwrap()
    }
}

fn answer(send: Option<Send<'_>>) -> Answer {
    match send {
        Some(Send::Client { bytes, .. }) => {
            let m = Message::parse(bytes).unwrap();
            Answer {
                class: m.class,
                method: m.method,
                code: m.error_code().unwrap().map(|(c, _)| c),
                bytes: bytes.to_vec(),
            }
        }
        other => panic!("expected an answer to the client, got {other:?}"),
    }
}

impl Client {
    fn new(port: u16, user: &str) -> Client {
        Client {
            tuple: tuple(port),
            cred: mint(SECRET, user, UNIX, 3600),
            nonce: None,
            tx: 0,
        }
    }

    fn key(&self) -> [u8; 16] {
        long_term_key(&self.cred.username, REALM, &self.cred.password)
    }

    /// A request with credentials (once a nonce is known), `add` putting its own
    /// attributes first.
    fn request(&mut self, method: u16, add: impl Fn(&mut Builder<'_>)) -> Vec<u8> {
        self.tx += 1;
        let mut out = Vec::new();
        let key = self.key();
        {
            let mut b = Builder::new(&mut out, method, Class::Request, [self.tx; 12]);
            add(&mut b);
            if let Some(nonce) = &self.nonce {
                b.attr(attr::USERNAME, self.cred.username.as_bytes())
                    .attr(attr::REALM, REALM.as_bytes())
                    .attr(attr::NONCE, nonce.as_bytes())
                    .integrity(&key);
            }
        }
        out
    }

    /// Sends a request, taking the nonce from a 401 and retrying once, as clients do.
    fn ask(
        &mut self,
        relay: &mut Relay,
        ports: &mut FakePorts,
        now: Instant,
        unix: u64,
        method: u16,
        add: impl Fn(&mut Builder<'_>) + Copy,
    ) -> Answer {
        let packet = self.request(method, add);
        let a = answer(relay.from_client(self.tuple, &packet, now, unix, ports));
        if matches!(a.code, Some(401 | 438)) {
            let m = a.message();
            let nonce = m.text(attr::NONCE).unwrap().map(str::to_owned);
            if nonce.is_some() && nonce != self.nonce {
                self.nonce = nonce;
                let packet = self.request(method, add);
                return answer(relay.from_client(self.tuple, &packet, now, unix, ports));
            }
        }
        a
    }

    fn allocate(&mut self, relay: &mut Relay, ports: &mut FakePorts, now: Instant) -> Answer {
        self.ask(relay, ports, now, UNIX, method::ALLOCATE, |b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    }
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 7], 40_000))
}

#[test]
fn binding_answers_the_mapped_address() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let mut out = Vec::new();
    {
        let mut b = Builder::new(&mut out, method::BINDING, Class::Request, [1; 12]);
        b.fingerprint();
    }
    let a = answer(relay.from_client(tuple(1000), &out, Instant::now(), UNIX, &mut ports));
    assert_eq!((a.class, a.method), (Class::Success, method::BINDING));
    let m = a.message();
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(tuple(1000).client)
    );
    assert!(m.has_fingerprint());
}

#[test]
fn an_allocation_is_challenged_then_made_and_signed() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    // The first request has no credentials: 401 with the realm and a nonce.
    let first = alice.request(method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    let a = answer(relay.from_client(alice.tuple, &first, now, UNIX, &mut ports));
    assert_eq!(a.code, Some(401));
    assert_eq!(a.message().text(attr::REALM).unwrap(), Some(REALM));
    assert_eq!(relay.allocations(), 0);
    // With them: the relayed address, the default lifetime, signed with the key.
    let a = alice.allocate(&mut relay, &mut ports, now);
    assert_eq!((a.class, a.code), (Class::Success, None));
    let m = a.message();
    let relayed = m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(relayed, SocketAddr::from(([203, 0, 113, 1], 50_001)));
    assert_eq!(m.u32_attr(attr::LIFETIME).unwrap(), Some(600));
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
        Some(alice.tuple.client)
    );
    assert!(m.check_integrity(&alice.key()));
    assert_eq!(relay.allocations(), 1);
    // The same request again is a retransmission: the same answer. A new one on the
    // same 5-tuple is a mismatch.
    alice.tx -= 1;
    let again = alice.allocate(&mut relay, &mut ports, now);
    assert_eq!(
        again
            .message()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap(),
        Some(relayed)
    );
    assert_eq!(alice.allocate(&mut relay, &mut ports, now).code, Some(437));
    assert_eq!(relay.allocations(), 1);
}

#[test]
fn bad_credentials_allocate_nothing() {
    let now = Instant::now();
    let mut ports = FakePorts::default();
    // Expired.
    let mut relay = relay();
    let mut late = Client::new(1000, "alice");
    late.cred = mint(SECRET, "alice", UNIX - 7200, 3600);
    assert_eq!(late.allocate(&mut relay, &mut ports, now).code, Some(401));
    assert_eq!(relay.stats().refusals.get(&Refusal::Expired), Some(&1));
    // Minted with another cluster's secret.
    let mut forged = Client::new(1001, "alice");
    forged.cred = mint(b"another cluster", "alice", UNIX, 3600);
    assert_eq!(forged.allocate(&mut relay, &mut ports, now).code, Some(401));
    // A password that is not the HMAC.
    let mut wrong = Client::new(1002, "alice");
    wrong.cred.password = "guess".into();
    assert_eq!(wrong.allocate(&mut relay, &mut ports, now).code, Some(401));
    assert_eq!(relay.allocations(), 0);
    assert_eq!(ports.next, 0, "no port was bound");
    // The previous secret still works during its grace period.
    relay.set_secrets(vec![b"rotated".to_vec(), SECRET.to_vec()]);
    let mut old = Client::new(1003, "alice");
    assert_eq!(old.allocate(&mut relay, &mut ports, now).code, None);
}

#[test]
fn a_stale_nonce_gets_438_and_a_new_one() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    assert_eq!(alice.allocate(&mut relay, &mut ports, now).code, None);
    let old = alice.nonce.clone();
    // Two hours later, with fresh credentials, the old nonce is stale: 438, then the
    // client retries with the new one.
    alice.cred = mint(SECRET, "alice", UNIX + 7200, 3600);
    let packet = alice.request(method::REFRESH, |_| {});
    let a = answer(relay.from_client(alice.tuple, &packet, now, UNIX + 7200, &mut ports));
    assert_eq!(a.code, Some(438));
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX + 7200,
        method::REFRESH,
        |_| {},
    );
    assert_eq!(a.code, None);
    assert_ne!(alice.nonce, old);
}

#[test]
fn media_flows_through_permissions_and_channels_only() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    let a = alice.allocate(&mut relay, &mut ports, now);
    let relayed = a
        .message()
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    // No permission yet: the peer's packets are dropped, and so are the client's.
    assert_eq!(relay.from_peer(relayed, peer(), b"early", now), None);
    let mut send = Vec::new();
    {
        let mut b = Builder::new(&mut send, method::SEND, Class::Indication, [3; 12]);
        b.xor_address(attr::XOR_PEER_ADDRESS, peer())
            .attr(attr::DATA, b"hi");
    }
    assert_eq!(
        relay.from_client(alice.tuple, &send, now, UNIX, &mut ports),
        None
    );
    // A permission: Send and Data indications flow.
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CREATE_PERMISSION,
        |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer());
        },
    );
    assert_eq!(a.code, None);
    assert!(a.message().check_integrity(&alice.key()));
    assert_eq!(
        relay.from_client(alice.tuple, &send, now, UNIX, &mut ports),
        Some(Send::Peer {
            relayed,
            peer: peer(),
            bytes: b"hi"
        })
    );
    let data = answer(relay.from_peer(relayed, peer(), b"back", now));
    assert_eq!((data.class, data.method), (Class::Indication, method::DATA));
    assert_eq!(data.message().get(attr::DATA), Some(&b"back"[..]));
    // A channel: ChannelData both ways, the relay's hot path.
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CHANNEL_BIND,
        |b| {
            b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, peer());
        },
    );
    assert_eq!(a.code, None);
    let mut frame = Vec::new();
    crate::stun::write_channel_data(&mut frame, 0x4001, b"rtp", false);
    assert_eq!(
        relay.from_client(alice.tuple, &frame, now, UNIX, &mut ports),
        Some(Send::Peer {
            relayed,
            peer: peer(),
            bytes: b"rtp"
        })
    );
    match relay.from_peer(relayed, peer(), b"rtp back", now) {
        Some(Send::Client { tuple, bytes }) => {
            assert_eq!(tuple, alice.tuple);
            assert_eq!(
                crate::stun::channel_data(bytes),
                Some((0x4001, &b"rtp back"[..]))
            );
        }
        other => panic!("{other:?}"),
    }
    // Another peer on the same channel, or another channel for the peer: 400.
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CHANNEL_BIND,
        |b| {
            b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x02, 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, peer());
        },
    );
    assert_eq!(a.code, Some(400));
    // A channel out of range: 400.
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CHANNEL_BIND,
        |b| {
            b.attr(attr::CHANNEL_NUMBER, &[0x30, 0x00, 0, 0])
                .xor_address(
                    attr::XOR_PEER_ADDRESS,
                    SocketAddr::from(([127, 0, 0, 8], 1)),
                );
        },
    );
    assert_eq!(a.code, Some(400));
    // Permissions lapse after five minutes; the channel (ten) no longer carries data.
    let later = now + Duration::from_secs(301);
    relay.expire(later, &mut ports);
    assert_eq!(relay.from_peer(relayed, peer(), b"late", later), None);
    assert_eq!(
        relay.from_client(alice.tuple, &frame, later, UNIX, &mut ports),
        None
    );
    assert!(relay.stats().packets_to_peers >= 2);
}

#[test]
fn forbidden_peers_get_403() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    alice.allocate(&mut relay, &mut ports, now);
    for forbidden in ["10.0.0.1:9", "169.254.169.254:80", "192.168.1.1:5"] {
        let peer: SocketAddr = forbidden.parse().unwrap();
        let a = alice.ask(
            &mut relay,
            &mut ports,
            now,
            UNIX,
            method::CREATE_PERMISSION,
            |b| {
                b.xor_address(attr::XOR_PEER_ADDRESS, peer);
            },
        );
        assert_eq!(a.code, Some(403), "{forbidden}");
        assert!(a.message().check_integrity(&alice.key()));
    }
    assert_eq!(
        relay.stats().refusals.get(&Refusal::ForbiddenPeer),
        Some(&3)
    );
    // An IPv6 peer for an IPv4 allocation.
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CREATE_PERMISSION,
        |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, "[2001:db8::1]:9".parse().unwrap());
        },
    );
    assert_eq!(a.code, Some(443));
}

#[test]
fn quotas_capacity_and_redirects() {
    let mut relay = Relay::new(
        Config {
            redirect_above: 3,
            ..config()
        },
        vec![SECRET.to_vec()],
    );
    let mut ports = FakePorts::default();
    let now = Instant::now();
    // Two allocations per user, the third gets 486.
    for port in [1000, 1001] {
        assert_eq!(
            Client::new(port, "alice")
                .allocate(&mut relay, &mut ports, now)
                .code,
            None
        );
    }
    assert_eq!(
        Client::new(1002, "alice")
            .allocate(&mut relay, &mut ports, now)
            .code,
        Some(486)
    );
    // Below its load the relay allocates, though it knows another relay...
    let alternate: SocketAddr = "203.0.113.2:3478".parse().unwrap();
    relay.set_alternate(Some(alternate));
    let mut dave = Client::new(4000, "dave");
    assert_eq!(dave.allocate(&mut relay, &mut ports, now).code, None);
    // ...and at its load it names the other, in a signed 300.
    let mut bob = Client::new(2000, "bob");
    let a = bob.allocate(&mut relay, &mut ports, now);
    assert_eq!(a.code, Some(300));
    let m = a.message();
    assert!(m.check_integrity(&bob.key()));
    assert_eq!(
        m.get(attr::ALTERNATE_SERVER),
        Some(&[0, 1, 0x0D, 0x96, 203, 0, 113, 2][..])
    );
    assert_eq!(relay.stats().redirects, 1);
    // A TLS client is not sent to the alternate's UDP and TCP port.
    let mut tls = Client::new(4001, "erin");
    tls.tuple.transport = Transport::Tls;
    assert_eq!(tls.allocate(&mut relay, &mut ports, now).code, None);
    relay.set_alternate(None);
    // No port left: 508, nothing allocated.
    ports.full = true;
    assert_eq!(
        Client::new(2001, "bob")
            .allocate(&mut relay, &mut ports, now)
            .code,
        Some(508)
    );
    assert_eq!(relay.allocations(), 4);
    // Unsupported transport, address family, reservations.
    ports.full = false;
    let mut carol = Client::new(3000, "carol");
    let a = carol.ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    });
    assert_eq!(a.code, Some(442));
    let a = carol.ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[0x02, 0, 0, 0]);
    });
    assert_eq!(a.code, Some(440), "no IPv6 address to relay from");
    // An attribute it must understand and does not: 420, naming it.
    let a = carol.ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(0x0777, &[]);
    });
    assert_eq!(a.code, Some(420));
    assert_eq!(
        a.message().get(attr::UNKNOWN_ATTRIBUTES),
        Some(&[0x07, 0x77][..])
    );
    // DONT-FRAGMENT is understood (Linux sets DF on relayed datagrams: docs/media.md).
    let a = carol.ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::DONT_FRAGMENT, &[]);
    });
    assert_eq!(a.code, None);
    assert_eq!(relay.allocations(), 5);
    let mut carol = Client::new(3001, "carol");
    // An even port when asked.
    let a = carol.ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::EVEN_PORT, &[0, 0, 0, 0]);
    });
    let relayed = a
        .message()
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relayed.port() % 2, 0);
}

#[test]
fn allocations_end_by_refresh_close_or_expiry() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    alice.allocate(&mut relay, &mut ports, now);
    // Refresh to an hour (capped), then to zero: gone, its port released.
    let a = alice.ask(&mut relay, &mut ports, now, UNIX, method::REFRESH, |b| {
        b.u32_attr(attr::LIFETIME, 86_400);
    });
    assert_eq!(a.message().u32_attr(attr::LIFETIME).unwrap(), Some(3600));
    let a = alice.ask(&mut relay, &mut ports, now, UNIX, method::REFRESH, |b| {
        b.u32_attr(attr::LIFETIME, 0);
    });
    assert_eq!(a.code, None);
    assert_eq!(relay.allocations(), 0);
    assert_eq!(ports.released.len(), 1);
    // Refreshing what is gone: 437.
    let a = alice.ask(&mut relay, &mut ports, now, UNIX, method::REFRESH, |_| {});
    assert_eq!(a.code, Some(437));
    // Another user cannot act on alice's allocation.
    let mut alice2 = Client::new(1001, "alice");
    alice2.allocate(&mut relay, &mut ports, now);
    let mut mallory = Client::new(1001, "mallory");
    let a = mallory.ask(&mut relay, &mut ports, now, UNIX, method::REFRESH, |_| {});
    assert_eq!(a.code, Some(441));
    // Expiry after the lifetime.
    relay.expire(now + Duration::from_secs(599), &mut ports);
    assert_eq!(relay.allocations(), 1);
    relay.expire(now + Duration::from_secs(601), &mut ports);
    assert_eq!(relay.allocations(), 0);
    // A closed stream ends its allocation at once.
    let mut tcp = Client::new(1002, "alice");
    tcp.tuple.transport = Transport::Tcp;
    tcp.allocate(&mut relay, &mut ports, now);
    assert_eq!(relay.allocations(), 1);
    relay.closed(tcp.tuple, &mut ports);
    assert_eq!(relay.allocations(), 0);
    assert_eq!(ports.released.len(), 3);
}

#[test]
fn bandwidth_is_capped_per_allocation() {
    let mut cfg = config();
    cfg.bandwidth = 1000;
    let mut relay = Relay::new(cfg, vec![SECRET.to_vec()]);
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    alice.allocate(&mut relay, &mut ports, now);
    alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CHANNEL_BIND,
        |b| {
            b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, peer());
        },
    );
    let mut frame = Vec::new();
    crate::stun::write_channel_data(&mut frame, 0x4000, &[0; 600], false);
    assert!(
        relay
            .from_client(alice.tuple, &frame, now, UNIX, &mut ports)
            .is_some()
    );
    assert!(
        relay
            .from_client(alice.tuple, &frame, now, UNIX, &mut ports)
            .is_none()
    );
    assert_eq!(relay.stats().refusals.get(&Refusal::Bandwidth), Some(&1));
    // Refilled a second later.
    let later = now + Duration::from_secs(1);
    assert!(
        relay
            .from_client(alice.tuple, &frame, later, UNIX, &mut ports)
            .is_some()
    );
}

#[test]
fn garbage_is_counted_and_not_answered() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    for junk in [
        &b""[..],
        b"\x00\x01\x00",
        b"GET / HTTP/1.1\r\n\r\n",
        &[0x40, 0, 0, 4, 1, 2, 3, 4],
    ] {
        assert_eq!(
            relay.from_client(tuple(1), junk, now, UNIX, &mut ports),
            None
        );
    }
    assert_eq!(relay.stats().refusals.get(&Refusal::Malformed), Some(&3));
    assert_eq!(relay.allocations(), 0);
}

#[test]
fn even_ports_and_reservations() {
    // At its load from the first allocation on (redirects need an alternate).
    let mut relay = Relay::new(
        Config {
            redirect_above: 1,
            ..config()
        },
        vec![SECRET.to_vec()],
    );
    let mut ports = FakePorts::default();
    let now = Instant::now();
    // RTP on an even port, the next one held for RTCP under a token.
    let mut rtp = Client::new(1000, "alice");
    let a = rtp.ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    });
    let m = a.message();
    let even = m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(even.port() % 2, 0);
    let token: [u8; 8] = m.get(attr::RESERVATION_TOKEN).unwrap().try_into().unwrap();
    // The token with EVEN-PORT is a bad request; an unknown token gets 508.
    let mut rtcp = Client::new(1001, "alice");
    let a = rtcp.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::ALLOCATE,
        move |b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::EVEN_PORT, &[0, 0, 0, 0])
                .attr(attr::RESERVATION_TOKEN, &token);
        },
    );
    assert_eq!(a.code, Some(400));
    // (Another user: alice's allocation and hold fill her quota of two.)
    let a =
        Client::new(1005, "carol").ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::RESERVATION_TOKEN, &[1; 8]);
        });
    assert_eq!(a.code, Some(508));
    // The token takes the held port, here though the relay is at its load and knows
    // another (which does not hold that port).
    relay.set_alternate(Some("203.0.113.2:3478".parse().unwrap()));
    let a = rtcp.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::ALLOCATE,
        move |b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::RESERVATION_TOKEN, &token);
        },
    );
    let odd = a
        .message()
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(odd.port(), even.port() + 1);
    assert_eq!(relay.stats().redirects, 0);
    relay.set_alternate(None);
    // A hold nobody claims is released after 30 s.
    let mut other = Client::new(1002, "bob");
    other.ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    });
    assert!(ports.released.is_empty());
    relay.expire(now + Duration::from_secs(31), &mut ports);
    assert_eq!(ports.released.len(), 1);
    assert_eq!(relay.allocations(), 3);
}

#[test]
fn holds_count_in_the_quota_and_lapsed_ones_are_released_when_claimed() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    // A quota of two: one allocation with a hold uses both.
    let mut rtp = Client::new(1000, "alice");
    let a = rtp.ask(&mut relay, &mut ports, now, UNIX, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    });
    let token: [u8; 8] = a
        .message()
        .get(attr::RESERVATION_TOKEN)
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(
        Client::new(1001, "alice")
            .allocate(&mut relay, &mut ports, now)
            .code,
        Some(486)
    );
    // Claimed after it lapsed (before the expiry tick): 508, and the port goes back.
    let late = now + Duration::from_secs(31);
    let mut rtcp = Client::new(1002, "bob");
    let a = rtcp.ask(
        &mut relay,
        &mut ports,
        late,
        UNIX,
        method::ALLOCATE,
        move |b| {
            b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::RESERVATION_TOKEN, &token);
        },
    );
    assert_eq!(a.code, Some(508));
    assert_eq!(ports.released.len(), 1);
    // The hold no longer counts.
    assert_eq!(
        Client::new(1003, "alice")
            .allocate(&mut relay, &mut ports, late)
            .code,
        None
    );
}

#[test]
fn an_allocation_outlives_its_credential() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    alice.cred = mint(SECRET, "alice", UNIX, 600);
    assert_eq!(alice.allocate(&mut relay, &mut ports, now).code, None);
    // Twenty minutes later the credential has expired: refreshes with it still work
    // for this allocation, and nothing else does.
    let later = UNIX + 1200;
    let a = alice.ask(&mut relay, &mut ports, now, later, method::REFRESH, |_| {});
    assert_eq!(a.code, None);
    assert!(a.message().check_integrity(&alice.key()));
    let mut other = Client::new(1001, "alice");
    other.cred = alice.cred.clone();
    let a = other.ask(&mut relay, &mut ports, now, later, method::ALLOCATE, |b| {
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(a.code, Some(401));
}

#[test]
fn peer_data_too_large_for_a_data_indication_is_dropped() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    let a = alice.allocate(&mut relay, &mut ports, now);
    let relayed = a
        .message()
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CREATE_PERMISSION,
        |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer());
        },
    );
    assert!(relay.from_peer(relayed, peer(), &[0; 1000], now).is_some());
    assert_eq!(relay.from_peer(relayed, peer(), &[0; 65_500], now), None);
}

#[test]
fn the_relays_own_address_is_a_peer_on_relay_ports_only() {
    let mut relay = relay();
    let mut ports = FakePorts::default();
    let now = Instant::now();
    let mut alice = Client::new(1000, "alice");
    let mut bob = Client::new(1001, "bob");
    alice.allocate(&mut relay, &mut ports, now);
    let b = bob.allocate(&mut relay, &mut ports, now);
    let bob_relayed = b
        .message()
        .xor_address(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    // Two users of one relay: alice's peer is bob's relayed address, on this node.
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CHANNEL_BIND,
        move |b| {
            b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, bob_relayed);
        },
    );
    assert_eq!(a.code, None);
    // A permission is for an address, whatever port the request names (0 here, as
    // clients send): the node's own address may be permitted...
    let own_port_zero = SocketAddr::new(bob_relayed.ip(), 0);
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CREATE_PERMISSION,
        move |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, own_port_zero);
        },
    );
    assert_eq!(a.code, None);
    // ...but its services are not peers, even with a permission for its address.
    let service = SocketAddr::from(([203, 0, 113, 1], 5222));
    let a = alice.ask(
        &mut relay,
        &mut ports,
        now,
        UNIX,
        method::CHANNEL_BIND,
        move |b| {
            b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, service);
        },
    );
    assert_eq!(a.code, Some(403));
    let mut send = Vec::new();
    {
        let mut b = Builder::new(&mut send, method::SEND, Class::Indication, [4; 12]);
        b.xor_address(attr::XOR_PEER_ADDRESS, service)
            .attr(attr::DATA, b"GET /");
    }
    assert_eq!(
        relay.from_client(alice.tuple, &send, now, UNIX, &mut ports),
        None
    );
    assert_eq!(
        relay.stats().refusals.get(&Refusal::ForbiddenPeer),
        Some(&2)
    );
}
