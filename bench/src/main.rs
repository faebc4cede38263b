//! `impmesh-bench`: an XMPP client-to-server load generator that speaks standard XMPP
//! (tokio-xmpp's stream layer: STARTTLS or plain TCP, SASL, bind, presence) to any
//! server by address, loopback only, every load bounded in count and time.
//!
//! - `register`: creates the benchmark accounts with XEP-0077.
//! - `login`: N full logins (connect, optional STARTTLS, SASL, bind, initial presence, wait for
//!   the presence echo) with C in flight; logins/s and server CPU per login.
//! - `msg`: U users online, user i sends chat messages to the bare JID of user
//!   (i + U/2) mod U; closed loop with W in flight per sender (saturation) or open loop
//!   at a fixed total rate; delivered msgs/s and latency percentiles.
//! - `room`: U users enter one chat room (XEP-0045); S of them send `groupchat`
//!   messages, closed loop with W in flight per sender (a sender's next message goes
//!   when the room brings its own back) or open loop at a fixed total rate; copies
//!   delivered/s over all occupants, messages/s, and the latency of every copy.
//! - `idle`: N sessions held idle; server RSS before and after, KiB per session.
//! - `turn`: media through a TURN relay (or straight, for the baseline): streams of
//!   RTP-sized packets at a fixed rate; loss, latency percentiles, server CPU per
//!   packet (turn.rs).
//!
//! The scenario mirrors `shared/anchors/perf/xmppbench.py` so the figures compare.
//! Output: one JSON object per run on stdout; progress on stderr.

#![forbid(unsafe_code)]

mod turn;
mod xmpp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tokio::sync::{Semaphore, mpsc};

#[derive(Parser, Clone)]
#[command(
    name = "impmesh-bench",
    about = "XMPP c2s load generator (loopback only)"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Server address; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:5222", global = true)]
    addr: SocketAddr,
    /// The XMPP domain of the accounts.
    #[arg(long, default_value = "localhost", global = true)]
    domain: String,
    /// Accounts are PREFIX1 … PREFIXn.
    #[arg(long, default_value = "user", global = true)]
    prefix: String,
    #[arg(long, default_value_t = 1000, global = true)]
    count: usize,
    #[arg(long, default_value = "benchpass", global = true)]
    password: String,
    /// Logins in flight.
    #[arg(long, default_value_t = 50, global = true)]
    concurrency: usize,
    /// Use STARTTLS (the certificate is not verified: loopback benchmarks only).
    #[arg(long, global = true)]
    starttls: bool,
    /// Server PID, for CPU and RSS sampling from /proc.
    #[arg(long, default_value_t = 0, global = true)]
    pid: u32,
    /// Free-form label copied into the JSON output.
    #[arg(long, default_value = "", global = true)]
    label: String,
}

