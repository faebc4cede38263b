//! A 30-cluster mesh on one machine (one node per cluster, 127.0.0.1, port 0): every
//! cluster peers with every other (435 `peer add`s, each accepted on the other side),
//! every directory ends with the 29 other clusters' users, and a change on any cluster
//! reaches all 29 others. Prints the propagation latencies (docs/benchmarks.md records
//! them from a release build); the test itself only requires that they arrive.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use impmesh_axl::NodeControl as _;
use support::{TestNode, start_node};

const CLUSTERS: usize = 30;
const AXL_USER: &str = "icsync";
const AXL_PW: &str = "mesh-intercluster-pw";

fn name(i: usize) -> String {
    format!("c{i:02}.mesh.example.com")
}

async fn mesh_node(i: usize) -> TestNode {
    mesh_node_with(i, |_| {}).await
}

/// A cluster of the mesh, its configuration changed by `tweak` after the mesh's own.
async fn mesh_node_with(i: usize, tweak: impl FnOnce(&mut impmesh::config::Config)) -> TestNode {
    let node = start_node(move |c| {
        c.node.name = Some(format!("node1.{}", name(i)));
        c.node.cluster = Some(name(i));
        // Thirty stores on one PostgreSQL server would exceed its connection limit;
        // the store backends are tested elsewhere.
        c.store.url = "sqlite://impmesh.db".into();
        // Only notifyChange moves changes here, not the periodic pull.
        c.sync.period = 3600;
        // Every peer is on 127.0.0.1: the per-address caps would count them as one.
        c.https.max_connections_per_address = 4096;
        c.limits.link_handshakes_per_address = 4096;
        tweak(c);
    })
    .await;
    impmesh_axl::set_axl_user(&node.node.server.store, AXL_USER, AXL_PW)
        .await
        .unwrap();
    node.add_user(&format!("first{i:02}"), "pw").await;
    node
}

