//! The real `impmesh` binary's account commands: exit codes and one-line reasons.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

fn impmesh(data_dir: &std::path::Path, args: &[&str], stdin: &str) -> Output {
    let mut full = vec!["--data-dir", data_dir.to_str().unwrap()];
    full.extend_from_slice(args);
    run(&full, stdin)
}

/// Runs the binary with `args`, feeding `stdin`.
fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_impmesh"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn user_commands_exit_codes_and_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = impmesh(d, &["user", "add", "Alice", "--password-stdin"], "pw-one\n");
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "created alice@localhost"
    );

    let dup = impmesh(d, &["user", "add", "alice", "--password-stdin"], "pw\n");
    assert_eq!(dup.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&dup.stderr).trim(),
        "impmesh: user alice already exists"
    );

    let bad = impmesh(d, &["user", "add", "no spaces", "--password-stdin"], "pw\n");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 7622"));
    assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);

    let empty = impmesh(d, &["user", "add", "bob", "--password-stdin"], "\n");
    assert_eq!(empty.status.code(), Some(1));

    let list = impmesh(d, &["user", "list", "--json"], "");
    let users: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(users[0]["jid"], "alice@localhost");
    assert_eq!(users.as_array().unwrap().len(), 1);

    assert!(
        impmesh(
            d,
            &["user", "passwd", "alice", "--password-stdin"],
            "pw-two\n"
        )
        .status
        .success()
    );
    let tokens = impmesh(d, &["user", "tokens", "alice"], "");
    assert!(tokens.status.success(), "{tokens:?}");
    assert_eq!(
        String::from_utf8_lossy(&tokens.stdout).trim(),
        "alice@localhost has no FAST tokens"
    );
    let none = impmesh(d, &["user", "tokens", "zed", "--revoke-all"], "");
    assert_eq!(
        String::from_utf8_lossy(&none.stderr).trim(),
        "impmesh: no such user: zed"
    );
    let missing = impmesh(d, &["user", "passwd", "zed", "--password-stdin"], "x\n");
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "impmesh: no such user: zed"
    );
    assert!(impmesh(d, &["user", "del", "alice"], "").status.success());
    assert_eq!(
        impmesh(d, &["user", "del", "alice"], "").status.code(),
        Some(1)
    );

    // A broken config file is a clear error with exit code 2.
    let conf = d.join("bad.toml");
    std::fs::write(&conf, "domian = 'x'\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_impmesh"))
        .args(["--config", conf.to_str().unwrap(), "user", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("domian"));
}

#[test]
fn cert_show_and_csr() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let show = impmesh(d, &["cert", "show", "--json"], "");
    assert!(show.status.success(), "{show:?}");
    let certs: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(certs[0]["sans"][0], "DNS:localhost");
    assert_eq!(certs[0]["self_signed"], true);
    // The same identity on every call (generated once, then loaded).
    let again: serde_json::Value =
        serde_json::from_slice(&impmesh(d, &["cert", "show", "--json"], "").stdout).unwrap();
    assert_eq!(certs[0]["sha256"], again[0]["sha256"]);

    let out = d.join("node.csr");
    let csr = impmesh(
        d,
        &[
            "cert",
            "csr",
            "--cn",
            "node1.example.com",
            "--san",
            "node1.example.com,example.com",
            "--out",
            out.to_str().unwrap(),
        ],
        "",
    );
    assert!(csr.status.success(), "{csr:?}");
    assert!(
        std::fs::read_to_string(&out)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
    );
    // Regenerate: a new certificate for the same names.
    let regen = impmesh(d, &["cert", "regenerate"], "");
    assert!(regen.status.success(), "{regen:?}");
    let after: serde_json::Value =
        serde_json::from_slice(&impmesh(d, &["cert", "show", "--json"], "").stdout).unwrap();
    assert_ne!(after[0]["sha256"], certs[0]["sha256"]);
    assert_eq!(after[0]["sans"], certs[0]["sans"]);
    assert!(String::from_utf8_lossy(&regen.stdout).contains(after[0]["sha256"].as_str().unwrap()));

    let bad = impmesh(d, &["cert", "csr", "--cn", "x", "--san", "bad name"], "");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a host name"));
}

