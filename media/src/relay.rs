//! The relay's sockets around [`core::Relay`](crate::core::Relay): the listening UDP
//! socket and TCP listener (3478 by default), one UDP socket per allocation in the
//! relay port range, and a timer for expiry. One lock holds the protocol state; a
//! packet is handled and sent under it without waiting (a UDP send that would block
//! drops the packet, as the network would; a stream client's queue that is full
//! drops it too), so no task ever waits on another while holding it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::{Family, FiveTuple, NoPort, Ports, Relay, Send, Stats, Transport, Want};
use crate::stun;

/// How often expired allocations, permissions and channels are dropped.
const EXPIRY_TICK: Duration = Duration::from_secs(5);
/// Frames queued for one stream client, at most (beyond, relayed data is dropped).
const STREAM_QUEUE: usize = 256;
/// Tries at finding a free port in the range before answering 508.
const BIND_TRIES: usize = 32;
/// A stream client that sends nothing for this long is closed (its allocation, if
/// any, was refreshed within this time by a client that is alive: RFC 8656 §3.1
/// lifetimes are at most an hour).
const STREAM_IDLE: Duration = Duration::from_secs(3600);

/// Where the relay listens and relays from.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The STUN/TURN port, UDP and TCP (3478).
    pub listen: SocketAddr,
    /// The address relayed sockets bind to.
    pub relay_ip: IpAddr,
    /// The address given to clients for relayed sockets, when the node is behind NAT
    /// (else `relay_ip`).
    pub external_ip: Option<IpAddr>,
    /// The relayed ports (RFC 8656 §7.2 suggests 49152–65535).
    pub ports: RangeInclusive<u16>,
    /// The DSCP class of relayed packets (EF, 46, by default), in the IP header's
    /// traffic class.
    pub dscp: u8,
}

/// One allocation's socket.
struct Relayed {
    socket: Arc<UdpSocket>,
    reader: AbortHandle,
}

struct State {
    relay: Relay,
    /// By the relayed address clients are given.
    relayed: HashMap<SocketAddr, Relayed>,
    /// Stream clients' queues.
    streams: HashMap<FiveTuple, mpsc::Sender<Vec<u8>>>,
}

struct Shared {
    state: Mutex<State>,
    config: RelayConfig,
    /// The listening UDP socket: answers and relayed data to UDP clients leave by it.
    udp: Arc<UdpSocket>,
    shutdown: CancellationToken,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A running relay.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("udp", &self.udp_addr)
            .field("tcp", &self.tcp_addr)
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// Binds the relay's UDP socket and TCP listener and starts serving.
    pub async fn start(
        config: RelayConfig,
        relay: Relay,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> io::Result<RelayHandle> {
        let udp = UdpSocket::bind(config.listen).await?;
        set_dscp(&udp, config.dscp);
        let udp_addr = udp.local_addr()?;
        // TCP on the same port as UDP (the port UDP got, when it was 0).
        let tcp = TcpListener::bind(udp_addr).await?;
        let tcp_addr = tcp.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                relay,
                relayed: HashMap::new(),
                streams: HashMap::new(),
            }),
            config,
            udp: Arc::new(udp),
            shutdown: shutdown.clone(),
        });
        tasks.spawn(serve_udp(shared.clone()));
        tasks.spawn(serve_tcp(shared.clone(), tcp, tasks.clone()));
        tasks.spawn(expiry(shared.clone()));
        Ok(RelayHandle {
            shared,
            udp_addr,
            tcp_addr,
        })
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// The allocations now, and what the relay counted.
    pub fn stats(&self) -> (usize, Stats) {
        let state = lock(&self.shared.state);
        (state.relay.allocations(), state.relay.stats().clone())
    }

    pub fn set_secrets(&self, secrets: Vec<Vec<u8>>) {
        lock(&self.shared.state).relay.set_secrets(secrets);
    }

    pub fn set_alternate(&self, alternate: Option<SocketAddr>) {
        lock(&self.shared.state).relay.set_alternate(alternate);
    }
}

