//! Limits a hostile (or just unlucky) client cannot walk around: offline delivery under
//! the XEP-0198 window, per-sender shares of a recipient's queue and offline storage,
//! write deadlines. Each test fails without the limit it names (security review
//! H2, M4, M5, M9, L8, L11).

#![allow(clippy::unwrap_used)]

mod support;

use impmesh_store::{Offline, OfflineQuota};
use support::*;
use tokio::io::AsyncWriteExt as _;

/// Stores `n` offline messages for `owner` from `senders` senders, numbered in order.
async fn store_offline(node: &TestNode, owner: &str, n: usize, senders: usize) {
    let quota = OfflineQuota {
        messages: 100_000,
        bytes: 1 << 30,
        per_sender: 100_000,
    };
    for i in 0..n {
        let from = format!("s{}@localhost", i % senders);
        let xml = format!(
            "<message xmlns='jabber:client' from='{from}/r' to='{owner}@localhost' type='chat'><body>{i}</body></message>"
        );
        let stored = node
            .node
            .server
            .store
            .store_offline(owner, &from, &xml, quota)
            .await
            .unwrap();
        assert_eq!(stored, Offline::Stored);
    }
}

/// H2: a user with 1,000 stored messages logs in with stream management, gets every
/// one in order and stays connected; the store is empty once the client acknowledged
/// them. Before, all were pushed at once, a window smaller than the backlog tripped
/// (here 200, as with Prosody's 500 and a full store), the session ended and the
/// messages went back to storage, at every login.
#[tokio::test]
async fn xep0198_a_thousand_offline_messages_arrive_under_the_ack_window() {
    let node = start_node_with_users(|c| c.limits.max_unacked = 200, &["alice", "bob"]).await;
    store_offline(&node, "bob", 1000, 8).await;
    let mut bob = node.client("bob", PW, Some("phone"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let mut got = Vec::with_capacity(1000);
    while got.len() < 1000 {
        let m = expect(&mut bob, 30, "offline messages", |e| body(e).is_some()).await;
        got.push(body(&m).unwrap().parse::<usize>().unwrap());
    }
    assert_eq!(got, (0..1000).collect::<Vec<_>>());
    // Still the same session: a live message arrives after them.
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    send(
        &mut alice,
        "<message to='bob@localhost' type='chat'><body>live</body></message>",
    )
    .await;
    let m = expect(&mut bob, 10, "the live message", |e| body(e).is_some()).await;
    assert_eq!(body(&m).as_deref(), Some("live"));
    eventually(
        10,
        "acknowledged offline messages leave the store",
        || async { offline_count(&node, "bob").await == 0 },
    )
    .await;
}

/// L8: stored messages are removed when the client acknowledges them, not when they
/// are pushed. A client that takes them and goes away without acknowledging leaves
/// them stored (with XEP-0198 and without); one that answers the ping after a page
/// (no XEP-0198) has them removed.
#[tokio::test]
async fn offline_messages_leave_the_store_only_when_acknowledged() {
    let node = start_node_with_users(|_| {}, &["bob"]).await;
    store_offline(&node, "bob", 5, 1).await;
    for sm in [true, false] {
        let mut raw = RawClient::login(&node, "bob", "r", sm, None).await;
        raw.send("<presence/>").await;
        raw.read_until("<body>4</body>").await;
        if !sm {
            raw.read_until("urn:xmpp:ping").await;
        }
        drop(raw);
        eventually(10, "the session ends", || async {
            node.node.server.session_count() == 0
        })
        .await;
        assert_eq!(offline_count(&node, "bob").await, 5, "sm={sm}");
    }
    // Without XEP-0198, the answer to the ping that follows a page confirms it.
    let mut raw = RawClient::login(&node, "bob", "r", false, None).await;
    raw.send("<presence/>").await;
    raw.read_until("<body>4</body>").await;
    let ping = raw.read_until("</iq>").await;
    let id = attr_in(&ping, "id");
    raw.send(&format!("<iq type='result' id='{id}' to='localhost'/>"))
        .await;
    eventually(10, "confirmed offline messages leave the store", || async {
        offline_count(&node, "bob").await == 0
    })
    .await;
}

/// M4: a sender that floods a recipient whose client is slow (here: never
/// acknowledges) fills its own share of the recipient's queue and gets the rest back
/// as `resource-constraint`; another sender still gets through, and the recipient is
/// not disconnected for it. Only when it stays silent past the ping timeout does its
/// session end, and what it never acknowledged goes to offline storage: every message
/// is either bounced or stored, none lost.
#[tokio::test]
async fn a_flood_is_bounced_to_its_sender_and_never_kicks_the_recipient() {
    let node = start_node_with_users(
        |c| {
            c.limits.session_queue = 40;
            c.limits.max_unacked = 10;
            c.limits.ping_timeout = 8;
        },
        &["alice", "bob", "carol"],
    )
    .await;
    let mut bob = RawClient::login(&node, "bob", "r", true, None).await;
    bob.send("<presence/>").await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    let mut carol = node.client("carol", PW, Some("c"));
    online(&mut carol).await;
    const N: usize = 200;
    for i in 0..N {
        send(
            &mut alice,
            &format!(
                "<message to='bob@localhost/r' type='chat' id='a{i}'><body>a{i}</body></message>"
            ),
        )
        .await;
    }
    // At most the window (10) and alice's share of the queue (40 / 4) are taken: at
    // least 180 come back, then the stream goes quiet.
    let is_bounce = |e: &minidom::Element| {
        e.attr("type") == Some("error")
            && e.get_child("error", "jabber:client").is_some_and(|err| {
                err.has_child("resource-constraint", "urn:ietf:params:xml:ns:xmpp-stanzas")
            })
    };
    let mut bounced = 0;
    while bounced < N - 20 {
        expect(&mut alice, 10, "bounces", is_bounce).await;
        bounced += 1;
    }
    bounced += collect(&mut alice, 300, is_bounce).await.len();
    // Carol's message gets in: her answer to a ping comes after any bounce would.
    send(
        &mut carol,
        "<message to='bob@localhost/r' type='chat' id='c'><body>carol</body></message>",
    )
    .await;
    send(
        &mut carol,
        "<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    let answer = expect(&mut carol, 10, "the ping answer or a bounce", |e| {
        e.attr("id") == Some("p") || e.attr("type") == Some("error")
    })
    .await;
    assert_eq!(
        answer.attr("id"),
        Some("p"),
        "carol was bounced: {answer:?}"
    );
    assert_eq!(
        node.node.server.hub.sessions("bob").len(),
        1,
        "the flood did not end bob's session"
    );
    // Bob never acknowledges: after the ping timeout his session ends and everything
    // he was given or queued goes to offline storage.
    eventually(15, "bob's silent session ends", || async {
        node.node.server.hub.sessions("bob").is_empty()
    })
    .await;
    eventually(10, "what bob never acknowledged is stored", || async {
        offline_count(&node, "bob").await + bounced == N + 1
    })
    .await;
    let stored = node
        .node
        .server
        .store
        .offline_messages("bob")
        .await
        .unwrap();
    assert!(stored.iter().any(|m| m.stanza.contains("carol")));
}

/// The read rate limit pauses a session's reads, it does not end them: a client that
/// sends more than twice the burst at a time, three times, gets everything through
/// in order: its session reads again once each pause is over (the session's own
/// timer ends the pause).
#[tokio::test]
async fn a_rate_limited_session_reads_again_after_each_pause() {
    let node = start_node_with_users(
        |c| {
            c.limits.read_rate = 4096;
            c.limits.read_burst = 4096;
        },
        &["alice", "bob"],
    )
    .await;
    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    let filler = "x".repeat(1000);
    const N: usize = 10;
    // Each round is read at once, far over the burst: the next round waits for the
    // pause to end.
    for round in 0..3 {
        for i in 0..N {
            send(
                &mut alice,
                &format!(
                    "<message to='bob@localhost' type='chat'><body>{i} {filler}</body></message>"
                ),
            )
            .await;
        }
        let mut got = Vec::with_capacity(N);
        while got.len() < N {
            let m = expect(&mut bob, 30, "rate-limited messages", |e| body(e).is_some()).await;
            let text = body(&m).unwrap();
            got.push(text.split(' ').next().unwrap().parse::<usize>().unwrap());
        }
        assert_eq!(got, (0..N).collect::<Vec<_>>(), "round {round}");
    }
    assert_eq!(node.node.server.hub.sessions("alice").len(), 1);
}

/// M9: one sender fills only its share of a recipient's offline storage (a quarter by
/// default), the rest bounce with `resource-constraint`; others still get in.
#[tokio::test]
async fn a_sender_fills_only_its_share_of_offline_storage() {
    let node = start_node_with_users(
        |c| {
            c.limits.max_offline = 8;
            c.limits.max_offline_per_sender = 2;
        },
        &["alice", "bob", "carol"],
    )
    .await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    for i in 0..4 {
        send(
            &mut alice,
            &format!(
                "<message to='bob@localhost' type='chat' id='m{i}'><body>{i}</body></message>"
            ),
        )
        .await;
    }
    for id in ["m2", "m3"] {
        let e = expect(&mut alice, 10, "bounce", |e| {
            e.attr("type") == Some("error")
        })
        .await;
        assert_eq!(e.attr("id"), Some(id));
        let error = e.get_child("error", "jabber:client").unwrap();
        assert!(error.has_child("resource-constraint", "urn:ietf:params:xml:ns:xmpp-stanzas"));
    }
    let mut carol = node.client("carol", PW, Some("c"));
    online(&mut carol).await;
    send(
        &mut carol,
        "<message to='bob@localhost' type='chat'><body>carol</body></message>",
    )
    .await;
    eventually(10, "carol's message is stored", || async {
        offline_count(&node, "bob").await == 3
    })
    .await;
}

/// M5: a client that stops reading is disconnected within the write deadline, and
/// what it was sent goes to offline storage (it was never written whole).
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_within_the_write_deadline() {
    let node = start_node_with_users(
        |c| {
            c.limits.write_timeout = 1;
            c.limits.read_rate = 1 << 30;
            c.limits.read_burst = 1 << 30;
        },
        &["alice", "bob"],
    )
    .await;
    let mut bob = RawClient::login(&node, "bob", "r", false, Some(4096)).await;
    bob.send("<presence/>").await;
    // Alice reads everything she is sent (her bounces), so only bob stops reading.
    let alice = RawClient::login(&node, "alice", "a", false, None).await;
    let (mut reader, mut writer) = tokio::io::split(alice.tls);
    let drain = tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0u8; 65536];
        while matches!(reader.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    // Alice writes until bob's session is gone: her share of bob's queue stays full,
    // so bob's socket buffers fill whatever size the kernel gives them (at most 4 MiB
    // each way here; 400 messages are 80 MB) and the write deadline is reached.
    let text = "x".repeat(200_000);
    let mut sent = 0;
    while !node.node.server.hub.sessions("bob").is_empty() {
        assert!(sent < 400, "bob's session outlived 80 MB sent to it");
        let message = format!(
            "<message to='bob@localhost/r' type='chat' id='{sent}'><body>{text}</body></message>"
        );
        writer.write_all(message.as_bytes()).await.unwrap();
        sent += 1;
    }
    drain.abort();
    drop(bob);
}

/// M6: login attempts are counted when they begin, so parallel connections get no
/// extra guesses: of 20 wrong passwords at once with a limit of 3, at most 3 are
/// checked; the rest get `temporary-auth-failure`, and so does the right password.
#[tokio::test]
async fn parallel_logins_get_no_extra_guesses() {
    let node = start_node_with_users(
        |c| {
            c.limits.login_failures = 3;
            c.limits.login_failure_window = 60;
        },
        &["alice"],
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let connector = node.connector();
        tasks.spawn(async move { try_login(&connector, "alice", "wrong").await });
    }
    let mut checked = 0;
    while let Some(result) = tasks.join_next().await {
        let err = format!("{:?}", result.unwrap().unwrap_err());
        if !err.contains("TemporaryAuthFailure") {
            checked += 1;
        }
    }
    assert!(checked <= 3, "{checked} guesses were checked");
    let err = try_login(&node.connector(), "alice", PW).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("TemporaryAuthFailure"),
        "{err:?}"
    );
}