/// Peers every pair of `nodes`: i adds j for every i < j, j accepts i; eight first
/// contacts at a time.
async fn peer_all(nodes: &[Arc<TestNode>]) {
    let pairs: Vec<(usize, usize)> = (0..CLUSTERS)
        .flat_map(|i| (i + 1..CLUSTERS).map(move |j| (i, j)))
        .collect();
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = vec![];
    for (i, j) in pairs {
        let (a, b, slots) = (nodes[i].clone(), nodes[j].clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire().await.unwrap();
            a.node
                .control
                .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
                .await
                .unwrap();
            b.node.control.peer_accept(&name(i)).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_clusters_peer_sync_and_propagate_changes() {
    let started = Instant::now();
    let mut nodes = vec![];
    for i in 0..CLUSTERS {
        nodes.push(Arc::new(mesh_node(i).await));
    }
    peer_all(&nodes).await;
    let peered = started.elapsed();

    // Every directory gets the 29 other clusters' first users.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, node) in nodes.iter().enumerate() {
        for j in (0..CLUSTERS).filter(|j| *j != i) {
            let user = format!("first{j:02}");
            while node
                .node
                .server
                .store
                .remote_user(&user)
                .await
                .unwrap()
                .is_empty()
            {
                assert!(Instant::now() < deadline, "{} never saw {user}", name(i));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let synced = started.elapsed();

    // A change on each cluster in turn, timed until each of the 29 others has it.
    let mut latencies = vec![];
    for (k, origin) in nodes.iter().enumerate() {
        let user = format!("late{k:02}");
        let t0 = Instant::now();
        origin.node.control.add_user(&user, "pw").await.unwrap();
        let mut waiting: Vec<usize> = (0..CLUSTERS).filter(|j| *j != k).collect();
        while !waiting.is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{user} did not reach {:?}",
                waiting.iter().map(|j| name(*j)).collect::<Vec<_>>()
            );
            let mut still = vec![];
            for j in waiting {
                if nodes[j]
                    .node
                    .server
                    .store
                    .remote_user(&user)
                    .await
                    .unwrap()
                    .is_empty()
                {
                    still.push(j);
                } else {
                    latencies.push(t0.elapsed());
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "mesh of {CLUSTERS}: peered in {:.1} s, directories complete at {:.1} s; \
         propagation of {} changes x 29 peers: p50 {:?}, p99 {:?}, max {:?}",
        peered.as_secs_f64(),
        synced.as_secs_f64(),
        CLUSTERS,
        pct(0.50),
        pct(0.99),
        latencies.last().unwrap()
    );
    assert_eq!(latencies.len(), CLUSTERS * (CLUSTERS - 1));

    // Every peer of every cluster is in sync with all of its users.
    for node in &nodes {
        let peers = serde_json::to_value(node.node.control.peers().await.unwrap()).unwrap();
        let peers = peers.as_array().unwrap();
        assert_eq!(peers.len(), CLUSTERS - 1);
        for p in peers {
            assert_eq!(p["state"], "active");
            assert_eq!(p["associated_users"], 2, "{p}");
        }
    }

    federate(&nodes).await;
}

/// Presence across the whole mesh: the first user of every cluster logs in at home,
/// asks all 29 others for a subscription and approves theirs (870 subscriptions over
/// the router links); each sees the 29 others online. Then one cluster's router stops
/// and everyone sees its user go offline.
async fn federate(nodes: &[Arc<TestNode>]) {
    use futures::StreamExt as _;
    let started = Instant::now();
    let mut tasks = vec![];
    for (i, node) in nodes.iter().enumerate() {
        let mut client = node.client(&format!("first{i:02}"), "pw", Some("mesh"));
        tasks.push(tokio::spawn(async move {
            support::online(&mut client).await;
            support::send(&mut client, "<presence/>").await;
            for j in (0..CLUSTERS).filter(|j| *j != i) {
                let to = format!("first{j:02}@{}", support::DOMAIN);
                support::send(
                    &mut client,
                    &format!("<presence to='{to}' type='subscribe'/>"),
                )
                .await;
            }
            // Distinct users: a request can come twice (live, and replayed at login).
            let (mut online, mut approved) = (
                std::collections::HashSet::new(),
                std::collections::HashSet::new(),
            );
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            let mut seen_xml: Vec<String> = vec![];
            while online.len() < CLUSTERS - 1 || approved.len() < CLUSTERS - 1 {
                let event = tokio::time::timeout_at(deadline, client.next())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "first{i:02}: {} online, {} approved after 120 s; not seen online: {:?}; presence received: {seen_xml:?}",
                            online.len(),
                            approved.len(),
                            (0..CLUSTERS)
                                .map(|j| format!("first{j:02}@{}", support::DOMAIN))
                                .filter(|j| !online.contains(j) && !j.starts_with(&format!("first{i:02}@")))
                                .collect::<Vec<_>>()
                        )
                    });
                let s = match event {
                    Some(tokio_xmpp::Event::Stanza(s)) => s,
                    other => {
                        seen_xml.push(format!("EVENT {other:?}"));
                        continue;
                    }
                };
                let el = support::element(s);
                if el.name() == "presence" {
                    seen_xml.push(String::from(&el));
                }
                if el.name() != "presence" {
                    continue;
                }
                let from = el.attr("from").unwrap_or_default().to_owned();
                let bare = from.split('/').next().unwrap_or_default().to_owned();
                match el.attr("type") {
                    Some("subscribe") => {
                        support::send(
                            &mut client,
                            &format!("<presence to='{bare}' type='subscribed'/>"),
                        )
                        .await;
                        approved.insert(bare);
                    }
                    None if !bare.starts_with(&format!("first{i:02}@")) => {
                        online.insert(bare);
                    }
                    _ => {}
                }
            }
            client
        }));
    }
    let mut clients = vec![];
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    println!(
        "mesh of {CLUSTERS}: {} subscriptions done and every user sees the {} others online \
         in {:.1} s",
        CLUSTERS * (CLUSTERS - 1),
        CLUSTERS - 1,
        started.elapsed().as_secs_f64()
    );
    // The last approvals may still be on their way to the rosters.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, node) in nodes.iter().enumerate() {
        loop {
            let (_, roster) = node
                .node
                .server
                .store
                .roster(&format!("first{i:02}"))
                .await
                .unwrap();
            let both = roster
                .iter()
                .filter(|r| r.subscription == impmesh_store::Subscription::Both)
                .count();
            if both == CLUSTERS - 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "first{i:02}: {both} of {} roster items are both-way: {roster:?}",
                roster.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Cluster 0's router stops: its user goes offline for all 29 others.
    nodes[0].node.server.shutdown(Duration::from_secs(5)).await;
    for client in clients.iter_mut().skip(1) {
        support::expect(client, 30, "first00 offline", |e| {
            support::is_presence_from(e, "first00", Some("unavailable"))
        })
        .await;
    }
}

/// User and system CPU seconds this process has used so far.
fn process_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<f64> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse::<f64>().unwrap() / 100.0)
        .collect();
    (f[0], f[1])
}

/// The benchmark of the issue: 30 clusters of 15,000 users each (450,000 in all), from
/// a cold start (users present, no peering yet) until every directory holds the
/// 435,000 users of its 29 peers; then the steady state and the propagation of one
/// change. Not run by CI; run it on a release build:
///
/// ```sh
/// cargo test --release --test mesh -- --ignored --nocapture
/// IMPMESH_MESH_USERS=2000 cargo test --release --test mesh -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: minutes and gigabytes; run with --ignored on a release build"]
async fn benchmark_thirty_clusters_of_fifteen_thousand_users() {
    let users: usize = std::env::var("IMPMESH_MESH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15_000);
    let verifiers = (
        impmesh_store::scram::ScramVerifier::new(impmesh_store::scram::ScramHash::Sha1, "pw", 4096)
            .unwrap(),
        impmesh_store::scram::ScramVerifier::new(
            impmesh_store::scram::ScramHash::Sha256,
            "pw",
            4096,
        )
        .unwrap(),
    );
    let mut nodes = vec![];
    for i in 0..CLUSTERS {
        let node = mesh_node(i).await;
        let names: Vec<String> = (0..users).map(|u| format!("c{i:02}u{u:05}")).collect();
        node.node
            .server
            .store
            .import_users(
                &names,
                (&verifiers.0, &verifiers.1),
                &name(i),
                &format!("node1.{}", name(i)),
            )
            .await
            .unwrap();
        nodes.push(Arc::new(node));
    }
    println!("BENCH mesh: {CLUSTERS} clusters x {users} users imported; peering");
    let cpu_at_start = process_cpu();
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = vec![];
    for i in 0..CLUSTERS {
        for j in i + 1..CLUSTERS {
            let (a, b, slots) = (nodes[i].clone(), nodes[j].clone(), slots.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire().await.unwrap();
                a.node
                    .control
                    .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
                    .await
                    .unwrap();
                b.node.control.peer_accept(&name(i)).await.unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let peered = started.elapsed();
    // Each peer contributes its users plus its first user.
    let expected = ((CLUSTERS - 1) * (users + 1)) as i64;
    // A complete directory stays complete (nothing changes meanwhile): count each node
    // until it is, and no more, so the counting does not compete with the syncs.
    let mut done = [false; CLUSTERS];
    loop {
        let mut complete = true;
        for (i, node) in nodes.iter().enumerate() {
            if done[i] {
                continue;
            }
            let mut total = 0;
            for j in (0..CLUSTERS).filter(|j| *j != i) {
                // A store saturated by the syncs may time out: count it as not yet.
                total += node
                    .node
                    .server
                    .store
                    .remote_user_count(&name(j))
                    .await
                    .unwrap_or(0);
            }
            if total != expected {
                complete = false;
                break;
            }
            done[i] = true;
        }
        if complete {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "not complete within an hour"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let complete = started.elapsed();
    let cpu_at_end = process_cpu();
    println!(
        "BENCH mesh: the cold start took {:.1} user + {:.1} system CPU-s",
        cpu_at_end.0 - cpu_at_start.0,
        cpu_at_end.1 - cpu_at_start.1
    );
    // Where one node's store spent its time (wall time, queueing included).
    let mut latency = String::new();
    nodes[0].node.server.store.latency().render(&mut latency);
    for line in latency
        .lines()
        .filter(|l| l.contains("_sum{") || l.contains("_count{"))
    {
        println!("BENCH mesh: node 0 {line}");
    }

    // Steady state: 30 s with nothing changing (periodic pulls are an hour apart here,
    // so this is the agents' idle cost), process-wide.
    let cpu = || {
        let (user, sys) = process_cpu();
        user + sys
    };
    let rss_kib = || {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .map(|v| v.parse::<u64>().unwrap())
            })
            .unwrap()
    };
    let cpu0 = cpu();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let idle_cpu = cpu() - cpu0;

    let mut latencies = vec![];
    for (k, origin) in nodes.iter().enumerate().take(10) {
        let user = format!("late{k:02}");
        let t0 = Instant::now();
        origin.node.control.add_user(&user, "pw").await.unwrap();
        let mut waiting: Vec<usize> = (0..CLUSTERS).filter(|j| *j != k).collect();
        while !waiting.is_empty() {
            let mut still = vec![];
            for j in waiting {
                if nodes[j]
                    .node
                    .server
                    .store
                    .remote_user(&user)
                    .await
                    .unwrap()
                    .is_empty()
                {
                    still.push(j);
                } else {
                    latencies.push(t0.elapsed());
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "BENCH mesh: {CLUSTERS} clusters x {users} users; peered in {:.1} s; every directory \
         complete ({expected} remote users each) {:.1} s after the first peer add; idle: \
         {:.3} CPU-s per node per 30 s, RSS {} MiB for the process ({} MiB per node); \
         propagation to 29 peers ({} samples): p50 {:?}, p99 {:?}, max {:?}",
        peered.as_secs_f64(),
        complete.as_secs_f64(),
        idle_cpu / CLUSTERS as f64,
        rss_kib() / 1024,
        rss_kib() / 1024 / CLUSTERS as u64,
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().unwrap()
    );
}

/// Presence fan-out across the mesh: one user on cluster 0 with 1,000 subscribers spread
/// over the 30 clusters (rosters seeded in the stores); times how long a presence
/// change takes to reach all of them. Not run by CI; run it on a release build:
///
/// ```sh
/// cargo test --release --test mesh benchmark_presence_fan_out -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --ignored on a release build"]
async fn benchmark_presence_fan_out() {
    use futures::StreamExt as _;
    const SUBSCRIBERS: usize = 1_000;
    let mut nodes = vec![];
    for i in 0..CLUSTERS {
        nodes.push(Arc::new(mesh_node(i).await));
    }
    let domain = support::DOMAIN;
    nodes[0].add_user("publisher", "pw").await;
    for k in 0..SUBSCRIBERS {
        nodes[k % CLUSTERS].add_user(&format!("sub{k}"), "pw").await;
    }
    // The subscriptions, as the RFC 6121 handshake would have left them.
    let item = |contact: String, subscription| impmesh_store::RosterItem {
        contact,
        subscription,
        ..Default::default()
    };
    for k in 0..SUBSCRIBERS {
        let contact = format!("sub{k}@{domain}");
        nodes[0]
            .node
            .server
            .store
            .put_roster_item(
                "publisher",
                &item(contact, impmesh_store::Subscription::From),
            )
            .await
            .unwrap();
        nodes[k % CLUSTERS]
            .node
            .server
            .store
            .put_roster_item(
                &format!("sub{k}"),
                &item(
                    format!("publisher@{domain}"),
                    impmesh_store::Subscription::To,
                ),
            )
            .await
            .unwrap();
    }
    peer_all(&nodes).await;
    // Node 0 knows where every subscriber lives.
    homes_known(&nodes[0], (0..SUBSCRIBERS).map(|k| format!("sub{k}"))).await;

    // Each subscriber's client is read all the time by its own task, which stamps each
    // stanza as it arrives.
    let mut subscribers = vec![];
    for k in 0..SUBSCRIBERS {
        let mut c = nodes[k % CLUSTERS].client(&format!("sub{k}"), "pw", Some("fan"));
        support::online(&mut c).await;
        support::send(&mut c, "<presence/>").await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = c.next().await {
                if let tokio_xmpp::Event::Stanza(s) = event
                    && tx.send((Instant::now(), support::element(s))).is_err()
                {
                    break;
                }
            }
        });
        subscribers.push(rx);
    }
    let mut publisher = nodes[0].client("publisher", "pw", Some("fan"));
    support::online(&mut publisher).await;
    support::send(&mut publisher, "<presence/>").await;
    // Everyone sees the publisher online first (the links are up).
    for (k, rx) in subscribers.iter_mut().enumerate() {
        from_publisher(rx, &format!("the publisher online at sub{k}"), false).await;
    }

    let t0 = Instant::now();
    support::send(&mut publisher, "<presence><show>away</show></presence>").await;
    let mut times = vec![];
    for (k, rx) in subscribers.iter_mut().enumerate() {
        let at = from_publisher(rx, &format!("the publisher away at sub{k}"), true).await;
        times.push(at - t0);
    }
    times.sort();
    println!(
        "BENCH presence fan-out: one change to {SUBSCRIBERS} subscribers over {CLUSTERS} \
         clusters: all reached in {:?} (p50 {:?}, p99 {:?})",
        times.last().unwrap(),
        times[times.len() / 2],
        times[times.len() * 99 / 100]
    );
}

/// Waits (300 s at most) until `node`'s directory knows where each of `users` lives.
async fn homes_known(node: &TestNode, users: impl Iterator<Item = String>) {
    let deadline = Instant::now() + Duration::from_secs(300);
    for user in users {
        while node.node.server.store.home_of(&user).await.unwrap() == impmesh_store::Home::Unknown {
            assert!(
                Instant::now() < deadline,
                "{user} never reached {}",
                node.config.node_name()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// When the publisher's presence (away or not) reached a subscriber's reader task.
async fn from_publisher(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, minidom::Element)>,
    what: &str,
    away: bool,
) -> Instant {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let Ok(Some((at, el))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            panic!("timed out waiting for {what}");
        };
        if support::is_presence_from(&el, "publisher", None)
            && el.get_child("show", "jabber:client").is_some() == away
        {
            return at;
        }
    }
}

/// The chat room benchmark of issue 16: a room on cluster 0 with 1,000 occupants spread
/// over the 30 clusters (34 or 33 each), entered by tokio-xmpp clients; an occupant on
/// cluster 1 sends 20 messages, 250 ms apart. Each goes to the room's home over one
/// link, and from there once to each of the 29 other clusters, which hand it to their
/// occupants. Every copy is timed from the send to its arrival at the occupant's client
/// (each client is read all the time by its own task); every occupant must get every
/// message exactly once. Not run by CI; run it on a release build:
///
/// ```sh
/// cargo test --release --test mesh benchmark_room_fan_out -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --ignored on a release build"]
async fn benchmark_room_fan_out() {
    use futures::StreamExt as _;
    const OCCUPANTS: usize = 1_000;
    const MESSAGES: usize = 20;
    let room = format!("fan@conference.{}", support::DOMAIN);
    let mut nodes = vec![];
    for i in 0..CLUSTERS {
        nodes.push(Arc::new(
            mesh_node_with(i, |c| {
                c.muc.enabled = true;
                c.muc.max_occupants = OCCUPANTS;
                // Entering sends the newcomer every occupant at once.
                c.limits.session_queue = 2_000;
                c.muc.message_rate = 10.0;
            })
            .await,
        ));
    }
    for k in 0..OCCUPANTS {
        nodes[k % CLUSTERS].add_user(&format!("occ{k}"), "pw").await;
    }
    let started = Instant::now();
    peer_all(&nodes).await;
    // The room's home knows where every occupant lives.
    homes_known(&nodes[0], (0..OCCUPANTS).map(|k| format!("occ{k}"))).await;
    println!(
        "mesh of {CLUSTERS} peered with {OCCUPANTS} users in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // occ0 makes the room on cluster 0, an instant room sized for all.
    let enter = |nick: &str| {
        format!(
            "<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'>\
             <history maxstanzas='0'/></x></presence>"
        )
    };
    let mut first = nodes[0].client("occ0", "pw", Some("fan"));
    support::online(&mut first).await;
    support::send(&mut first, &enter("occ0")).await;
    support::expect(&mut first, 10, "occ0 in the room", |e| {
        e.attr("from") == Some(&format!("{room}/occ0"))
    })
    .await;
    support::send(
        &mut first,
        &format!(
            "<iq type='set' id='open' to='{room}'><query xmlns='http://jabber.org/protocol/muc#owner'>\
             <x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
             <field var='muc#roomconfig_maxusers'><value>{OCCUPANTS}</value></field>\
             </x></query></iq>"
        ),
    )
    .await;
    let opened = support::expect(&mut first, 10, "the room opened", |e| {
        e.attr("id") == Some("open")
    })
    .await;
    assert_eq!(
        opened.attr("type"),
        Some("result"),
        "{}",
        String::from(&opened)
    );
    // Every cluster knows where the room lives.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, node) in nodes.iter().enumerate() {
        while node.node.server.store.room_home("fan").await.unwrap()
            == impmesh_store::RoomHome::Unknown
        {
            assert!(
                Instant::now() < deadline,
                "{} never learnt the room",
                name(i)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Each occupant's client, once in, is read by its own task, which stamps each
    // message of the room as it arrives (and drops the rest: the presence of those
    // entering after it).
    type Stamped = tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>;
    let reader = |mut c: tokio_xmpp::Client| -> Stamped {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = c.next().await {
                if let tokio_xmpp::Event::Stanza(s) = event {
                    let el = support::element(s);
                    if el.name() == "message"
                        && el.attr("type") == Some("groupchat")
                        && let Some(body) = el.get_child("body", "jabber:client")
                        && tx.send((Instant::now(), body.text())).is_err()
                    {
                        break;
                    }
                }
            }
        });
        rx
    };
    let entering = Instant::now();
    let mut readers = vec![reader(first)];
    let others = futures::stream::iter(1..OCCUPANTS)
        .map(|k| {
            let (node, room, presence) = (
                nodes[k % CLUSTERS].clone(),
                room.clone(),
                enter(&format!("occ{k}")),
            );
            async move {
                let mut c = node.client(&format!("occ{k}"), "pw", Some("fan"));
                support::online(&mut c).await;
                support::send(&mut c, &presence).await;
                let own = format!("{room}/occ{k}");
                let el = support::expect(&mut c, 60, &format!("occ{k} in the room"), |e| {
                    e.name() == "presence" && e.attr("from") == Some(own.as_str())
                })
                .await;
                assert_ne!(el.attr("type"), Some("error"), "{}", String::from(&el));
                // The sender's copies are not timed; the others are read from now on.
                if k == 1 {
                    (k, Some(c), tokio::sync::mpsc::unbounded_channel().1)
                } else {
                    (k, None, reader(c))
                }
            }
        })
        .buffer_unordered(25)
        .collect::<Vec<_>>()
        .await;
    let mut others = others;
    others.sort_by_key(|(k, _, _)| *k);
    let mut sender = None;
    for (_, client, rx) in others {
        sender = sender.or(client);
        readers.push(rx);
    }
    println!(
        "{OCCUPANTS} occupants entered in {:.1} s",
        entering.elapsed().as_secs_f64()
    );
    let mut sender = sender.unwrap();
    let mut sent = vec![];
    for m in 0..MESSAGES {
        sent.push(Instant::now());
        support::send(
            &mut sender,
            &format!("<message to='{room}' type='groupchat' id='m{m}'><body>m{m}</body></message>"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut times = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (k, rx) in readers.iter_mut().enumerate() {
        if k == 1 {
            continue;
        }
        let mut seen = [false; MESSAGES];
        while seen.contains(&false) {
            let Ok(Some((at, body))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
                panic!(
                    "occ{k} got {} of {MESSAGES} messages",
                    seen.iter().filter(|s| **s).count()
                );
            };
            let m: usize = body.trim_start_matches('m').parse().unwrap();
            assert!(!seen[m], "occ{k} got m{m} twice");
            seen[m] = true;
            times.push(at - sent[m]);
        }
    }
    // Nothing comes twice: a last look after the others have had their time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (k, rx) in readers.iter_mut().enumerate() {
        assert!(rx.try_recv().is_err(), "occ{k} got a copy too many");
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "BENCH room fan-out: {MESSAGES} messages from cluster 1 through the room's home on \
         cluster 0 to {} occupants over {CLUSTERS} clusters ({} copies): p50 {:?}, p90 {:?}, \
         p99 {:?}, max {:?}",
        OCCUPANTS - 1,
        times.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        times.last().unwrap()
    );
}
