//! The HTTPS service of real nodes (port 0 on 127.0.0.1): the AXL operations, the
//! channel-bound first contact between two nodes and a man in the middle, bad input,
//! the admin API, metrics and alarms, and the CLI talking to a running node.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use impmesh_axl::client::{AxlClient, ClientError, Method, OurSide, Peering, ServerTrust};
use impmesh_axl::pake::PakeError;
use impmesh_axl::soap::{NodeCertificate, Request, Response};
use impmesh_certs::{PeerVerifier, TrustAnchors};
use support::{TestNode, start_node};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const AXL_USER: &str = "icsync";
const AXL_PW: &str = "intercluster-secret";

/// A node of cluster `cluster` with the AXL user set and a short failure delay.
async fn axl_node(cluster: &str) -> TestNode {
    let cluster = cluster.to_owned();
    let node = start_node(move |c| {
        c.node.name = Some(format!("node1.{cluster}"));
        c.node.cluster = Some(cluster);
        c.https.failure_delay_ms = 50;
    })
    .await;
    impmesh_axl::set_axl_user(&node.node.server.store, AXL_USER, AXL_PW)
        .await
        .unwrap();
    node
}

/// A verifier that trusts exactly `node`'s current certificate.
fn pinned_to(node: &TestNode) -> ServerTrust {
    let anchors = TrustAnchors {
        cas: vec![],
        pinned: HashSet::from([node.node.identity().fingerprint()]),
    };
    ServerTrust::Verified(PeerVerifier::new(&anchors).unwrap())
}

async fn client(node: &TestNode) -> AxlClient {
    AxlClient::connect(
        &node.node.https_addr.to_string(),
        "localhost",
        pinned_to(node),
    )
    .await
    .unwrap()
}

/// A client of the node's admin listener, without credentials.
async fn admin_client(node: &TestNode) -> AxlClient {
    AxlClient::connect(
        &node.node.admin_addr.to_string(),
        "localhost",
        pinned_to(node),
    )
    .await
    .unwrap()
}

async fn admin(node: &TestNode) -> AxlClient {
    let mut c = admin_client(node).await;
    let token = impmesh::files::admin_token(&node.config).unwrap();
    c.use_bearer(&token).unwrap();
    c
}

