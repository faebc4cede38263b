//! Trust between clusters, tried by a rogue peer: cluster C peered with B the normal
//! way (so its admin knows B's AXL password and holds a peer credential of B's), then
//! misbehaves, driving the real AXL client and raw router links. In every case nothing
//! changes on B (pins, peer records, directory, routing, deliveries), and B says why.
//! docs/peering.md ("What a peer may do") states the rules.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use impmesh_axl::NodeControl as _;
use impmesh_axl::client::{AxlClient, ClientError, OurSide, ServerTrust};
use impmesh_axl::soap::{NodeCertificate, Request};
use impmesh_store::Home;
use support::{
    AXL_PW, AXL_USER, DOMAIN, TestNode, body, collect, eventually, expect, has_alarm, online,
    peer_clusters, send,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const A: &str = "cluster-a.example.com";
const B: &str = "cluster-b.example.com";
const C: &str = "cluster-c.example.com";

async fn cluster(name: &str, users: &[&str]) -> TestNode {
    support::mesh_cluster(name, users, |_| {}).await
}

/// The certificates of a node's cluster, as an exchange lists them.
async fn certificates_of(node: &TestNode) -> Vec<NodeCertificate> {
    node.node
        .server
        .store
        .cluster_nodes(&node.config.cluster_name())
        .await
        .unwrap()
        .into_iter()
        .map(|n| NodeCertificate {
            node: n.name,
            fingerprint: n.fingerprint,
            pem: n.cert_pem,
        })
        .collect()
}

/// What an exchange could change on `node`: every peer record and the trust store.
async fn peering_state(
    node: &TestNode,
) -> (
    Vec<impmesh_store::PeerRecord>,
    Vec<impmesh_store::TrustEntry>,
) {
    let store = &node.node.server.store;
    (
        store.peers().await.unwrap(),
        store.trust_entries().await.unwrap(),
    )
}

/// A new key and self-signed certificate that nobody has pinned, as a rogue admin
/// makes one, with the listing entry an exchange sends for it.
fn fresh_identity(
    dir: &std::path::Path,
    name: &str,
) -> (impmesh_certs::NodeIdentity, Vec<NodeCertificate>) {
    let identity = impmesh_certs::NodeIdentity::regenerate(dir, &[name.to_owned()]).unwrap();
    let pem = impmesh_certs::pem_encode("CERTIFICATE", identity.client_auth().0[0].as_ref());
    let listed = vec![NodeCertificate {
        node: name.to_owned(),
        fingerprint: identity.fingerprint(),
        pem,
    }];
    (identity, listed)
}

/// The rogue's admin runs `exchangeCertificates` on `target` through the real AXL
/// client, claiming to be `claimed` and listing `certificates`, presenting
/// `identity` as its client certificate, as the AXL user or (with `token`) with its
/// own peer credential.
async fn rogue_exchange(
    rogue: &TestNode,
    identity: &impmesh_certs::NodeIdentity,
    target: &TestNode,
    claimed: &str,
    certificates: Vec<NodeCertificate>,
    token: Option<&str>,
) -> Result<impmesh_axl::client::Peering, ClientError> {
    impmesh_axl::client::exchange_certificates(
        &rogue.node.server.store,
        &target.node.https_addr.to_string(),
        "localhost",
        (AXL_USER, AXL_PW),
        OurSide {
            cluster: claimed.into(),
            domain: DOMAIN.into(),
            address: rogue.node.https_addr.to_string(),
            server_name: "localhost".into(),
            token: impmesh_axl::auth::random_token(),
            certificates,
        },
        identity,
        token,
    )
    .await
}

fn fault_code(r: &Result<impmesh_axl::client::Peering, ClientError>) -> String {
    match r {
        Err(ClientError::Fault(f)) => f.code.clone(),
        Err(e) => format!("not a fault: {e}"),
        Ok(_) => "accepted".into(),
    }
}

#[tokio::test]
async fn a_rogue_peer_cannot_rekey_another_peer_or_pin_a_certificate_it_does_not_hold() {
    let a = cluster(A, &["alice"]).await;
    let b = cluster(B, &["bea"]).await;
    let c = cluster(C, &["carl"]).await;
    peer_clusters(&a, &b, 1, 1).await;
    peer_clusters(&c, &b, 1, 1).await;
    let before = peering_state(&b).await;
    let c_token = c
        .node
        .server
        .store
        .peer(B)
        .await
        .unwrap()
        .unwrap()
        .our_token
        .unwrap();

    // Re-keying the active peer A with a key of C's admin's, as the AXL user (C's
    // admin knows the password): refused.
    let dir = tempfile::tempdir().unwrap();
    let (evil, evil_listing) = fresh_identity(dir.path(), &format!("node1.{A}"));
    let r = rogue_exchange(&c, &evil, &b, A, evil_listing.clone(), None).await;
    assert_eq!(fault_code(&r), "forbidden");
    // ... and with C's own peer credential, which speaks for C only.
    let r = rogue_exchange(&c, &evil, &b, A, evil_listing, Some(&c_token)).await;
    assert_eq!(fault_code(&r), "forbidden");
    // Pinning A's public certificate under a made-up name, to block A's peering:
    // C cannot present it, so it is not pinned.
    let own = c.node.identity();
    let r = rogue_exchange(
        &c,
        &own,
        &b,
        "cluster-z.example.com",
        certificates_of(&a).await,
        None,
    )
    .await;
    assert_eq!(fault_code(&r), "proofOfPossession");
    // A certificate pinned for C does not become another cluster's.
    let r = rogue_exchange(
        &c,
        &own,
        &b,
        "cluster-z.example.com",
        certificates_of(&c).await,
        None,
    )
    .await;
    assert_eq!(fault_code(&r), "certificateInUse");
    // Without any client certificate, nothing can be pinned at all.
    let mut bare = AxlClient::connect(
        &b.node.https_addr.to_string(),
        "localhost",
        ServerTrust::FirstContact,
    )
    .await
    .unwrap();
    bare.first_contact(AXL_USER, AXL_PW, &Request::GetClusterInfo)
        .await
        .unwrap();
    let r = bare
        .call(&Request::ExchangeCertificates {
            cluster: "cluster-y.example.com".into(),
            address: c.node.https_addr.to_string(),
            server_name: "localhost".into(),
            token: impmesh_axl::auth::random_token(),
            certificates: certificates_of(&c).await,
        })
        .await;
    assert!(
        matches!(&r, Err(ClientError::Fault(f)) if f.code == "proofOfPossession"),
        "{r:?}"
    );

    // notifyChange nudges only the caller's own sync.
    let anchors = impmesh_axl::trust::anchors_for(&c.node.server.store, B)
        .await
        .unwrap();
    let mut as_c = AxlClient::connect(
        &b.node.https_addr.to_string(),
        "localhost",
        ServerTrust::Verified(impmesh_certs::PeerVerifier::new(&anchors).unwrap()),
    )
    .await
    .unwrap();
    as_c.use_peer_token(C, &c_token).unwrap();
    let r = as_c
        .call(&Request::NotifyChange {
            cluster: A.into(),
            usn: 1,
        })
        .await;
    assert!(
        matches!(&r, Err(ClientError::Fault(f)) if f.code == "forbidden"),
        "{r:?}"
    );
    assert!(
        as_c.call(&Request::NotifyChange {
            cluster: C.into(),
            usn: 1,
        })
        .await
        .is_ok(),
        "its own nudge is taken"
    );

    // Nothing changed on B, and B says who tried.
    assert_eq!(peering_state(&b).await, before);
    assert!(has_alarm(&b, "InterClusterPeerExchangeRefused", "127.0.0.1").await);
    let refusals = b
        .node
        .server
        .store
        .alarm_history(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.name == "InterClusterPeerExchangeRefused" && e.raised)
        .count();
    assert_eq!(refusals, 1, "one alarm per caller, however often it tries");

    // Control: A itself renews its own peering (Force Sync with certificates runs as
    // the peering, with its credential), and B keeps syncing from the real A.
    a.node
        .control
        .peer_sync(B, Some((AXL_USER.into(), AXL_PW.into())))
        .await
        .unwrap();
    let a_on_b = b.node.server.store.peer(A).await.unwrap().unwrap();
    assert_eq!(a_on_b.address, a.node.https_addr.to_string());
    a.node.control.add_user("amy", "pw").await.unwrap();
    let store_b = b.node.server.store.clone();
    eventually(10, "A's change reaches B", || async {
        store_b
            .home_of("amy")
            .await
            .unwrap()
            .cluster()
            .is_some_and(|c| *c == A)
    })
    .await;
}

/// Opens a router link to `to` presenting `identity`.
async fn raw_link_as(
    identity: &impmesh_certs::NodeIdentity,
    to: &TestNode,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let verifier = impmesh_certs::PeerVerifier::new(&impmesh_certs::TrustAnchors {
        cas: vec![],
        pinned: [to.node.identity().fingerprint()].into(),
    })
    .unwrap();
    let config = identity.link_client_config(verifier).unwrap();
    let tcp = tokio::net::TcpStream::connect(to.node.links_addr.unwrap())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect("node1.example.com".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

fn header(from_node: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='urn:impmesh:link:1' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0' \
         from='{from_node}' to='node1.{B}' id='rogue'>"
    )
}

/// Whether the link answers a header (true) or is closed without a word (false).
async fn answered(link: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), link.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0)
        > 0
}