#[derive(Subcommand, Clone)]
enum Cmd {
    Register,
    Login,
    Msg {
        /// Messages in flight per sender (saturation mode).
        #[arg(long, default_value_t = 4)]
        window: usize,
        /// Total messages per second (open loop); saturation when absent.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 3.0)]
        warmup: f64,
        #[arg(long, default_value_t = 15.0)]
        duration: f64,
        /// Writes one line per measured message to this file: its send time (seconds
        /// since the run started), its latency (ms) and its sender, to see when the
        /// slow ones happened; and beside it, `FILE.steal`, the time each CPU was
        /// stolen by the hypervisor (cumulative, in 10 ms ticks from /proc/stat),
        /// sampled every 10 ms (the resolution /proc/stat has) on the same clock.
        #[arg(long)]
        latency_log: Option<std::path::PathBuf>,
    },
    Room {
        /// The room's address (made by the first user, opened as an instant room for
        /// `--count` occupants).
        #[arg(long, default_value = "bench@conference.localhost")]
        room: String,
        /// Occupants that send (the first ones); all of them receive.
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Messages in flight per sender (saturation mode).
        #[arg(long, default_value_t = 1)]
        window: usize,
        /// Messages per second over all senders (open loop); saturation when absent.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 3.0)]
        warmup: f64,
        #[arg(long, default_value_t = 15.0)]
        duration: f64,
    },
    Idle {
        /// Seconds to wait before each RSS sample.
        #[arg(long, default_value_t = 5.0)]
        settle: f64,
        /// Seconds to wait after the sessions close before a last RSS sample (does
        /// the memory come back?); no sample when absent.
        #[arg(long)]
        after_close: Option<f64>,
    },
    /// `--count` connections that send a stream header and nothing more (abandoned
    /// before authentication), spread over source addresses 127.1.0.0/16 so that no
    /// per-address cap is what is measured; server RSS before, with them open, and
    /// after they close.
    Preauth {
        /// Seconds to wait before the RSS sample with the connections open.
        #[arg(long, default_value_t = 5.0)]
        settle: f64,
        /// Seconds to wait after closing them before the last RSS sample.
        #[arg(long, default_value_t = 60.0)]
        after_close: f64,
        /// Connections per source address.
        #[arg(long, default_value_t = 25)]
        per_source: usize,
    },
    /// The AXL-like API on `--addr` (the node's HTTPS port): channel-bound first
    /// contacts, then full directory listings, as a peer's sync agent runs them. The
    /// account is the AXL user (`--prefix` is its name, `--password` its password).
    /// Media through a TURN relay at a fixed rate (turn.rs).
    Turn {
        /// The relay (UDP); absent with --direct.
        #[arg(long)]
        relay: Option<SocketAddr>,
        /// Send straight to the peers: the loopback baseline.
        #[arg(long)]
        direct: bool,
        /// The TURN username and password (long-term credentials).
        #[arg(long, default_value = "bench")]
        username: String,
        #[arg(long, default_value = "benchpass")]
        turn_password: String,
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        /// Packets a second per stream (50: a voice call's 20 ms frames).
        #[arg(long, default_value_t = 50)]
        pps: u32,
        /// Payload bytes per packet (172: 20 ms of G.711 with its RTP header).
        #[arg(long, default_value_t = 172)]
        size: usize,
        #[arg(long, default_value_t = 3.0)]
        warmup: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    Axl {
        /// First contacts to time.
        #[arg(long, default_value_t = 5)]
        contacts: usize,
        /// Full listings to time.
        #[arg(long, default_value_t = 5)]
        listings: usize,
        #[arg(long, default_value_t = 500)]
        page_size: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        bail!(
            "refusing to load {}: only loopback targets are allowed",
            args.addr
        );
    }
    let out = match args.cmd.clone() {
        Cmd::Register => register(&args).await?,
        Cmd::Login => login(&args).await?,
        Cmd::Msg {
            window,
            rate,
            warmup,
            duration,
            latency_log,
        } => {
            msg(
                &args,
                window,
                rate,
                warmup,
                duration,
                latency_log.as_deref(),
            )
            .await?
        }
        Cmd::Room {
            room,
            senders,
            window,
            rate,
            warmup,
            duration,
        } => room_load(&args, &room, senders, window, rate, warmup, duration).await?,
        Cmd::Idle {
            settle,
            after_close,
        } => idle(&args, settle, after_close).await?,
        Cmd::Preauth {
            settle,
            after_close,
            per_source,
        } => preauth(&args, settle, after_close, per_source).await?,
        Cmd::Axl {
            contacts,
            listings,
            page_size,
        } => axl(&args, contacts, listings, page_size).await?,
        Cmd::Turn {
            relay,
            direct,
            username,
            turn_password,
            streams,
            pps,
            size,
            warmup,
            duration,
        } => {
            let relay = match (relay, direct) {
                (Some(r), false) if r.ip().is_loopback() => Some(r),
                (Some(r), false) => {
                    bail!("refusing to load {r}: only loopback targets are allowed")
                }
                (None, true) => None,
                _ => bail!("give --relay ADDR, or --direct for the baseline"),
            };
            let shape = turn::Shape {
                relay,
                username,
                password: turn_password,
                streams,
                pps,
                size,
                warmup,
                duration,
                concurrency: args.concurrency,
            };
            turn::run(&shape, args.pid, &args.label).await?
        }
    };
    println!("{out}");
    Ok(())
}

fn log(s: impl AsRef<str>) {
    eprintln!("{}", s.as_ref());
}

fn user(args: &Args, i: usize) -> String {
    format!("{}{}", args.prefix, i + 1)
}

/// Runs `f(i)` for i in 0..n with `c` in flight; returns the results in order.
async fn bounded<T, F, Fut>(n: usize, c: usize, f: F) -> Vec<anyhow::Result<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(c.max(1)));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await;
        let fut = f(i);
        handles.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        }));
    }
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(
            h.await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("task failed: {e}"))),
        );
    }
    out
}

