//! `impmesh-bench turn`: media through a TURN relay, as calls send it. `--streams`
//! clients each allocate on the relay (RFC 8656 over UDP, long-term credentials),
//! bind a channel to a peer socket of the generator, and send `--pps` RTP-sized
//! packets a second as ChannelData; the relay forwards each to the peer. Every packet
//! carries its stream, sequence number and send time, so the peer side counts what
//! was lost and how long each took (one clock: one process). `--direct` sends the
//! same packets straight to the peers, for the loopback baseline the relay's added
//! latency is measured against.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use impmesh_media::stun::{self, Builder, Class, Message, attr, method};
use tokio::net::UdpSocket;

/// How the run is shaped.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The relay (UDP); none: straight to the peers.
    pub relay: Option<SocketAddr>,
    pub username: String,
    pub password: String,
    pub streams: usize,
    /// Packets a second per stream (a divisor of 1,000).
    pub pps: u32,
    /// Bytes of each packet's payload (172: 20 ms of G.711 with its RTP header).
    pub size: usize,
    pub warmup: f64,
    pub duration: f64,
    /// Allocations made at once while setting up.
    pub concurrency: usize,
}

/// Peer sockets the streams are spread over (each has a reader).
const PEERS: usize = 8;
/// Socket buffers asked for (the kernel caps them at net.core.rmem_max and wmem_max).
const SOCKET_BUFFER: usize = 8 << 20;
/// The payload's header: stream, sequence number, send time (ns since the start).
const STAMP: usize = 16;

/// One client: its socket and where its packets go.
struct Stream {
    socket: Arc<UdpSocket>,
    /// The relay, or the peer itself (direct).
    to: SocketAddr,
    /// The channel bound to the peer (relayed runs).
    channel: Option<u16>,
    /// A Refresh with lifetime 0 that ends the allocation (relayed runs): sent at the
    /// end, so that a later run's sockets, which may get the same ports, do not find
    /// this run's allocations (437).
    delete: Vec<u8>,
}

fn udp(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(UdpSocket::from_std(socket.into())?)
}

/// Sends a request and waits for its answer (retransmitting, as RFC 8489 §6.2.1
/// says, a few times).
async fn transact(socket: &UdpSocket, to: SocketAddr, request: &[u8]) -> anyhow::Result<Vec<u8>> {
    let transaction = &request[8..20];
    let mut buf = vec![0u8; 2048];
    for attempt in 0..6u32 {
        socket.send_to(request, to).await?;
        let wait = Duration::from_millis(250 << attempt.min(3));
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(got) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            let (n, _) = got?;
            if buf.get(8..20) == Some(transaction) {
                return Ok(buf[..n].to_vec());
            }
        }
    }
    bail!("no answer from {to}")
}

/// A transaction id unique to the stream (each has its own socket) and step.
fn transaction(i: usize, step: u8) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&(i as u64).to_be_bytes());
    t[8] = step;
    t
}

fn error_of(answer: &[u8]) -> Option<(u16, String)> {
    let m = Message::parse(answer).ok()?;
    m.error_code()
        .ok()
        .flatten()
        .map(|(c, r)| (c, r.to_owned()))
}

/// The clients' address: one of 127.3.0.0/16 that this process's id picks, so that a
/// run never uses a 5-tuple a previous run's allocation may still hold (coturn keeps
/// them a while after they are deleted, and answers 437).
fn client_ip() -> [u8; 4] {
    let pid = std::process::id();
    [127, 3, ((pid >> 8) % 254 + 1) as u8, (pid % 254 + 1) as u8]
}

/// Allocates on the relay for stream `i` and binds channel 0x4000 to `peer`.
async fn allocate(
    i: usize,
    relay: SocketAddr,
    peer: SocketAddr,
    username: &str,
    password: &str,
) -> anyhow::Result<Stream> {
    let socket = udp(SocketAddr::from((client_ip(), 0)))?;
    let mut out = Vec::with_capacity(256);
    // Unauthenticated first: the 401 gives the realm and a nonce.
    drop(Builder::new(
        &mut out,
        method::ALLOCATE,
        Class::Request,
        transaction(i, 0),
    ));
    let challenge = transact(&socket, relay, &out).await?;
    let m = Message::parse(&challenge).context("the relay's challenge does not parse")?;
    match error_of(&challenge) {
        Some((401, _)) => {}
        Some((code, reason)) => bail!("Allocate without credentials: {code} {reason}"),
        None => bail!("Allocate without credentials was not challenged"),
    }
    let realm = m
        .text(attr::REALM)
        .ok()
        .flatten()
        .context("no REALM")?
        .to_owned();
    let nonce = m
        .text(attr::NONCE)
        .ok()
        .flatten()
        .context("no NONCE")?
        .to_owned();
    let key = stun::long_term_key(username, &realm, password);
    let sign = |b: &mut Builder<'_>| {
        b.attr(attr::USERNAME, username.as_bytes())
            .attr(attr::REALM, realm.as_bytes())
            .attr(attr::NONCE, nonce.as_bytes())
            .integrity(&key);
    };
    {
        let mut b = Builder::new(
            &mut out,
            method::ALLOCATE,
            Class::Request,
            transaction(i, 1),
        );
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        sign(&mut b);
    }
    let answer = transact(&socket, relay, &out).await?;
    if let Some((code, reason)) = error_of(&answer) {
        bail!("Allocate refused: {code} {reason}");
    }
    let channel = 0x4000;
    {
        let mut b = Builder::new(
            &mut out,
            method::CHANNEL_BIND,
            Class::Request,
            transaction(i, 2),
        );
        b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
        sign(&mut b);
    }
    let answer = transact(&socket, relay, &out).await?;
    if let Some((code, reason)) = error_of(&answer) {
        bail!("ChannelBind refused: {code} {reason}");
    }
    let mut delete = Vec::new();
    {
        let mut b = Builder::new(
            &mut delete,
            method::REFRESH,
            Class::Request,
            transaction(i, 3),
        );
        b.u32_attr(attr::LIFETIME, 0);
        sign(&mut b);
    }
    Ok(Stream {
        socket: Arc::new(socket),
        to: relay,
        channel: Some(channel),
        delete,
    })
}

