//! The node's TURN relay end to end: credentials from XEP-0215 (tokio-xmpp), then a
//! TURN client crate (turn-client-proto, turn-client-rustls) allocating, relaying and
//! being refused over UDP, TCP and TLS.

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

mod support;
#[path = "support/turn.rs"]
mod turn;

use std::collections::HashMap;
use std::net::SocketAddr;

use impmesh_media::core::Refusal;
use support::*;
use turn::{Over, Turn, tls_trusting};

/// One service of a XEP-0215 answer.
#[derive(Debug, Clone)]
struct Service {
    host: String,
    port: u16,
    username: String,
    password: String,
}

/// What XEP-0215 gives `user` (password [`PW`]), by "type/transport".
async fn services(node: &TestNode, user: &str) -> HashMap<String, Service> {
    let mut client = node.client(user, PW, Some("call"));
    online(&mut client).await;
    let services = services_of(&mut client).await;
    client.send_end().await.unwrap();
    services
}

/// What XEP-0215 gives `client`'s user, by "type/transport".
async fn services_of(client: &mut tokio_xmpp::Client) -> HashMap<String, Service> {
    send(
        client,
        "<iq type='get' id='s' to='localhost'><services xmlns='urn:xmpp:extdisco:2'/></iq>",
    )
    .await;
    let reply = expect(client, 5, "services", |e| e.attr("id") == Some("s")).await;
    reply
        .get_child("services", "urn:xmpp:extdisco:2")
        .unwrap()
        .children()
        .map(|s| {
            let a = |n| s.attr(n).unwrap_or_default().to_owned();
            (
                format!("{}/{}", a("type"), a("transport")),
                Service {
                    host: a("host"),
                    port: a("port").parse().unwrap(),
                    username: a("username"),
                    password: a("password"),
                },
            )
        })
        .collect()
}

/// The relay's address for a service (the tests' node listens on 127.0.0.1).
fn address(s: &Service) -> SocketAddr {
    let ip = if s.host == "localhost" {
        "127.0.0.1"
    } else {
        &s.host
    };
    format!("{ip}:{}", s.port).parse().unwrap()
}

fn relay(node: &TestNode) -> &impmesh_media::relay::RelayHandle {
    node.node.relay.as_ref().unwrap()
}

fn refusals(node: &TestNode, reason: Refusal) -> u64 {
    relay(node)
        .stats()
        .1
        .refusals
        .get(&reason)
        .copied()
        .unwrap_or(0)
}

/// RFC 8656 through the node: alice's client allocates over UDP, TCP or TLS with the
/// credentials XEP-0215 gave her, bob's over UDP with his, and RTP-sized packets go
/// relay to relay both ways (over a channel on the stream transports). Closing ends
/// the allocations.
#[tokio::test]
async fn a_turn_client_relays_over_udp_tcp_and_tls_with_xep0215_credentials() {
    let node = start_node_with_users(
        |c| c.media.allow_peers = vec!["127.0.0.0/8".into()],
        &["alice", "bob"],
    )
    .await;
    let (alice, bob) = (services(&node, "alice").await, services(&node, "bob").await);
    let tls = tls_trusting(node.cert());
    for over in [Over::Udp, Over::Tcp, Over::Tls] {
        let service = match over {
            Over::Udp => &alice["turn/udp"],
            Over::Tcp => &alice["turn/tcp"],
            Over::Tls => &alice["turns/tcp"],
        };
        assert!(service.username.ends_with(":alice"), "{service:?}");
        let mut a = Turn::connect(
            over,
            address(service),
            &service.username,
            &service.password,
            Some(tls.clone()),
        )
        .await;
        let b_service = &bob["turn/udp"];
        let mut b = Turn::connect(
            Over::Udp,
            address(b_service),
            &b_service.username,
            &b_service.password,
            None,
        )
        .await;
        let relayed_a = a.allocate().await.expect("alice's allocation");
        let relayed_b = b.allocate().await.expect("bob's allocation");
        assert_ne!(relayed_a, relayed_b);
        assert!(a.permit(relayed_b.ip()).await);
        assert!(b.permit(relayed_a.ip()).await);
        if over != Over::Udp {
            a.bind_channel(relayed_b).await;
        }
        for i in 0..20u8 {
            // An RTP packet of a voice call: 12 bytes of header, 160 of payload.
            let packet = [i; 172];
            a.send(relayed_b, &packet).await;
            assert_eq!(
                b.recv().await,
                (relayed_a, packet.to_vec()),
                "{over:?} to bob"
            );
            b.send(relayed_a, &packet).await;
            assert_eq!(
                a.recv().await,
                (relayed_b, packet.to_vec()),
                "{over:?} to alice"
            );
        }
        let stats = relay(&node).stats();
        assert_eq!(stats.0, 2, "{over:?}: two allocations");
        a.delete().await;
        b.delete().await;
        eventually(5, "the allocations end", || async {
            relay(&node).stats().0 == 0
        })
        .await;
    }
    let stats = relay(&node).stats().1;
    assert_eq!(stats.allocations_created, 6);
    assert!(stats.packets_to_peers >= 120 && stats.packets_to_clients >= 120);
}

