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

/// What XEP-0215 gives `user`, by "type/transport".
async fn services(node: &TestNode, user: &str) -> HashMap<String, Service> {
    let mut client = node.client(user, PW, Some("call"));
    online(&mut client).await;
    send(
        &mut client,
        "<iq type='get' id='s' to='localhost'><services xmlns='urn:xmpp:extdisco:2'/></iq>",
    )
    .await;
    let reply = expect(&mut client, 5, "services", |e| e.attr("id") == Some("s")).await;
    let services = reply
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
        .collect();
    client.send_end().await.unwrap();
    services
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

    // node2 stops: it leaves the registry, and node1 keeps what comes (up to its
    // capacity, two).
    node2.node.shutdown().await;
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
    let subject = node.config.node_name();
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
