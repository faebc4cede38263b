//! Federation across the mesh: clusters peered with `peer add` route messages, IQs and
//! presence to each other's users over router links (port 7400, mutual TLS), as one
//! server would; a link is accepted only from a pinned peer, and a peer cannot speak
//! for users it does not home.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use impmesh_axl::NodeControl as _;
use support::{DOMAIN, TestNode, body, collect, eventually, expect, online, send, start_node};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const AXL_USER: &str = "icsync";
const AXL_PW: &str = "intercluster-secret";

async fn cluster(name: &str, users: &[&str]) -> TestNode {
    cluster_with(name, users, |_| {}).await
}

async fn cluster_with(
    name: &str,
    users: &[&str],
    tweak: impl FnOnce(&mut impmesh::config::Config),
) -> TestNode {
    let name = name.to_owned();
    let node = start_node(move |c| {
        c.node.name = Some(format!("node1.{name}"));
        c.node.cluster = Some(name);
        c.sync.period = 3600;
        tweak(c);
    })
    .await;
    impmesh_axl::set_axl_user(&node.node.server.store, AXL_USER, AXL_PW)
        .await
        .unwrap();
    for user in users {
        node.add_user(user, "pw").await;
    }
    node
}

/// Two clusters peered both ways, each knowing the other's users and link port.
async fn peered_pair() -> (TestNode, TestNode) {
    let a = cluster("cluster-a.example.com", &["alice", "amy"]).await;
    let b = cluster("cluster-b.example.com", &["bob", "bea"]).await;
    peer(&a, &b).await;
    (a, b)
}

/// Peers `a` (cluster-a) and `b` (cluster-b) both ways and waits until each knows the
/// other's two users and link port.
async fn peer(a: &TestNode, b: &TestNode) {
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    b.node
        .control
        .peer_accept("cluster-a.example.com")
        .await
        .unwrap();
    for (node, other, other_node) in [
        (a, "cluster-b.example.com", "node1.cluster-b.example.com"),
        (b, "cluster-a.example.com", "node1.cluster-a.example.com"),
    ] {
        let store = node.node.server.store.clone();
        eventually(10, "the peer's users and nodes known", || async {
            store.remote_user_count(other).await.unwrap() == 2
                && store
                    .peer_node(other_node)
                    .await
                    .unwrap()
                    .is_some_and(|n| n.link_port != 0)
        })
        .await;
    }
}

fn jid(user: &str, resource: &str) -> String {
    format!("{user}@{DOMAIN}/{resource}")
}