/// What the relay refuses, it refuses with RFC 8656's error and allocates nothing:
/// expired credentials and a wrong password (401), a loopback peer without
/// `[media] allow_peers` (403), a user over `[media] user_allocations` (486).
#[tokio::test]
async fn refused_requests_get_the_stun_error_and_allocate_nothing() {
    let node = start_node_with_users(|c| c.media.user_allocations = 1, &["alice"]).await;
    let service = services(&node, "alice").await["turn/udp"].clone();
    let server = address(&service);
    let now = impmesh_store::now_unix();
    let secrets = node
        .node
        .server
        .store
        .turn_secrets(now, 86_400)
        .await
        .unwrap();

    // Credentials that expired a minute ago, signed with the right secret.
    let expired = impmesh_media::auth::mint(&secrets[0].secret, "alice", (now - 3660) as u64, 3600);
    let mut client = Turn::connect(
        Over::Udp,
        server,
        &expired.username,
        &expired.password,
        None,
    )
    .await;
    assert_eq!(client.allocation_refused().await, 401);
    assert!(refusals(&node, Refusal::Expired) >= 1);

    // A password the secret did not make.
    let before = refusals(&node, Refusal::Unauthorized);
    let mut client =
        Turn::connect(Over::Udp, server, &service.username, "not-the-hmac", None).await;
    assert_eq!(client.allocation_refused().await, 401);
    assert!(refusals(&node, Refusal::Unauthorized) > before);
    assert_eq!(relay(&node).stats().0, 0, "nothing allocated");

    // A good allocation may not reach loopback: the tests' node has no allow-list
    // (127.0.0.1 is the node's own address, a peer on its relay ports only).
    let mut first = Turn::connect(
        Over::Udp,
        server,
        &service.username,
        &service.password,
        None,
    )
    .await;
    assert!(first.allocate().await.is_some());
    assert!(!first.permit("127.0.0.2".parse().unwrap()).await);
    assert_eq!(first.errors.last(), Some(&403), "{:?}", first.errors);
    assert!(refusals(&node, Refusal::ForbiddenPeer) >= 1);

    // alice's quota is one allocation.
    let mut second = Turn::connect(
        Over::Udp,
        server,
        &service.username,
        &service.password,
        None,
    )
    .await;
    assert_eq!(second.allocation_refused().await, 486);
    assert!(refusals(&node, Refusal::Quota) >= 1);
    assert_eq!(relay(&node).stats().0, 1, "only the first allocation");
}