async fn register(args: &Args) -> anyhow::Result<serde_json::Value> {
    let t0 = Instant::now();
    let results =
        bounded(args.count, args.concurrency, |i| {
            let a = args.clone();
            async move {
                xmpp::register(&a.addr, &a.domain, &user(&a, i), &a.password, a.starttls).await
            }
        })
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        log(format!("first registration error: {e:#}"));
    }
    Ok(serde_json::json!({
        "cmd": "register", "label": args.label, "count": args.count, "failed": failed,
        "seconds": t0.elapsed().as_secs_f64(),
    }))
}

/// Logs in users 0..n with `concurrency` in flight; returns the sessions.
async fn login_many(args: &Args, n: usize) -> anyhow::Result<Vec<xmpp::Session>> {
    let results = bounded(n, args.concurrency, |i| {
        let a = args.clone();
        async move {
            xmpp::login(&a.addr, &a.domain, &user(&a, i), &a.password, a.starttls)
                .await
                .with_context(|| format!("login of {}", user(&a, i)))
        }
    })
    .await;
    results.into_iter().collect()
}

async fn login(args: &Args) -> anyhow::Result<serde_json::Value> {
    let cpu0 = proc_cpu(args.pid);
    let t0 = Instant::now();
    let sessions = login_many(args, args.count).await?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu(args.pid).zip(cpu0).map(|(b, a)| b - a);
    let n = sessions.len();
    for s in sessions {
        s.close().await;
    }
    log(format!("{n} logins in {seconds:.2} s"));
    Ok(serde_json::json!({
        "cmd": "login", "label": args.label, "starttls": args.starttls, "count": n,
        "concurrency": args.concurrency, "seconds": seconds,
        "logins_per_s": n as f64 / seconds,
        "server_cpu_ms_per_login": cpu.map(|c| c * 1000.0 / n as f64),
    }))
}

async fn idle(
    args: &Args,
    settle: f64,
    after_close: Option<f64>,
) -> anyhow::Result<serde_json::Value> {
    if args.pid == 0 {
        bail!("idle needs --pid to sample the server's RSS");
    }
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let before = proc_rss_kib(args.pid).context("reading the server's RSS")?;
    let sessions = login_many(args, args.count).await?;
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let after = proc_rss_kib(args.pid).context("reading the server's RSS")?;
    let n = sessions.len();
    let per = (after as f64 - before as f64) / n as f64;
    log(format!(
        "RSS {before} KiB -> {after} KiB with {n} idle sessions: {per:.1} KiB each"
    ));
    for s in sessions {
        s.close().await;
    }
    let closed = match after_close {
        Some(wait) => {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            let closed = proc_rss_kib(args.pid).context("reading the server's RSS")?;
            log(format!(
                "RSS {closed} KiB {wait} s after they closed ({:.2}x the figure before)",
                closed as f64 / before as f64
            ));
            Some(closed)
        }
        None => None,
    };
    Ok(serde_json::json!({
        "cmd": "idle", "label": args.label, "starttls": args.starttls, "sessions": n,
        "rss_before_kib": before, "rss_after_kib": after, "kib_per_session": per,
        "rss_after_close_kib": closed, "after_close_s": after_close,
    }))
}

