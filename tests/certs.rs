//! Certificates on a running node: a CA-signed certificate imported and reloaded is
//! what new TLS clients see, with no restart.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use support::*;

/// A TLS client on the direct-TLS port that trusts only `root`; returns the
/// fingerprint of the certificate the server presented.
async fn tls_fingerprint(
    node: &TestNode,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> Result<String, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let tcp = tokio::net::TcpStream::connect(node.direct_tls()).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await?;
    let (_, session) = tls.get_ref();
    Ok(impmesh_certs::fingerprint(
        &session.peer_certificates().unwrap()[0],
    ))
}

#[tokio::test]
async fn imported_certificate_is_used_by_new_handshakes_after_reload() {
    let node = start_node(|_| {}).await;
    node.add_user("alice", PW).await;
    let self_signed = node.node.identity().fingerprint();

    // A test CA and a certificate for localhost with a fresh key.
    let ca = TestCa::new("Test CA");
    let (cert, node_key) = ca.issue(&["localhost"], 365);
    let ca_der = ca.cert.der().clone();

    // Before: the node still presents its self-signed certificate.
    assert!(tls_fingerprint(&node, &ca_der).await.is_err());
    let mut alice = node.client("alice", PW, Some("before"));
    online(&mut alice).await;

    let installed = impmesh::node::import_certificate(
        &node.config,
        cert.as_bytes(),
        Some(node_key.as_bytes()),
        Some(ca.cert.pem().as_bytes()),
    )
    .unwrap();
    assert_ne!(installed, self_signed);
    // Installed but not yet reloaded: still the old certificate.
    assert!(tls_fingerprint(&node, &ca_der).await.is_err());

    let reloaded = node.node.reload_certificates().await.unwrap();
    assert_eq!(reloaded, installed);
    assert_eq!(tls_fingerprint(&node, &ca_der).await.unwrap(), installed);

    // A session that was up before the swap keeps working.
    send(
        &mut alice,
        "<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    expect(&mut alice, 5, "ping result", |e| e.attr("id") == Some("p")).await;
}

/// Imports a certificate for localhost, signed by a fresh test CA and valid for `days`
/// from now, and reloads the node; returns the new fingerprint.
async fn install_ca_signed(node: &TestNode, days: i64) -> String {
    let ca = TestCa::new("Test CA");
    let (cert, key) = ca.issue(&["localhost"], days);
    let config = node.config.clone();
    impmesh::node::import_certificate(
        &config,
        cert.as_bytes(),
        Some(key.as_bytes()),
        Some(ca.cert.pem().as_bytes()),
    )
    .unwrap();
    node.node.reload_certificates().await.unwrap()
}

#[tokio::test]
async fn expiring_certificate_raises_an_alarm_and_its_replacement_clears_it() {
    let node = start_node(|_| {}).await;
    let store = node.node.server.store.clone();
    assert!(
        store.active_alarms().await.unwrap().is_empty(),
        "a fresh self-signed certificate is fine"
    );

    let short = install_ca_signed(&node, 10).await;
    let active = store.active_alarms().await.unwrap();
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(active[0].name, "NodeCertificateExpiringSoon");
    assert_eq!(active[0].severity, "warning");
    assert_eq!(active[0].subject, short);

    install_ca_signed(&node, 365).await;
    assert!(store.active_alarms().await.unwrap().is_empty());
    let history = store.alarm_history(10).await.unwrap();
    let events: Vec<(&str, bool)> = history
        .iter()
        .map(|e| (e.name.as_str(), e.raised))
        .collect();
    assert_eq!(
        events,
        [
            ("NodeCertificateExpiringSoon", false),
            ("NodeCertificateExpiringSoon", true)
        ]
    );
}