/// The relay's ports, seen from inside the lock.
struct PortsIo<'a> {
    shared: &'a Arc<Shared>,
    relayed: &'a mut HashMap<SocketAddr, Relayed>,
}

impl Ports for PortsIo<'_> {
    fn bind(
        &mut self,
        family: Family,
        want: Want,
    ) -> Result<(SocketAddr, Option<SocketAddr>), NoPort> {
        let config = &self.shared.config;
        let ip = config.relay_ip;
        if (family == Family::V4) != ip.is_ipv4() {
            return Err(NoPort::Family);
        }
        let (lo, hi) = (*config.ports.start(), *config.ports.end());
        for _ in 0..BIND_TRIES {
            let mut port = rand::Rng::gen_range(&mut rand::thread_rng(), lo..=hi);
            if want != Want::Any && port % 2 == 1 {
                port = if port > lo { port - 1 } else { port + 1 };
            }
            let Some(first) = self.bind_one(ip, port) else {
                continue;
            };
            if want != Want::EvenAndNext {
                return Ok((first, None));
            }
            match port
                .checked_add(1)
                .filter(|p| *p <= hi)
                .and_then(|p| self.bind_one(ip, p))
            {
                Some(next) => return Ok((first, Some(next))),
                None => self.release(first),
            }
        }
        tracing::warn!("no free relay port after {BIND_TRIES} tries");
        Err(NoPort::Exhausted)
    }

    fn release(&mut self, relayed: SocketAddr) {
        if let Some(r) = self.relayed.remove(&relayed) {
            r.reader.abort();
        }
    }
}

impl PortsIo<'_> {
    /// Binds one relayed port and starts reading from its peers; the address clients
    /// are given for it.
    fn bind_one(&mut self, ip: IpAddr, port: u16) -> Option<SocketAddr> {
        let config = &self.shared.config;
        let std_socket = std::net::UdpSocket::bind((ip, port)).ok()?;
        std_socket.set_nonblocking(true).ok()?;
        let socket = UdpSocket::from_std(std_socket).ok()?;
        set_dscp(&socket, config.dscp);
        let advertised = SocketAddr::new(config.external_ip.unwrap_or(ip), port);
        let socket = Arc::new(socket);
        let reader = tokio::spawn(read_peers(self.shared.clone(), socket.clone(), advertised))
            .abort_handle();
        self.relayed.insert(advertised, Relayed { socket, reader });
        Some(advertised)
    }
}

/// Sends what the core said to send, without waiting.
fn deliver(
    send: Send<'_>,
    udp: &UdpSocket,
    relayed: &HashMap<SocketAddr, Relayed>,
    streams: &HashMap<FiveTuple, mpsc::Sender<Vec<u8>>>,
) {
    match send {
        Send::Client { tuple, bytes } => match tuple.transport {
            Transport::Udp => {
                let _ = udp.try_send_to(bytes, tuple.client);
            }
            Transport::Tcp | Transport::Tls => {
                if let Some(q) = streams.get(&tuple) {
                    let _ = q.try_send(bytes.to_vec());
                }
            }
        },
        Send::Peer {
            relayed: from,
            peer,
            bytes,
        } => {
            if let Some(r) = relayed.get(&from) {
                let _ = r.socket.try_send_to(bytes, peer);
            }
        }
    }
}

/// Handles one packet from a client under the lock.
fn from_client(shared: &Arc<Shared>, tuple: FiveTuple, packet: &[u8]) {
    let mut guard = lock(&shared.state);
    let State {
        relay,
        relayed,
        streams,
    } = &mut *guard;
    let mut ports = PortsIo { shared, relayed };
    let send = relay.from_client(tuple, packet, Instant::now(), unix_now(), &mut ports);
    if let Some(send) = send {
        deliver(send, &shared.udp, ports.relayed, streams);
    }
}

