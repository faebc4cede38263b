//! The durable outbox keeps its promise: what waits for a remote node is delivered in
//! order and once, streamed under the link's ack window (never read whole), through
//! flaps mid-backlog; what is bounced at its time to live is never delivered after;
//! and a per-node cap bounces beyond it with a clear error and an alarm.

#![allow(clippy::unwrap_used)]

mod support;

use impmesh::config::Config;
use impmesh_axl::NodeControl as _;
use support::{
    AXL_PW, AXL_USER, DOMAIN, TestNode, body, collect, eventually, expect, mesh_cluster as cluster,
    online, send,
};

const A: &str = "cluster-a.example.com";
const B: &str = "cluster-b.example.com";
const B_NODE: &str = "node1.cluster-b.example.com";

/// A (alice) peered with B (bob), A's link to B through a proxy the test can cut.
async fn pair(tweak_a: impl FnOnce(&mut Config)) -> (TestNode, TestNode, support::Proxy) {
    let a = cluster(A, &["alice"], tweak_a).await;
    // Bob's client reads a backlog as fast as the link brings it: room for it in his
    // session (the benchmark's 100,000 messages are acknowledged by stream management
    // in batches).
    let b = cluster(B, &["bob"], |c| {
        c.limits.session_queue = 10_000;
        c.limits.max_unacked = 200_000;
    })
    .await;
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    b.node.control.peer_accept(A).await.unwrap();
    let store_a = a.node.server.store.clone();
    eventually(10, "B known to A", || async {
        store_a.remote_user_count(B).await.unwrap() == 1
            && store_a.peer_node(B_NODE).await.unwrap().is_some()
    })
    .await;
    let proxy = support::Proxy::start(b.node.links_addr.unwrap()).await;
    let mut node = store_a.peer_node(B_NODE).await.unwrap().unwrap();
    node.link_port = proxy.addr.port();
    store_a.set_peer_nodes(B, &[node]).await.unwrap();
    (a, b, proxy)
}

/// A's outgoing link to B as `impmesh peer status` shows it.
fn link_to_b(a: &TestNode) -> Option<impmesh_router::LinkStatus> {
    a.node
        .server
        .link_status()
        .into_iter()
        .find(|l| l.direction == impmesh_router::LinkDirection::Out && l.node == B_NODE)
}

async fn link_down(a: &TestNode) {
    eventually(30, "A's link to B down", || async {
        link_to_b(a).is_some_and(|l| !l.up)
    })
    .await;
}

fn chat(n: usize) -> String {
    format!("<message to='bob@{DOMAIN}' type='chat' id='m{n}'><body>{n}</body></message>")
}

/// Reads bodies on `client` until `n` arrived; returns them in arrival order.
async fn bodies(client: &mut tokio_xmpp::Client, n: usize) -> Vec<String> {
    let mut got = vec![];
    while got.len() < n {
        let m = expect(client, 60, "the next message", |e| body(e).is_some()).await;
        got.push(body(&m).unwrap());
    }
    got
}

#[tokio::test]
async fn a_backlog_is_streamed_under_the_window_and_delivered_once_through_flaps() {
    const WINDOW: usize = 16;
    const BACKLOG: usize = 600;
    let (a, b, proxy) = pair(|c| c.limits.link_window = WINDOW).await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    // The link comes up with a first message, then goes down.
    send(&mut alice, &chat(0)).await;
    assert_eq!(bodies(&mut bob, 1).await, ["0"]);
    proxy.cut_and_refuse();
    link_down(&a).await;

    // A backlog builds up in the outbox.
    for i in 1..=BACKLOG {
        send(&mut alice, &chat(i)).await;
    }
    let store_a = a.node.server.store.clone();
    // (The link's count follows each stored batch's commit.)
    eventually(30, "the backlog in A's outbox, and counted", || async {
        store_a.outbox_size(B_NODE).await.unwrap().0 == BACKLOG as u64
            && link_to_b(&a).unwrap().outbox_rows == BACKLOG as u64
    })
    .await;

    // Back, and cut three times while the backlog drains.
    proxy.restore();
    let mut got = vec![];
    for _ in 0..3 {
        got.extend(bodies(&mut bob, 50).await);
        proxy.cut();
        link_down(&a).await;
    }
    // Meanwhile new messages queue behind the backlog.
    for i in BACKLOG + 1..=BACKLOG + 10 {
        send(&mut alice, &chat(i)).await;
    }
    let rest = BACKLOG + 10 - got.len();
    got.extend(bodies(&mut bob, rest).await);
    let expected: Vec<String> = (1..=BACKLOG + 10).map(|i| i.to_string()).collect();
    assert_eq!(got, expected, "every message once, in order");
    assert!(
        collect(&mut bob, 500, |e| body(e).is_some())
            .await
            .is_empty(),
        "and nothing twice"
    );
    eventually(10, "A's outbox empty", || async {
        store_a.outbox_size(B_NODE).await.unwrap() == (0, 0)
    })
    .await;
    let link = link_to_b(&a).unwrap();
    assert!(
        link.peak_in_flight <= WINDOW as u64,
        "at most the window in flight: {}",
        link.peak_in_flight
    );
    assert_eq!(link.outbox_rows, 0);
}