/// What the peers saw in the measured window.
#[derive(Default)]
struct Seen {
    latencies_ns: Vec<u64>,
}

/// Runs the shape; one JSON object.
pub async fn run(shape: &Shape, pid: u32, label: &str) -> anyhow::Result<serde_json::Value> {
    if !(1..=1000).contains(&shape.pps) || 1000 % shape.pps != 0 {
        bail!("--pps must divide 1000 (a packet every whole number of milliseconds)");
    }
    if shape.size < STAMP + 12 {
        bail!("--size must be at least {} bytes", STAMP + 12);
    }
    let mut peers = Vec::with_capacity(PEERS);
    // On 127.0.0.2: the relay's own address (127.0.0.1) is a peer on its relay ports
    // only.
    for _ in 0..PEERS {
        peers.push(Arc::new(udp(SocketAddr::from(([127, 0, 0, 2], 0)))?));
    }
    let peer_addrs: Vec<SocketAddr> = peers
        .iter()
        .map(|p| p.local_addr())
        .collect::<Result<_, _>>()?;

    // The clients.
    let started = Instant::now();
    let mut streams = Vec::with_capacity(shape.streams);
    match shape.relay {
        Some(relay) => {
            let results = crate::bounded(shape.streams, shape.concurrency, |i| {
                let (peer, user, pass) = (
                    peer_addrs[i % PEERS],
                    shape.username.clone(),
                    shape.password.clone(),
                );
                async move { allocate(i, relay, peer, &user, &pass).await }
            })
            .await;
            for r in results {
                streams.push(r?);
            }
        }
        None => {
            for i in 0..shape.streams {
                streams.push(Stream {
                    socket: Arc::new(udp(SocketAddr::from((client_ip(), 0)))?),
                    to: peer_addrs[i % PEERS],
                    channel: None,
                    delete: vec![],
                });
            }
        }
    }
    crate::log(format!(
        "{} streams ready in {:.1} s ({})",
        streams.len(),
        started.elapsed().as_secs_f64(),
        shape
            .relay
            .map_or_else(|| "direct".to_owned(), |r| format!("through {r}"))
    ));

    let t0 = Instant::now();
    let warmup = Duration::from_secs_f64(shape.warmup);
    let measured = Duration::from_secs_f64(shape.duration);
    let end = warmup + measured;
    let in_window = move |sent_ns: u64| {
        let t = Duration::from_nanos(sent_ns);
        t >= warmup && t < end
    };

    // The peers: one reader per socket, latencies of packets sent in the window.
    let mut readers = Vec::with_capacity(PEERS);
    for peer in &peers {
        let peer = peer.clone();
        readers.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut buf = vec![0u8; 2048];
            let stop = end + Duration::from_millis(500);
            loop {
                let left = stop.saturating_sub(t0.elapsed());
                let Ok(Ok((n, _))) = tokio::time::timeout(left, peer.recv_from(&mut buf)).await
                else {
                    break;
                };
                let now = t0.elapsed().as_nanos() as u64;
                if n < STAMP {
                    continue;
                }
                let sent = u64::from_be_bytes(buf[8..16].try_into().unwrap_or_default());
                if in_window(sent) {
                    seen.latencies_ns.push(now.saturating_sub(sent));
                }
            }
            seen
        }));
    }

    // The clients: stream j sends when (ms mod period) == j mod period.
    let period = (1000 / shape.pps) as usize;
    let sent_in_window = Arc::new(AtomicU64::new(0));
    let send_errors = Arc::new(AtomicU64::new(0));
    let server_cpu = Arc::new(std::sync::Mutex::new((None, None)));
    let gen_cpu = Arc::new(std::sync::Mutex::new((None, None)));
    {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut packet = vec![0u8; 4 + shape.size];
        let mut seqs = vec![0u32; streams.len()];
        let mut ms: usize = 0;
        let mut measuring = false;
        loop {
            tick.tick().await;
            let elapsed = t0.elapsed();
            if elapsed >= end {
                break;
            }
            if !measuring && elapsed >= warmup {
                measuring = true;
                server_cpu
                    .lock()
                    .map(|mut c| c.0 = crate::proc_cpu(pid))
                    .ok();
                gen_cpu
                    .lock()
                    .map(|mut c| c.0 = crate::proc_cpu(std::process::id()))
                    .ok();
            }
            let slot = ms % period;
            ms += 1;
            for (j, stream) in streams.iter().enumerate().skip(slot).step_by(period) {
                let now = t0.elapsed().as_nanos() as u64;
                let payload_at = if stream.channel.is_some() { 4 } else { 0 };
                let payload = &mut packet[payload_at..payload_at + shape.size];
                payload[..4].copy_from_slice(&(j as u32).to_be_bytes());
                payload[4..8].copy_from_slice(&seqs[j].to_be_bytes());
                payload[8..16].copy_from_slice(&now.to_be_bytes());
                // An RTP header after the stamp, for the look of it.
                payload[16] = 0x80;
                seqs[j] = seqs[j].wrapping_add(1);
                if let Some(channel) = stream.channel {
                    packet[..2].copy_from_slice(&channel.to_be_bytes());
                    packet[2..4].copy_from_slice(&(shape.size as u16).to_be_bytes());
                }
                let bytes = &packet[..payload_at + shape.size];
                if stream.socket.try_send_to(bytes, stream.to).is_err() {
                    send_errors.fetch_add(1, Ordering::Relaxed);
                } else if in_window(now) {
                    sent_in_window.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    server_cpu
        .lock()
        .map(|mut c| c.1 = crate::proc_cpu(pid))
        .ok();
    gen_cpu
        .lock()
        .map(|mut c| c.1 = crate::proc_cpu(std::process::id()))
        .ok();

    let mut latencies = Vec::new();
    for r in readers {
        latencies.extend(r.await?.latencies_ns);
    }
    // The allocations end, each answered before the run ends.
    let streams = Arc::new(streams);
    let deleted = crate::bounded(streams.len(), shape.concurrency, |i| {
        let streams = streams.clone();
        async move {
            let s = &streams[i];
            if !s.delete.is_empty() {
                let answer = transact(&s.socket, s.to, &s.delete).await?;
                if let Some((code, reason)) = error_of(&answer) {
                    bail!("Refresh refused: {code} {reason}");
                }
            }
            Ok(())
        }
    })
    .await;
    let undeleted: Vec<_> = deleted.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(e) = undeleted.first() {
        crate::log(format!(
            "{} allocations not deleted (they lapse in 10 minutes): {e}",
            undeleted.len()
        ));
    }
    latencies.sort_unstable();
    let sent = sent_in_window.load(Ordering::Relaxed);
    let received = latencies.len() as u64;
    let lost = sent.saturating_sub(received);
    let pct = |p: f64| -> Option<f64> {
        let i = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        latencies.get(i).map(|ns| *ns as f64 / 1000.0)
    };
    let cpu = |c: &std::sync::Mutex<(Option<f64>, Option<f64>)>| {
        c.lock().ok().and_then(|c| c.1.zip(c.0).map(|(b, a)| b - a))
    };
    let server = cpu(&server_cpu);
    let generator = cpu(&gen_cpu);
    let seconds = shape.duration;
    let rate = sent as f64 / seconds;
    crate::log(format!(
        "{rate:.0} packets/s sent, {received} of {sent} arrived ({:.3} % lost), p50 {:.0} µs, p99 {:.0} µs; server CPU {:.2} s",
        lost as f64 * 100.0 / sent.max(1) as f64,
        pct(0.5).unwrap_or(f64::NAN),
        pct(0.99).unwrap_or(f64::NAN),
        server.unwrap_or(f64::NAN)
    ));
    Ok(serde_json::json!({
        "cmd": "turn", "label": label, "path": if shape.relay.is_some() { "relay" } else { "direct" },
        "streams": shape.streams, "pps_per_stream": shape.pps, "size": shape.size,
        "seconds": seconds, "sent": sent, "received": received, "lost": lost,
        "loss_pct": lost as f64 * 100.0 / sent.max(1) as f64,
        "send_errors": send_errors.load(Ordering::Relaxed),
        "packets_per_s": rate,
        "latency_us": { "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0) },
        "server_cpu_s": server,
        "server_cpu_us_per_packet": server.map(|c| c * 1e6 / sent.max(1) as f64),
        "server_cpu_share": server.map(|c| c / seconds),
        "generator_cpu_share": generator.map(|c| c / seconds),
    }))
}
