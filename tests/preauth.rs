//! Benchmark (ignored): abandoned connections before authentication give their memory
//! back. A real `impmesh serve` process; `IMPMESH_BENCH_PREAUTH` connections (100,000
//! by default) that each send a stream header and nothing more, 25 per source address
//! over 127.1.0.0/16 so that the per-address cap is not what is measured; the node's
//! RSS before, with them open, and once they closed, which must come back within 10 %
//! of the figure before (issue 13, security review H3).
//!
//! Both this process and the node need a file descriptor per connection: where the
//! open-file hard limit is lower than that, the benchmark measures as many as it
//! allows and says so. Run it with
//! `cargo test --release --test preauth -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;

/// Connections from one source address.
const PER_SOURCE: usize = 25;
/// What each connection sends, and nothing more.
const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
     xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";
/// Descriptors left for everything else of each process.
const SPARE_FILES: u64 = 500;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Raises this process's soft open-file limit to the hard one; returns the hard one.
fn raise_file_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        },
    );
    hard
}

/// Kills the node when the benchmark ends, however it ends.
struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a benchmark: run with --ignored on a release build"]
async fn benchmark_abandoned_preauth_connections_give_their_memory_back() {
    let wanted: usize = std::env::var("IMPMESH_BENCH_PREAUTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let hard = raise_file_limit();
    let count = wanted.min(hard.saturating_sub(SPARE_FILES) as usize);
    if count < wanted {
        eprintln!(
            "the open-file hard limit is {hard}: measuring {count} connections instead of {wanted}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("impmesh.toml");
    std::fs::write(
        &config,
        format!(
            "domain = \"localhost\"\ndata_dir = \"{}\"\n\
             [listen]\nc2s = [\"127.0.0.1:0\"]\nc2s_direct_tls = []\nhttps = \"127.0.0.1:0\"\n\
             admin = \"127.0.0.1:0\"\nlinks = \"127.0.0.1:0\"\nclient_https = \"127.0.0.1:0\"\nturn = \"127.0.0.1:0\"\nturns = \"127.0.0.1:0\"\n\
             [limits]\nhandshake_timeout = 600\nmax_connections = {}\n\
             [log]\nlevel = \"warn\"\n",
            dir.path().join("data").display(),
            count + 100,
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_impmesh"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let node = Node(child);
    let pid = node.0.id();
    // The node's standard output is read to its end (a closed pipe would stop the node
    // at its next line); the first thing wanted from it is where it listens.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let addr = line
                .strip_prefix("impmesh: listening for XMPP clients on ")
                .and_then(|rest| rest.strip_suffix(" (STARTTLS)"))
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if let Some(addr) = addr {
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the node said where it listens");
    // Serving: a stream header gets the node's answer. Then its RSS is the baseline.
    {
        use tokio::io::AsyncReadExt as _;
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe.write_all(HEADER.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        assert!(probe.read(&mut buf).await.unwrap() > 0);
    }
    let before = rss_kib(pid);

    let slots = Arc::new(tokio::sync::Semaphore::new(500));
    let started = Instant::now();
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..count {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let source = (i / PER_SOURCE) as u32;
        let ip = Ipv4Addr::new(127, 1, (source >> 8) as u8, (source & 0xff) as u8);
        opening.spawn(async move {
            let _permit = permit;
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip.into(), 0))?;
            let mut stream = socket.connect(addr).await?;
            stream.write_all(HEADER.as_bytes()).await?;
            Ok::<_, std::io::Error>(stream)
        });
    }
    let mut open = Vec::with_capacity(count);
    while let Some(r) = opening.join_next().await {
        open.push(r.unwrap().unwrap());
    }
    // Each stream got the node's header back: the node holds every connection.
    let mut buf = [0u8; 512];
    for stream in &mut open {
        use tokio::io::AsyncReadExt as _;
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the node closed an abandoned stream too early");
    }
    let with = rss_kib(pid);
    eprintln!(
        "{count} abandoned connections opened in {:.1} s: RSS {before} KiB -> {with} KiB ({:.2} KiB each)",
        started.elapsed().as_secs_f64(),
        with.saturating_sub(before) as f64 / count as f64
    );
    drop(open);
    let limit = before + before / 10;
    let took = support::eventually(
        90,
        &format!("RSS back within 10 % of {before} KiB after close"),
        || async { rss_kib(pid) <= limit },
    )
    .await;
    let after = rss_kib(pid);
    eprintln!(
        "RSS {after} KiB {:.0} s after they closed ({:.2}x the figure before)",
        took.as_secs_f64(),
        after as f64 / before as f64
    );
    drop(node);
}
