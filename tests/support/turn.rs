//! A TURN client for the relay's end-to-end tests: turn-client-proto's sans-I/O client
//! (turn-client-rustls's over TLS) driven over a real socket on loopback.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use stun_proto::Instant;
use stun_proto::types::attribute::{AlternateServer, ErrorCode};
use stun_proto::types::message::Message;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;
use turn_client_rustls::TurnClientRustls;

turn_client_proto::impl_client!(
    Client,
    (Udp, TurnClientUdp),
    (Tcp, TurnClientTcp),
    (Tls, TurnClientRustls)
);

/// How the client reaches the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Udp,
    Tcp,
    Tls,
}

enum Wire {
    Udp(UdpSocket),
    Stream(TcpStream),
}

/// One TURN client with its socket.
pub struct Turn {
    client: Client,
    wire: Wire,
    local: SocketAddr,
    server: SocketAddr,
    events: VecDeque<TurnEvent>,
    data: VecDeque<(SocketAddr, Vec<u8>)>,
    /// The STUN error codes the relay answered with (read over UDP only: stream
    /// bytes are not framed here).
    pub errors: Vec<u16>,
    /// The ALTERNATE-SERVER of a 300 Try Alternate (UDP only).
    pub alternate: Option<SocketAddr>,
    closed: bool,
}

/// The clients' clock: nanoseconds since the first reading.
fn now() -> Instant {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    Instant::from_nanos(i64::try_from(base.elapsed().as_nanos()).unwrap_or(i64::MAX))
}

/// Waits this long at most for what the relay should do.
const WITHIN: Duration = Duration::from_secs(10);

impl Turn {
    /// Connects to the relay at `server` with a username and password; `tls` is the
    /// client configuration for [`Over::Tls`] (the name checked is `localhost`).
    pub async fn connect(
        over: Over,
        server: SocketAddr,
        username: &str,
        password: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Turn {
        let config = TurnConfig::new(TurnCredentials::new(username, password));
        let (wire, local, client) = match over {
            Over::Udp => {
                let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let local = socket.local_addr().unwrap();
                let client = Client::Udp(TurnClientUdp::allocate(local, server, config));
                (Wire::Udp(socket), local, client)
            }
            Over::Tcp | Over::Tls => {
                let stream = TcpStream::connect(server).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let local = stream.local_addr().unwrap();
                let client = match over {
                    Over::Tcp => Client::Tcp(TurnClientTcp::allocate(local, server, config)),
                    _ => Client::Tls(TurnClientRustls::allocate(
                        local,
                        server,
                        config,
                        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                        tls.expect("a TLS client configuration"),
                    )),
                };
                (Wire::Stream(stream), local, client)
            }
        };
        Turn {
            client,
            wire,
            local,
            server,
            events: VecDeque::new(),
            data: VecDeque::new(),
            errors: vec![],
            alternate: None,
            closed: false,
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        match &mut self.wire {
            Wire::Udp(s) => {
                s.send_to(bytes, self.server).await.unwrap();
            }
            Wire::Stream(s) => {
                if s.write_all(bytes).await.is_err() {
                    self.closed = true;
                }
            }
        }
    }

    /// Sends what the client has to send.
    async fn flush(&mut self) {
        while let Some(t) = self.client.poll_transmit(now()) {
            let bytes = t.data.to_vec();
            self.write(&bytes).await;
        }
    }

    /// One round: sends what the client has to send, then reads one packet (or
    /// waits for the client's next timer) and hands it to the client.
    async fn step(&mut self) {
        self.flush().await;
        let wait = match self.client.poll(now()) {
            TurnPollRet::WaitUntil(t) => t
                .saturating_duration_since(now())
                .clamp(Duration::from_millis(1), Duration::from_millis(100)),
            TurnPollRet::Closed => {
                self.closed = true;
                return;
            }
            _ => Duration::from_millis(10),
        };
        let mut buf = vec![0u8; 65_536];
        let read = match &mut self.wire {
            Wire::Udp(s) => tokio::time::timeout(wait, s.recv(&mut buf)).await,
            Wire::Stream(s) => tokio::time::timeout(wait, s.read(&mut buf)).await,
        };
        let transport = match self.wire {
            Wire::Udp(_) => TransportType::Udp,
            Wire::Stream(_) => TransportType::Tcp,
        };
        if let Ok(read) = read {
            match read {
                Ok(0) | Err(_) if transport == TransportType::Tcp => {
                    self.closed = true;
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    if transport == TransportType::Udp
                        && let Ok(m) = Message::from_bytes(&buf)
                        && let Ok(e) = m.attribute::<ErrorCode>()
                    {
                        self.errors.push(e.code());
                        if let Ok(a) = m.attribute::<AlternateServer>() {
                            self.alternate = Some(a.server());
                        }
                    }
                    let t = Transmit::new(&buf[..], transport, self.server, self.local);
                    if let TurnRecvRet::PeerData(d) = self.client.recv(t, now()) {
                        self.data.push_back((d.peer, d.data().to_vec()));
                    }
                }
                Err(_) => {}
            }
        }
        while let Some(d) = self.client.poll_recv(now()) {
            self.data.push_back((d.peer, d.data().to_vec()));
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push_back(e);
        }
    }

    /// Steps until `f` gives an answer; panics after [`WITHIN`].
    async fn until<T>(&mut self, what: &str, mut f: impl FnMut(&mut Turn) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            if let Some(t) = f(self) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: nothing within {WITHIN:?}"
            );
            self.step().await;
        }
    }