/// Two nodes of one cluster share a store (CI's PostgreSQL, or one SQLite file): each
/// relay registers its address and load there. Above its load (here, one allocation)
/// the first sends new allocations to the second with a signed 300 Try Alternate, and
/// the same credentials allocate there (the cluster's secrets are shared). A relay
/// that stops leaves the registry, and allocations stay home again.
#[tokio::test]
async fn a_relay_above_its_load_redirects_to_the_least_loaded_relay_of_the_cluster() {
    let node1 = start_node_with_users(
        |c| {
            c.node.name = Some("node1.localhost".into());
            c.media.max_allocations = 2;
            c.media.redirect_above_percent = 50;
            c.media.heartbeat_secs = 1;
        },
        &["alice", "bob"],
    )
    .await;
    let shared_store = if std::env::var("IMPMESH_TEST_POSTGRES").is_ok() {
        node1.config.store.url.clone()
    } else {
        format!("sqlite://{}", node1.dir.path().join("impmesh.db").display())
    };
    let node2 = start_node(|c| {
        c.node.name = Some("node2.localhost".into());
        c.store.url = shared_store;
        c.media.heartbeat_secs = 1;
    })
    .await;
    let relay2 = relay(&node2).udp_addr();
    eventually(10, "node1 knows node2's relay", || async {
        node1
            .node
            .server
            .store
            .relays(0)
            .await
            .unwrap()
            .iter()
            .any(|r| r.address == relay2.to_string())
    })
    .await;
    // One heartbeat more: node1 has read the registry since node2 joined it.
    let beats = |node: &TestNode| {
        let store = node.node.server.store.clone();
        async move {
            store
                .relays(0)
                .await
                .unwrap()
                .iter()
                .find(|r| r.node == "node1.localhost")
                .map(|r| r.heartbeat)
        }
    };
    let seen = beats(&node1).await;
    eventually(5, "a heartbeat of node1", || async {
        beats(&node1).await > seen
    })
    .await;

    let service = services(&node1, "alice").await["turn/udp"].clone();
    let server = address(&service);
    let mut first = Turn::connect(
        Over::Udp,
        server,
        &service.username,
        &service.password,
        None,
    )
    .await;
    assert!(first.allocate().await.is_some(), "below the load: here");
    let bob = services(&node1, "bob").await["turn/udp"].clone();
    let mut second = Turn::connect(Over::Udp, server, &bob.username, &bob.password, None).await;
    assert_eq!(second.allocation_refused().await, 300);
    assert_eq!(second.alternate, Some(relay2), "the other node's relay");
    assert_eq!(relay(&node1).stats().1.redirects, 1);
    // bob's credentials, from node1, work on node2's relay.
    let mut moved = Turn::connect(Over::Udp, relay2, &bob.username, &bob.password, None).await;
    assert!(moved.allocate().await.is_some());
    assert_eq!((relay(&node1).stats().0, relay(&node2).stats().0), (1, 1));

    // node2 stops: it leaves the registry at once (not only when its heartbeats
    // lapse), and node1 keeps what comes (up to its capacity, two).
    node2.node.shutdown().await;
    let left = node1.node.server.store.relays(0).await.unwrap();
    assert!(left.iter().all(|r| r.node != "node2.localhost"), "{left:?}");
    eventually(10, "node1 no longer redirects", || async {
        let mut again = Turn::connect(Over::Udp, server, &bob.username, &bob.password, None).await;
        again.allocate().await.is_some()
    })
    .await;
    assert_eq!(relay(&node1).stats().0, 2);
    // Full: the alarm says so, and clears when an allocation ends.
    eventually(5, "MediaRelayAtCapacity", || async {
        has_alarm(&node1, "MediaRelayAtCapacity", "node1.localhost").await
    })
    .await;
    first.delete().await;
    eventually(5, "MediaRelayAtCapacity clears", || async {
        !has_alarm(&node1, "MediaRelayAtCapacity", "node1.localhost").await
    })
    .await;
}

