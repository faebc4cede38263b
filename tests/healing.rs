//! The mesh heals without the admins: a removed peer is told and shows it, what waited
//! for it is bounced; peers on different releases (a feature turned off) keep working
//! and show what is missing; the mesh's limits (one domain, at most 30 clusters) are
//! refused with clear errors.

#![allow(clippy::unwrap_used)]

mod support;

use impmesh_axl::NodeControl as _;
use support::{
    AXL_PW, AXL_USER, DOMAIN, TestNode, body, eventually, expect, has_alarm,
    mesh_cluster as cluster, metrics, online, send,
};

const A: &str = "cluster-a.example.com";
const B: &str = "cluster-b.example.com";

/// A adds B, B accepts; both know each other's users and nodes.
async fn peer(a: &TestNode, b: &TestNode) {
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    b.node
        .control
        .peer_accept(&a.config.cluster_name())
        .await
        .unwrap();
    for (node, other) in [(a, b), (b, a)] {
        let store = node.node.server.store.clone();
        let (cluster, node_name) = (other.config.cluster_name(), other.config.node_name());
        eventually(10, "the peer's users and nodes known", || async {
            store.remote_user_count(&cluster).await.unwrap() > 0
                && store.peer_node(&node_name).await.unwrap().is_some()
        })
        .await;
    }
}

/// One peer's entry of `peer status`.
async fn status_of(node: &TestNode, cluster: &str) -> serde_json::Value {
    let peers = serde_json::to_value(node.node.control.peers().await.unwrap()).unwrap();
    peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["cluster"] == cluster)
        .cloned()
        .unwrap_or_default()
}

fn chat(to: &str, id: &str) -> String {
    format!("<message to='{to}@{DOMAIN}' type='chat' id='{id}'><body>{id}</body></message>")
}

