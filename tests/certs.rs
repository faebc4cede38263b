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

    let installed = impmesh::files::import_certificate(
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
    impmesh::files::import_certificate(
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

/// With `[tls] client_certificate`, the client ports present that certificate while
/// HTTPS keeps the node identity; a reload picks up a renewed file.
#[tokio::test]
async fn a_separate_client_facing_certificate_serves_the_client_ports_only() {
    let ca = TestCa::new("Public CA");
    let (cert, key) = ca.issue(&["localhost"], 90);
    let chain = format!("{cert}{}", ca.cert.pem());
    let node = start_node(|c| {
        std::fs::create_dir_all(c.data_dir.join("client")).unwrap();
        std::fs::write(c.data_dir.join("client/fullchain.pem"), &chain).unwrap();
        std::fs::write(c.data_dir.join("client/privkey.pem"), &key).unwrap();
        c.tls.client_certificate = Some("client/fullchain.pem".into());
        c.tls.client_key = Some("client/privkey.pem".into());
    })
    .await;
    let ca_der = ca.cert.der().clone();
    let client_fp = tls_fingerprint(&node, &ca_der).await.unwrap();
    assert_ne!(client_fp, node.node.identity().fingerprint());
    assert_eq!(
        node.node.control.client_identity().unwrap().fingerprint(),
        client_fp
    );
    // HTTPS still presents the node identity.
    let anchors = impmesh_certs::TrustAnchors {
        cas: vec![],
        pinned: [node.node.identity().fingerprint()].into(),
    };
    impmesh_axl::client::AxlClient::connect(
        &node.node.https_addr.to_string(),
        "localhost",
        impmesh_axl::client::ServerTrust::Verified(
            impmesh_certs::PeerVerifier::new(&anchors).unwrap(),
        ),
    )
    .await
    .unwrap();

    // Renewed in place (as certbot would), then reloaded: new handshakes see it.
    let (renewed, renewed_key) = ca.issue(&["localhost"], 90);
    std::fs::write(
        node.config.data_dir.join("client/fullchain.pem"),
        format!("{renewed}{}", ca.cert.pem()),
    )
    .unwrap();
    std::fs::write(
        node.config.data_dir.join("client/privkey.pem"),
        &renewed_key,
    )
    .unwrap();
    node.node.reload_certificates().await.unwrap();
    let renewed_fp = tls_fingerprint(&node, &ca_der).await.unwrap();
    assert_ne!(renewed_fp, client_fp);

    // A broken file is refused and the certificate in use stays.
    std::fs::write(node.config.data_dir.join("client/privkey.pem"), &key).unwrap();
    assert!(node.node.reload_certificates().await.is_err());
    assert_eq!(tls_fingerprint(&node, &ca_der).await.unwrap(), renewed_fp);
}