#[tokio::test]
async fn a_message_bounced_at_its_time_to_live_is_never_delivered_afterwards() {
    let (a, b, proxy) = pair(|c| {
        c.limits.outbox_ttl = 2;
        c.limits.link_ack_timeout = 1;
    })
    .await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(&mut alice, &chat(0)).await;
    assert_eq!(bodies(&mut bob, 1).await, ["0"]);

    // A black hole: the messages are written to a link that never answers, so they
    // are in flight, unacknowledged, when the link is given up.
    proxy.freeze_and_refuse();
    for i in 1..=3 {
        send(&mut alice, &chat(i)).await;
    }
    link_down(&a).await;
    // ... and one more waits in the outbox.
    send(&mut alice, &chat(4)).await;
    for i in 1..=4 {
        let id = format!("m{i}");
        let error = expect(&mut alice, 30, "the bounce at the time to live", |e| {
            e.attr("id") == Some(id.as_str()) && e.attr("type") == Some("error")
        })
        .await;
        assert!(String::from(&error).contains("remote-server-timeout"));
    }

    // The link returns: what was bounced is not delivered; what comes next is (sent
    // once the link is up, or its two seconds to live could run out in the outbox).
    proxy.restore();
    eventually(60, "A's link to B up again", || async {
        link_to_b(&a).is_some_and(|l| l.up)
    })
    .await;
    send(&mut alice, &chat(5)).await;
    let got = expect(&mut bob, 60, "the next message", |e| body(e).is_some()).await;
    assert_eq!(body(&got).as_deref(), Some("5"), "not a bounced one");
    assert!(
        collect(&mut bob, 500, |e| body(e).is_some())
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_full_outbox_bounces_with_a_clear_error_and_an_alarm() {
    let (a, _b, proxy) = pair(|c| c.limits.outbox_max_rows = 3).await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    proxy.cut_and_refuse();
    // The link is opened by the first message and fails: everything waits.
    for i in 1..=5 {
        send(&mut alice, &chat(i)).await;
    }
    for i in [4, 5] {
        let id = format!("m{i}");
        let error = expect(&mut alice, 30, "the bounce beyond the cap", |e| {
            e.attr("id") == Some(id.as_str()) && e.attr("type") == Some("error")
        })
        .await;
        let text = String::from(&error);
        assert!(text.contains("resource-constraint"), "{text}");
        assert!(text.contains("too many messages wait"), "{text}");
    }
    let store_a = a.node.server.store.clone();
    eventually(10, "three messages kept", || async {
        store_a.outbox_size(B_NODE).await.unwrap().0 == 3
    })
    .await;
    let alarmed = store_a
        .active_alarms()
        .await
        .unwrap()
        .into_iter()
        .any(|al| al.name == "InterClusterOutboxFull" && al.subject == B_NODE);
    assert!(alarmed);
    // The link returns, the outbox drains, the alarm clears.
    proxy.restore();
    eventually(30, "the alarm cleared", || async {
        !store_a
            .active_alarms()
            .await
            .unwrap()
            .iter()
            .any(|al| al.name == "InterClusterOutboxFull")
    })
    .await;
    assert_eq!(store_a.outbox_size(B_NODE).await.unwrap(), (0, 0));
}

/// A backlog of 100,000 messages drains with memory bounded by the ack window, not by
/// the backlog: prints the node's resident memory before, at the peak, and after.
/// Not run by CI (it takes minutes in a debug build); run it on a release build:
///
/// ```sh
/// cargo test --release --test outbox -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --ignored on a release build"]
async fn benchmark_a_backlog_of_100000_messages() {
    const BACKLOG: usize = 100_000;
    let (a, b, proxy) = pair(|_| {}).await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    send(&mut alice, &chat(0)).await;
    assert_eq!(bodies(&mut bob, 1).await, ["0"]);
    proxy.cut_and_refuse();
    link_down(&a).await;
    // The backlog as a node holds it after a day's outage: rows in the outbox.
    let store_a = a.node.server.store.clone();
    let rows: Vec<(String, i64)> = (1..=BACKLOG)
        .map(|i| {
            (
                format!(
                    "<message xmlns='jabber:client' from='alice@{DOMAIN}/phone' \
                     to='bob@{DOMAIN}' type='chat'><body>{i}</body></message>"
                ),
                0,
            )
        })
        .collect();
    for chunk in rows.chunks(5_000) {
        store_a.outbox_push(B_NODE, B, chunk).await.unwrap();
    }
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_owned()))
            .unwrap()
    };
    println!("RSS with the backlog stored: {}", rss());
    let started = std::time::Instant::now();
    proxy.restore();
    let mut peak = String::new();
    let mut seen = 0usize;
    while seen < BACKLOG {
        let m = expect(&mut bob, 60, "the backlog", |e| body(e).is_some()).await;
        seen += 1;
        assert_eq!(body(&m).unwrap(), seen.to_string());
        if seen.is_multiple_of(10_000) {
            peak = rss();
            println!(
                "{seen} delivered, RSS {peak}, in flight {}",
                link_to_b(&a).unwrap().in_flight
            );
        }
    }
    println!(
        "100,000 delivered in order in {:.1} s; peak in flight {}; RSS {} (both nodes and both clients in this process)",
        started.elapsed().as_secs_f64(),
        link_to_b(&a).unwrap().peak_in_flight,
        peak
    );
}