/// A relayed port that cannot be bound (here the range is one port, which another
/// socket holds): the allocation gets 508, the failure is counted in /metrics, and
/// the alarm MediaRelayPortsUnavailable names the node.
#[tokio::test]
async fn relayed_ports_that_cannot_bind_refuse_the_allocation_and_raise_an_alarm() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let node = start_node_with_users(
        |c| {
            c.media.port_min = port;
            c.media.port_max = port;
            c.media.heartbeat_secs = 1;
        },
        &["alice"],
    )
    .await;
    // An alarm an earlier run left on (alarms outlive the process) is cleared by the
    // first heartbeat after a restart.
    let subject = node.config.node_name();
    let store = node.node.server.store.clone();
    store
        .raise_alarm(
            impmesh_store::alarms::RELAY_AT_CAPACITY,
            &subject,
            "left over",
        )
        .await
        .unwrap();
    drop(store);
    let node = node.restart().await;
    eventually(5, "the stale MediaRelayAtCapacity cleared", || async {
        !has_alarm(&node, "MediaRelayAtCapacity", &subject).await
    })
    .await;
    let service = services(&node, "alice").await["turn/udp"].clone();
    let mut client = Turn::connect(
        Over::Udp,
        address(&service),
        &service.username,
        &service.password,
        None,
    )
    .await;
    assert_eq!(client.allocation_refused().await, 508);
    assert_eq!(relay(&node).port_failures(), 1);
    assert_eq!(relay(&node).stats().0, 0);
    eventually(5, "MediaRelayPortsUnavailable", || async {
        has_alarm(&node, "MediaRelayPortsUnavailable", &subject).await
    })
    .await;
    let mut metrics = String::new();
    relay(&node).render_metrics(&mut metrics);
    assert!(
        metrics.contains("impmesh_relay_port_failures_total 1\n"),
        "{metrics}"
    );
}

/// A Jingle offer or answer (XEP-0166) for one voice stream (XEP-0167, Opus) whose
/// only ICE-UDP candidate (XEP-0176) is a relayed address.
fn jingle(action: &str, sid: &str, initiator: &str, relayed: SocketAddr) -> String {
    format!(
        "<jingle xmlns='urn:xmpp:jingle:1' action='{action}' initiator='{initiator}' sid='{sid}'>\
           <content creator='initiator' name='voice'>\
             <description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'>\
               <payload-type id='111' name='opus' clockrate='48000' channels='2'/>\
             </description>\
             <transport xmlns='urn:xmpp:jingle:transports:ice-udp:1' ufrag='{sid}u' pwd='{sid}-password-0123456789'>\
               <candidate component='1' foundation='1' generation='0' id='{sid}c' ip='{}' port='{}' \
                 priority='16777215' protocol='udp' type='relay'/>\
             </transport>\
           </content>\
         </jingle>",
        relayed.ip(),
        relayed.port()
    )
}

/// The relayed candidate of a Jingle IQ, as the other party sent it.
fn relayed_candidate(iq: &minidom::Element) -> SocketAddr {
    let candidate = iq
        .get_child("jingle", "urn:xmpp:jingle:1")
        .and_then(|j| j.get_child("content", "urn:xmpp:jingle:1"))
        .and_then(|c| c.get_child("transport", "urn:xmpp:jingle:transports:ice-udp:1"))
        .and_then(|t| t.get_child("candidate", "urn:xmpp:jingle:transports:ice-udp:1"))
        .expect("an ICE-UDP candidate");
    assert_eq!(candidate.attr("type"), Some("relay"));
    format!(
        "{}:{}",
        candidate.attr("ip").unwrap(),
        candidate.attr("port").unwrap()
    )
    .parse()
    .unwrap()
}

fn is_jingle(e: &minidom::Element, action: &str) -> bool {
    e.is("iq", "jabber:client")
        && e.attr("type") == Some("set")
        && e.get_child("jingle", "urn:xmpp:jingle:1")
            .is_some_and(|j| j.attr("action") == Some(action))
}