/// H5: password changes (each a PBKDF2 derivation) are limited per account: the fourth
/// within a minute gets `resource-constraint` and changes nothing.
#[tokio::test]
async fn xep0077_password_changes_are_rate_limited() {
    let node = start_node_with_users(|_| {}, &["alice"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    for i in 0..4 {
        send(
            &mut alice,
            &format!("<iq type='set' id='pw{i}'><query xmlns='jabber:iq:register'><username>alice</username><password>new{i}</password></query></iq>"),
        )
        .await;
        let reply = expect(&mut alice, 10, "the answer", |e| {
            e.attr("id") == Some(&format!("pw{i}"))
        })
        .await;
        let ok = reply.attr("type") == Some("result");
        assert_eq!(ok, i < 3, "change {i}: {reply:?}");
    }
    // The last accepted password is the one in force.
    assert!(try_login(&node.connector(), "alice", "new2").await.is_ok());
    assert!(try_login(&node.connector(), "alice", "new3").await.is_err());
}

/// M12: an account cancelled in-band (XEP-0077 `<remove/>`) has every session closed,
/// as when an admin deletes it; a name created again later inherits none of them.
#[tokio::test]
async fn xep0077_cancellation_closes_the_accounts_other_sessions() {
    let node = start_node_with_users(|_| {}, &["alice"]).await;
    let mut phone = node.client("alice", PW, Some("phone"));
    online(&mut phone).await;
    let mut laptop = node.client("alice", PW, Some("laptop"));
    online(&mut laptop).await;
    send(
        &mut laptop,
        "<iq type='set' id='bye'><query xmlns='jabber:iq:register'><remove/></query></iq>",
    )
    .await;
    let reply = expect(&mut laptop, 10, "the answer", |e| {
        e.attr("id") == Some("bye")
    })
    .await;
    assert_eq!(reply.attr("type"), Some("result"));
    eventually(
        10,
        "every session of the cancelled account is closed",
        || async { node.node.server.hub.sessions("alice").is_empty() },
    )
    .await;
    drop((phone, laptop));
}

/// The salt and iteration count a SCRAM-SHA-256 challenge gives `name`.
async fn scram_salt(node: &TestNode, name: &str) -> (String, String) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut raw = RawClient::connect(node, None).await;
    let first = b64.encode(format!("n,,n={name},r=abcdefghijklmnop"));
    raw.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{first}</auth>"
    ))
    .await;
    let challenge = raw.read_until("</challenge>").await;
    let text = challenge
        .split("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
        .nth(1)
        .and_then(|c| c.split('<').next())
        .unwrap();
    let decoded = String::from_utf8(b64.decode(text).unwrap()).unwrap();
    let field = |key: &str| {
        decoded
            .split(',')
            .find_map(|f| f.strip_prefix(key))
            .unwrap()
            .to_owned()
    };
    (field("s="), field("i="))
}