#[test]
fn cert_import_checks_then_installs() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = support::TestCa::new("Test CA");
    let (cert, key) = ca.issue(&["localhost"], 365);
    let write = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (cert_f, key_f, ca_f) = (
        write("node.pem", cert),
        write("node-key.pem", key),
        write("ca.pem", ca.cert.pem()),
    );
    let wrong_f = write(
        "wrong-key.pem",
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    let data = d.join("data");

    let wrong = impmesh(
        &data,
        &[
            "cert", "import", "--cert", &cert_f, "--key", &wrong_f, "--chain", &ca_f,
        ],
        "",
    );
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("does not belong"),
        "{wrong:?}"
    );

    let ok = impmesh(
        &data,
        &[
            "cert", "import", "--cert", &cert_f, "--key", &key_f, "--chain", &ca_f,
        ],
        "",
    );
    assert!(ok.status.success(), "{ok:?}");
    let show: serde_json::Value =
        serde_json::from_slice(&impmesh(&data, &["cert", "show", "--json"], "").stdout).unwrap();
    assert_eq!(show[0]["self_signed"], false);
    assert_eq!(
        show.as_array().unwrap().len(),
        2,
        "certificate and its chain"
    );
}

#[test]
fn cert_import_of_a_pkcs12_archive_asks_its_password() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = support::TestCa::new("Test CA");
    let (cert, key) = ca.issue(&["localhost"], 365);
    std::fs::write(d.join("node.pem"), cert).unwrap();
    std::fs::write(d.join("node-key.pem"), key).unwrap();
    std::fs::write(d.join("ca.pem"), ca.cert.pem()).unwrap();
    let p12 = d.join("node.p12");
    let made = Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "pass:s3cret", "-in"])
        .arg(d.join("node.pem"))
        .arg("-inkey")
        .arg(d.join("node-key.pem"))
        .arg("-certfile")
        .arg(d.join("ca.pem"))
        .arg("-out")
        .arg(&p12)
        .status()
        .expect("this test needs the openssl command");
    assert!(made.success());
    let data = d.join("data");
    let p12 = p12.to_str().unwrap();

    let wrong = impmesh(
        &data,
        &["cert", "import", "--p12", p12, "--password-stdin"],
        "nope\n",
    );
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("wrong password"),
        "{wrong:?}"
    );
    let ok = impmesh(
        &data,
        &["cert", "import", "--p12", p12, "--password-stdin"],
        "s3cret\n",
    );
    assert!(ok.status.success(), "{ok:?}");
    let show: serde_json::Value =
        serde_json::from_slice(&impmesh(&data, &["cert", "show", "--json"], "").stdout).unwrap();
    assert_eq!(show[0]["self_signed"], false);
    assert_eq!(show[1]["subject"], "CN=Test CA");
}