/// An allocation on the relay XEP-0215 named, or on the one it redirects to (300 Try
/// Alternate); the client, the relayed address and the relay that holds it.
async fn allocate_at_home(service: &Service) -> (Turn, SocketAddr, SocketAddr) {
    let home = address(service);
    let mut client =
        Turn::connect(Over::Udp, home, &service.username, &service.password, None).await;
    if let Some(relayed) = client.allocate().await {
        return (client, relayed, home);
    }
    assert_eq!(client.errors.last(), Some(&300), "{:?}", client.errors);
    let alternate = client.alternate.expect("an ALTERNATE-SERVER");
    let mut client = Turn::connect(
        Over::Udp,
        alternate,
        &service.username,
        &service.password,
        None,
    )
    .await;
    let relayed = client
        .allocate()
        .await
        .expect("an allocation at the alternate");
    (client, relayed, alternate)
}

/// One call: alice (cluster A) offers, bob (cluster B) answers, through the mesh; each
/// allocated on their own cluster's relay (following a redirect), and only learns the
/// other's relayed address from the Jingle stanzas. Then 50 RTP packets each way,
/// relay to relay; every one arrives, from the other's relayed address. Returns the
/// relay bob's allocation was on.
async fn call(
    (alice, alice_turn): (&mut tokio_xmpp::Client, &Service),
    (bob, bob_turn): (&mut tokio_xmpp::Client, &Service),
    sid: &str,
) -> SocketAddr {
    let (mut a, relayed_a, _) = allocate_at_home(alice_turn).await;
    let (mut b, relayed_b, bob_relay) = allocate_at_home(bob_turn).await;

    let (alice_jid, bob_jid) = (
        format!("alice@{DOMAIN}/{sid}"),
        format!("bob@{DOMAIN}/{sid}"),
    );
    send(
        alice,
        &format!(
            "<iq type='set' id='{sid}-offer' to='{bob_jid}'>{}</iq>",
            jingle("session-initiate", sid, &alice_jid, relayed_a)
        ),
    )
    .await;
    let offer = expect(bob, 10, "session-initiate", |e| {
        is_jingle(e, "session-initiate")
    })
    .await;
    assert_eq!(offer.attr("from"), Some(alice_jid.as_str()));
    let alice_candidate = relayed_candidate(&offer);
    assert_eq!(alice_candidate, relayed_a);
    send(
        bob,
        &format!("<iq type='result' id='{sid}-offer' to='{alice_jid}'/>"),
    )
    .await;
    expect(alice, 10, "the offer acknowledged", |e| {
        e.attr("id") == Some(&format!("{sid}-offer")) && e.attr("type") == Some("result")
    })
    .await;
    send(
        bob,
        &format!(
            "<iq type='set' id='{sid}-answer' to='{alice_jid}'>{}</iq>",
            jingle("session-accept", sid, &alice_jid, relayed_b)
        ),
    )
    .await;
    let answer = expect(alice, 10, "session-accept", |e| {
        is_jingle(e, "session-accept")
    })
    .await;
    let bob_candidate = relayed_candidate(&answer);
    send(
        alice,
        &format!("<iq type='result' id='{sid}-answer' to='{bob_jid}'/>"),
    )
    .await;

    // Each relay lets the other's relayed address in, and media flows relay to relay.
    assert!(a.permit(bob_candidate.ip()).await);
    assert!(b.permit(alice_candidate.ip()).await);
    for seq in 0..50u16 {
        // An RTP header (version 2, Opus' payload type, sequence) and 160 bytes.
        let mut rtp = vec![0x80, 111];
        rtp.extend_from_slice(&seq.to_be_bytes());
        rtp.resize(172, 0x55);
        a.send(bob_candidate, &rtp).await;
        assert_eq!(b.recv().await, (alice_candidate, rtp.clone()));
        b.send(alice_candidate, &rtp).await;
        assert_eq!(a.recv().await, (bob_candidate, rtp));
    }
    a.delete().await;
    b.delete().await;
    bob_relay
}