/// Opens `count` connections that each send a stream header and then nothing,
/// `concurrency` at a time, from 127.1.0.0/16 (`per_source` per address); samples the
/// server's RSS before, with them open, and `after_close` seconds after closing them.
async fn preauth(
    args: &Args,
    settle: f64,
    after_close: f64,
    per_source: usize,
) -> anyhow::Result<serde_json::Value> {
    use tokio::io::AsyncWriteExt as _;
    if args.pid == 0 {
        bail!("preauth needs --pid to sample the server's RSS");
    }
    let before = proc_rss_kib(args.pid).context("reading the server's RSS")?;
    let header = Arc::new(format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0'>",
        args.domain
    ));
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.count {
        let permit = sem.clone().acquire_owned().await?;
        let (addr, header) = (args.addr, header.clone());
        let source = (i / per_source.max(1)) as u32;
        let ip = std::net::Ipv4Addr::new(127, 1, (source >> 8) as u8, (source & 0xff) as u8);
        tasks.spawn(async move {
            let _permit = permit;
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip.into(), 0))?;
            let mut stream = socket.connect(addr).await?;
            stream.write_all(header.as_bytes()).await?;
            Ok::<_, std::io::Error>(stream)
        });
        if i % 10_000 == 9_999 {
            log(format!("{} connections opened", i + 1));
        }
    }
    let mut open = Vec::with_capacity(args.count);
    let mut failed = 0usize;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(stream)) => open.push(stream),
            _ => failed += 1,
        }
    }
    let opening = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let peak = proc_rss_kib(args.pid).context("reading the server's RSS")?;
    let n = open.len();
    log(format!(
        "RSS {before} KiB -> {peak} KiB with {n} abandoned connections ({failed} failed, opened in {opening:.1} s)"
    ));
    drop(open);
    tokio::time::sleep(Duration::from_secs_f64(after_close)).await;
    let after = proc_rss_kib(args.pid).context("reading the server's RSS")?;
    log(format!(
        "RSS {after} KiB {after_close} s after they closed ({:.2}x the figure before)",
        after as f64 / before as f64
    ));
    Ok(serde_json::json!({
        "cmd": "preauth", "label": args.label, "connections": n, "failed": failed,
        "opening_s": opening, "rss_before_kib": before, "rss_open_kib": peak,
        "kib_per_connection": (peak as f64 - before as f64) / n.max(1) as f64,
        "rss_after_close_kib": after, "after_close_s": after_close,
    }))
}

/// Shared counters of a message run.
struct MsgStats {
    start: Instant,
    measuring_from: Duration,
    measuring_until: Duration,
    delivered: AtomicU64,
    /// (send time in ns since `start`, latency in ns, sender) of each measured message.
    latencies: std::sync::Mutex<Vec<(u64, u64, u32)>>,
}

impl MsgStats {
    /// A delivery of `sender`'s message sent at `sent_ns`: counted, and its latency
    /// kept, when it lands in the measured window. Returns the time since start.
    fn record(&self, sender: usize, sent_ns: u64) -> Duration {
        let now = self.start.elapsed();
        if now >= self.measuring_from && now < self.measuring_until {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            let lat = (now.as_nanos() as u64).saturating_sub(sent_ns);
            if let Ok(mut l) = self.latencies.lock() {
                l.push((sent_ns, lat, sender as u32));
            }
        }
        now
    }
}