#[test]
fn trust_add_list_remove() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = support::TestCa::new("Test CA");
    let peer =
        rcgen::generate_simple_self_signed(vec!["cluster-b.example.com".to_owned()]).unwrap();
    std::fs::write(d.join("ca.pem"), ca.cert.pem()).unwrap();
    std::fs::write(d.join("peer.pem"), peer.cert.pem()).unwrap();
    let data = d.join("data");
    let path = |n: &str| d.join(n).to_str().unwrap().to_owned();

    let add_ca = impmesh(&data, &["trust", "add", "--ca", &path("ca.pem")], "");
    assert!(add_ca.status.success(), "{add_ca:?}");
    let again = impmesh(&data, &["trust", "add", "--ca", &path("ca.pem")], "");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "already trusted"
    );
    let no_peer = impmesh(&data, &["trust", "add", "--pin", &path("peer.pem")], "");
    assert!(!no_peer.status.success(), "a pin needs its peer");
    let pin = impmesh(
        &data,
        &[
            "trust",
            "add",
            "--pin",
            &path("peer.pem"),
            "--peer",
            "cluster-b.example.com",
        ],
        "",
    );
    assert!(pin.status.success(), "{pin:?}");

    let list: serde_json::Value =
        serde_json::from_slice(&impmesh(&data, &["trust", "list", "--json"], "").stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let by_kind = |k: &str| list.iter().find(|e| e["kind"] == k).unwrap().clone();
    assert_eq!(by_kind("ca")["source"], "imported");
    assert_eq!(by_kind("ca")["subject"], "CN=Test CA");
    assert_eq!(by_kind("pinned")["peer"], "cluster-b.example.com");
    let fp = by_kind("pinned")["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();

    // What verifiers will trust: one CA and the pinned certificate.
    let config = impmesh::config::Config {
        data_dir: data.clone(),
        ..Default::default()
    };
    let anchors = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = impmesh::files::open_store(&config).await.unwrap();
        impmesh_axl::trust::anchors(&store).await.unwrap()
    });
    assert_eq!(anchors.cas.len(), 1);
    assert!(anchors.pinned.contains(&fp));

    assert!(
        impmesh(&data, &["trust", "remove", &fp], "")
            .status
            .success()
    );
    let gone = impmesh(&data, &["trust", "remove", &fp], "");
    assert_eq!(gone.status.code(), Some(1));
    let list: serde_json::Value =
        serde_json::from_slice(&impmesh(&data, &["trust", "list", "--json"], "").stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

/// Runs the binary against the running `node`, through a config file naming its data
/// directory, cluster and HTTPS addresses.
async fn cli_on(node: &support::TestNode, args: &[&str], stdin: &str) -> Output {
    let config_file = node.dir.path().join("impmesh.toml");
    std::fs::write(
        &config_file,
        format!(
            "data_dir = {:?}\n[node]\nname = {:?}\ncluster = {:?}\n[listen]\nhttps = \"{}\"\nadmin = \"{}\"\n",
            node.dir.path(),
            node.config.node_name(),
            node.config.cluster_name(),
            node.node.https_addr,
            node.node.admin_addr
        ),
    )
    .unwrap();
    let mut full = vec![
        "--config".to_owned(),
        config_file.to_str().unwrap().to_owned(),
    ];
    full.extend(args.iter().map(|a| a.to_string()));
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = full.iter().map(String::as_str).collect();
        run(&args, &stdin)
    })
    .await
    .unwrap()
}