/// The node certificates of a node's cluster, as it would offer them to a peer.
async fn own_certificates(node: &TestNode) -> Vec<NodeCertificate> {
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

/// `from` runs a first contact with the node at `to` using `password`, as `peer add`
/// will.
async fn first_contact(
    from: &TestNode,
    to: std::net::SocketAddr,
    password: &str,
) -> Result<Peering, ClientError> {
    impmesh_axl::client::exchange_certificates(
        &from.node.server.store,
        &to.to_string(),
        "localhost",
        (AXL_USER, password),
        OurSide {
            cluster: from.config.cluster_name(),
            domain: from.config.domain.clone(),
            address: from.node.https_addr.to_string(),
            server_name: "localhost".into(),
            token: impmesh_axl::auth::random_token(),
            certificates: own_certificates(from).await,
        },
        &from.node.identity(),
        None,
    )
    .await
}

/// A node's trust store.
async fn trusted(node: &TestNode) -> Vec<impmesh_store::TrustEntry> {
    node.node.server.store.trust_entries().await.unwrap()
}

#[tokio::test]
async fn axl_operations_page_the_directory_with_usns_and_tombstones() {
    let node = axl_node("cluster-a.example.com").await;
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        node.add_user(user, "pw").await;
    }
    let mut axl = client(&node).await;
    axl.use_basic(AXL_USER, AXL_PW).unwrap();

    let Response::ClusterInfo(info) = axl.call(&Request::GetClusterInfo).await.unwrap() else {
        panic!("not cluster info");
    };
    assert_eq!(info.cluster, "cluster-a.example.com");
    assert_eq!(info.domain, "localhost");
    assert_eq!(info.usn, 5);
    assert_eq!(info.nodes.len(), 1);
    let me = &info.nodes[0];
    assert_eq!(me.name, "node1.cluster-a.example.com");
    assert_eq!(me.host, "127.0.0.1");
    assert_eq!(me.c2s_port, node.c2s().port());
    assert_eq!(me.c2s_tls_port, node.direct_tls().port());
    assert_eq!(me.https_port, node.node.https_addr.port());
    assert_eq!(me.fingerprint, node.node.identity().fingerprint());

    // A full listing, two users a page.
    let (mut names, mut cursor, mut pages) = (vec![], None, 0);
    loop {
        let request = Request::ListUsers {
            since_usn: 0,
            cursor,
            page_size: 2,
            rooms: false,
        };
        let Response::Users(page) = axl.call(&request).await.unwrap() else {
            panic!("not a user page");
        };
        pages += 1;
        assert_eq!(page.snapshot_usn, 5);
        names.extend(page.users.iter().map(|u| u.name.clone()));
        assert!(
            page.users
                .iter()
                .all(|u| u.home_node == "node1.cluster-a.example.com")
        );
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["alice", "bob", "carol", "dave", "erin"]);

    // Changes since USN 5: a deletion is a tombstone.
    impmesh::users::delete(&node.node.server.store, &node.config, "bob")
        .await
        .unwrap();
    node.add_user("frank", "pw").await;
    let Response::Users(page) = axl
        .call(&Request::ListUsers {
            since_usn: 5,
            cursor: None,
            page_size: 100,
            rooms: false,
        })
        .await
        .unwrap()
    else {
        panic!("not a user page");
    };
    let changes: Vec<_> = page
        .users
        .iter()
        .map(|u| (u.name.as_str(), u.usn, u.deleted))
        .collect();
    assert_eq!(changes, [("bob", 6, true), ("frank", 7, false)]);
    assert_eq!(page.next_cursor, None);

    // Pages are kept for the other peers asking the same, but by their snapshot: the
    // same requests after changes see the changes.
    let list = |since_usn, page_size| Request::ListUsers {
        since_usn,
        cursor: None,
        page_size,
        rooms: false,
    };
    let Response::Users(page) = axl.call(&list(0, 2)).await.unwrap() else {
        panic!("not a user page");
    };
    assert_eq!(page.snapshot_usn, 7);
    let first: Vec<_> = page.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(first, ["alice", "carol"]);
    node.add_user("gina", "pw").await;
    let Response::Users(page) = axl.call(&list(5, 100)).await.unwrap() else {
        panic!("not a user page");
    };
    let changes: Vec<_> = page.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(changes, ["bob", "frank", "gina"]);
    assert_eq!(page.snapshot_usn, 8);

    let Response::Certificates(certs) = axl.call(&Request::GetCertificates).await.unwrap() else {
        panic!("not certificates");
    };
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].fingerprint, node.node.identity().fingerprint());
    assert!(certs[0].pem.starts_with("-----BEGIN CERTIFICATE-----"));

    // notifyChange is a peer's, for itself only (the AXL user speaks for no cluster;
    // tests/trust.rs has the peers' side).
    let notify = Request::NotifyChange {
        cluster: "cluster-b.example.com".into(),
        usn: 42,
    };
    assert!(matches!(
        axl.call(&notify).await,
        Err(ClientError::Fault(f)) if f.code == "forbidden"
    ));

    // Asking for changes from before pruned tombstones is a fault that says what to do.
    node.node
        .server
        .store
        .prune_tombstones(impmesh_store::now_unix() + 1)
        .await
        .unwrap();
    let err = axl
        .call(&Request::ListUsers {
            since_usn: 3,
            cursor: None,
            page_size: 10,
            rooms: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Fault(f) if f.code == "usnTooOld" && f.client),
        "{err}"
    );
}