async fn msg(
    args: &Args,
    window: usize,
    rate: Option<f64>,
    warmup: f64,
    duration: f64,
    latency_log: Option<&std::path::Path>,
) -> anyhow::Result<serde_json::Value> {
    let n = args.count;
    if n < 2 || !n.is_multiple_of(2) {
        bail!("msg needs an even --count of at least 2");
    }
    log(format!("logging in {n} users"));
    let sessions = login_many(args, n).await?;
    let stats = Arc::new(MsgStats {
        start: Instant::now(),
        measuring_from: Duration::from_secs_f64(warmup),
        measuring_until: Duration::from_secs_f64(warmup + duration),
        delivered: AtomicU64::new(0),
        latencies: std::sync::Mutex::new(Vec::new()),
    });
    let steal_sampler = latency_log.map(|_| {
        let start = stats.start;
        let until = stats.measuring_until + Duration::from_secs(1);
        tokio::task::spawn_blocking(move || sample_steal(start, until))
    });
    // Each session task owns its stream; `send_tx[i]` asks user i to send one message.
    let mut send_txs = Vec::with_capacity(n);
    let mut send_rxs = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mpsc::channel::<()>(window.max(1) * 4 + 64);
        send_txs.push(tx);
        send_rxs.push(rx);
    }
    let send_txs = Arc::new(send_txs);
    let closed_loop = rate.is_none();
    let mut tasks = Vec::with_capacity(n);
    for (i, (session, rx)) in sessions.into_iter().zip(send_rxs).enumerate() {
        let peer = format!("{}@{}", user(args, (i + n / 2) % n), args.domain);
        let stats2 = stats.clone();
        let txs = send_txs.clone();
        let start = stats.start;
        tasks.push(tokio::spawn(session.run_messages(
            i,
            peer,
            rx,
            move |sender, sent_ns| {
                let now = stats2.record(sender, sent_ns);
                if closed_loop && now < stats2.measuring_until {
                    let _ = txs[sender].try_send(());
                }
            },
            start,
        )));
    }
    start_sending(&send_txs, rate, window, &stats);
    tokio::time::sleep(stats.measuring_from).await;
    let steal_start = cpu_steal();
    let server_start = proc_cpu(args.pid);
    let gen_start = proc_cpu(std::process::id());
    tokio::time::sleep(stats.measuring_until - stats.measuring_from).await;
    let server_cpu = proc_cpu(args.pid).zip(server_start).map(|(b, a)| b - a);
    // The share of the machine's CPU time the hypervisor gave to others while this ran.
    let steal_share = cpu_steal()
        .zip(steal_start)
        .map(|((b, cpus), (a, _))| (b - a) / (duration * cpus as f64));
    let gen_cpu = proc_cpu(std::process::id())
        .zip(gen_start)
        .map(|(b, a)| b - a);
    // Let in-flight messages land, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for t in &tasks {
        t.abort();
    }
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let measured = stats
        .latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    if let Some(path) = latency_log {
        let mut lines = String::with_capacity(measured.len() * 24);
        for (sent, lat, sender) in &measured {
            lines.push_str(&format!(
                "{:.6} {:.3} {sender}\n",
                *sent as f64 / 1e9,
                *lat as f64 / 1e6
            ));
        }
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
        if let Some(sampler) = steal_sampler
            && let Ok(samples) = sampler.await
        {
            let mut steal_path = path.as_os_str().to_owned();
            steal_path.push(".steal");
            let steal_path = std::path::PathBuf::from(steal_path);
            std::fs::write(&steal_path, samples)
                .with_context(|| format!("writing {}", steal_path.display()))?;
        }
    }
    let mut lat: Vec<u64> = measured.iter().map(|m| m.1).collect();
    lat.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        if lat.is_empty() {
            return None;
        }
        let idx = ((p / 100.0) * (lat.len() - 1) as f64).round() as usize;
        Some(lat[idx] as f64 / 1e6)
    };
    let per_s = delivered as f64 / duration;
    log(format!(
        "{delivered} delivered in {duration} s: {per_s:.0}/s, p50 {:?} ms, p99 {:?} ms",
        pct(50.0),
        pct(99.0)
    ));
    Ok(serde_json::json!({
        "cmd": "msg", "label": args.label, "starttls": args.starttls, "users": n,
        "mode": if rate.is_some() { "rate" } else { "saturate" }, "rate": rate, "window": window,
        "duration": duration, "delivered": delivered, "delivered_per_s": per_s,
        "latency_ms": { "p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0), "max": pct(100.0) },
        "server_cpu_s_per_10k": server_cpu.filter(|_| delivered > 0).map(|c| c * 10_000.0 / delivered as f64),
        "generator_cpu_share": gen_cpu.map(|c| c / duration),
        "steal_share": steal_share,
    }))
}

/// Starts the senders: `window` messages each (closed loop: each delivery asks for
/// the next), or one message every `1/rate` s over all of them until the end.
fn start_sending(
    send_txs: &Arc<Vec<mpsc::Sender<()>>>,
    rate: Option<f64>,
    window: usize,
    stats: &MsgStats,
) {
    match rate {
        None => {
            for tx in send_txs.iter() {
                for _ in 0..window {
                    let _ = tx.try_send(());
                }
            }
        }
        Some(rate) => {
            let txs = send_txs.clone();
            let (until, start) = (stats.measuring_until, stats.start);
            tokio::spawn(async move {
                let interval = Duration::from_secs_f64(1.0 / rate);
                let mut next = tokio::time::Instant::now();
                let mut i = 0;
                while start.elapsed() < until {
                    let _ = txs[i % txs.len()].try_send(());
                    i += 1;
                    next += interval;
                    tokio::time::sleep_until(next).await;
                }
            });
        }
    }
}