/// With the node running, the CLI acts through its admin API: a regenerated
/// certificate is in use at once, without a reload.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_drives_a_running_node_through_the_admin_api() {
    let node = support::start_node(|c| {
        c.node.cluster = Some("cluster-a.example.com".into());
        c.muc.enabled = false;
    })
    .await;
    let cli = |args: &'static [&'static str], stdin: &'static str| {
        let node = &node;
        async move { Ok::<_, ()>(cli_on(node, args, stdin).await) }
    };

    let status = cli(&["status", "--json"], "").await.unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["cluster"], "cluster-a.example.com");
    // The client HTTPS listener (file upload) is among the listeners.
    assert_eq!(
        status["listeners"]["client_https"],
        node.node.client_https_addr.unwrap().to_string()
    );
    // And the TURN relay.
    assert_eq!(
        status["listeners"]["turn"],
        node.node.relay.as_ref().unwrap().udp_addr().to_string()
    );
    assert_eq!(
        status["listeners"]["turns"],
        node.node
            .relay
            .as_ref()
            .unwrap()
            .tls_addr()
            .unwrap()
            .to_string()
    );

    // With the chat service turned off there are no rooms to list, and the CLI says
    // why.
    let rooms = cli(&["room", "list"], "").await.unwrap();
    assert_eq!(rooms.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&rooms.stderr).trim(),
        "impmesh: the chat service is off on this node ([muc] enabled = false)"
    );

    let added = cli(&["user", "add", "bob", "--password-stdin"], "pw\n")
        .await
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    assert!(node.node.server.store.user_exists("bob").await.unwrap());
    let dup = cli(&["user", "add", "bob", "--password-stdin"], "pw\n")
        .await
        .unwrap();
    assert_eq!(dup.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&dup.stderr).trim(),
        "impmesh: user bob already exists"
    );

    // FAST tokens: listed with their client, revoked one client at a time.
    let store = &node.node.server.store;
    let credentials = store
        .user("bob")
        .await
        .unwrap()
        .unwrap()
        .scram_sha256
        .encode();
    let token = impmesh_store::NewFastToken {
        credentials: &credentials,
        owner: "bob",
        client: "phone/1",
        mechanism: "HT-SHA-256-NONE",
        initiator: "00",
        responder: "",
        software: "Conversations",
        device: "Pixel",
        issued: 1_000,
        expires: i64::MAX,
    };
    assert!(store.fast_issue(&token, 32).await.unwrap());
    let listed = cli(&["user", "tokens", "bob", "--json"], "").await.unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["username"], "bob");
    assert_eq!(listed["tokens"][0]["client"], "phone/1");
    assert_eq!(listed["tokens"][0]["software"], "Conversations");
    assert_eq!(listed["tokens"][0]["pending"], true);
    let revoked = cli(
        &["user", "tokens", "bob", "--revoke", "phone/1", "--json"],
        "",
    )
    .await
    .unwrap();
    let revoked: serde_json::Value = serde_json::from_slice(&revoked.stdout).unwrap();
    assert_eq!(revoked["revoked"], 1);
    assert!(store.fast_tokens("bob").await.unwrap().is_empty());

    let before = node.node.identity().fingerprint();
    let regen = cli(&["cert", "regenerate"], "").await.unwrap();
    assert!(regen.status.success(), "{regen:?}");
    let out = String::from_utf8_lossy(&regen.stdout).into_owned();
    assert!(out.contains("the running node uses it"), "{out}");
    let now = node.node.identity().fingerprint();
    assert_ne!(now, before);
    assert!(out.contains(&now), "{out}");

    // The CLI reaches the node again after the swap: it pins the new certificate.
    let set = cli(
        &["axl-user", "set", "icsync", "--password-stdin"],
        "intercluster-pw\n",
    )
    .await
    .unwrap();
    assert!(set.status.success(), "{set:?}");
    assert!(
        node.node
            .server
            .store
            .axl_user("icsync")
            .await
            .unwrap()
            .is_some()
    );
    let alarms = cli(&["alarms", "--json"], "").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&alarms.stdout).trim(), "[]");

    // A stopped node: status says so; user commands work on the store.
    let stopped = tempfile::tempdir().unwrap();
    let out = impmesh(stopped.path(), &["status"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

/// `impmesh room list|show|destroy` on the running node: the room a client created,
/// its occupant, a room that is not there, a bad venue, and the destruction, which
/// the client sees with the venue.
#[tokio::test(flavor = "multi_thread")]
async fn room_commands_list_show_and_destroy() {
    const ROOM: &str = "team@conference.localhost";
    let node = support::start_node_with_users(|c| c.muc.enabled = true, &["alice"]).await;
    let mut alice = node.client("alice", support::PW, Some("laptop"));
    support::online(&mut alice).await;
    support::send(
        &mut alice,
        &format!(
            "<presence to='{ROOM}/Alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
        ),
    )
    .await;
    support::expect(&mut alice, 5, "alice in the room", |e| {
        e.name() == "presence" && e.attr("from") == Some(&format!("{ROOM}/Alice"))
    })
    .await;

    let list = cli_on(&node, &["room", "list", "--json"], "").await;
    assert!(list.status.success(), "{list:?}");
    let rooms: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rooms[0]["jid"], ROOM);
    assert_eq!(rooms[0]["locked"], true);
    let text = cli_on(&node, &["room", "list"], "").await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("{ROOM}\t1\ttemporary,public,locked")),
        "{text}"
    );
    let show = cli_on(&node, &["room", "show", ROOM, "--json"], "").await;
    assert!(show.status.success(), "{show:?}");
    let room: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(room["occupants"][0]["nick"], "Alice");
    assert_eq!(room["occupants"][0]["affiliation"], "owner");
    assert_eq!(room["affiliations"][0]["jid"], "alice@localhost");

    let missing = cli_on(&node, &["room", "show", "nope"], "").await;
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "impmesh: no room nope on this node"
    );
    let bad = cli_on(
        &node,
        &["room", "destroy", "team", "--venue", "not a room"],
        "",
    )
    .await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not a room's address"),
        "{bad:?}"
    );

    let gone = cli_on(
        &node,
        &[
            "room",
            "destroy",
            "team",
            "--venue",
            "other@conference.localhost",
            "--reason",
            "moved",
        ],
        "",
    )
    .await;
    assert!(gone.status.success(), "{gone:?}");
    assert_eq!(
        String::from_utf8_lossy(&gone.stdout).trim(),
        format!("destroyed {ROOM} (1 session(s) told)")
    );
    let told = support::expect(&mut alice, 5, "the room destroyed", |e| {
        e.name() == "presence" && e.attr("type") == Some("unavailable")
    })
    .await;
    assert!(
        String::from(&told).contains("other@conference.localhost"),
        "{}",
        String::from(&told)
    );
    let empty = cli_on(&node, &["room", "list"], "").await;
    assert_eq!(String::from_utf8_lossy(&empty.stdout).trim(), "no rooms");
    node.node.shutdown().await;
}

