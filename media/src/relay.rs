//! The relay's sockets around [`core::Relay`](crate::core::Relay): the listening UDP
//! socket and TCP listener (3478 by default), the TLS listener (5349, RFC 8656 §3.1),
//! one UDP socket per allocation in the relay port range, and a timer for expiry. One lock holds the protocol state; a
//! packet is handled and sent under it without waiting (a UDP send that would block
//! drops the packet, as the network would; a stream client's queue that is full
//! drops it too), so no task ever waits on another while holding it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::{Family, FiveTuple, NoPort, Ports, Relay, Send, Stats, Transport, Want};
use crate::stun;

/// How often expired allocations, permissions and channels are dropped.
const EXPIRY_TICK: Duration = Duration::from_secs(5);
/// Frames, and bytes, queued for one stream client at most (beyond, relayed data is
/// dropped, as a congested network would).
const STREAM_QUEUE: usize = 256;
const STREAM_QUEUE_BYTES: usize = 256 * 1024;
/// Stream connections at most, and from one address (IPv6: one /64).
const MAX_STREAMS: usize = 4096;
const STREAMS_PER_ADDRESS: u32 = 16;
/// How long the TCP listener waits after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A TLS client must finish its handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A frame's body must follow its header within this.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream client without an allocation that sends nothing for this long is closed.
const UNALLOCATED_IDLE: Duration = Duration::from_secs(60);
/// The listening UDP socket's buffers, each way (the kernel caps them at
/// net.core.rmem_max and wmem_max): bursts from many clients queue here rather than
/// drop while the relay is busy, as coturn's do.
const LISTEN_BUFFER: usize = 4 << 20;
/// Tries at finding a free port in the range before answering 508.
const BIND_TRIES: usize = 32;
/// A stream client that sends nothing for this long is closed (its allocation, if
/// any, was refreshed within this time by a client that is alive: RFC 8656 §3.1
/// lifetimes are at most an hour).
const STREAM_IDLE: Duration = Duration::from_secs(3600);

/// The TLS configuration a TURNS handshake uses, asked for at each handshake (so a
/// certificate reload reaches the relay at once).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + std::marker::Send + Sync>;

/// Where the relay listens and relays from.
#[derive(Clone)]
pub struct RelayConfig {
    /// The STUN/TURN port, UDP and TCP (3478).
    pub listen: SocketAddr,
    /// STUN/TURN over TLS (5349) and its certificate; none: no TLS listener.
    pub tls: Option<(SocketAddr, TlsSource)>,
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

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("listen", &self.listen)
            .field("tls", &self.tls.as_ref().map(|(a, _)| a))
            .field("relay_ip", &self.relay_ip)
            .field("external_ip", &self.external_ip)
            .field("ports", &self.ports)
            .field("dscp", &self.dscp)
            .finish()
    }
}

/// A UDP socket registered for reading only. Sends go straight to the socket and
/// never wait (a full buffer drops the packet, as the network would), so the
/// kernel's "writable again" after each send wakes nothing: with tokio's UdpSocket,
/// registered both ways, every packet relayed cost an epoll event.
struct Udp(AsyncFd<std::net::UdpSocket>);

impl Udp {
    fn new(socket: std::net::UdpSocket) -> io::Result<Udp> {
        socket.set_nonblocking(true)?;
        // The safe constructor tokio deprecated (its replacement is `unsafe`, and this
        // crate forbids unsafe code): its condition, an fd that stays open and the
        // same while registered, holds for a std socket, which owns its fd.
        #[allow(deprecated)]
        let registered = AsyncFd::with_interest(socket, Interest::READABLE)?;
        Ok(Udp(registered))
    }

    fn socket(&self) -> &std::net::UdpSocket {
        self.0.get_ref()
    }

    fn try_send_to(&self, bytes: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.socket().send_to(bytes, to)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            if let Ok(result) = ready.try_io(|s| s.get_ref().recv_from(buf)) {
                return result;
            }
        }
    }
}

/// One allocation's socket.
struct Relayed {
    socket: Arc<Udp>,
    reader: AbortHandle,
}

struct State {
    relay: Relay,
    /// By the relayed address clients are given.
    relayed: HashMap<SocketAddr, Relayed>,
    /// Stream clients' queues.
    streams: HashMap<FiveTuple, StreamQueue>,
}