/// M8: the SCRAM challenge does not tell which users exist. An unknown name's salt
/// comes from the normalised name (`Nobody` and `nobody` get the same one, as `ALICE`
/// and `alice` do for a real user) with a key the cluster keeps, so it is the same
/// after a restart; its iteration count is the one real users get.
#[tokio::test]
async fn scram_challenges_do_not_reveal_unknown_users() {
    let node = start_node_with_users(|_| {}, &["alice"]).await;
    let (alice_salt, alice_i) = scram_salt(&node, "alice").await;
    assert_eq!(scram_salt(&node, "ALICE").await.0, alice_salt);
    let (nobody_salt, nobody_i) = scram_salt(&node, "nobody").await;
    assert_eq!(scram_salt(&node, "Nobody").await.0, nobody_salt);
    assert_eq!(nobody_i, alice_i);
    assert_ne!(nobody_salt, alice_salt);
    let node = node.restart().await;
    assert_eq!(scram_salt(&node, "nobody").await.0, nobody_salt);
}

/// M9: an outbound `subscribe` (or the approval of a request) creates a roster item,
/// so the roster cap (1000) holds for it as for a roster set; and a session has at most 1000 directed-presence
/// targets. Beyond either: `resource-constraint`, nothing kept.
#[tokio::test]
async fn subscriptions_and_directed_presence_respect_the_caps() {
    let node = start_node_with_users(|_| {}, &["alice"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    for i in 0..1001 {
        send(
            &mut alice,
            &format!("<presence to='x{i}@localhost' type='subscribe' id='s{i}'/>"),
        )
        .await;
    }
    let e = expect(&mut alice, 30, "the refusal", |e| {
        e.attr("type") == Some("error") && e.name() == "presence"
    })
    .await;
    assert_eq!(e.attr("id"), Some("s1000"));
    let error = e.get_child("error", "jabber:client").unwrap();
    assert!(error.has_child("resource-constraint", "urn:ietf:params:xml:ns:xmpp-stanzas"));
    let (_, roster) = node.node.server.store.roster("alice").await.unwrap();
    assert_eq!(roster.len(), 1000);
    // Approving a request would create an item too: refused the same way.
    let store = &node.node.server.store;
    let request = "<presence xmlns='jabber:client' from='zed@localhost' type='subscribe'/>";
    assert!(
        store
            .put_subscription_request("alice", "zed@localhost", request, 1000)
            .await
            .unwrap()
    );
    send(
        &mut alice,
        "<presence to='zed@localhost' type='subscribed' id='approve'/>",
    )
    .await;
    let e = expect(&mut alice, 30, "the refused approval", |e| {
        e.attr("type") == Some("error") && e.name() == "presence"
    })
    .await;
    assert_eq!(e.attr("id"), Some("approve"));
    assert_eq!(store.roster("alice").await.unwrap().1.len(), 1000);
    for i in 0..1001 {
        send(
            &mut alice,
            &format!("<presence to='y{i}@localhost' id='d{i}'/>"),
        )
        .await;
    }
    let e = expect(&mut alice, 30, "the refusal", |e| {
        e.attr("type") == Some("error") && e.name() == "presence"
    })
    .await;
    assert_eq!(e.attr("id"), Some("d1000"));
}

/// M9: a stored subscription request keeps the request, a status and a nick, each
/// trimmed: not the whole 256 KiB stanza, replayed at every login.
#[tokio::test]
async fn stored_subscription_requests_are_trimmed() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    let long = "s".repeat(100_000);
    send(
        &mut alice,
        &format!("<presence to='bob@localhost' type='subscribe'><status>{long}</status><x xmlns='urn:example'>{long}</x></presence>"),
    )
    .await;
    eventually(10, "the request is stored", || async {
        node.node
            .server
            .store
            .subscription_requests("bob")
            .await
            .unwrap()
            .len()
            == 1
    })
    .await;
    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let request = expect(&mut bob, 10, "the request", |e| {
        e.attr("type") == Some("subscribe")
    })
    .await;
    let status = request.get_child("status", "jabber:client").unwrap().text();
    assert_eq!(status.len(), 1024);
    assert!(request.get_child("x", "urn:example").is_none());
}

/// L3: a store failure during authentication is `temporary-auth-failure`, not
/// "unknown user" (`not-authorized`), and counts against nobody.
#[tokio::test]
async fn a_store_failure_during_login_is_temporary() {
    let node = start_node_with_users(|c| c.limits.login_failures = 2, &["alice"]).await;
    node.node.server.store.close().await;
    // More than the limit: none of them counts.
    for _ in 0..4 {
        let err = try_login(&node.connector(), "alice", PW).await.unwrap_err();
        assert!(
            format!("{err:?}").contains("TemporaryAuthFailure"),
            "{err:?}"
        );
    }
    assert!(!node.node.server.login_blocked("127.0.0.1".parse().unwrap()));
}

/// H3: unauthenticated connections per address are capped; the one over is closed
/// at once, before any TLS or parsing work, and a slot freed is usable again.
#[tokio::test]
async fn unauthenticated_connections_per_address_are_capped() {
    use tokio::io::AsyncReadExt as _;
    let node = start_node(|c| c.limits.preauth_connections_per_address = 4).await;
    let mut open = vec![];
    for _ in 0..4 {
        open.push(tokio::net::TcpStream::connect(node.c2s()).await.unwrap());
    }
    let mut fifth = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), fifth.read(&mut buf))
        .await
        .expect("the fifth connection is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // The four are still served: a stream header gets an answer.
    open[0].write_all(RAW_HEADER.as_bytes()).await.unwrap();
    let n = open[0].read(&mut buf).await.unwrap();
    assert!(n > 0);
    let mut metrics = String::new();
    node.node.server.stats.render(&mut metrics);
    assert!(
        metrics.contains("impmesh_connections_refused_total{reason=\"preauth_per_address\"} 1"),
        "{metrics}"
    );
    // A slot given back (its connection closed) is usable again.
    drop(open.pop());
    let server = node.node.server.clone();
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    eventually(5, "the closed connection's slot given back", || async {
        server.unauthenticated_connections(local) < 4
    })
    .await;
    let mut again = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
    again.write_all(RAW_HEADER.as_bytes()).await.unwrap();
    let n = again.read(&mut buf).await.unwrap();
    assert!(n > 0, "a connection in the freed slot is served");
}

/// `limits.max_connections`: a node holds at most that many client connections, its
/// two client listeners (STARTTLS and direct TLS) together; the next one is not served
/// (not even its stream header answered) until one closes, and then it is. Before, each
/// listener took a place while it waited for a connection: a limit of 2 served one.
#[tokio::test]
async fn the_node_serves_at_most_max_connections_at_once() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt as _;
    let node = start_node(|c| c.limits.max_connections = 2).await;
    let mut buf = [0u8; 64];
    let mut open = vec![];
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
        s.write_all(RAW_HEADER.as_bytes()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("within the limit: served")
            .unwrap();
        assert!(n > 0);
        open.push(s);
    }
    let mut third = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
    third.write_all(RAW_HEADER.as_bytes()).await.unwrap();
    // Served, it would be answered within milliseconds.
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "the third connection was served: {early:?}");
    drop(open.pop());
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(n > 0);
}