/// Peering two running clusters with the CLI, as admins do.
#[tokio::test(flavor = "multi_thread")]
async fn peer_commands_peer_two_clusters() {
    let a = support::start_node(|c| {
        c.node.name = Some("node1.cluster-a.example.com".into());
        c.node.cluster = Some("cluster-a.example.com".into());
    })
    .await;
    let b = support::start_node(|c| {
        c.node.name = Some("node1.cluster-b.example.com".into());
        c.node.cluster = Some("cluster-b.example.com".into());
    })
    .await;
    let set = cli_on(
        &b,
        &["axl-user", "set", "icsync", "--password-stdin"],
        "peer-pass-b\n",
    )
    .await;
    assert!(set.status.success(), "{set:?}");
    b.add_user("bob", "pw").await;

    let b_addr = b.node.https_addr.to_string();
    let wrong = cli_on(
        &a,
        &[
            "peer",
            "add",
            &b_addr,
            "--user",
            "icsync",
            "--password-stdin",
        ],
        "nope-nope\n",
    )
    .await;
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("did not prove knowledge"),
        "{wrong:?}"
    );
    let added = cli_on(
        &a,
        &[
            "peer",
            "add",
            &b_addr,
            "--user",
            "icsync",
            "--password-stdin",
        ],
        "peer-pass-b\n",
    )
    .await;
    assert!(added.status.success(), "{added:?}");
    assert!(String::from_utf8_lossy(&added.stdout).contains("peered with cluster-b.example.com"));

    let listed = cli_on(&b, &["peer", "list", "--json"], "").await;
    let peers: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(peers[0]["cluster"], "cluster-a.example.com");
    assert_eq!(peers[0]["state"], "pending");
    let accepted = cli_on(&b, &["peer", "accept", "cluster-a.example.com"], "").await;
    assert!(accepted.status.success(), "{accepted:?}");

    for _ in 0..100 {
        if a.node
            .server
            .store
            .remote_user_count("cluster-b.example.com")
            .await
            .unwrap()
            == 1
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let status = cli_on(&a, &["peer", "status", "cluster-b.example.com"], "").await;
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        text.contains("associated users: 1 (the peer has 1)"),
        "{text}"
    );
    assert!(text.contains("certificates:     in-sync"), "{text}");

    let deleted = cli_on(&a, &["peer", "del", "cluster-b.example.com"], "").await;
    assert!(deleted.status.success(), "{deleted:?}");
    let missing = cli_on(&a, &["peer", "status", "cluster-b.example.com"], "").await;
    assert_eq!(missing.status.code(), Some(1));
}

/// M13, L9: the data directory is created 0700 and the SQLite store 0600; a node whose
/// admin token other users can read refuses to start and says how to fix it.
#[cfg(unix)]
#[tokio::test]
async fn secrets_are_private_and_a_readable_token_stops_the_node() {
    use std::os::unix::fs::PermissionsExt as _;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let mut config = impmesh::config::Config {
        data_dir: dir.clone(),
        ..Default::default()
    };
    config.listen.c2s = vec!["127.0.0.1:0".parse().unwrap()];
    config.listen.c2s_direct_tls = vec!["127.0.0.1:0".parse().unwrap()];
    config.listen.https = "127.0.0.1:0".parse().unwrap();
    config.listen.admin = "127.0.0.1:0".parse().unwrap();
    config.listen.client_https = "127.0.0.1:0".parse().unwrap();
    config.listen.turn = Some("127.0.0.1:0".parse().unwrap());
    config.listen.turns = Some("127.0.0.1:0".parse().unwrap());
    let node = impmesh::node::Node::start(&config).await.unwrap();
    node.shutdown().await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("impmesh.db")), 0o600);
    assert_eq!(mode(&dir.join("admin.token")), 0o600);
    std::fs::set_permissions(
        dir.join("admin.token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let Err(err) = impmesh::node::Node::start(&config).await else {
        panic!("a node started with a readable admin token");
    };
    assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
}