#[tokio::test]
async fn chat_and_iq_cross_clusters_and_offline_storage_on_the_home_node() {
    let (a, b) = peered_pair().await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;

    // A chat to the bare JID of a user homed on B reaches B's session, from alice's
    // full JID.
    send(
        &mut alice,
        &format!("<message to='bob@{DOMAIN}' type='chat' id='m1'><body>hi bob</body></message>"),
    )
    .await;
    let got = expect(&mut bob, 10, "alice's message on B", |e| {
        body(e).as_deref() == Some("hi bob")
    })
    .await;
    assert_eq!(got.attr("from"), Some(jid("alice", "phone").as_str()));

    // The reply to the full JID comes back over B's link to A.
    send(
        &mut bob,
        &format!(
            "<message to='{}' type='chat' id='m2'><body>hi alice</body></message>",
            jid("alice", "phone")
        ),
    )
    .await;
    let got = expect(&mut alice, 10, "bob's reply on A", |e| {
        body(e).as_deref() == Some("hi alice")
    })
    .await;
    assert_eq!(got.attr("from"), Some(jid("bob", "laptop").as_str()));

    // An IQ round trip between full JIDs (what a Jingle session set-up needs).
    send(
        &mut alice,
        &format!(
            "<iq type='get' id='ping1' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
            jid("bob", "laptop")
        ),
    )
    .await;
    let request = expect(&mut bob, 10, "alice's IQ on B", |e| {
        e.name() == "iq" && e.attr("id") == Some("ping1")
    })
    .await;
    assert_eq!(request.attr("from"), Some(jid("alice", "phone").as_str()));
    send(
        &mut bob,
        &format!(
            "<iq type='result' id='ping1' to='{}'/>",
            jid("alice", "phone")
        ),
    )
    .await;
    let result = expect(&mut alice, 10, "bob's IQ result on A", |e| {
        e.name() == "iq" && e.attr("id") == Some("ping1")
    })
    .await;
    assert_eq!(result.attr("type"), Some("result"));
    assert_eq!(result.attr("from"), Some(jid("bob", "laptop").as_str()));

    // A request to a resource that is not online on B: the error comes back.
    send(
        &mut alice,
        &format!(
            "<iq type='get' id='ping2' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
            jid("bob", "gone")
        ),
    )
    .await;
    let error = expect(&mut alice, 10, "the error for a gone resource", |e| {
        e.name() == "iq" && e.attr("id") == Some("ping2")
    })
    .await;
    assert_eq!(error.attr("type"), Some("error"));
    assert!(
        String::from(&error).contains("service-unavailable"),
        "{}",
        String::from(&error)
    );

    // Queries to bob's bare JID are answered by his home node, for his account:
    // his vCard, disco#info; anything else gets the protocol's error.
    send(
        &mut bob,
        "<iq type='set' id='v1'><vCard xmlns='vcard-temp'><FN>Bob on B</FN></vCard></iq>",
    )
    .await;
    expect(&mut bob, 10, "bob's vCard stored", |e| {
        e.attr("id") == Some("v1") && e.attr("type") == Some("result")
    })
    .await;
    let ask = |id: &str, payload: &str| {
        format!("<iq type='get' id='{id}' to='bob@{DOMAIN}'>{payload}</iq>")
    };
    send(&mut alice, &ask("v2", "<vCard xmlns='vcard-temp'/>")).await;
    let vcard = expect(&mut alice, 10, "bob's vCard from B", |e| {
        e.attr("id") == Some("v2")
    })
    .await;
    assert_eq!(
        vcard.attr("type"),
        Some("result"),
        "{}",
        String::from(&vcard)
    );
    assert_eq!(vcard.attr("from"), Some(format!("bob@{DOMAIN}").as_str()));
    assert!(
        String::from(&vcard).contains("Bob on B"),
        "{}",
        String::from(&vcard)
    );
    send(
        &mut alice,
        &ask(
            "d1",
            "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        ),
    )
    .await;
    let disco = expect(&mut alice, 10, "disco#info of bob's account from B", |e| {
        e.attr("id") == Some("d1")
    })
    .await;
    assert!(
        String::from(&disco).contains("category='account'"),
        "{}",
        String::from(&disco)
    );
    send(&mut alice, &ask("q1", "<query xmlns='jabber:iq:version'/>")).await;
    let error = expect(&mut alice, 10, "the error for an unknown query", |e| {
        e.attr("id") == Some("q1")
    })
    .await;
    assert_eq!(error.attr("type"), Some("error"));
    assert!(String::from(&error).contains("service-unavailable"));

    // A user nobody homes: the proper stanza error, not silence.
    send(
        &mut alice,
        &format!("<message to='nobody@{DOMAIN}' type='chat' id='m3'><body>?</body></message>"),
    )
    .await;
    let error = expect(&mut alice, 10, "the error for an unknown user", |e| {
        e.name() == "message" && e.attr("id") == Some("m3")
    })
    .await;
    assert_eq!(error.attr("type"), Some("error"));

    // The link shows as up, with what it carried.
    let links = a.node.server.link_status();
    let out = links
        .iter()
        .find(|l| {
            l.direction == impmesh_router::LinkDirection::Out
                && l.node == "node1.cluster-b.example.com"
        })
        .unwrap();
    assert!(out.up);
    assert_eq!(out.cluster, "cluster-b.example.com");
    assert!(out.stanzas >= 3, "{out:?}");
    let peers = serde_json::to_value(a.node.control.peers().await.unwrap()).unwrap();
    let shown = &peers[0]["links"][0];
    assert_eq!(shown["node"], "node1.cluster-b.example.com");
    assert_eq!(shown["direction"], "out");
    assert_eq!(shown["up"], true);
    assert!(
        b.node
            .server
            .link_status()
            .iter()
            .any(|l| l.direction == impmesh_router::LinkDirection::In
                && l.node == "node1.cluster-a.example.com"
                && l.up)
    );

    // Bob offline: the message is kept on his home node (XEP-0160) and delivered at
    // his next login there.
    drop(bob);
    let store_b = b.node.server.store.clone();
    let hub_b = b.node.server.clone();
    eventually(10, "bob's session gone", || async {
        hub_b.session_count() == 0
    })
    .await;
    send(
        &mut alice,
        &format!("<message to='bob@{DOMAIN}' type='chat' id='m4'><body>later</body></message>"),
    )
    .await;
    eventually(10, "the message stored offline on B", || async {
        store_b.offline_messages("bob").await.unwrap().len() == 1
    })
    .await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let got = expect(&mut bob, 10, "the offline message", |e| {
        body(e).as_deref() == Some("later")
    })
    .await;
    assert_eq!(got.attr("from"), Some(jid("alice", "phone").as_str()));
}

/// Opens a link to `to`'s link port as `from`'s node would, with `from`'s certificate.
async fn raw_link(
    from: &TestNode,
    to: &TestNode,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let verifier = impmesh_certs::PeerVerifier::new(&impmesh_certs::TrustAnchors {
        cas: vec![],
        pinned: [to.node.identity().fingerprint()].into(),
    })
    .unwrap();
    let config = from.node.identity().link_client_config(verifier).unwrap();
    let tcp = tokio::net::TcpStream::connect(to.node.links_addr.unwrap())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect("node1.example.com".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='urn:impmesh:link:1' \
     xmlns:stream='http://etherx.jabber.org/streams' version='1.0' \
     from='node1.cluster-a.example.com' to='node1.cluster-b.example.com'>";

#[tokio::test]
async fn links_refuse_strangers_and_spoofed_senders() {
    let (a, b) = peered_pair().await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;

    // A peer may speak for its own users only: a stanza from a user B homes is dropped,
    // one from A's user is delivered.
    let mut link = raw_link(&a, &b).await;
    link.write_all(HEADER.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(link.read(&mut buf).await.unwrap() > 0, "the header answer");
    for (from, text) in [("bea", "spoofed"), ("alice", "genuine")] {
        let stanza = format!(
            "<message xmlns='jabber:client' from='{}' to='bob@{DOMAIN}' type='chat'>\
             <body>{text}</body></message>",
            jid(from, "x")
        );
        link.write_all(stanza.as_bytes()).await.unwrap();
    }
    link.flush().await.unwrap();
    let got = expect(&mut bob, 10, "the genuine message", |e| body(e).is_some()).await;
    assert_eq!(body(&got).as_deref(), Some("genuine"));
    assert!(
        collect(&mut bob, 300, |e| body(e).is_some())
            .await
            .is_empty()
    );

    // A node whose certificate is not pinned for a peer is refused before any XML.
    let stranger = cluster("cluster-c.example.com", &["carl"]).await;
    let mut link = raw_link(&stranger, &b).await;
    let _ = link.write_all(HEADER.as_bytes()).await;
    let _ = link.flush().await;
    let n = tokio::time::timeout(Duration::from_secs(10), link.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a stranger's link must be closed without an answer");
    let stanza = format!(
        "<message xmlns='jabber:client' from='carl@{DOMAIN}/x' to='bob@{DOMAIN}' type='chat'>\
         <body>intruder</body></message>"
    );
    let _ = link.write_all(stanza.as_bytes()).await;
    assert!(
        collect(&mut bob, 300, |e| body(e).is_some())
            .await
            .is_empty()
    );
}

/// A client that logs in to a node that is not its home is sent there with
/// `see-other-host` (RFC 6120 §4.9.3.19) naming the home node's client address.
#[tokio::test]
async fn a_client_at_the_wrong_cluster_is_sent_to_its_home_node() {
    let (a, b) = peered_pair().await;
    let error = support::try_login(&a.connector(), "bob", "pw")
        .await
        .unwrap_err()
        .to_string();
    // tokio-xmpp parses the stream error and its address.
    let home = format!("SeeOtherHost(\"127.0.0.1:{}\")", b.c2s().port());
    assert!(error.contains(&home), "{error}");
    // Being sent home is not a failed login: however often, it throttles nobody.
    for _ in 0..6 {
        let _ = support::try_login(&a.connector(), "bob", "pw").await;
    }
    assert!(!a.node.server.login_blocked("127.0.0.1".parse().unwrap()));
    // A's own users still log in there, and an unknown user still fails as before.
    let mut alice = a.client("alice", "pw", None);
    online(&mut alice).await;
}

fn presence_from(el: &minidom::Element, user: &str, ty: Option<&str>) -> bool {
    support::is_presence_from(el, user, ty)
}

/// The whole RFC 6121 subscription handshake between users homed on two clusters,
/// presence broadcasts and probes across them, and presence that follows the link:
/// unavailable when it is cut, probed back when it returns.
#[tokio::test]
async fn subscriptions_and_presence_follow_users_and_links_across_clusters() {
    let (a, b) = peered_pair().await;
    // B reaches A's link port through a proxy the test can cut: what B sends to A
    // (bob's presence) rides on it.
    let a_links = a.node.links_addr.unwrap();
    let proxy = support::Proxy::start(a_links).await;
    let mut via_proxy = b
        .node
        .server
        .store
        .peer_node("node1.cluster-a.example.com")
        .await
        .unwrap()
        .unwrap();
    via_proxy.link_port = proxy.addr.port();
    b.node
        .server
        .store
        .set_peer_nodes("cluster-a.example.com", &[via_proxy])
        .await
        .unwrap();

    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;

    // alice → bob: request, approval, and bob's presence for alice.
    send(
        &mut alice,
        &format!("<presence to='bob@{DOMAIN}' type='subscribe'/>"),
    )
    .await;
    let request = expect(&mut bob, 10, "alice's request on B", |e| {
        presence_from(e, "alice", Some("subscribe"))
    })
    .await;
    assert_eq!(
        request.attr("from"),
        Some(format!("alice@{DOMAIN}").as_str())
    );
    send(
        &mut bob,
        &format!("<presence to='alice@{DOMAIN}' type='subscribed'/>"),
    )
    .await;
    expect(&mut alice, 10, "bob's approval on A", |e| {
        presence_from(e, "bob", Some("subscribed"))
    })
    .await;
    expect(&mut alice, 10, "bob's presence on A", |e| {
        presence_from(e, "bob", None)
    })
    .await;

    // bob → alice the same way: both directions now.
    send(
        &mut bob,
        &format!("<presence to='alice@{DOMAIN}' type='subscribe'/>"),
    )
    .await;
    expect(&mut alice, 10, "bob's request on A", |e| {
        presence_from(e, "bob", Some("subscribe"))
    })
    .await;
    send(
        &mut alice,
        &format!("<presence to='bob@{DOMAIN}' type='subscribed'/>"),
    )
    .await;
    expect(&mut bob, 10, "alice's presence on B", |e| {
        presence_from(e, "alice", None)
    })
    .await;
    // Each roster lives on its owner's home cluster.
    let (_, alice_items) = a.node.server.store.roster("alice").await.unwrap();
    assert_eq!(alice_items[0].contact, format!("bob@{DOMAIN}"));
    assert_eq!(
        alice_items[0].subscription,
        impmesh_store::Subscription::Both
    );
    let (_, bob_items) = b.node.server.store.roster("bob").await.unwrap();
    assert_eq!(bob_items[0].subscription, impmesh_store::Subscription::Both);
    assert!(
        b.node
            .server
            .store
            .roster("alice")
            .await
            .unwrap()
            .1
            .is_empty()
    );

    // A broadcast reaches the remote subscriber.
    send(&mut bob, "<presence><show>away</show></presence>").await;
    let away = expect(&mut alice, 10, "bob away on A", |e| {
        presence_from(e, "bob", None)
    })
    .await;
    assert_eq!(
        away.get_child("show", "jabber:client").unwrap().text(),
        "away"
    );

    // A second resource of alice logs in on A: its probe reaches B and bob's presence
    // comes back.
    let mut tablet = a.client("alice", "pw", Some("tablet"));
    online(&mut tablet).await;
    send(&mut tablet, "<presence/>").await;
    expect(&mut tablet, 10, "bob's presence by probe", |e| {
        presence_from(e, "bob", None)
    })
    .await;
    drop(tablet);

    // The link from B is cut: alice must not see bob online forever.
    proxy.cut_and_refuse();
    expect(
        &mut alice,
        10,
        "bob unavailable when B's link is cut",
        |e| presence_from(e, "bob", Some("unavailable")),
    )
    .await;
    // Back: B reconnects by itself and A probes again; no client does anything.
    proxy.restore();
    expect(
        &mut alice,
        60,
        "bob available again after the link is back",
        |e| presence_from(e, "bob", None),
    )
    .await;

    // Logout reaches the other cluster.
    send(&mut bob, "<presence type='unavailable'/>").await;
    expect(&mut alice, 10, "bob's logout on A", |e| {
        presence_from(e, "bob", Some("unavailable"))
    })
    .await;
}

/// Points `from`'s link to `to`'s node at a proxy the test can cut.
async fn proxied_link(
    from: &TestNode,
    to: &TestNode,
    to_node: &str,
    to_cluster: &str,
) -> support::Proxy {
    let proxy = support::Proxy::start(to.node.links_addr.unwrap()).await;
    let store = &from.node.server.store;
    let mut node = store.peer_node(to_node).await.unwrap().unwrap();
    node.link_port = proxy.addr.port();
    store.set_peer_nodes(to_cluster, &[node]).await.unwrap();
    proxy
}

/// Alice's first message to Bob, which brings the link up, and its arrival.
async fn first_message(alice: &mut tokio_xmpp::Client, bob: &mut tokio_xmpp::Client) {
    send(
        alice,
        &format!("<message to='bob@{DOMAIN}' type='chat'><body>0</body></message>"),
    )
    .await;
    expect(bob, 10, "the first message", |e| {
        body(e).as_deref() == Some("0")
    })
    .await;
}

/// Waits up to `secs` until `node` has an outgoing link that is down.
async fn out_link_down(node: &TestNode, secs: u64, what: &str) {
    let server = node.node.server.clone();
    eventually(secs, what, || async {
        server
            .link_status()
            .iter()
            .any(|l| l.direction == impmesh_router::LinkDirection::Out && !l.up)
    })
    .await;
}

/// Messages for a cluster whose link is down wait in the durable outbox and are
/// delivered once each, in order, when it returns; IQ requests fail at once; what
/// waits too long is bounced to its sender.
#[tokio::test]
async fn messages_wait_in_the_outbox_while_a_link_is_down() {
    let (a, b) = peered_pair().await;
    let proxy = proxied_link(
        &a,
        &b,
        "node1.cluster-b.example.com",
        "cluster-b.example.com",
    )
    .await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;

    // The link comes up with a first message.
    first_message(&mut alice, &mut bob).await;

    proxy.cut_and_refuse();
    out_link_down(&a, 10, "A's link to B down").await;
    for i in 1..=5 {
        send(
            &mut alice,
            &format!("<message to='bob@{DOMAIN}' type='chat'><body>{i}</body></message>"),
        )
        .await;
    }
    // An IQ request cannot wait: the error comes at once.
    send(
        &mut alice,
        &format!(
            "<iq type='get' id='ping-down' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
            jid("bob", "laptop")
        ),
    )
    .await;
    let error = expect(&mut alice, 10, "the IQ error while down", |e| {
        e.attr("id") == Some("ping-down")
    })
    .await;
    assert!(String::from(&error).contains("remote-server-timeout"));
    let store_a = a.node.server.store.clone();
    eventually(10, "five messages in A's outbox", || async {
        store_a.outbox_nodes().await.unwrap()
            == vec![(
                "node1.cluster-b.example.com".to_owned(),
                "cluster-b.example.com".to_owned(),
                5,
            )]
    })
    .await;
    assert!(
        collect(&mut bob, 300, |e| body(e).is_some())
            .await
            .is_empty()
    );

    // Back: all five, in order, each once; the outbox is empty.
    proxy.restore();
    let mut got = vec![];
    while got.len() < 5 {
        let m = expect(&mut bob, 60, "the queued messages", |e| body(e).is_some()).await;
        got.push(body(&m).unwrap());
    }
    assert_eq!(got, ["1", "2", "3", "4", "5"]);
    assert!(
        collect(&mut bob, 500, |e| body(e).is_some())
            .await
            .is_empty()
    );
    eventually(10, "A's outbox empty", || async {
        store_a.outbox_nodes().await.unwrap().is_empty()
    })
    .await;
}

/// Security review limit 5, on links: a peer node that stops reading is closed within
/// the write deadline (`[limits] write_timeout`), not when the ack timeout finds the
/// link silent; what it was sent stays in the outbox and goes once the link is back.
#[tokio::test]
async fn a_link_that_stops_reading_is_closed_within_the_write_deadline() {
    let a = cluster_with("cluster-a.example.com", &["alice", "amy"], |c| {
        c.limits.write_timeout = 2;
        // Far beyond the test: only the write deadline can close the link in time.
        c.limits.link_ack_timeout = 600;
        // Alice's client sends megabytes at once (the default shaper reads 64 KiB/s).
        c.limits.read_rate = 64 * 1024 * 1024;
        c.limits.read_burst = 64 * 1024 * 1024;
    })
    .await;
    let b = cluster("cluster-b.example.com", &["bob", "bea"]).await;
    peer(&a, &b).await;
    let proxy = proxied_link(
        &a,
        &b,
        "node1.cluster-b.example.com",
        "cluster-b.example.com",
    )
    .await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    first_message(&mut alice, &mut bob).await;

    // B's side stops reading. 12.8 MB of messages: more than the socket buffers
    // between A and the frozen proxy hold, so A's writes block.
    proxy.freeze_and_refuse();
    let filler = "x".repeat(200 * 1024);
    for i in 1..=64 {
        send(
            &mut alice,
            &format!(
                "<message to='bob@{DOMAIN}' type='normal'><body>{i} {filler}</body></message>"
            ),
        )
        .await;
    }
    out_link_down(&a, 60, "A's link to B closed by the write deadline").await;
    // Nothing was lost: the messages wait in A's outbox, and leave it once the link
    // is back.
    let store_a = a.node.server.store.clone();
    eventually(
        10,
        "what B never acknowledged parked in A's outbox",
        || async { !store_a.outbox_nodes().await.unwrap().is_empty() },
    )
    .await;
    proxy.restore();
    eventually(120, "A's outbox drained over the restored link", || async {
        store_a.outbox_nodes().await.unwrap().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_message_that_waits_too_long_is_bounced() {
    let a = start_node(|c| {
        c.node.name = Some("node1.cluster-a.example.com".into());
        c.node.cluster = Some("cluster-a.example.com".into());
        c.sync.period = 3600;
        c.limits.outbox_ttl = 1;
    })
    .await;
    impmesh_axl::set_axl_user(&a.node.server.store, AXL_USER, AXL_PW)
        .await
        .unwrap();
    a.add_user("alice", "pw").await;
    let b = cluster("cluster-b.example.com", &["bob"]).await;
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    let store_a = a.node.server.store.clone();
    eventually(10, "B known to A", || async {
        store_a
            .remote_user_count("cluster-b.example.com")
            .await
            .unwrap()
            == 1
            && store_a
                .peer_node("node1.cluster-b.example.com")
                .await
                .unwrap()
                .is_some()
    })
    .await;
    let proxy = proxied_link(
        &a,
        &b,
        "node1.cluster-b.example.com",
        "cluster-b.example.com",
    )
    .await;
    proxy.cut_and_refuse();
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    send(
        &mut alice,
        &format!("<message to='bob@{DOMAIN}' type='chat' id='late'><body>late</body></message>"),
    )
    .await;
    let error = expect(&mut alice, 30, "the bounce after the time to live", |e| {
        e.attr("id") == Some("late")
    })
    .await;
    assert_eq!(error.attr("type"), Some("error"));
    assert!(String::from(&error).contains("remote-server-timeout"));
    assert!(store_a.outbox_nodes().await.unwrap().is_empty());
}

/// Cross-cluster message throughput and latency against the same load inside one
/// cluster: 10 senders on A, each sending 2,000 chat messages to its own receiver, first
/// on A, then on B (over the router link). Not run by CI; run it on a release build:
///
/// ```sh
/// cargo test --release --test federation -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --ignored on a release build"]
async fn benchmark_cross_cluster_messages() {
    const PAIRS: usize = 10;
    // Messages per second per sender (IMPMESH_BENCH_RATE): unset, as fast as the
    // server takes them (throughput, and latency at saturation); set, a paced load
    // (latency at moderate load).
    let rate: Option<u32> = std::env::var("IMPMESH_BENCH_RATE")
        .ok()
        .and_then(|r| r.parse().ok());
    let messages: usize = if rate.is_some() { 1_000 } else { 2_000 };
    let a = cluster("cluster-a.example.com", &[]).await;
    let b = cluster("cluster-b.example.com", &[]).await;
    for i in 0..PAIRS {
        a.add_user(&format!("send{i}"), "pw").await;
        a.add_user(&format!("near{i}"), "pw").await;
        b.add_user(&format!("far{i}"), "pw").await;
    }
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    b.node
        .control
        .peer_accept("cluster-a.example.com")
        .await
        .unwrap();
    let store = a.node.server.store.clone();
    eventually(30, "B's users known to A", || async {
        store
            .remote_user_count("cluster-b.example.com")
            .await
            .unwrap()
            == PAIRS as i64
    })
    .await;
    let mut senders = vec![];
    for i in 0..PAIRS {
        let mut c = a.client(&format!("send{i}"), "pw", Some("b"));
        online(&mut c).await;
        senders.push(c);
    }
    for (label, node, prefix) in [
        ("local (A to A)", &a, "near"),
        ("cross-cluster (A to B)", &b, "far"),
    ] {
        let mut receivers = vec![];
        for i in 0..PAIRS {
            let mut c = node.client(&format!("{prefix}{i}"), "pw", Some("b"));
            online(&mut c).await;
            send(&mut c, "<presence/>").await;
            receivers.push(c);
        }
        // Warm-up: the link (if any) is up before the clock starts.
        for (i, s) in senders.iter_mut().enumerate() {
            send(
                s,
                &format!(
                    "<message to='{prefix}{i}@{DOMAIN}' type='chat'><body>warm</body></message>"
                ),
            )
            .await;
        }
        for r in receivers.iter_mut() {
            expect(r, 30, "warm-up", |e| body(e).as_deref() == Some("warm")).await;
        }
        let start = Instant::now();
        let mut tasks = vec![];
        for (i, mut r) in receivers.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(messages);
                while latencies.len() < messages {
                    let m = expect(&mut r, 60, "the load", |e| body(e).is_some()).await;
                    let sent: u128 = body(&m).unwrap().parse().unwrap();
                    latencies.push(start.elapsed().as_nanos() - sent);
                }
                let _ = i;
                latencies
            }));
        }
        let mut sending = vec![];
        for (i, mut s) in std::mem::take(&mut senders).into_iter().enumerate() {
            let prefix = prefix.to_owned();
            sending.push(tokio::spawn(async move {
                let mut pace = rate.map(|r| {
                    let mut i = tokio::time::interval(Duration::from_secs(1) / r);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    i
                });
                for _ in 0..messages {
                    if let Some(pace) = pace.as_mut() {
                        pace.tick().await;
                    }
                    let t = start.elapsed().as_nanos();
                    send(&mut s, &format!("<message to='{prefix}{i}@{DOMAIN}' type='chat'><body>{t}</body></message>")).await;
                }
                s
            }));
        }
        for t in sending {
            senders.push(t.await.unwrap());
        }
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = start.elapsed();
        all.sort_unstable();
        let pct = |p: f64| {
            Duration::from_nanos(all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as u64)
        };
        println!(
            "BENCH {label}: {} messages in {:.2} s = {:.0} msg/s; latency p50 {:?}, p99 {:?}",
            all.len(),
            elapsed.as_secs_f64(),
            all.len() as f64 / elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99)
        );
    }
}

/// What waits in the outbox survives a restart of the sending node and is delivered,
/// in order, once the link can be opened again.
#[tokio::test]
async fn the_outbox_survives_a_restart() {
    let (a, b) = peered_pair().await;
    let proxy = proxied_link(
        &a,
        &b,
        "node1.cluster-b.example.com",
        "cluster-b.example.com",
    )
    .await;
    proxy.cut_and_refuse();
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    for i in 1..=3 {
        send(
            &mut alice,
            &format!("<message to='bob@{DOMAIN}' type='chat'><body>{i}</body></message>"),
        )
        .await;
    }
    let store_a = a.node.server.store.clone();
    eventually(10, "three messages in A's outbox", || async {
        store_a
            .outbox_nodes()
            .await
            .unwrap()
            .first()
            .is_some_and(|(_, _, n)| *n == 3)
    })
    .await;
    drop(alice);
    drop(store_a);

    let a = a.restart().await;
    proxy.restore();
    let mut got = vec![];
    while got.len() < 3 {
        let m = expect(&mut bob, 60, "the messages kept across the restart", |e| {
            body(e).is_some()
        })
        .await;
        got.push(body(&m).unwrap());
    }
    assert_eq!(got, ["1", "2", "3"]);
    assert!(
        collect(&mut bob, 500, |e| body(e).is_some())
            .await
            .is_empty()
    );
    let store_a = a.node.server.store.clone();
    eventually(10, "A's outbox empty", || async {
        store_a.outbox_nodes().await.unwrap().is_empty()
    })
    .await;
}

/// XEP-0163 across the mesh: bob (cluster B) gets alice's (cluster A) PEP events by
/// his capabilities, asked and verified by alice's home node over the links while she
/// is offline; he retrieves her items through the links, a new resource of his gets
/// the last item; bea, not her contact, is refused by alice's home node.
#[tokio::test]
async fn pep_events_and_items_cross_clusters_under_the_owners_access_model() {
    use support::{
        AVATAR, AVATAR_META, ClientCaps, befriend, is_event_of, items_iq, publish_iq, pubsub_error,
    };
    let (a, b) = peered_pair().await;
    befriend((&a, "alice"), (&b, "bob")).await;
    let caps = ClientCaps::wanting(&[AVATAR]);
    let mut bob = b.client("bob", "pw", Some("phone"));
    online(&mut bob).await;
    send(&mut bob, &caps.presence()).await;
    // Asked twice, as a stock client is: by B for bob's own PEP service, and by A for
    // alice's (she is offline) through the link.
    caps.answer(&mut bob, 10).await;
    caps.answer(&mut bob, 10).await;
    let mut alice = a.client("alice", "pw", Some("laptop"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    alice
        .send_stanza(publish_iq("p1", AVATAR, "111f", AVATAR_META, &[]))
        .await
        .unwrap();
    expect(&mut alice, 10, "the publication's result", |e| {
        e.attr("id") == Some("p1") && e.attr("type") == Some("result")
    })
    .await;
    let event = expect(&mut bob, 10, "alice's avatar on B", |e| {
        is_event_of(e, AVATAR)
    })
    .await;
    assert_eq!(event.attr("from"), Some(format!("alice@{DOMAIN}").as_str()));

    bob.send_stanza(items_iq("i1", "alice", AVATAR))
        .await
        .unwrap();
    let items = expect(&mut bob, 10, "alice's items from A", |e| {
        e.attr("id") == Some("i1")
    })
    .await;
    assert_eq!(
        items.attr("type"),
        Some("result"),
        "{}",
        String::from(&items)
    );
    assert!(String::from(&items).contains("111f4b3c50d7b0df729d299bc6f8e9ef9066971f"));

    let mut tablet = b.client("bob", "pw", Some("tablet"));
    online(&mut tablet).await;
    send(&mut tablet, &caps.presence()).await;
    let last = expect(&mut tablet, 10, "the last avatar from A", |e| {
        e.name() == "iq" || is_event_of(e, AVATAR)
    })
    .await;
    assert_eq!(
        last.name(),
        "message",
        "asked again: {}",
        String::from(&last)
    );

    let mut bea = b.client("bea", "pw", Some("b"));
    online(&mut bea).await;
    bea.send_stanza(items_iq("i2", "alice", AVATAR))
        .await
        .unwrap();
    let refused = expect(&mut bea, 10, "A's refusal", |e| e.attr("id") == Some("i2")).await;
    assert_eq!(
        pubsub_error(&refused),
        (
            "not-authorized".into(),
            "presence-subscription-required".into()
        )
    );
}

/// XEP-0313 across the mesh: a chat between clusters is archived on both home nodes,
/// each side with its own archive id; each reads its history from its own cluster.
#[tokio::test]
async fn each_side_of_a_chat_across_clusters_is_archived_at_home() {
    use support::{mam_query_iq, mam_results, stanza_id_by};
    let (a, b) = peered_pair().await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(
        &mut alice,
        &format!("<message to='bob@{DOMAIN}' type='chat'><body>across</body><stanza-id xmlns='urn:xmpp:sid:0' id='forged' by='bob@{DOMAIN}'/></message>"),
    )
    .await;
    let m = expect(&mut bob, 10, "alice's message on B", |e| body(e).is_some()).await;
    let bob_id = stanza_id_by(&m, &format!("bob@{DOMAIN}")).expect("stamped by B");
    assert_ne!(bob_id, "forged");
    bob.send_stanza(mam_query_iq(
        "q1",
        Some(&format!("alice@{DOMAIN}")),
        10,
        None,
        None,
    ))
    .await
    .unwrap();
    let (page, fin) = mam_results(&mut bob, "q1").await;
    assert_eq!(page, [(bob_id, "across".to_owned())]);
    assert!(fin.complete);
    alice
        .send_stanza(mam_query_iq(
            "q2",
            Some(&format!("bob@{DOMAIN}")),
            10,
            None,
            None,
        ))
        .await
        .unwrap();
    let (page, _) = mam_results(&mut alice, "q2").await;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].1, "across");
    assert!(!page[0].0.is_empty());
}

/// XEP-0363 across the mesh: alice (cluster A) uploads on her home node, bob (cluster
/// B) downloads from the URL she sends him, and the same path asked of B's node is
/// redirected to A's, which B learned from A's getClusterInfo.
#[tokio::test]
async fn xep0363_a_file_from_another_cluster_and_a_redirect_from_the_wrong_one() {
    use support::{https_request, slot_parts, upload_slot};
    let (a, b) = peered_pair().await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    let reply = upload_slot(&mut alice, "s", "hello.txt", 5, "text/plain").await;
    let (put, auth, get) = slot_parts(&reply);
    let a_port = a.node.client_https_addr.unwrap().port();
    // Each node's URLs name the node itself (its certificate covers its name).
    let a_base = format!("https://node1.cluster-a.example.com:{a_port}");
    assert!(
        get.starts_with(&format!("{a_base}/upload/node1.cluster-a.example.com/")),
        "{get}"
    );
    let r = https_request(
        &a.cert(),
        "PUT",
        &put,
        &[("authorization", &auth), ("content-type", "text/plain")],
        b"hello",
    )
    .await;
    assert_eq!(r.status, 201);

    let mut bob = b.client("bob", "pw", Some("laptop"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(
        &mut alice,
        &format!("<message to='bob@{DOMAIN}' type='chat' id='f'><body>{get}</body><x xmlns='jabber:x:oob'><url>{get}</url></x></message>"),
    )
    .await;
    let m = expect(&mut bob, 10, "alice's link", |e| body(e).is_some()).await;
    let url = body(&m).unwrap();
    let r = https_request(&a.cert(), "GET", &url, &[], b"").await;
    assert_eq!((r.status, r.body.as_slice()), (200, b"hello".as_slice()));
    assert_eq!(r.header("content-type"), Some("text/plain"));

    let b_base = b.node.server.upload_url().unwrap().to_owned();
    let at_b = url.replace(&a_base, &b_base);
    let r = https_request(&b.cert(), "GET", &at_b, &[], b"").await;
    assert_eq!(r.status, 307);
    assert_eq!(r.header("location"), Some(url.as_str()));
    // A node nobody announced: nothing to redirect to.
    let unknown = at_b.replace("node1.cluster-a.example.com", "node9.cluster-z.example.com");
    assert_eq!(
        https_request(&b.cert(), "GET", &unknown, &[], b"")
            .await
            .status,
        404
    );
    // A node whose announced URL is B's own (nodes sharing one name): never a
    // redirect to the URL asked, which would loop.
    let store_b = &b.node.server.store;
    let mut same = store_b
        .peer_node("node1.cluster-a.example.com")
        .await
        .unwrap()
        .unwrap();
    same.name = impmesh_store::NodeName::new("node2.cluster-a.example.com");
    same.upload_url = b_base.clone();
    let mut nodes = store_b.peer_nodes("cluster-a.example.com").await.unwrap();
    nodes.push(same);
    store_b
        .set_peer_nodes("cluster-a.example.com", &nodes)
        .await
        .unwrap();
    let looping = at_b.replace("/upload/node1.cluster-a", "/upload/node2.cluster-a");
    let r = https_request(&b.cert(), "GET", &looping, &[], b"").await;
    assert_eq!(r.status, 404);
}

/// XEP-0357 across the mesh: alice (cluster A) registers an app server at a full JID
/// homed on cluster B; a message stored offline for her sends the notification over
/// the router link, and the app server's error, back over it, disables the
/// registration on A.
#[tokio::test]
async fn xep0357_a_notification_reaches_an_app_server_on_another_cluster() {
    use support::{field, notification};
    let (a, b) = peered_pair().await;
    let mut amy = a.client("amy", "pw", Some("c"));
    online(&mut amy).await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(
        &mut alice,
        &format!("<iq type='set' id='e'><enable xmlns='urn:xmpp:push:0' jid='bob@{DOMAIN}/app' node='n'><x xmlns='jabber:x:data' type='submit'><field var='include-sender'><value>1</value></field></x></enable></iq>"),
    )
    .await;
    let reply = expect(&mut alice, 5, "push enabled", |e| e.attr("id") == Some("e")).await;
    assert_eq!(reply.attr("type"), Some("result"));
    drop(alice);
    eventually(10, "alice offline", || async {
        a.node.server.hub.sessions("alice").is_empty()
    })
    .await;
    // The app server is not online: B bounces the notification, which A counts as
    // undelivered and does not take as a refusal.
    send(
        &mut amy,
        &format!("<message to='alice@{DOMAIN}' type='chat'><body>anyone?</body></message>"),
    )
    .await;
    eventually(10, "the bounced notification counted on A", || async {
        let mut metrics = String::new();
        a.node.server.stats.render(&mut metrics);
        metrics.contains("impmesh_push_notifications_total{result=\"undelivered\"} 1")
    })
    .await;
    assert_eq!(
        a.node
            .server
            .store
            .push_registrations("alice")
            .await
            .unwrap()
            .len(),
        1
    );
    let mut app = b.client("bob", "pw", Some("app"));
    online(&mut app).await;
    send(
        &mut amy,
        &format!("<message to='alice@{DOMAIN}' type='chat'><body>wake up</body></message>"),
    )
    .await;
    let (from, node, fields, _) = notification(&mut app, "error").await;
    assert_eq!((from.as_str(), node.as_str()), ("alice@localhost", "n"));
    assert_eq!(field(&fields, "message-count"), Some("2"));
    assert_eq!(field(&fields, "last-message-sender"), Some("amy@localhost"));
    let store = a.node.server.store.clone();
    eventually(10, "the refused registration disabled on A", || async {
        store.push_registrations("alice").await.unwrap().is_empty()
    })
    .await;
}