/// A stream client's queue, bounded in frames (the channel) and in bytes.
struct StreamQueue {
    frames: mpsc::Sender<Vec<u8>>,
    bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl StreamQueue {
    fn push(&self, frame: &[u8]) {
        use std::sync::atomic::Ordering;
        let queued = self.bytes.load(Ordering::Relaxed);
        if queued + frame.len() > STREAM_QUEUE_BYTES {
            return;
        }
        if self.frames.try_send(frame.to_vec()).is_ok() {
            self.bytes.fetch_add(frame.len(), Ordering::Relaxed);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    config: RelayConfig,
    /// The listening UDP socket: answers and relayed data to UDP clients leave by it.
    udp: Arc<Udp>,
    shutdown: CancellationToken,
    /// The media plane's runtime, on a thread of its own: the UDP sockets (listening
    /// and relayed) are registered with it and read by its tasks, so that signalling
    /// load on the node's runtime never delays a relayed packet (coturn's relay
    /// threads likewise do nothing else). Stream clients stay on the node's runtime.
    media: tokio::runtime::Handle,
    /// Stream connections: in all, and per address.
    streams: Arc<tokio::sync::Semaphore>,
    per_address: Arc<impmesh_limits::PerAddress>,
    /// Allocations refused because no relayed port could be bound.
    port_failures: std::sync::atomic::AtomicU64,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the protocol state under the lock, with the relay's ports and the
/// stream clients' queues beside it.
fn locked<R>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&mut Relay, &mut PortsIo<'_>, &HashMap<FiveTuple, StreamQueue>) -> R,
) -> R {
    let mut guard = lock(&shared.state);
    let State {
        relay,
        relayed,
        streams,
    } = &mut *guard;
    let mut ports = PortsIo { shared, relayed };
    f(relay, &mut ports, streams)
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
    tls_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("udp", &self.udp_addr)
            .field("tcp", &self.tcp_addr)
            .field("tls", &self.tls_addr)
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// Binds the relay's UDP socket and TCP listener (and its TLS listener, when one is
    /// configured) and starts serving.
    pub async fn start(
        config: RelayConfig,
        relay: Relay,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> io::Result<RelayHandle> {
        // Every port first: one that is taken fails the start with nothing to undo.
        let (udp, tcp) = bind_pair(config.listen).await?;
        let tls = match &config.tls {
            Some((listen, source)) => Some((TcpListener::bind(listen).await?, source.clone())),
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let media_handle = runtime.handle().clone();
        let media = MediaRuntime(Some(runtime));
        // The relay stops with the node, and also when the caller's runtime goes
        // without a shutdown (a node dropped, a test ending): the media thread must
        // not outlive it holding the node's ports and, through the TLS source, its
        // store.
        let shutdown = shutdown.child_token();
        let udp = {
            let _media = media_handle.enter();
            Udp::new(udp)?
        };
        set_dscp(&udp, config.dscp);
        // Media to stream clients too (accepted connections inherit the class).
        for listener in std::iter::once(&tcp).chain(tls.as_ref().map(|(l, _)| l)) {
            if let Err(e) = impmesh_limits::set_dscp(listener, config.dscp) {
                tracing::debug!(error = %e, "cannot set the DSCP class of a relay's stream listener");
            }
        }
        let udp_addr = udp.socket().local_addr()?;
        let tcp_addr = tcp.local_addr()?;
        let tls_addr = match &tls {
            Some((l, _)) => Some(l.local_addr()?),
            None => None,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                relay,
                relayed: HashMap::new(),
                streams: HashMap::new(),
            }),
            config,
            udp: Arc::new(udp),
            shutdown: shutdown.clone(),
            media: media_handle,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            per_address: impmesh_limits::PerAddress::new(STREAMS_PER_ADDRESS),
            port_failures: std::sync::atomic::AtomicU64::new(0),
        });
        // The media thread: UDP and expiry until shutdown; its runtime's remaining
        // tasks (the relayed sockets' readers) end with it. The node's shutdown waits
        // for it through `tasks`.
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let on_thread = shared.clone();
        std::thread::Builder::new()
            .name("impmesh-relay".into())
            .spawn(move || {
                let mut media = media;
                if let Some(runtime) = media.0.take() {
                    runtime.block_on(async {
                        let expiry = tokio::spawn(expiry(on_thread.clone()));
                        serve_udp(on_thread).await;
                        let _ = expiry.await;
                    });
                }
                let _ = done.send(());
            })?;
        let stop = shutdown.clone().drop_guard();
        tasks.spawn(async move {
            let _stop_when_dropped = stop;
            let _ = finished.await;
        });
        tasks.spawn(serve_streams(shared.clone(), tcp, None, tasks.clone()));
        if let Some((listener, source)) = tls {
            tasks.spawn(serve_streams(
                shared.clone(),
                listener,
                Some(source),
                tasks.clone(),
            ));
        }
        Ok(RelayHandle {
            shared,
            udp_addr,
            tcp_addr,
            tls_addr,
        })
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// The TLS listener's address, when there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The allocations now, and what the relay counted.
    pub fn stats(&self) -> (usize, Stats) {
        let state = lock(&self.shared.state);
        (state.relay.allocations(), state.relay.stats().clone())
    }

    /// The allocations and held ports, as they count against the capacity.
    pub fn load(&self) -> usize {
        lock(&self.shared.state).relay.load()
    }

    /// Allocations refused so far because no relayed port could be bound (the range
    /// used up, or the system refusing).
    pub fn port_failures(&self) -> u64 {
        self.shared
            .port_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The relay's figures in Prometheus' text format, for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let (allocations, stats) = self.stats();
        let mut metric = |name: &str, kind: &str, help: &str| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        };
        metric(
            "impmesh_relay_allocations",
            "gauge",
            "TURN allocations now.",
        );
        metric(
            "impmesh_relay_allocations_created_total",
            "counter",
            "TURN allocations made.",
        );
        metric(
            "impmesh_relay_redirects_total",
            "counter",
            "Allocations sent to another relay of the cluster (300 Try Alternate).",
        );
        metric(
            "impmesh_relay_packets_total",
            "counter",
            "Packets relayed, by direction.",
        );
        metric(
            "impmesh_relay_bytes_total",
            "counter",
            "Bytes relayed, by direction.",
        );
        metric(
            "impmesh_relay_port_failures_total",
            "counter",
            "Allocations refused because no relayed port could be bound.",
        );
        metric(
            "impmesh_relay_refusals_total",
            "counter",
            "Requests refused and packets dropped by the relay, by reason.",
        );
        let _ = writeln!(out, "impmesh_relay_allocations {allocations}");
        let _ = writeln!(
            out,
            "impmesh_relay_allocations_created_total {}",
            stats.allocations_created
        );
        let _ = writeln!(out, "impmesh_relay_redirects_total {}", stats.redirects);
        let _ = writeln!(
            out,
            "impmesh_relay_port_failures_total {}",
            self.port_failures()
        );
        for (direction, packets, bytes) in [
            ("to_peer", stats.packets_to_peers, stats.bytes_to_peers),
            (
                "to_client",
                stats.packets_to_clients,
                stats.bytes_to_clients,
            ),
        ] {
            let _ = writeln!(
                out,
                "impmesh_relay_packets_total{{direction=\"{direction}\"}} {packets}"
            );
            let _ = writeln!(
                out,
                "impmesh_relay_bytes_total{{direction=\"{direction}\"}} {bytes}"
            );
        }
        for reason in crate::core::Refusal::ALL {
            let n = stats.refusals.get(&reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "impmesh_relay_refusals_total{{reason=\"{}\"}} {n}",
                reason.as_str()
            );
        }
    }

    pub fn set_secrets(&self, secrets: Vec<Vec<u8>>) {
        lock(&self.shared.state).relay.set_secrets(secrets);
    }

    pub fn set_alternate(&self, alternate: Option<SocketAddr>) {
        lock(&self.shared.state).relay.set_alternate(alternate);
    }
}

/// The media thread's runtime until the thread takes it. Dropped before (a start that
/// fails halfway), it shuts down in the background: a runtime may not be dropped,
/// waiting, inside another one's task.
struct MediaRuntime(Option<tokio::runtime::Runtime>);

impl Drop for MediaRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The UDP socket and TCP listener on one port. With port 0, UDP picks the port and
/// TCP takes the same one; should another process hold that TCP port, another pick
/// is tried.
async fn bind_pair(listen: SocketAddr) -> io::Result<(std::net::UdpSocket, TcpListener)> {
    const TRIES: usize = 16;
    let mut last = None;
    for _ in 0..TRIES {
        let udp = std::net::UdpSocket::bind(listen)?;
        let buffers = socket2::SockRef::from(&udp);
        let _ = buffers.set_recv_buffer_size(LISTEN_BUFFER);
        let _ = buffers.set_send_buffer_size(LISTEN_BUFFER);
        let at = udp.local_addr()?;
        match TcpListener::bind(at).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if listen.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
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
        self.shared
            .port_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        let socket = {
            // Registered with the media thread's runtime, whichever runtime asks.
            let _media = self.shared.media.enter();
            Udp::new(std::net::UdpSocket::bind((ip, port)).ok()?).ok()?
        };
        set_dscp(&socket, config.dscp);
        let advertised = SocketAddr::new(config.external_ip.unwrap_or(ip), port);
        let socket = Arc::new(socket);
        let reader = self
            .shared
            .media
            .spawn(read_peers(self.shared.clone(), socket.clone(), advertised))
            .abort_handle();
        self.relayed.insert(advertised, Relayed { socket, reader });
        Some(advertised)
    }
}

/// Sends what the core said to send, without waiting.
fn deliver(
    send: Send<'_>,
    udp: &Udp,
    relayed: &HashMap<SocketAddr, Relayed>,
    streams: &HashMap<FiveTuple, StreamQueue>,
) {
    match send {
        Send::Client { tuple, bytes } => match tuple.transport {
            Transport::Udp => {
                let _ = udp.try_send_to(bytes, tuple.client);
            }
            Transport::Tcp | Transport::Tls => {
                if let Some(q) = streams.get(&tuple) {
                    q.push(bytes);
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
    locked(shared, |relay, ports, streams| {
        if let Some(send) = relay.from_client(tuple, packet, Instant::now(), unix_now(), ports) {
            deliver(send, &shared.udp, ports.relayed, streams);
        }
    });
}

async fn serve_udp(shared: Arc<Shared>) {
    let mut buf = vec![0u8; stun::MAX_MESSAGE];
    let server = shared.udp.socket().local_addr().ok();
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

async fn read_peers(shared: Arc<Shared>, socket: Arc<Udp>, advertised: SocketAddr) {
    let mut buf = vec![0u8; stun::MAX_MESSAGE];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => continue,
        };
        locked(&shared, |relay, ports, streams| {
            if let Some(send) = relay.from_peer(advertised, peer, &buf[..n], Instant::now()) {
                deliver(send, &shared.udp, ports.relayed, streams);
            }
        });
    }
}

/// Accepts stream clients on `listener`: TCP, or TLS when `tls` gives the
/// configuration.
async fn serve_streams(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<TlsSource>,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shared.shutdown.cancelled() => return,
        };
        let Ok((stream, client)) = accepted else {
            // Out of file descriptors, most likely: wait rather than spin.
            tokio::select! {
                () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                () = shared.shutdown.cancelled() => return,
            }
            continue;
        };
        // Refused before any work: over the relay's or the address's share.
        let Ok(permit) = shared.streams.clone().try_acquire_owned() else {
            continue;
        };
        let Some(slot) = shared.per_address.acquire(client.ip()) else {
            continue;
        };
        let Ok(server) = stream.local_addr() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let permits = (permit, slot);
        let Some(tls) = &tls else {
            let tuple = FiveTuple {
                client,
                server,
                transport: Transport::Tcp,
            };
            tasks.spawn(serve_stream(shared.clone(), stream, tuple, permits));
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls());
        let shared = shared.clone();
        tasks.spawn(async move {
            let handshake = tokio::select! {
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => r,
                () = shared.shutdown.cancelled() => return,
            };
            let Ok(Ok(stream)) = handshake else {
                return;
            };
            let tuple = FiveTuple {
                client,
                server,
                transport: Transport::Tls,
            };
            serve_stream(shared, stream, tuple, permits).await;
        });
    }
}

/// One stream client: frames in, answers and relayed data out, its allocation gone
/// when it closes (also should its task end by a panic: the guard cleans up).
async fn serve_stream<S, P>(shared: Arc<Shared>, stream: S, tuple: FiveTuple, _permits: P)
where
    S: AsyncRead + AsyncWrite + std::marker::Send + 'static,
    P: std::marker::Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
    let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    lock(&shared.state).streams.insert(
        tuple,
        StreamQueue {
            frames: tx,
            bytes: bytes.clone(),
        },
    );
    let _guard = StreamGuard {
        shared: shared.clone(),
        tuple,
    };
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = async move {
        while let Some(frame) = rx.recv().await {
            if write.write_all(&frame).await.is_err() {
                return;
            }
            // TLS holds what it wrote until flushed.
            if rx.is_empty() && write.flush().await.is_err() {
                return;
            }
            bytes.fetch_sub(frame.len(), std::sync::atomic::Ordering::Relaxed);
        }
    };
    let reader = async {
        let mut buf = vec![0u8; stun::MAX_FRAME];
        loop {
            let idle = if lock(&shared.state).relay.has_allocation(tuple) {
                STREAM_IDLE
            } else {
                UNALLOCATED_IDLE
            };
            let mut head = [0u8; 4];
            match tokio::time::timeout(idle, read.read_exact(&mut head)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Some(len) = stun::frame_len(head).filter(|l| *l <= buf.len()) else {
                return;
            };
            buf[..4].copy_from_slice(&head);
            match tokio::time::timeout(FRAME_TIMEOUT, read.read_exact(&mut buf[4..len])).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            from_client(&shared, tuple, &buf[..len]);
        }
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
        () = shared.shutdown.cancelled() => {}
    }
}

/// Ends a stream client's allocation and forgets its queue when its task ends.
struct StreamGuard {
    shared: Arc<Shared>,
    tuple: FiveTuple,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        lock(&self.shared.state).streams.remove(&self.tuple);
        locked(&self.shared, |relay, ports, _| {
            relay.closed(self.tuple, ports)
        });
    }
}

async fn expiry(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.cancelled() => break,
        }
        locked(&shared, |relay, ports, _| {
            relay.expire(Instant::now(), ports)
        });
    }
    // Shutting down: every relayed socket closes.
    let mut guard = lock(&shared.state);
    for (_, r) in guard.relayed.drain() {
        r.reader.abort();
    }
}