fn chat(from: &str, to: &str, text: &str) -> String {
    format!(
        "<message xmlns='jabber:client' from='{from}@{DOMAIN}/x' to='{to}@{DOMAIN}' \
         type='chat'><body>{text}</body></message>"
    )
}

#[tokio::test]
async fn a_rogue_peer_cannot_claim_users_it_does_not_home() {
    let a = cluster(A, &["alice"]).await;
    let b = cluster(B, &["bea", "bob"]).await;
    // C's admin creates names that belong elsewhere before peering (afterwards its own
    // node would refuse them), and lists users homed in A or on a node it does not have.
    let c = cluster(C, &["bob", "alice", "mallory", "cara", "carl"]).await;
    let store_c = c.node.server.store.clone();
    store_c
        .set_home("cara", A, &format!("node1.{A}"))
        .await
        .unwrap();
    store_c
        .set_home("carl", C, &format!("node9.{C}"))
        .await
        .unwrap();
    peer_clusters(&a, &b, 1, 2).await;
    peer_clusters(&c, &b, 3, 2).await;
    let store_b = b.node.server.store.clone();
    eventually(10, "C's valid entries applied", || async {
        store_b.remote_user("mallory").await.unwrap().len() == 1
    })
    .await;

    // A local account wins over a peer's claim, whatever the names' order.
    assert!(matches!(
        store_b.home_of("bob").await.unwrap(),
        Home::Local { .. }
    ));
    // Entries homed elsewhere than the sending peer, or on a node it does not
    // announce, are refused (names that are not normalised localparts too: the
    // sync agent's unit tests, since no node of ours lists one).
    for refused in ["cara", "carl"] {
        assert!(
            store_b.remote_user(refused).await.unwrap().is_empty(),
            "{refused}"
        );
    }
    let status = serde_json::to_value(b.node.control.peers().await.unwrap()).unwrap();
    let c_status = status
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["cluster"] == C)
        .unwrap();
    assert!(
        c_status["live"]["refused_entries"].as_u64().unwrap() >= 2,
        "{c_status}"
    );
    // Two peers claim alice: quarantined, alarmed, routed to neither.
    assert_eq!(
        store_b.home_of("alice").await.unwrap(),
        Home::Quarantined {
            clusters: vec![A.into(), C.into()]
        }
    );
    eventually(10, "the duplicate alarm on B", || async {
        has_alarm(&b, "InterClusterDuplicateUser", "alice").await
    })
    .await;

    let mut bea = b.client("bea", "pw", Some("desk"));
    online(&mut bea).await;
    send(&mut bea, "<presence/>").await;
    send(
        &mut bea,
        &format!("<message to='alice@{DOMAIN}' id='q1' type='chat'><body>hi?</body></message>"),
    )
    .await;
    let bounced = expect(&mut bea, 10, "the quarantine bounce", |e| {
        e.attr("id") == Some("q1") && e.attr("type") == Some("error")
    })
    .await;
    assert!(
        String::from(&bounced).contains("claimed by several clusters"),
        "{}",
        String::from(&bounced)
    );

    // Over a raw link C may speak for its own users only: not for B's bob (a local
    // account), nor for A's alice (a duplicate), nor for cara.
    let mut link = raw_link_as(&c.node.identity(), &b).await;
    link.write_all(header(&format!("node1.{C}")).as_bytes())
        .await
        .unwrap();
    assert!(answered(&mut link).await, "C's own node gets an answer");
    for (from, text) in [
        ("bob", "as bob"),
        ("alice", "as alice"),
        ("cara", "as cara"),
        ("mallory", "genuine"),
    ] {
        link.write_all(chat(from, "bea", text).as_bytes())
            .await
            .unwrap();
    }
    link.flush().await.unwrap();
    let got = expect(&mut bea, 10, "the genuine message", |e| body(e).is_some()).await;
    assert_eq!(body(&got).as_deref(), Some("genuine"));
    assert!(
        collect(&mut bea, 300, |e| body(e).is_some())
            .await
            .is_empty(),
        "nothing spoofed got through"
    );

    // A message to bob (offline) stays on B: stored for him, not sent to C.
    send(
        &mut bea,
        &format!("<message to='bob@{DOMAIN}' type='chat'><body>for bob</body></message>"),
    )
    .await;
    let mut bob = b.client("bob", "pw", Some("home"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let got = expect(&mut bob, 10, "bob's offline message, on B", |e| {
        body(e).as_deref() == Some("for bob")
    })
    .await;
    assert!(got.attr("from").unwrap().starts_with("bea@"));

    // A link header naming a node of another cluster is refused before anything is
    // read (its counters and presence bookkeeping belong to that node).
    let mut spoofed = raw_link_as(&c.node.identity(), &b).await;
    let _ = spoofed
        .write_all(header(&format!("node1.{A}")).as_bytes())
        .await;
    let _ = spoofed.flush().await;
    assert!(
        !answered(&mut spoofed).await,
        "a header as A's node is refused"
    );

    // The quarantine clears by itself once all claims but one are withdrawn.
    c.node.control.delete_user("alice").await.unwrap();
    eventually(10, "alice back to A", || async {
        store_b
            .home_of("alice")
            .await
            .unwrap()
            .cluster()
            .is_some_and(|c| *c == A)
    })
    .await;
    eventually(10, "the duplicate alarm cleared", || async {
        !has_alarm(&b, "InterClusterDuplicateUser", "alice").await
    })
    .await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    send(
        &mut bea,
        &format!("<message to='alice@{DOMAIN}' type='chat'><body>now?</body></message>"),
    )
    .await;
    expect(&mut alice, 10, "the message reaches A", |e| {
        body(e).as_deref() == Some("now?")
    })
    .await;
}

/// A self-signed node certificate for `name` that expired yesterday, as an identity.
fn expired_identity(dir: &std::path::Path, name: &str) -> impmesh_certs::NodeIdentity {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("old.pem"), dir.join("old.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    impmesh_certs::NodeIdentity::load(&cert_path, &key_path).unwrap()
}

#[tokio::test]
async fn an_expired_pinned_certificate_opens_no_link() {
    let b = cluster(B, &["bea"]).await;
    let c = cluster(C, &["carl"]).await;
    peer_clusters(&c, &b, 1, 1).await;
    // C's node shows an old certificate that B pinned for C long ago.
    let dir = tempfile::tempdir().unwrap();
    let old = expired_identity(dir.path(), &format!("node1.{C}"));
    let pem = std::fs::read(dir.path().join("old.pem")).unwrap();
    impmesh_axl::trust::add(
        &b.node.server.store,
        &pem,
        impmesh_store::TrustKind::Pinned,
        Some(C),
        "imported",
    )
    .await
    .unwrap();
    let mut link = raw_link_as(&old, &b).await;
    let _ = link
        .write_all(header(&format!("node1.{C}")).as_bytes())
        .await;
    let _ = link.flush().await;
    assert!(
        !answered(&mut link).await,
        "the expired certificate is refused"
    );
    assert!(has_alarm(&b, "InterClusterPeerCertificateExpired", C).await);
    // Control: C's current certificate opens a link, and the alarm clears.
    let mut link = raw_link_as(&c.node.identity(), &b).await;
    link.write_all(header(&format!("node1.{C}")).as_bytes())
        .await
        .unwrap();
    assert!(answered(&mut link).await);
    assert!(!has_alarm(&b, "InterClusterPeerCertificateExpired", C).await);
}

/// A stanza whose sender the receiving node cannot check (its store fails) is neither
/// handled nor acknowledged: the link closes, the sender keeps it, and it is
/// delivered once the receiver works again (before, it was acknowledged and lost).
#[tokio::test]
async fn a_stanza_whose_sender_cannot_be_checked_is_not_acknowledged() {
    let a = cluster(A, &["alice", "amy"]).await;
    let b = cluster(B, &["bob"]).await;
    peer_clusters(&a, &b, 2, 1).await;
    let mut alice = a.client("alice", "pw", Some("phone"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    let mut bob = b.client("bob", "pw", Some("desk"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(
        &mut alice,
        &format!("<message to='bob@{DOMAIN}' type='chat'><body>first</body></message>"),
    )
    .await;
    expect(&mut bob, 10, "the link up", |e| {
        body(e).as_deref() == Some("first")
    })
    .await;

    // B's store fails; amy (whom B has not looked up yet) writes to bob.
    b.node.server.store.close().await;
    let mut amy = a.client("amy", "pw", Some("laptop"));
    online(&mut amy).await;
    send(
        &mut amy,
        &format!("<message to='bob@{DOMAIN}' type='chat'><body>unchecked</body></message>"),
    )
    .await;
    let links = a.node.server.clone();
    eventually(10, "B closed the link unacknowledged", || async {
        links.link_status().iter().any(|l| {
            l.cluster == B
                && l.direction == impmesh_router::LinkDirection::Out
                && !l.up
                && l.in_flight > 0
        })
    })
    .await;

    // B comes back with a working store (new ports: A is told where, as a sync would).
    drop(bob);
    let b = b.restart().await;
    let store_a = a.node.server.store.clone();
    let mut node = store_a
        .peer_node(&format!("node1.{B}"))
        .await
        .unwrap()
        .unwrap();
    node.link_port = b.node.links_addr.unwrap().port();
    store_a.set_peer_nodes(B, &[node]).await.unwrap();
    let mut bob = b.client("bob", "pw", Some("desk"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    expect(&mut bob, 60, "the message B could not check before", |e| {
        body(e).as_deref() == Some("unchecked")
    })
    .await;
}

/// A peer announces nodes it should not: another cluster's node name, a host that is
/// no address to dial, and more nodes than a cluster has. None of it is kept.
#[tokio::test]
async fn a_rogue_peer_cannot_announce_nodes_it_does_not_have() {
    let a = cluster(A, &["alice"]).await;
    let b = cluster(B, &["bea"]).await;
    let c = cluster(C, &["carl"]).await;
    peer_clusters(&a, &b, 1, 1).await;
    peer_clusters(&c, &b, 1, 1).await;
    // C's admin publishes made-up nodes in its own cluster's record.
    let store_c = c.node.server.store.clone();
    let node1 = store_c.cluster_nodes(C).await.unwrap().remove(0);
    let fake = |name: String, host: &str| impmesh_store::NodeRecord {
        name,
        host: host.to_owned(),
        cert_pem: String::new(),
        fingerprint: String::new(),
        ..node1.clone()
    };
    store_c
        .publish_node(&fake(format!("node1.{A}"), "127.0.0.1"))
        .await
        .unwrap();
    store_c
        .publish_node(&fake(format!("a0.{C}"), "0.0.0.0"))
        .await
        .unwrap();
    for i in 0..20 {
        store_c
            .publish_node(&fake(format!("x{i:02}.{C}"), "127.0.0.1"))
            .await
            .unwrap();
    }
    let store_b = b.node.server.store.clone();
    b.node.agent.nudge(C);
    eventually(10, "C's announcement read", || async {
        store_b.peer_nodes(C).await.unwrap().len() > 1
    })
    .await;
    let kept = store_b.peer_nodes(C).await.unwrap();
    assert_eq!(kept.len(), 16, "at most 16 nodes a peer: {kept:?}");
    assert!(kept.iter().all(|n| n.host != "0.0.0.0"), "{kept:?}");
    assert!(kept.iter().all(|n| n.name.ends_with(C)), "{kept:?}");
    // A's node stays A's.
    assert_eq!(
        store_b
            .peer_node(&format!("node1.{A}"))
            .await
            .unwrap()
            .unwrap()
            .peer,
        A
    );
}

/// A room speaks over a link only from its home cluster, and only to sessions that
/// entered it where it arrives: C cannot speak for A's room, nor have B pass its own
/// room's broadcast on to A's users or to B's users who are not in it.
#[tokio::test]
async fn a_rogue_peer_cannot_speak_for_rooms_it_does_not_home() {
    let muc = |c: &mut impmesh::config::Config| c.muc.enabled = true;
    let a = support::mesh_cluster(A, &["alice"], muc).await;
    let b = support::mesh_cluster(B, &["bea", "ben"], muc).await;
    let c = support::mesh_cluster(C, &["carl"], muc).await;
    // Alice makes room "team" on A, Carl room "rogue" on C (open to all).
    let mut alice = a.client("alice", "pw", Some("phone"));
    let mut carl = c.client("carl", "pw", Some("desk"));
    for (client, room) in [(&mut alice, "team"), (&mut carl, "rogue")] {
        online(client).await;
        send(client, "<presence/>").await;
        send(
            client,
            &format!("<presence to='{room}@conference.{DOMAIN}/owner'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        )
        .await;
        send(
            client,
            &format!("<iq type='set' id='open' to='{room}@conference.{DOMAIN}'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>"),
        )
        .await;
        expect(client, 10, "the room open", |e| {
            e.attr("id") == Some("open")
        })
        .await;
    }
    peer_clusters(&a, &b, 1, 2).await;
    peer_clusters(&c, &b, 1, 2).await;
    let store_b = b.node.server.store.clone();
    for room in ["team", "rogue"] {
        eventually(10, "the rooms known to B", || async {
            store_b.room_home(room).await.unwrap() != impmesh_store::RoomHome::Unknown
        })
        .await;
    }
    let mut bea = b.client("bea", "pw", Some("desk"));
    let mut ben = b.client("ben", "pw", Some("desk"));
    for client in [&mut bea, &mut ben] {
        online(client).await;
        send(client, "<presence/>").await;
    }
    // Bea enters C's room (a genuine one): its stanzas reach her, and only her.
    send(
        &mut bea,
        &format!("<presence to='rogue@conference.{DOMAIN}/bea'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
    )
    .await;
    expect(&mut bea, 10, "in C's room", |e| {
        e.attr("from") == Some(&*format!("rogue@conference.{DOMAIN}/bea"))
            && e.attr("type").is_none()
    })
    .await;
    let groupchat = |room: &str, to: &str, text: &str, extra: &str| {
        format!(
            "<message xmlns='jabber:client' type='groupchat' from='{room}@conference.{DOMAIN}/x' \
             to='{to}'><body>{text}</body>{extra}</message>"
        )
    };
    let mut link = raw_link_as(&c.node.identity(), &b).await;
    link.write_all(header(&format!("node1.{C}")).as_bytes())
        .await
        .unwrap();
    assert!(answered(&mut link).await);
    let bea_jid = format!("bea@{DOMAIN}/desk");
    let alice_jid = format!("alice@{DOMAIN}/phone");
    let relay = format!(
        "<addresses xmlns='http://jabber.org/protocol/address'>\
         <address type='bcc' jid='{bea_jid}'/><address type='bcc' jid='{alice_jid}'/>\
         <address type='bcc' jid='ben@{DOMAIN}/desk'/></addresses>"
    );
    for stanza in [
        // As A's room: refused.
        groupchat("team", &bea_jid, "as A's room", ""),
        // C's own room, to A's user: refused.
        groupchat("rogue", &alice_jid, "to A's user", ""),
        // C's own room, to bea, (through B) to A's user, and to ben, who is not in
        // it: bea only.
        groupchat("rogue", &bea_jid, "genuine", &relay),
    ] {
        link.write_all(stanza.as_bytes()).await.unwrap();
    }
    link.flush().await.unwrap();
    let got = expect(&mut bea, 10, "the genuine message", |e| body(e).is_some()).await;
    assert_eq!(body(&got).as_deref(), Some("genuine"));
    assert!(
        got.get_child("addresses", "http://jabber.org/protocol/address")
            .is_none()
    );
    assert!(
        collect(&mut bea, 300, |e| body(e).is_some())
            .await
            .is_empty(),
        "nothing spoofed got through"
    );
    assert!(
        collect(&mut alice, 300, |e| body(e).is_some())
            .await
            .is_empty(),
        "nothing relayed to A"
    );
    assert!(
        collect(&mut ben, 300, |e| body(e).is_some())
            .await
            .is_empty(),
        "nothing for one who is not in the room"
    );
}