/// A call across two clusters (issue 15): alice's and bob's clusters are peered; each
/// gets credentials from their own cluster (XEP-0215), allocates on its relay, and
/// the call's media goes relay to relay while Jingle crosses the router link. Then
/// the same while bob's first call still holds his cluster's relay at its load: his
/// allocation there is redirected to the cluster's second node (sharing its store),
/// and the call goes through that relay.
#[tokio::test]
async fn a_call_across_two_clusters_goes_relay_to_relay() {
    let loopback = |c: &mut impmesh::config::Config| {
        c.media.allow_peers = vec!["127.0.0.0/8".into()];
        c.media.heartbeat_secs = 1;
    };
    let a = mesh_cluster("cluster-a.example.com", &["alice"], loopback).await;
    let b = mesh_cluster("cluster-b.example.com", &["bob"], |c| {
        loopback(c);
        c.media.max_allocations = 2;
        c.media.redirect_above_percent = 50;
    })
    .await;
    peer_clusters(&a, &b, 1, 1).await;

    let mut alice = a.client("alice", "pw", Some("call1"));
    online(&mut alice).await;
    let mut bob = b.client("bob", "pw", Some("call1"));
    online(&mut bob).await;
    let alice_turn = services_of(&mut alice).await["turn/udp"].clone();
    let bob_turn = services_of(&mut bob).await["turn/udp"].clone();
    assert_eq!(address(&alice_turn), relay(&a).udp_addr());
    assert_eq!(address(&bob_turn), relay(&b).udp_addr());
    let bob_relay = call((&mut alice, &alice_turn), (&mut bob, &bob_turn), "call1").await;
    assert_eq!(bob_relay, relay(&b).udp_addr());
    assert_eq!(relay(&a).stats().1.allocations_created, 1);
    assert_eq!(relay(&b).stats().1.allocations_created, 1);

    // Cluster B gets a second node (its relay sharing B's store), and B's first relay
    // is held at its load by an allocation of bob's.
    let shared_store = if std::env::var("IMPMESH_TEST_POSTGRES").is_ok() {
        b.config.store.url.clone()
    } else {
        format!("sqlite://{}", b.dir.path().join("impmesh.db").display())
    };
    let b2 = start_node(|c| {
        c.node.name = Some("node2.cluster-b.example.com".into());
        c.node.cluster = Some("cluster-b.example.com".into());
        c.store.url = shared_store;
        loopback(c);
    })
    .await;
    let mut held = Turn::connect(
        Over::Udp,
        address(&bob_turn),
        &bob_turn.username,
        &bob_turn.password,
        None,
    )
    .await;
    assert!(held.allocate().await.is_some());
    let relay_b2 = relay(&b2).udp_addr();
    let redirected = eventually(10, "B's first relay redirects to its second", || async {
        let mut probe = Turn::connect(
            Over::Udp,
            address(&bob_turn),
            &bob_turn.username,
            &bob_turn.password,
            None,
        )
        .await;
        // Until B's first relay has read the registry, it allocates here.
        if probe.allocate().await.is_some() {
            probe.delete().await;
            return false;
        }
        probe.alternate == Some(relay_b2)
    });
    redirected.await;

    let mut alice2 = a.client("alice", "pw", Some("call2"));
    online(&mut alice2).await;
    let mut bob2 = b.client("bob", "pw", Some("call2"));
    online(&mut bob2).await;
    let bob_relay = call((&mut alice2, &alice_turn), (&mut bob2, &bob_turn), "call2").await;
    assert_eq!(bob_relay, relay_b2, "redirected to B's second node");
    assert_eq!(relay(&b2).stats().1.allocations_created, 1);
    assert_eq!(relay(&b).stats().0, 1, "the held one");
}