#[tokio::test]
async fn first_contact_pins_each_others_certificates() {
    let a = axl_node("cluster-a.example.com").await;
    let b = axl_node("cluster-b.example.com").await;
    let peering = first_contact(&a, b.node.https_addr, AXL_PW).await.unwrap();
    assert_eq!(peering.info.cluster, "cluster-b.example.com");
    assert_eq!(peering.certificates.len(), 1);
    assert_eq!(
        peering.certificates[0].fingerprint,
        b.node.identity().fingerprint()
    );
    // B now knows A as a pending peer, with a credential to call A back.
    let pending = b
        .node
        .server
        .store
        .peer("cluster-a.example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pending.state, impmesh_store::PeerState::Pending);
    assert_eq!(pending.address, a.node.https_addr.to_string());
    assert!(pending.our_token.is_some() && pending.their_token_hash.is_some());

    // Each side pinned the other's node certificate, for the other's cluster.
    let a_trust = trusted(&a).await;
    assert_eq!(a_trust.len(), 1);
    assert_eq!(a_trust[0].fingerprint, b.node.identity().fingerprint());
    assert_eq!(a_trust[0].peer.as_deref(), Some("cluster-b.example.com"));
    assert_eq!(a_trust[0].source, "exchanged");
    let b_trust = trusted(&b).await;
    assert_eq!(b_trust.len(), 1);
    assert_eq!(b_trust[0].fingerprint, a.node.identity().fingerprint());
    assert_eq!(b_trust[0].peer.as_deref(), Some("cluster-a.example.com"));

    // From now on A verifies B through its trust store, and may use Basic on it.
    let anchors = impmesh_axl::trust::anchors(&a.node.server.store)
        .await
        .unwrap();
    let mut verified = AxlClient::connect(
        &b.node.https_addr.to_string(),
        "localhost",
        ServerTrust::Verified(PeerVerifier::new(&anchors).unwrap()),
    )
    .await
    .unwrap();
    verified.use_basic(AXL_USER, AXL_PW).unwrap();
    assert!(matches!(
        verified.call(&Request::GetClusterInfo).await.unwrap(),
        Response::ClusterInfo(_)
    ));
    // ... or the credential B issued to A, which renews the peering only together
    // with a certificate it proves it holds (docs/peering.md).
    let mut by_token = AxlClient::connect(
        &b.node.https_addr.to_string(),
        "localhost",
        ServerTrust::Verified(PeerVerifier::new(&anchors).unwrap()),
    )
    .await
    .unwrap();
    by_token
        .use_peer_token("cluster-a.example.com", &peering.token)
        .unwrap();
    assert!(matches!(
        by_token.call(&Request::GetCertificates).await.unwrap(),
        Response::Certificates(_)
    ));
    let renew = Request::ExchangeCertificates {
        cluster: "cluster-a.example.com".into(),
        address: a.node.https_addr.to_string(),
        server_name: "localhost".into(),
        token: impmesh_axl::auth::random_token(),
        certificates: vec![],
    };
    assert!(matches!(
        by_token.call(&renew).await,
        Err(ClientError::Fault(f)) if f.code == "proofOfPossession"
    ));
    let mut forged = AxlClient::connect(
        &b.node.https_addr.to_string(),
        "localhost",
        ServerTrust::Verified(PeerVerifier::new(&anchors).unwrap()),
    )
    .await
    .unwrap();
    forged
        .use_peer_token("cluster-a.example.com", "not-the-token")
        .unwrap();
    assert!(matches!(
        forged.call(&Request::GetCertificates).await,
        Err(ClientError::Status { status, .. }) if status == 401
    ));

    // A wrong password fails on the client before it sends a proof; nothing is pinned.
    let c = axl_node("cluster-c.example.com").await;
    let err = first_contact(&c, b.node.https_addr, "not-the-password")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Pake(PakeError::ServerNotAuthenticated)),
        "{err}"
    );
    assert!(trusted(&c).await.is_empty());
    assert_eq!(trusted(&b).await.len(), 1);
}

/// A TLS-terminating proxy with its own certificate: what a man in the middle can do
/// to a first contact. Records the plaintext the client sends through it.
struct Mitm {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Mitm {
    async fn start(upstream: std::net::SocketAddr) -> Mitm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let mut client = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(impmesh_certs::FirstContactVerifier::new())
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, connector, log) = (acceptor.clone(), connector.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(down) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let up = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                    let Ok(up) = connector.connect(name, up).await else {
                        return;
                    };
                    let (mut down_r, mut down_w) = tokio::io::split(down);
                    let (mut up_r, mut up_w) = tokio::io::split(up);
                    let to_server = async {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = down_r.read(&mut buf).await {
                            if n == 0 || up_w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = up_w.shutdown().await;
                    };
                    let to_client = async {
                        let _ = tokio::io::copy(&mut up_r, &mut down_w).await;
                        let _ = down_w.shutdown().await;
                    };
                    tokio::join!(to_server, to_client);
                });
            }
        });
        Mitm { addr, seen }
    }
}