async fn serve_udp(shared: Arc<Shared>) {
    let mut buf = vec![0u8; stun::MAX_MESSAGE];
    let server = shared.udp.local_addr().ok();
    loop {
        let received = tokio::select! {
            r = shared.udp.recv_from(&mut buf) => r,
            () = shared.shutdown.cancelled() => return,
        };
        let (n, client) = match received {
            Ok(r) => r,
            // An ICMP error from an earlier send surfaces here on some systems.
            Err(_) => continue,
        };
        let Some(server) = server else { return };
        let tuple = FiveTuple {
            client,
            server,
            transport: Transport::Udp,
        };
        from_client(&shared, tuple, &buf[..n]);
    }
}

async fn read_peers(shared: Arc<Shared>, socket: Arc<UdpSocket>, advertised: SocketAddr) {
    let mut buf = vec![0u8; stun::MAX_MESSAGE];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => continue,
        };
        let mut guard = lock(&shared.state);
        let State {
            relay,
            relayed,
            streams,
        } = &mut *guard;
        if let Some(send) = relay.from_peer(advertised, peer, &buf[..n], Instant::now()) {
            deliver(send, &shared.udp, relayed, streams);
        }
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener, tasks: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shared.shutdown.cancelled() => return,
        };
        let Ok((stream, client)) = accepted else {
            continue;
        };
        let Ok(server) = stream.local_addr() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let tuple = FiveTuple {
            client,
            server,
            transport: Transport::Tcp,
        };
        tasks.spawn(serve_stream(shared.clone(), stream, tuple));
    }
}

/// One stream client: frames in, answers and relayed data out, its allocation gone
/// when it closes.
async fn serve_stream(shared: Arc<Shared>, stream: TcpStream, tuple: FiveTuple) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
    lock(&shared.state).streams.insert(tuple, tx);
    let (mut read, mut write) = stream.into_split();
    let writer = async move {
        while let Some(frame) = rx.recv().await {
            if write.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    let reader = async {
        let mut buf = vec![0u8; stun::MAX_MESSAGE + 4];
        loop {
            let mut head = [0u8; 4];
            match tokio::time::timeout(STREAM_IDLE, read.read_exact(&mut head)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Some(len) = stun::frame_len(head) else {
                return;
            };
            buf[..4].copy_from_slice(&head);
            if read.read_exact(&mut buf[4..len]).await.is_err() {
                return;
            }
            from_client(&shared, tuple, &buf[..len]);
        }
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
        () = shared.shutdown.cancelled() => {}
    }
    let mut guard = lock(&shared.state);
    let State {
        relay,
        relayed,
        streams,
    } = &mut *guard;
    streams.remove(&tuple);
    let mut ports = PortsIo {
        shared: &shared,
        relayed,
    };
    relay.closed(tuple, &mut ports);
}

async fn expiry(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.cancelled() => break,
        }
        let mut guard = lock(&shared.state);
        let State { relay, relayed, .. } = &mut *guard;
        let mut ports = PortsIo {
            shared: &shared,
            relayed,
        };
        relay.expire(Instant::now(), &mut ports);
    }
    // Shutting down: every relayed socket closes.
    let mut guard = lock(&shared.state);
    for (_, r) in guard.relayed.drain() {
        r.reader.abort();
    }
}

/// Marks a socket's packets with a DSCP class (the top six bits of the IPv4 TOS or
/// IPv6 traffic class byte). A system that refuses it leaves them unmarked.
fn set_dscp(socket: &UdpSocket, dscp: u8) {
    let sock = socket2::SockRef::from(socket);
    let tos = u32::from(dscp) << 2;
    let result = match socket.local_addr() {
        Ok(SocketAddr::V6(_)) => sock.set_tclass_v6(tos),
        _ => sock.set_tos_v4(tos),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot set the DSCP class of a relay socket");
    }
}
