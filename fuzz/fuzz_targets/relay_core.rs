//! The relay's protocol logic (media/src/core.rs) driven by a sequence of arbitrary
//! operations: raw packets from clients, requests with attributes of the fuzzer's
//! choosing signed with valid credentials (so that the fuzzer gets past
//! authentication), packets from peers, time passing and connections closing. Nothing
//! may panic, what the relay answers must parse, and nothing may go to a peer the
//! policy forbids (the node's own services above all: its address is a peer on the
//! relay ports only).

#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use arbitrary::Arbitrary;
use impmesh_media::auth;
use impmesh_media::core::{Config, Family, FiveTuple, NoPort, Ports, Relay, Send, Transport, Want};
use impmesh_media::policy::PeerPolicy;
use impmesh_media::stun::{self, Builder, Class, Message, attr};
use libfuzzer_sys::fuzz_target;
use tokio::time::Instant;

const REALM: &str = "example.com";
const SECRET: &[u8] = b"fuzz secret";
const UNIX: u64 = 1_800_000_000;

#[derive(Debug, Arbitrary)]
enum Op {
    /// Bytes from client `client`.
    Raw { client: u8, bytes: Vec<u8> },
    /// A request from client `client` with these attributes, then credentials.
    Request {
        client: u8,
        method: u16,
        attributes: Vec<(u16, Vec<u8>)>,
    },
    /// A ChannelData frame from a client.
    Channel {
        client: u8,
        channel: u16,
        data: Vec<u8>,
    },
    /// A datagram from a peer to relayed port `port` (of those handed out).
    Peer { port: u8, peer: u8, bytes: Vec<u8> },
    /// Seconds pass; expiry runs.
    Wait { secs: u16 },
    /// A stream client's connection closes.
    Close { client: u8 },
}

#[derive(Default)]
struct FakePorts {
    next: u16,
    bound: Vec<SocketAddr>,
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
        if self.next > 1000 {
            return Err(NoPort::Exhausted);
        }
        self.next += if want == Want::Any { 1 } else { 2 };
        let addr = |n: u16| SocketAddr::from(([203, 0, 113, 1], 50_000 + n));
        let first = addr(self.next);
        self.bound.push(first);
        if want == Want::EvenAndNext {
            return Ok((first, Some(addr(self.next + 1))));
        }
        Ok((first, None))
    }

    fn release(&mut self, relayed: SocketAddr) {
        self.bound.retain(|b| *b != relayed);
    }
}

fn tuple(client: u8) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::from(([198, 51, 100, 5], 1000 + u16::from(client % 8))),
        server: SocketAddr::from(([203, 0, 113, 1], 3478)),
        transport: if client % 2 == 0 {
            Transport::Udp
        } else {
            Transport::Tcp
        },
    }
}

/// The relay's peer policy: the fuzzer's peers in 192.0.2.0/24, the node's own
/// address a peer on its relay ports only.
fn policy() -> PeerPolicy {
    PeerPolicy {
        allow: vec!["192.0.2.0/24".parse().expect("a block")],
        own: vec![OWN.into()],
        relay_ports: Some(50_000..=51_100),
    }
}

const OWN: [u8; 4] = [203, 0, 113, 1];

/// Checks what the relay sends: answers to clients parse (or are ChannelData), and
/// data goes only to peers the policy allows.
fn check(send: Option<Send<'_>>, nonce: &mut Option<String>, policy: &PeerPolicy) {
    if let Some(Send::Peer { peer, .. }) = &send {
        assert!(
            policy.allows_addr(*peer),
            "relayed to a forbidden peer {peer}"
        );
    }
    if let Some(Send::Client { bytes, .. }) = send {
        if stun::channel_data(bytes).is_some() {
            return;
        }
        let m = Message::parse(bytes).expect("the relay's answer parses");
        if let Ok(Some(n)) = m.text(attr::NONCE) {
            *nonce = Some(n.to_owned());
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut relay = Relay::new(
        Config {
            realm: REALM.into(),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            user_quota: 3,
            max_allocations: 6,
            redirect_above: 5,
            bandwidth: 10_000,
            policy: policy(),
        },
        vec![SECRET.to_vec()],
    );
    relay.set_alternate(Some(SocketAddr::from(([203, 0, 113, 2], 3478))));
    let mut ports = FakePorts::default();
    let start = Instant::now();
    let mut now = start;
    let credential = auth::mint(SECRET, "alice", UNIX, 3600);
    let key = stun::long_term_key(&credential.username, REALM, &credential.password);
    let mut nonce: Option<String> = None;
    let mut tx = 0u8;
    let policy = policy();
    let mut out = Vec::new();
    for op in ops.into_iter().take(64) {
        let unix = UNIX + now.duration_since(start).as_secs();
        match op {
            Op::Raw { client, bytes } => {
                let send = relay.from_client(tuple(client), &bytes, now, unix, &mut ports);
                check(send, &mut nonce, &policy);
            }
            Op::Request {
                client,
                method,
                attributes,
            } => {
                tx = tx.wrapping_add(1);
                out.clear();
                {
                    let mut b = Builder::new(&mut out, method & 0x0FFF, Class::Request, [tx; 12]);
                    for (ty, value) in attributes.iter().take(8) {
                        b.attr(*ty, &value[..value.len().min(300)]);
                    }
                    if let Some(n) = &nonce {
                        b.attr(attr::USERNAME, credential.username.as_bytes())
                            .attr(attr::REALM, REALM.as_bytes())
                            .attr(attr::NONCE, n.as_bytes())
                            .integrity(&key);
                    }
                }
                let send = relay.from_client(tuple(client), &out, now, unix, &mut ports);
                check(send, &mut nonce, &policy);
            }
            Op::Channel {
                client,
                channel,
                data,
            } => {
                stun::write_channel_data(&mut out, channel, &data, client % 2 == 1);
                let send = relay.from_client(tuple(client), &out, now, unix, &mut ports);
                check(send, &mut nonce, &policy);
            }
            Op::Peer { port, peer, bytes } => {
                if let Some(relayed) = ports
                    .bound
                    .get(usize::from(port) % ports.bound.len().max(1))
                {
                    let from = SocketAddr::from(([192, 0, 2, peer], 40_000));
                    let send = relay.from_peer(*relayed, from, &bytes, now);
                    check(send, &mut nonce, &policy);
                }
            }
            Op::Wait { secs } => {
                now += Duration::from_secs(u64::from(secs));
                relay.expire(now, &mut ports);
            }
            Op::Close { client } => relay.closed(tuple(client), &mut ports),
        }
        assert!(relay.allocations() <= 6, "the capacity holds");
    }
});