    /// Allocates a relayed UDP address; none when the relay refuses (see
    /// [`Turn::errors`]).
    pub async fn allocate(&mut self) -> Option<SocketAddr> {
        self.until("an allocation", |t| {
            let found = t.events.iter().find_map(|e| match e {
                TurnEvent::AllocationCreated(_, relayed) => Some(Some(*relayed)),
                TurnEvent::AllocationCreateFailed(_) => Some(None),
                _ => None,
            });
            found.or_else(|| t.closed.then_some(None))
        })
        .await
    }

    /// Asks for an allocation the relay should refuse; the error code of its answer to
    /// the authenticated request (the first answer is the 401 challenge). UDP only.
    pub async fn allocation_refused(&mut self) -> u16 {
        self.until("a refused allocation", |t| {
            if let Some(TurnEvent::AllocationCreated(_, a)) = t.events.front() {
                panic!("allocated {a}");
            }
            (t.errors.len() >= 2).then(|| t.errors[1])
        })
        .await
    }

    /// Installs a permission for `peer`; whether the relay granted it.
    pub async fn permit(&mut self, peer: IpAddr) -> bool {
        self.events.clear();
        self.client
            .create_permission(TransportType::Udp, peer, now())
            .unwrap();
        self.until("a permission", |t| {
            t.events.iter().find_map(|e| match e {
                TurnEvent::PermissionCreated(_, ip) if *ip == peer => Some(true),
                TurnEvent::PermissionCreateFailed(_, ip) if *ip == peer => Some(false),
                _ => None,
            })
        })
        .await
    }

    /// Binds a channel to `peer` (data then goes as ChannelData).
    pub async fn bind_channel(&mut self, peer: SocketAddr) {
        self.events.clear();
        self.client
            .bind_channel(TransportType::Udp, peer, now())
            .unwrap();
        self.until("a channel", |t| {
            t.events.iter().find_map(|e| match e {
                TurnEvent::ChannelCreated(_, p) if *p == peer => Some(()),
                TurnEvent::ChannelCreateFailed(_, p) if *p == peer => {
                    panic!("the relay refused a channel to {peer}")
                }
                _ => None,
            })
        })
        .await
    }

    /// Sends `data` to `peer` through the relay.
    pub async fn send(&mut self, peer: SocketAddr, data: &[u8]) {
        let transmit = self
            .client
            .send_to(TransportType::Udp, peer, data.to_vec(), now())
            .unwrap()
            .expect("something to send");
        let bytes = transmit.build().data;
        self.write(&bytes).await;
    }

    /// The next packet from a peer, with the peer's address.
    pub async fn recv(&mut self) -> (SocketAddr, Vec<u8>) {
        self.until("data from a peer", |t| t.data.pop_front()).await
    }

    /// Ends the allocation (a Refresh with lifetime 0) and waits for the answer.
    pub async fn delete(&mut self) {
        self.client.delete(now()).unwrap();
        self.flush().await;
        let deadline = tokio::time::Instant::now() + WITHIN;
        while !self.closed && tokio::time::Instant::now() < deadline {
            self.step().await;
        }
    }
}

/// A TLS client configuration that trusts `cert` only.
pub fn tls_trusting(cert: rustls_pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