#[tokio::test]
async fn a_man_in_the_middle_makes_the_first_contact_fail_and_learns_nothing() {
    let a = axl_node("cluster-a.example.com").await;
    let b = axl_node("cluster-b.example.com").await;
    let mitm = Mitm::start(b.node.https_addr).await;

    let err = first_contact(&a, mitm.addr, AXL_PW).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Pake(PakeError::ServerNotAuthenticated)),
        "the client must detect the other channel: {err}"
    );
    // Nothing was pinned on either side.
    assert!(trusted(&a).await.is_empty());
    assert!(trusted(&b).await.is_empty());

    // What the proxy saw: one request (KE1), no password, no client proof (KE3), and
    // not the certificates the client would have offered.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = String::from_utf8_lossy(&mitm.seen.lock().unwrap()).into_owned();
    assert_eq!(seen.matches("POST /axl/").count(), 1, "{seen}");
    assert!(!seen.contains(AXL_PW));
    use base64::Engine as _;
    for encoding in [
        base64::engine::general_purpose::STANDARD.encode(AXL_PW),
        base64::engine::general_purpose::STANDARD.encode(format!("{AXL_USER}:{AXL_PW}")),
    ] {
        assert!(!seen.contains(&encoding));
    }
    assert!(!seen.contains("sid="), "the client sent a proof: {seen}");
    assert!(!seen.contains("exchangeCertificates"));

    // The same exchange straight to B works: the failure was the proxy's doing.
    first_contact(&a, b.node.https_addr, AXL_PW).await.unwrap();
}

#[tokio::test]
async fn an_unverified_server_gets_no_credentials() {
    let node = axl_node("cluster-a.example.com").await;
    // Trusting nothing: the handshake fails before any request is sent.
    let nothing = ServerTrust::Verified(PeerVerifier::new(&TrustAnchors::default()).unwrap());
    let err = AxlClient::connect(&node.node.https_addr.to_string(), "localhost", nothing)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Tls(..)), "{err}");
    // On a first-contact connection, Basic and tokens are refused by the client itself.
    let mut first = AxlClient::connect(
        &node.node.https_addr.to_string(),
        "localhost",
        ServerTrust::FirstContact,
    )
    .await
    .unwrap();
    assert!(matches!(
        first.use_basic(AXL_USER, AXL_PW),
        Err(ClientError::NotTrusted)
    ));
    assert!(matches!(
        first.use_bearer("x"),
        Err(ClientError::NotTrusted)
    ));
    assert!(
        node.node.https.stats.snapshot().is_empty(),
        "no request reached the server"
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let node = axl_node("cluster-a.example.com").await;
    node.add_user("alice", "pw").await;
    let mut raw = client(&node).await;
    raw.use_basic(AXL_USER, AXL_PW).unwrap();

    // Oversized body: 413.
    let big = format!("<x>{}</x>", "a".repeat(2 * 1024 * 1024));
    let (status, text) = post_raw(&mut raw, big.into_bytes()).await;
    assert_eq!(status, 413, "{text}");
    // Unknown paths: 404.
    let mut c = client(&node).await;
    let (status, _) = c.raw(Method::GET, "/etc/passwd", vec![]).await.unwrap();
    assert_eq!(status, 404);

    // Malformed XML and a DTD: 400 with a SOAP Fault, nothing changes.
    let usn = node.node.server.store.current_usn().await.unwrap();
    for body in [
        "<soapenv:Envelope".to_owned(),
        "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>".to_owned(),
    ] {
        let mut c = client(&node).await;
        c.use_basic(AXL_USER, AXL_PW).unwrap();
        let (status, text) = post_raw(&mut c, body.into_bytes()).await;
        assert_eq!(status, 400);
        assert!(
            text.contains("<faultcode>soapenv:Client</faultcode>"),
            "{text}"
        );
        assert!(text.contains("malformedRequest"), "{text}");
    }
    assert_eq!(node.node.server.store.current_usn().await.unwrap(), usn);

    // Wrong credentials: 401 after a delay, then 429 once the address used up its tries.
    let mut wrong = client(&node).await;
    wrong.use_basic(AXL_USER, "wrong").unwrap();
    let started = std::time::Instant::now();
    let err = wrong.call(&Request::GetClusterInfo).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status, .. } if *status == 401),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(50));
    let mut last = 401;
    for _ in 0..12 {
        if let Err(ClientError::Status { status, .. }) = wrong.call(&Request::GetClusterInfo).await
        {
            last = status.as_u16();
        }
    }
    assert_eq!(last, 429);
    // The throttle is per address and applies to every credential from it.
    let mut right = client(&node).await;
    right.use_basic(AXL_USER, AXL_PW).unwrap();
    assert!(matches!(
        right.call(&Request::GetClusterInfo).await,
        Err(ClientError::Status { status, .. }) if status == 429
    ));
}