/// The `room` command: `args.count` occupants of one room, `senders` of them talking.
#[allow(clippy::too_many_arguments)]
async fn room_load(
    args: &Args,
    room: &str,
    senders: usize,
    window: usize,
    rate: Option<f64>,
    warmup: f64,
    duration: f64,
) -> anyhow::Result<serde_json::Value> {
    let n = args.count;
    if senders == 0 || senders > n {
        bail!("--senders must be between 1 and --count");
    }
    log(format!("logging in {n} users"));
    let mut sessions = login_many(args, n).await?;
    log(format!("{n} users entering {room}"));
    // Each session in the room reads what the room sends while the others enter.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    sessions[0]
        .enter_room(room, &user(args, 0), Some(n))
        .await?;
    let first = tokio::spawn(sessions.remove(0).drain(stopped.clone()));
    let pending: Arc<Vec<std::sync::Mutex<Option<xmpp::Session>>>> = Arc::new(
        sessions
            .into_iter()
            .map(|s| std::sync::Mutex::new(Some(s)))
            .collect(),
    );
    let entered = bounded(n - 1, args.concurrency, |i| {
        let (pending, room, nick) = (pending.clone(), room.to_owned(), user(args, i + 1));
        let stopped = stopped.clone();
        async move {
            let mut session = pending[i]
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .take()
                .context("taken twice")?;
            session.enter_room(&room, &nick, None).await?;
            Ok(tokio::spawn(session.drain(stopped)))
        }
    })
    .await;
    let _ = stop.send(true);
    let mut sessions = vec![first.await?];
    for s in entered {
        sessions.push(s?.await?);
    }
    let stats = Arc::new(MsgStats {
        start: Instant::now(),
        measuring_from: Duration::from_secs_f64(warmup),
        measuring_until: Duration::from_secs_f64(warmup + duration),
        delivered: AtomicU64::new(0),
        latencies: std::sync::Mutex::new(Vec::new()),
    });
    let mut send_txs = Vec::with_capacity(senders);
    let mut send_rxs = Vec::with_capacity(n);
    // The occupants that only listen keep their channel open (a closed one ends the
    // session's loop, and an unread session is dropped by the server as too slow).
    let mut listening = Vec::with_capacity(n - senders);
    for i in 0..n {
        let (tx, rx) = mpsc::channel::<()>(window.max(1) * 4 + 64);
        if i < senders {
            send_txs.push(tx);
        } else {
            listening.push(tx);
        }
        send_rxs.push(rx);
    }
    let send_txs = Arc::new(send_txs);
    let closed_loop = rate.is_none();
    let mut tasks = Vec::with_capacity(n);
    for (i, (session, rx)) in sessions.into_iter().zip(send_rxs).enumerate() {
        let stats2 = stats.clone();
        let txs = send_txs.clone();
        tasks.push(tokio::spawn(session.run_room(
            i,
            room.to_owned(),
            rx,
            move |sender, sent_ns| {
                let now = stats2.record(sender, sent_ns);
                // The sender's own copy back from the room: its next message.
                if closed_loop && sender == i && now < stats2.measuring_until {
                    let _ = txs[sender].try_send(());
                }
            },
            stats.start,
        )));
    }
    start_sending(&send_txs, rate, window, &stats);
    tokio::time::sleep(stats.measuring_from).await;
    let server_start = proc_cpu(args.pid);
    tokio::time::sleep(stats.measuring_until - stats.measuring_from).await;
    let server_cpu = proc_cpu(args.pid).zip(server_start).map(|(b, a)| b - a);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for t in &tasks {
        t.abort();
    }
    drop(listening);
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let mut lat: Vec<u64> = stats
        .latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .map(|m| m.1)
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        let last = lat.len().checked_sub(1)?;
        Some(lat[((p / 100.0) * last as f64).round() as usize] as f64 / 1e6)
    };
    let per_s = delivered as f64 / duration;
    log(format!(
        "{delivered} copies delivered in {duration} s: {per_s:.0}/s ({:.0} messages/s), p50 {:?} ms, p99 {:?} ms",
        per_s / n as f64,
        pct(50.0),
        pct(99.0)
    ));
    Ok(serde_json::json!({
        "cmd": "room", "label": args.label, "starttls": args.starttls, "occupants": n,
        "senders": senders, "mode": if rate.is_some() { "rate" } else { "saturate" },
        "rate": rate, "window": window, "duration": duration,
        "copies_delivered": delivered, "copies_per_s": per_s,
        "messages_per_s": per_s / n as f64,
        "latency_ms": { "p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0), "max": pct(100.0) },
        "server_cpu_s_per_10k_copies": server_cpu.filter(|_| delivered > 0).map(|c| c * 10_000.0 / delivered as f64),
    }))
}