/// Marks a relay socket's packets with the media class; a system that refuses it
/// leaves them unmarked.
fn set_dscp(socket: &Udp, dscp: u8) {
    if let Err(e) = impmesh_limits::set_dscp(socket.socket(), dscp) {
        tracing::debug!(error = %e, "cannot set the DSCP class of a relay socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Config;
    use crate::policy::PeerPolicy;
    use crate::stun::{Builder, Class, Message, attr, method};
    use tokio::net::{TcpStream, UdpSocket};

    fn config() -> Config {
        Config {
            realm: "example.com".into(),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            user_quota: 2,
            max_allocations: 10,
            redirect_above: 10,
            bandwidth: 100_000,
            policy: PeerPolicy::default(),
        }
    }

    async fn start() -> (RelayHandle, CancellationToken, TaskTracker) {
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let relay = RelayHandle::start(
            RelayConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                tls: None,
                relay_ip: "127.0.0.1".parse().unwrap(),
                external_ip: None,
                ports: 49152..=65535,
                dscp: 46,
            },
            Relay::new(config(), vec![b"s".to_vec()]),
            shutdown.clone(),
            &tasks,
        )
        .await
        .unwrap();
        (relay, shutdown, tasks)
    }

    fn binding(tx: u8) -> Vec<u8> {
        let mut out = Vec::new();
        drop(Builder::new(
            &mut out,
            method::BINDING,
            Class::Request,
            [tx; 12],
        ));
        out
    }

    /// The largest frame a stream may announce is read whole (it once overran the
    /// read buffer and killed the connection's task), and the stream goes on.
    #[tokio::test]
    async fn the_largest_stream_frame_is_read_and_the_stream_goes_on() {
        let (relay, shutdown, _tasks) = start().await;
        let mut tcp = TcpStream::connect(relay.tcp_addr()).await.unwrap();
        let mut frame = vec![0u8; stun::MAX_FRAME];
        frame[..8].copy_from_slice(&[0x00, 0x01, 0xFF, 0xFC, 0x21, 0x12, 0xA4, 0x42]);
        tcp.write_all(&frame).await.unwrap();
        tcp.write_all(&binding(7)).await.unwrap();
        // The large frame is a Binding request with unknown attributes (type 0,
        // empty): 420, then the next request's answer.
        let mut head = [0u8; 20];
        tcp.read_exact(&mut head).await.unwrap();
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
        tcp.read_exact(&mut rest).await.unwrap();
        let refused = [&head[..], &rest].concat();
        assert_eq!(
            Message::parse(&refused)
                .unwrap()
                .error_code()
                .unwrap()
                .map(|(c, _)| c),
            Some(420)
        );
        let mut answer = vec![0u8; 32];
        tcp.read_exact(&mut answer).await.unwrap();
        let m = Message::parse(&answer).unwrap();
        assert_eq!((m.class, m.transaction), (Class::Success, [7; 12]));
        assert!(m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().is_some());
        // And over UDP, and the DSCP class on the listening socket.
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp.send_to(&binding(8), relay.udp_addr()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = udp.recv(&mut buf).await.unwrap();
        assert_eq!(Message::parse(&buf[..n]).unwrap().transaction, [8; 12]);
        let tos = socket2::SockRef::from(relay.shared.udp.socket())
            .tos_v4()
            .unwrap();
        assert_eq!(tos, 46 << 2);
        shutdown.cancel();
    }

    /// A relay whose caller's runtime ends without a shutdown (a node dropped) stops
    /// its media thread and frees its port: the thread once served on, keeping the
    /// node (and its store's connections) alive.
    #[test]
    fn the_media_thread_ends_with_the_callers_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (relay, _shutdown, _tasks) = runtime.block_on(start());
        let port = relay.udp_addr();
        let weak = Arc::downgrade(&relay.shared);
        drop(relay);
        drop(runtime);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while weak.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the media thread lives on"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::net::UdpSocket::bind(port).expect("the port is free again");
    }

    /// A port that is taken fails the start with an error (it once panicked: the media
    /// runtime, made before the binding, was dropped inside the caller's runtime).
    #[tokio::test]
    async fn a_taken_port_fails_the_start_cleanly() {
        let (relay, shutdown, tasks) = start().await;
        let taken = relay.udp_addr();
        let core = Relay::new(config(), vec![b"s".to_vec()]);
        let again = RelayHandle::start(
            RelayConfig {
                listen: taken,
                ..relay.shared.config.clone()
            },
            core,
            shutdown.clone(),
            &tasks,
        )
        .await;
        assert_eq!(
            again.map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        // And a TLS port that is taken, after the UDP and TCP ones bound.
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let source: TlsSource = Arc::new(|| unreachable!("no handshake"));
        let again = RelayHandle::start(
            RelayConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                tls: Some((busy.local_addr().unwrap(), source)),
                ..relay.shared.config.clone()
            },
            Relay::new(config(), vec![b"s".to_vec()]),
            shutdown.clone(),
            &tasks,
        )
        .await;
        assert!(again.is_err());
        shutdown.cancel();
    }

    /// One address holds at most STREAMS_PER_ADDRESS stream connections.
    #[tokio::test]
    async fn stream_connections_are_capped_per_address() {
        let (relay, shutdown, _tasks) = start().await;
        let mut open = vec![];
        for _ in 0..STREAMS_PER_ADDRESS {
            let mut tcp = TcpStream::connect(relay.tcp_addr()).await.unwrap();
            // Answered: the connection is being served.
            tcp.write_all(&binding(1)).await.unwrap();
            let mut answer = vec![0u8; 32];
            tcp.read_exact(&mut answer).await.unwrap();
            open.push(tcp);
        }
        let mut extra = TcpStream::connect(relay.tcp_addr()).await.unwrap();
        let _ = extra.write_all(&binding(2)).await;
        let mut byte = [0u8; 1];
        // Closed without an answer.
        assert!(matches!(extra.read(&mut byte).await, Ok(0) | Err(_)));
        shutdown.cancel();
    }
}