/// Posts raw bytes to /axl/ with the client's credentials; returns status and body.
async fn post_raw(client: &mut AxlClient, body: Vec<u8>) -> (u16, String) {
    let (status, answer) = client.raw(Method::POST, "/axl/", body).await.unwrap();
    (status.as_u16(), answer)
}

#[tokio::test]
async fn admin_api_metrics_and_alarms() {
    let node = axl_node("cluster-a.example.com").await;

    // The admin API and /metrics live on the admin listener only; the peer-facing
    // listener answers 404 for them, and the admin listener has no /axl/.
    let token = impmesh::files::admin_token(&node.config).unwrap();
    let mut peer_side = client(&node).await;
    peer_side.use_bearer(&token).unwrap();
    let (status, _) = peer_side.admin(Method::GET, "/users", None).await.unwrap();
    assert_eq!(status, 404);
    let (status, _) = peer_side
        .raw(Method::GET, "/metrics", vec![])
        .await
        .unwrap();
    assert_eq!(status, 404);
    let mut admin_side = admin_client(&node).await;
    admin_side.use_basic(AXL_USER, AXL_PW).unwrap();
    let (status, _) = admin_side
        .raw(Method::POST, "/axl/", b"<x/>".to_vec())
        .await
        .unwrap();
    assert_eq!(status, 404);

    // No or wrong admin credentials: 401, nothing done.
    let mut anonymous = admin_client(&node).await;
    let (status, _) = anonymous.admin(Method::GET, "/users", None).await.unwrap();
    assert_eq!(status, 401);
    let mut wrong = admin_client(&node).await;
    wrong.use_bearer("not-the-token").unwrap();
    let body = serde_json::json!({"name": "mallory", "password": "pw"});
    let (status, _) = wrong
        .admin(Method::POST, "/users", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert!(!node.node.server.store.user_exists("mallory").await.unwrap());

    let mut api = admin(&node).await;
    let body = serde_json::json!({"name": "Alice", "password": "pw"});
    let (status, created) = api
        .admin(Method::POST, "/users", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(created["username"], "alice");
    let (status, _) = api
        .admin(Method::POST, "/users", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, 409);
    let (_, users) = api.admin(Method::GET, "/users", None).await.unwrap();
    assert_eq!(users[0]["jid"], "alice@localhost");
    let (status, status_json) = api.admin(Method::GET, "/status", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(status_json["cluster"], "cluster-a.example.com");
    assert_eq!(status_json["sessions"], 0);

    // An admin account works too (Basic).
    node.node
        .server
        .store
        .set_admin_user("ops", "ops-password")
        .await
        .unwrap();
    let mut ops = admin_client(&node).await;
    ops.use_basic("ops", "ops-password").unwrap();
    let (status, _) = ops.admin(Method::GET, "/alarms", None).await.unwrap();
    assert_eq!(status, 200);

    // A login shows in the counters.
    let mut alice = node.client("alice", "pw", Some("m"));
    support::online(&mut alice).await;
    let (status, metrics) = api.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("impmesh_sessions 1"), "{metrics}");
    // The TURN relay's figures.
    assert!(metrics.contains("impmesh_relay_allocations 0"), "{metrics}");
    assert!(
        metrics.contains("impmesh_relay_refusals_total{reason=\"forbidden_peer\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("impmesh_logins_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("impmesh_tls_handshakes_total{result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("impmesh_stanzas_in_total{kind=\"presence\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("impmesh_store_query_seconds_count{op=\"user\"}"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("impmesh_api_requests_total{operation=\"/admin/v1/users\",status=\"201\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "impmesh_alarm_active{name=\"NodeCertificateExpiringSoon\",severity=\"warning\"} 0"
    ));

    // An alarm raised and cleared shows in the admin API and /metrics.
    let store = &node.node.server.store;
    let def = impmesh_store::alarms::CERT_EXPIRING_SOON;
    store
        .raise_alarm(def, "subject-1", "test raise")
        .await
        .unwrap();
    let (_, active) = api.admin(Method::GET, "/alarms", None).await.unwrap();
    assert_eq!(active[0]["name"], "NodeCertificateExpiringSoon");
    assert_eq!(active[0]["severity"], "warning");
    let (_, metrics) = api.get("/metrics").await.unwrap();
    assert!(metrics.contains(
        "impmesh_alarm_active{name=\"NodeCertificateExpiringSoon\",severity=\"warning\"} 1"
    ));
    store
        .clear_alarm(def, "subject-1", "test clear")
        .await
        .unwrap();
    let (_, active) = api.admin(Method::GET, "/alarms", None).await.unwrap();
    assert_eq!(active.as_array().unwrap().len(), 0);
    let (_, history) = api
        .admin(Method::GET, "/alarms/history", None)
        .await
        .unwrap();
    assert_eq!(history[0]["raised"], false);
    assert_eq!(history[1]["raised"], true);
    let (_, metrics) = api.get("/metrics").await.unwrap();
    assert!(metrics.contains(
        "impmesh_alarm_active{name=\"NodeCertificateExpiringSoon\",severity=\"warning\"} 0"
    ));

    // Deleting a user through the API closes its session.
    let (status, _) = api
        .admin(Method::DELETE, "/users/alice", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let hub = &node.node.server.hub;
    for _ in 0..50 {
        if hub.session("alice", "m").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        hub.session("alice", "m").is_none(),
        "the session outlived its account"
    );
    drop(alice);

    // Health checks need no credentials.
    let mut lb = admin_client(&node).await;
    assert_eq!(lb.get("/healthz").await.unwrap().0, 200);
    assert_eq!(lb.get("/readyz").await.unwrap().0, 200);
}

#[tokio::test]
async fn a_certificate_swapped_through_the_admin_api_serves_new_handshakes() {
    let node = axl_node("cluster-a.example.com").await;
    let before = node.node.identity().fingerprint();
    let mut api = admin(&node).await;
    let (status, answer) = api
        .admin(Method::POST, "/certificates/regenerate", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let after = answer["fingerprint"].as_str().unwrap().to_owned();
    assert_ne!(after, before);
    // A new HTTPS handshake sees the new certificate; the old pin no longer verifies.
    let anchors = TrustAnchors {
        cas: vec![],
        pinned: HashSet::from([after.clone()]),
    };
    let fresh = AxlClient::connect(
        &node.node.https_addr.to_string(),
        "localhost",
        ServerTrust::Verified(PeerVerifier::new(&anchors).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(impmesh_certs::fingerprint(&fresh.server_chain()[0]), after);
    // The cluster publishes it to peers.
    let nodes = node
        .node
        .server
        .store
        .cluster_nodes("cluster-a.example.com")
        .await
        .unwrap();
    assert_eq!(nodes[0].fingerprint, after);

    // A CA-signed import through the API, checked like any import.
    let ca = support::TestCa::new("Test CA");
    let (cert, key) = ca.issue(&["localhost", "node1.cluster-a.example.com"], 365);
    let body = serde_json::json!({"cert": cert, "key": key, "chain": ca.cert.pem()});
    let (status, answer) = api
        .admin(Method::POST, "/certificates/import", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let bad = serde_json::json!({"cert": ca.cert.pem()});
    let (status, answer) = api
        .admin(Method::POST, "/certificates/import", Some(&bad))
        .await
        .unwrap();
    assert_eq!(status, 400, "{answer}");
}

/// M6: HTTPS Basic attempts are counted when they begin: of 20 parallel guesses with a
/// limit of 3, at most 3 are checked (401), the rest get 429.
#[tokio::test]
async fn parallel_basic_guesses_get_no_extra_tries() {
    let node = start_node(|c| {
        c.https.failure_delay_ms = 300;
        c.https.max_failures = 3;
    })
    .await;
    impmesh_axl::set_axl_user(&node.node.server.store, AXL_USER, AXL_PW)
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut c = client(&node).await;
        c.use_basic(AXL_USER, "wrong").unwrap();
        tasks.spawn(async move {
            match c.call(&Request::GetClusterInfo).await {
                Err(ClientError::Status { status, .. }) => status.as_u16(),
                other => panic!("{other:?}"),
            }
        });
    }
    let mut checked = 0;
    while let Some(status) = tasks.join_next().await {
        match status.unwrap() {
            401 => checked += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert!(checked <= 3, "{checked} guesses were checked");
}

/// M10: one address holds at most `max_connections_per_address` HTTPS connections; the
/// next is closed before the TLS handshake, while other work goes on.
#[tokio::test]
async fn https_connections_per_address_are_capped() {
    let node = start_node(|c| c.https.max_connections_per_address = 3).await;
    let mut open = vec![];
    for _ in 0..3 {
        open.push(
            tokio::net::TcpStream::connect(node.node.https_addr)
                .await
                .unwrap(),
        );
    }
    let mut fourth = tokio::net::TcpStream::connect(node.node.https_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), fourth.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(open);
    // Once they are gone, a client gets in again.
    support::eventually(5, "a slot comes back", || async {
        let Ok(mut c) = AxlClient::connect(
            &node.node.https_addr.to_string(),
            "localhost",
            pinned_to(&node),
        )
        .await
        else {
            return false;
        };
        let token = impmesh::files::admin_token(&node.config).unwrap();
        c.use_bearer(&token).unwrap();
        c.raw(Method::GET, "/healthz", vec![]).await.is_ok()
    })
    .await;
}

/// Rooms are listed (and digested) only when asked, and only while the `rooms`
/// feature is on here: a node with it off answers as a release without rooms.
#[tokio::test]
async fn axl_lists_rooms_only_when_asked_and_turned_on() {
    for off in [false, true] {
        let node = start_node(move |c| {
            c.node.name = Some("node1.cluster-a.example.com".into());
            c.node.cluster = Some("cluster-a.example.com".into());
            if off {
                c.sync.disable_features = vec!["rooms".into()];
            }
        })
        .await;
        let store = &node.node.server.store;
        impmesh_axl::set_axl_user(store, AXL_USER, AXL_PW)
            .await
            .unwrap();
        node.add_user("alice", "pw").await;
        store
            .claim_room(
                "team",
                "cluster-a.example.com",
                "node1.cluster-a.example.com",
                1_800_000_000_000_000,
            )
            .await
            .unwrap();
        let mut axl = client(&node).await;
        axl.use_basic(AXL_USER, AXL_PW).unwrap();
        for asked in [false, true] {
            let Response::Users(page) = axl
                .call(&Request::ListUsers {
                    since_usn: 0,
                    cursor: None,
                    page_size: 10,
                    rooms: asked,
                })
                .await
                .unwrap()
            else {
                panic!("not a user page");
            };
            assert_eq!(page.users.len(), 1);
            let listed: Vec<_> = page.rooms.iter().map(|r| r.name.as_str()).collect();
            let expected: &[&str] = if asked && !off { &["team"] } else { &[] };
            assert_eq!(listed, expected, "asked {asked}, off {off}");
            let Response::Digest { rooms, .. } = axl
                .call(&Request::GetDirectoryDigest { rooms: asked })
                .await
                .unwrap()
            else {
                panic!("not a digest");
            };
            assert_eq!(rooms.map(|r| r.0), (asked && !off).then_some(1));
        }
        node.node.shutdown().await;
    }
}