/// Lines of `seconds since start, then each CPU's stolen time` (cumulative, in the
/// USER_HZ ticks of /proc/stat), every 10 ms until `until`.
fn sample_steal(start: Instant, until: Duration) -> String {
    let mut out = String::new();
    while start.elapsed() < until {
        let now = start.elapsed().as_secs_f64();
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
            break;
        };
        out.push_str(&format!("{now:.6}"));
        for line in stat.lines().filter(|l| is_cpu_line(l)) {
            out.push(' ');
            out.push_str(steal_field(line).unwrap_or("0"));
        }
        out.push('\n');
        std::thread::sleep(Duration::from_millis(10));
    }
    out
}

/// Time stolen from this machine's CPUs by the hypervisor, in seconds (the sum over
/// CPUs, from the first line of /proc/stat), and how many CPUs the machine has.
fn cpu_steal() -> Option<(f64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: f64 = steal_field(stat.lines().next()?)?.parse().ok()?;
    let cpus = stat.lines().filter(|l| is_cpu_line(l)).count();
    Some((ticks / 100.0, cpus.max(1)))
}

/// A line of /proc/stat about one CPU (`cpu0 …`), not their sum (`cpu …`).
fn is_cpu_line(line: &str) -> bool {
    line.starts_with("cpu") && !line.starts_with("cpu ")
}

/// The stolen time of a `cpu` line of /proc/stat, in USER_HZ ticks: its 8th number
/// (user nice system idle iowait irq softirq steal …).
fn steal_field(line: &str) -> Option<&str> {
    line.split_whitespace().nth(8)
}

/// utime + stime of a process in seconds, from /proc.
fn proc_cpu(pid: u32) -> Option<f64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux for every architecture this runs on.
    Some(ticks / 100.0)
}

/// Resident set size of a process in KiB, from /proc.
fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Times first contacts and full listings against a node's AXL-like API.
async fn axl(
    args: &Args,
    contacts: usize,
    listings: usize,
    page_size: u32,
) -> anyhow::Result<serde_json::Value> {
    use impmesh_axl::client::{AxlClient, ServerTrust};
    use impmesh_axl::soap::{Request, Response};
    let addr = args.addr.to_string();
    let (user, password) = (args.prefix.as_str(), args.password.as_str());
    let mut contact_ms = vec![];
    let mut session = None;
    for _ in 0..contacts.max(1) {
        let started = Instant::now();
        let mut client = AxlClient::connect(&addr, &args.domain, ServerTrust::FirstContact).await?;
        client
            .first_contact(user, password, &Request::GetCertificates)
            .await
            .context("first contact")?;
        contact_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        session = Some(client);
    }
    let mut client = session.context("no session")?;
    let cpu_before = proc_cpu(args.pid);
    let (mut users, mut pages) = (0usize, 0usize);
    let mut listing_ms = vec![];
    for _ in 0..listings.max(1) {
        let started = Instant::now();
        let mut cursor = None;
        loop {
            let request = Request::ListUsers {
                since_usn: 0,
                cursor,
                page_size,
                rooms: false,
            };
            let Response::Users(page) = client.call(&request).await? else {
                bail!("listUsers answered with something else");
            };
            pages += 1;
            users += page.users.len();
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        listing_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let cpu = proc_cpu(args.pid).zip(cpu_before).map(|(a, b)| a - b);
    let total_s: f64 = listing_ms.iter().sum::<f64>() / 1000.0;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok(serde_json::json!({
        "cmd": "axl", "label": args.label,
        "first_contact_ms_median": median(&mut contact_ms),
        "listing_users": users / listings.max(1),
        "listing_ms_median": median(&mut listing_ms),
        "users_per_s": users as f64 / total_s,
        "pages": pages, "page_size": page_size,
        "server_cpu_s_per_10k_users": cpu.map(|c| c / users as f64 * 10_000.0),
    }))
}