#[tokio::test]
async fn a_deleted_peer_is_told_and_what_waited_for_it_is_bounced() {
    let a = cluster(A, &["alice"], |_| {}).await;
    let b = cluster(B, &["bob"], |_| {}).await;
    peer(&a, &b).await;
    // A's link to B goes through a proxy the test can cut.
    let store_a = a.node.server.store.clone();
    let proxy = support::Proxy::start(b.node.links_addr.unwrap()).await;
    let mut node = store_a
        .peer_node(&format!("node1.{B}"))
        .await
        .unwrap()
        .unwrap();
    node.link_port = proxy.addr.port();
    store_a.set_peer_nodes(B, &[node]).await.unwrap();
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("desk"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(&mut alice, &chat("bob", "hello")).await;
    expect(&mut bob, 10, "a message before", |e| {
        body(e).as_deref() == Some("hello")
    })
    .await;
    // Both sides speak peer-removal.
    let s = status_of(&a, B).await;
    assert_eq!(s["live"]["peer_features"][0], "peer-removal", "{s}");
    assert_eq!(s["live"]["missing_features"].as_array().unwrap().len(), 0);

    // A message waits in A's outbox for B (its link cut), then A removes B.
    proxy.cut_and_refuse();
    eventually(10, "A's link to B down", || async {
        a.node
            .server
            .link_status()
            .iter()
            .any(|l| l.cluster == B && l.direction == impmesh_router::LinkDirection::Out && !l.up)
    })
    .await;
    send(&mut alice, &chat("bob", "waiting")).await;
    eventually(10, "the message in the outbox", || async {
        store_a.outbox_size(&format!("node1.{B}")).await.unwrap().0 == 1
    })
    .await;
    a.node.control.peer_delete(B).await.unwrap();
    let e = expect(&mut alice, 10, "the waiting message bounced", |e| {
        e.attr("id") == Some("waiting") && e.attr("type") == Some("error")
    })
    .await;
    assert!(
        String::from(&e).contains("no longer peered"),
        "{}",
        String::from(&e)
    );

    // B was told: A shows as removed there, with the alarm; A's users are gone from
    // B's directory, and B's messages to them bounce at once.
    eventually(10, "A removed on B", || async {
        status_of(&b, A).await["state"] == "removed"
    })
    .await;
    assert!(has_alarm(&b, "InterClusterPeerRemoved", A).await);
    assert!(
        b.node
            .server
            .store
            .remote_user("alice")
            .await
            .unwrap()
            .is_empty()
    );
    send(&mut bob, &chat("alice", "after-b")).await;
    let e = expect(&mut bob, 10, "B's bounce", |e| {
        e.attr("id") == Some("after-b") && e.attr("type") == Some("error")
    })
    .await;
    assert!(String::from(&e).contains("service-unavailable"));

    // On A: B is gone, what waited for it was bounced (not kept), and new messages to
    // B's users bounce at once.
    assert!(store_a.peer(B).await.unwrap().is_none());
    assert_eq!(
        store_a.outbox_size(&format!("node1.{B}")).await.unwrap().0,
        0
    );
    send(&mut alice, &chat("bob", "after-a")).await;
    let e = expect(&mut alice, 10, "A's bounce", |e| {
        e.attr("id") == Some("after-a") && e.attr("type") == Some("error")
    })
    .await;
    assert!(String::from(&e).contains("service-unavailable"));
    assert!(
        !a.node
            .server
            .link_status()
            .iter()
            .any(|l| l.cluster == B && l.up),
        "no link to B stays up"
    );
    // B's admin removes A too: the alarm clears.
    b.node.control.peer_delete(A).await.unwrap();
    assert!(!has_alarm(&b, "InterClusterPeerRemoved", A).await);
}

#[tokio::test]
async fn a_peer_with_a_feature_turned_off_keeps_working_and_shows_it() {
    let a = cluster(A, &["alice"], |_| {}).await;
    let b = cluster(B, &["bob"], |c| {
        c.sync.disable_features = vec!["peer-removal".into()];
    })
    .await;
    peer(&a, &b).await;
    // A sees what B lacks; both still sync and route.
    eventually(10, "in sync", || async {
        status_of(&a, B).await["live"]["state"] == "in-sync"
    })
    .await;
    let s = status_of(&a, B).await;
    assert_eq!(s["live"]["missing_features"][0], "peer-removal", "{s}");
    assert_eq!(s["live"]["peer_protocol"], 2);
    assert_eq!(s["live"]["state"], "in-sync");
    let mut bob = b.client("bob", "pw", Some("desk"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    send(&mut alice, &chat("bob", "still")).await;
    expect(&mut bob, 10, "routing works", |e| {
        body(e).as_deref() == Some("still")
    })
    .await;
    // The link header announces the features too.
    let links = a.node.server.link_status();
    let out = links
        .iter()
        .find(|l| l.cluster == B && l.direction == impmesh_router::LinkDirection::Out)
        .unwrap();
    assert_eq!(out.peer_protocol, Some(2));
    assert_eq!(out.peer_features, ["rooms"]);

    // A removes B without telling it (B would not understand): B is not marked
    // removed; it finds out at its next sync.
    a.node.control.peer_delete(B).await.unwrap();
    assert_eq!(status_of(&b, A).await["state"], "active");
    assert!(!has_alarm(&b, "InterClusterPeerRemoved", A).await);
}

#[tokio::test]
async fn a_mesh_serves_one_domain_and_at_most_its_peer_limit() {
    let a = cluster(A, &["alice"], |c| c.sync.max_peers = 1).await;
    let b = cluster(B, &["bob"], |_| {}).await;
    peer(&a, &b).await;
    // A third cluster is one too many for A: refused by A when C adds it ...
    let c = cluster("cluster-c.example.com", &["carl"], |_| {}).await;
    let e = c
        .node
        .control
        .peer_add(&a.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already has 1 peers"), "{e}");
    // ... and by A's own admin.
    let e = a
        .node
        .control
        .peer_add(&c.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already has 1 peers"), "{e}");
    assert_eq!(a.node.server.store.peers().await.unwrap().len(), 1);

    // A cluster of another XMPP domain is not a peer.
    let other = cluster("cluster-d.example.com", &["dan"], |c| {
        c.domain = "other.example".into();
    })
    .await;
    let e = b
        .node
        .control
        .peer_add(&other.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("serves the XMPP domain other.example"),
        "{e}"
    );
    assert!(
        b.node
            .server
            .store
            .peer("cluster-d.example.com")
            .await
            .unwrap()
            .is_none()
    );
}

/// Router links find a peer node named by host the way the sync agent finds the peer:
/// through DNS, and on the last good addresses while DNS is down.
#[tokio::test]
async fn a_link_to_a_node_named_by_host_survives_a_dns_outage() {
    let a = cluster(A, &["alice"], |c| c.sync.dns_check_interval = 1).await;
    let b = cluster(B, &["bob"], |_| {}).await;
    let dns = support::test_dns();
    a.node.agent.set_resolver(dns.clone());
    peer(&a, &b).await;
    // B's node is reached by its name (through a proxy the test can cut).
    let store_a = a.node.server.store.clone();
    let proxy = support::Proxy::start(b.node.links_addr.unwrap()).await;
    let b_node = format!("node1.{B}");
    let mut node = store_a.peer_node(&b_node).await.unwrap().unwrap();
    node.host = b_node.clone();
    node.link_port = proxy.addr.port();
    store_a.set_peer_nodes(B, &[node]).await.unwrap();
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("desk"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(&mut alice, &chat("bob", "by-name")).await;
    expect(&mut bob, 10, "over a link to a node named by host", |e| {
        body(e).as_deref() == Some("by-name")
    })
    .await;

    // DNS goes down and the link breaks: it reopens on the last good address.
    dns.down.store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.cut();
    send(&mut alice, &chat("bob", "during-outage")).await;
    expect(&mut bob, 30, "over the reopened link", |e| {
        body(e).as_deref() == Some("during-outage")
    })
    .await;

    // /metrics shows the mesh: the peer in sync and in step, the link up, and the
    // failing DNS name (the last good addresses in use).
    let b_in_sync = format!("impmesh_peer_sync_state{{peer=\"{B}\",state=\"in-sync\"}} 1");
    let dns_failing = format!("impmesh_peer_dns_ok{{peer=\"{B}\",name=\"{b_node}\"}} 0");
    let link_up =
        format!("impmesh_link_up{{node=\"{b_node}\",cluster=\"{B}\",direction=\"out\"}} 1");
    // (Names are checked during a sync, at most every dns_check_interval: nudge.)
    eventually(20, "the mesh in /metrics", || async {
        a.node.agent.nudge(B);
        let m = metrics(&a).await;
        m.contains(&b_in_sync)
            && m.contains(&dns_failing)
            && m.contains(&link_up)
            && m.contains(&format!("impmesh_peer_usn_lag{{peer=\"{B}\"}} 0"))
            && m.contains(&format!("impmesh_peer_users{{peer=\"{B}\"}} 1"))
    })
    .await;
}

/// The certificate a node's HTTPS service presents now.
async fn served_certificate(node: &TestNode) -> String {
    let client = impmesh_axl::client::AxlClient::connect(
        &node.node.https_addr.to_string(),
        "localhost",
        impmesh_axl::client::ServerTrust::FirstContact,
    )
    .await
    .unwrap();
    impmesh_certs::fingerprint(&client.server_chain()[0])
}

/// The fingerprints `node` pins for `peer`.
async fn pins(node: &TestNode, peer: &str) -> Vec<String> {
    node.node
        .server
        .store
        .trust_entries()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.peer.as_deref() == Some(peer))
        .map(|t| t.fingerprint)
        .collect()
}

/// A regenerated certificate reaches the peers by itself, make-before-break: each
/// peer pins it over the channel it already trusts, the old one is served to peers
/// until all have it (a peer that is down gets it when it is back), then the peers
/// drop the old pin. Messages flow throughout; nobody types a password.
#[tokio::test]
async fn a_new_certificate_is_rolled_out_to_the_peers_without_dropping_anything() {
    const C: &str = "cluster-c.example.com";
    let a = cluster(A, &["alice"], |_| {}).await;
    let b = cluster(B, &["bob"], |_| {}).await;
    let c = cluster(C, &["carl"], |_| {}).await;
    peer(&a, &b).await;
    peer(&a, &c).await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("desk"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(&mut alice, &chat("bob", "before")).await;
    expect(&mut bob, 10, "before", |e| {
        body(e).as_deref() == Some("before")
    })
    .await;
    let old = a.node.identity().fingerprint();

    // C is unreachable from A for now.
    let store_a = a.node.server.store.clone();
    let c_record = store_a.peer(C).await.unwrap().unwrap();
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    store_a
        .upsert_peer(&impmesh_store::PeerRecord {
            address: dead_addr,
            ..c_record.clone()
        })
        .await
        .unwrap();
    // (Pins carry their second: the new one must be younger than the old.)
    let t = impmesh_store::now_unix();
    eventually(3, "the next second", || async {
        impmesh_store::now_unix() > t
    })
    .await;

    let new = a.node.control.regenerate_certificate().await.unwrap();
    assert_ne!(new, old);
    // B pins it by itself; C cannot yet; A keeps serving the old one to peers and
    // says who is missing.
    eventually(10, "B pins the new certificate", || async {
        pins(&b, A).await.contains(&new)
    })
    .await;
    assert!(
        pins(&b, A).await.contains(&old),
        "the old pin stays meanwhile"
    );
    let alarm = "InterClusterCertificateRotationPending";
    eventually(10, "the rotation alarm naming C", || async {
        a.node
            .server
            .store
            .active_alarms()
            .await
            .unwrap()
            .iter()
            .any(|al| al.name == alarm && al.message.contains(C))
    })
    .await;
    assert_eq!(served_certificate(&a).await, old);
    send(&mut alice, &chat("bob", "during")).await;
    expect(&mut bob, 10, "during", |e| {
        body(e).as_deref() == Some("during")
    })
    .await;

    // C is back: it gets the announcement, A switches, the alarm clears.
    store_a.upsert_peer(&c_record).await.unwrap();
    eventually(30, "the new certificate in use for peers", || async {
        served_certificate(&a).await == new
    })
    .await;
    eventually(10, "the rotation alarm cleared", || async {
        !has_alarm(&a, alarm, &a.config.node_name()).await
    })
    .await;
    assert!(pins(&c, A).await.contains(&new));
    // The peers drop the old pin at their next sync.
    for (peer, name) in [(&b, "B"), (&c, "C")] {
        eventually(10, "the old pin dropped", || async {
            peer.node.agent.nudge(A);
            pins(peer, A).await == [new.clone()]
        })
        .await;
        assert_eq!(
            status_of(peer, A).await["live"]["state"],
            "in-sync",
            "{name}"
        );
    }
    // Both ways still work, and the link did not drop.
    send(&mut alice, &chat("bob", "after")).await;
    expect(&mut bob, 10, "after", |e| {
        body(e).as_deref() == Some("after")
    })
    .await;
    send(&mut bob, &chat("alice", "back")).await;
    expect(&mut alice, 10, "back", |e| {
        body(e).as_deref() == Some("back")
    })
    .await;

    // A compromised key: with C away again, a new certificate waits for it, until the
    // admin ends the overlap; then peers are served the new one at once.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    store_a
        .upsert_peer(&impmesh_store::PeerRecord {
            address: dead_addr,
            ..c_record.clone()
        })
        .await
        .unwrap();
    let newer = a.node.control.regenerate_certificate().await.unwrap();
    eventually(10, "B pins the newer certificate", || async {
        pins(&b, A).await.contains(&newer)
    })
    .await;
    assert_eq!(served_certificate(&a).await, new);
    assert!(a.node.control.end_certificate_overlap().await.unwrap());
    eventually(10, "the newer certificate served at once", || async {
        served_certificate(&a).await == newer
    })
    .await;
}
