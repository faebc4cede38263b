//! End-to-end tests of a node with real XMPP clients (tokio-xmpp), grouped by spec.

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn node_with(mechanisms: &[&str]) -> TestNode {
    let mechs: Vec<String> = mechanisms.iter().map(|s| s.to_string()).collect();
    let node = start_node(|c| c.sasl.mechanisms = mechs).await;
    node.add_user("alice", PW).await;
    node
}

/// RFC 6120 §6 / RFC 9266: every mechanism logs in; -PLUS ones with the real binding.
#[tokio::test]
async fn rfc6120_every_sasl_mechanism_logs_in() {
    for (mechanism, binding) in [
        ("SCRAM-SHA-256-PLUS", Binding::Real),
        ("SCRAM-SHA-1-PLUS", Binding::Real),
        ("SCRAM-SHA-256", Binding::None),
        ("SCRAM-SHA-1", Binding::None),
        ("PLAIN", Binding::None),
    ] {
        let node = node_with(&[mechanism]).await;
        let mut connector = node.connector();
        connector.binding = binding;
        let mut client = client_with(connector, "alice", PW, Some("r1"));
        let jid = online(&mut client).await;
        assert_eq!(jid.to_string(), "alice@localhost/r1", "{mechanism}");
        client.send_end().await.unwrap();
        node.node.shutdown().await;
    }
}

/// A -PLUS exchange whose binding data does not match this TLS channel must fail.
#[tokio::test]
async fn rfc9266_wrong_channel_binding_is_refused() {
    let node = node_with(&["SCRAM-SHA-256-PLUS"]).await;
    let mut connector = node.connector();
    assert!(try_login(&connector, "alice", PW).await.is_ok());
    connector.binding = Binding::Wrong;
    let err = try_login(&connector, "alice", PW).await.unwrap_err();
    assert!(matches!(err, tokio_xmpp::Error::Auth(_)), "{err:?}");
}

#[tokio::test]
async fn rfc6120_wrong_password_fails_and_direct_tls_works() {
    let node = node_with(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"]).await;
    let err = try_login(&node.connector(), "alice", "wrong")
        .await
        .unwrap_err();
    assert!(matches!(err, tokio_xmpp::Error::Auth(_)), "{err:?}");
    let err = try_login(&node.connector(), "nobody", PW)
        .await
        .unwrap_err();
    assert!(matches!(err, tokio_xmpp::Error::Auth(_)), "{err:?}");
    let mut connector = node.connector();
    connector.addr = node.direct_tls();
    connector.direct = true;
    let mut client = client_with(connector, "alice", PW, Some("tls"));
    assert_eq!(online(&mut client).await.to_string(), "alice@localhost/tls");
}

/// RFC 6121 §2 and §3: roster set/push, the whole subscription handshake both ways,
/// presence broadcast, and roster removal cancelling both directions.
#[tokio::test]
async fn rfc6121_roster_subscription_and_presence() {
    let node = node_with(&["SCRAM-SHA-256-PLUS"]).await;
    node.add_user("bob", PW).await;
    let mut alice = node.client("alice", PW, Some("a"));
    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut alice).await;
    online(&mut bob).await;
    for c in [&mut alice, &mut bob] {
        send(
            c,
            "<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>",
        )
        .await;
        expect(c, 5, "roster result", |e| e.attr("id") == Some("r1")).await;
        send(c, "<presence/>").await;
    }
    expect_presence(&mut bob, 5, "own presence echo", "bob", None).await;

    // Alice adds Bob with a name and a group: a push with subscription none.
    send(
        &mut alice,
        "<iq type='set' id='set1'><query xmlns='jabber:iq:roster'><item jid='bob@localhost' name='Bob'><group>Friends</group></item></query></iq>",
    )
    .await;
    let push = expect(&mut alice, 5, "roster push", |e| {
        e.attr("type") == Some("set") && e.has_child("query", "jabber:iq:roster")
    })
    .await;
    let item = push
        .get_child("query", "jabber:iq:roster")
        .unwrap()
        .get_child("item", "jabber:iq:roster")
        .unwrap();
    assert_eq!(
        (item.attr("name"), item.attr("subscription")),
        (Some("Bob"), Some("none"))
    );

    // Subscribe → Bob sees the request; Bob approves; Alice gets "to" and Bob's presence.
    send(
        &mut alice,
        "<presence to='bob@localhost' type='subscribe'/>",
    )
    .await;
    let req = expect_presence(&mut bob, 5, "subscribe", "alice", Some("subscribe")).await;
    assert_eq!(req.attr("from"), Some("alice@localhost"));
    send(
        &mut bob,
        "<presence to='alice@localhost' type='subscribed'/>",
    )
    .await;
    expect(&mut alice, 5, "push to", |e| {
        e.get_child("query", "jabber:iq:roster")
            .and_then(|q| q.get_child("item", "jabber:iq:roster"))
            .is_some_and(|i| i.attr("subscription") == Some("to") && i.attr("ask").is_none())
    })
    .await;
    expect_presence(&mut alice, 5, "subscribed", "bob", Some("subscribed")).await;
    expect_presence(&mut alice, 5, "bob's presence", "bob", None).await;

    // And the other way: both.
    send(
        &mut bob,
        "<presence to='alice@localhost' type='subscribe'/>",
    )
    .await;
    expect_presence(&mut alice, 5, "subscribe", "bob", Some("subscribe")).await;
    send(
        &mut alice,
        "<presence to='bob@localhost' type='subscribed'/>",
    )
    .await;
    expect_presence(&mut bob, 5, "alice's presence", "alice", None).await;
    let (_, items) = node.node.server.store.roster("alice").await.unwrap();
    assert_eq!(items[0].subscription, impmesh_store::Subscription::Both);

    // A presence update reaches the subscriber.
    send(&mut alice, "<presence><show>away</show></presence>").await;
    let p = expect_presence(&mut bob, 5, "away", "alice", None).await;
    assert_eq!(p.get_child("show", "jabber:client").unwrap().text(), "away");

    // Removing the item cancels both directions: Bob is told, and Bob's roster follows.
    send(
        &mut alice,
        "<iq type='set' id='rm'><query xmlns='jabber:iq:roster'><item jid='bob@localhost' subscription='remove'/></query></iq>",
    )
    .await;
    expect_presence(&mut bob, 5, "unsubscribe", "alice", Some("unsubscribe")).await;
    expect_presence(&mut bob, 5, "unavailable", "alice", Some("unavailable")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        node.node
            .server
            .store
            .roster("alice")
            .await
            .unwrap()
            .1
            .is_empty()
    );
    let (_, bob_items) = node.node.server.store.roster("bob").await.unwrap();
    assert_eq!(bob_items[0].subscription, impmesh_store::Subscription::None);
}

/// A stored subscription request is delivered at the next login (RFC 6121 §3.1.3), and a
/// killed connection sends unavailable to subscribers (RFC 6121 §4.5).
#[tokio::test]
async fn rfc6121_stored_request_and_unavailable_on_dropped_connection() {
    let node = start_node_with_users(|c| c.limits.resume_timeout = 1, &["alice", "bob"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    send(
        &mut alice,
        "<presence to='bob@localhost' type='subscribe'/>",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Bob logs in through a proxy we can cut; the request waits for him.
    let (proxy, mut bob) = client_behind_proxy(&node, "bob", "b").await;
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    expect_presence(&mut bob, 5, "stored subscribe", "alice", Some("subscribe")).await;
    send(
        &mut bob,
        "<presence to='alice@localhost' type='subscribed'/>",
    )
    .await;
    expect_presence(&mut alice, 5, "bob online", "bob", None).await;

    // Cut the TCP connection and keep the proxy closed: after the resume window, Alice
    // sees Bob go unavailable.
    proxy.cut_and_refuse();
    expect_presence(
        &mut alice,
        10,
        "bob unavailable",
        "bob",
        Some("unavailable"),
    )
    .await;
}

/// RFC 6121 §8 and XEP-0160: a message to an online user arrives; to an offline user it
/// is stored and delivered, with a delay stamp, at the next initial presence.
#[tokio::test]
async fn rfc6121_messages_online_and_offline() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut alice).await;
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(
        &mut alice,
        "<message to='bob@localhost' type='chat' id='m1'><body>hello bob</body></message>",
    )
    .await;
    let m = expect(&mut bob, 5, "message", |e| e.name() == "message").await;
    assert_eq!(body(&m).as_deref(), Some("hello bob"));
    assert_eq!(m.attr("from"), Some("alice@localhost/a"));

    // A stanza far larger than one read (and than one TLS record) arrives whole.
    let big = "0123456789".repeat(2_000);
    send(
        &mut alice,
        &format!("<message to='bob@localhost' type='chat'><body>{big}</body></message>"),
    )
    .await;
    let m = expect(&mut bob, 5, "big message", |e| e.name() == "message").await;
    assert_eq!(body(&m).map(|b| b.len()), Some(big.len()));

    // To a user who does not exist: an error, not silence.
    send(
        &mut alice,
        "<message to='nobody@localhost' type='chat' id='m2'><body>x</body></message>",
    )
    .await;
    let err = expect(&mut alice, 5, "error", |e| e.attr("id") == Some("m2")).await;
    assert_eq!(err.attr("type"), Some("error"));

    bob.send_end().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(
        &mut alice,
        "<message to='bob@localhost' type='chat' id='m3'><body>while you were out</body></message>",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        node.node
            .server
            .store
            .offline_messages("bob")
            .await
            .unwrap()
            .len(),
        1
    );
    let mut bob = node.client("bob", PW, Some("b2"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let m = expect(&mut bob, 5, "offline message", |e| e.name() == "message").await;
    assert_eq!(body(&m).as_deref(), Some("while you were out"));
    assert!(m.has_child("delay", "urn:xmpp:delay"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        node.node
            .server
            .store
            .offline_messages("bob")
            .await
            .unwrap()
            .is_empty()
    );
}

/// XEP-0280: the other resource gets "received" and "sent" copies.
#[tokio::test]
async fn xep0280_carbons() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let mut a1 = node.client("alice", PW, Some("one"));
    let mut a2 = node.client("alice", PW, Some("two"));
    let mut bob = node.client("bob", PW, Some("b"));
    for c in [&mut a1, &mut a2, &mut bob] {
        online(c).await;
    }
    for (c, prio) in [(&mut a1, 5), (&mut a2, 0)] {
        send(
            c,
            "<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
        )
        .await;
        expect(c, 5, "carbons enabled", |e| e.attr("id") == Some("c")).await;
        send(
            c,
            &format!("<presence><priority>{prio}</priority></presence>"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(
        &mut bob,
        "<message to='alice@localhost' type='chat'><body>to alice</body></message>",
    )
    .await;
    let direct = expect(&mut a1, 5, "message", |e| body(e).is_some()).await;
    assert_eq!(body(&direct).as_deref(), Some("to alice"));
    let copy = expect(&mut a2, 5, "received carbon", |e| {
        e.has_child("received", "urn:xmpp:carbons:2")
    })
    .await;
    let inner = copy
        .get_child("received", "urn:xmpp:carbons:2")
        .unwrap()
        .get_child("forwarded", "urn:xmpp:forward:0")
        .unwrap()
        .get_child("message", "jabber:client")
        .unwrap();
    assert_eq!(body(inner).as_deref(), Some("to alice"));

    send(
        &mut a1,
        "<message to='bob@localhost' type='chat'><body>to bob</body></message>",
    )
    .await;
    expect(&mut a2, 5, "sent carbon", |e| {
        e.has_child("sent", "urn:xmpp:carbons:2")
    })
    .await;
}

/// XEP-0352: while a client is inactive, a contact's presence updates and chat states
/// wait, the latest of each, and go out before the next message with a body or when
/// the client is active again. (The inactive client is driven by hand: tokio-xmpp
/// cannot send the CSI nonzas.)
#[tokio::test]
async fn xep0352_inactive_clients_get_the_latest_presence_and_chat_state_only() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let mut bob = RawClient::login(&node, "bob", "r", true, None).await;
    assert!(
        bob.features.contains("<csi xmlns='urn:xmpp:csi:0'/>"),
        "{}",
        bob.features
    );
    bob.send("<inactive xmlns='urn:xmpp:csi:0'/>").await;
    // In-order processing: once the ping is answered, the session is inactive.
    bob.sync_with_server("sync").await;
    // The nonza is not a stanza: stream management counts the ping only.
    bob.send("<r xmlns='urn:xmpp:sm:3'/>").await;
    bob.read_until("<a xmlns='urn:xmpp:sm:3'").await;
    let ack = bob.read_until("/>").await;
    assert_eq!(ack.trim(), "h='1'/>");
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    let states = "http://jabber.org/protocol/chatstates";
    for xml in [
        "<presence to='bob@localhost/r'><show>away</show></presence>".to_owned(),
        format!(
            "<message to='bob@localhost/r' type='chat'><composing xmlns='{states}'/></message>"
        ),
        "<presence to='bob@localhost/r'><show>xa</show></presence>".to_owned(),
        format!("<message to='bob@localhost/r' type='chat'><paused xmlns='{states}'/></message>"),
        "<message to='bob@localhost/r' type='chat'><body>wake up</body></message>".to_owned(),
    ] {
        send(&mut alice, &xml).await;
    }
    let before = bob.read_until("<body>wake up</body>").await;
    assert_eq!(before.matches("<presence").count(), 1, "{before}");
    let (xa, paused) = (before.find("<show>xa</show>"), before.find("<paused"));
    assert!(!before.contains("<show>away</show>"), "{before}");
    assert!(!before.contains("<composing"), "{before}");
    assert!(
        xa.is_some() && paused.is_some() && xa < paused,
        "the latest of each, in their order: {before}"
    );

    // Held again until the client is active.
    send(
        &mut alice,
        "<presence to='bob@localhost/r'><show>dnd</show></presence>",
    )
    .await;
    send(
        &mut alice,
        "<iq type='get' id='p' to='bob@localhost/r'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    // The IQ is urgent: it brings the held presence with it, before it.
    let held = bob.read_until("id='p'").await;
    assert!(held.contains("<show>dnd</show>"), "{held}");
    send(
        &mut alice,
        "<presence to='bob@localhost/r'><show>chat</show></presence>",
    )
    .await;
    // Once alice's own request is answered her presence is in bob's queue; bob's
    // answer to his own request goes out at once, and the presence still waits.
    sync_with_server(&mut alice, "a-sync").await;
    let meanwhile = bob.sync_with_server("b-sync").await;
    assert!(!meanwhile.contains("<show>chat</show>"), "{meanwhile}");
    bob.send("<active xmlns='urn:xmpp:csi:0'/>").await;
    bob.read_until("<show>chat</show>").await;
}

/// XEP-0352 §4 with XEP-0198: a resumed stream starts active, so what waited for the
/// inactive client goes out after the retransmitted stanzas.
#[tokio::test]
async fn xep0352_a_resumed_stream_is_active() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let mut bob = RawClient::login(&node, "bob", "r", false, None).await;
    bob.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await;
    bob.read_until("<enabled").await;
    let enabled = bob.read_until("/>").await;
    let id = attr_in(&enabled, "id");
    bob.send("<inactive xmlns='urn:xmpp:csi:0'/>").await;
    bob.sync_with_server("sync").await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    send(
        &mut alice,
        "<presence to='bob@localhost/r'><show>away</show></presence>",
    )
    .await;
    sync_with_server(&mut alice, "a-sync").await;
    // The presence waits in bob's session; his connection breaks.
    drop(bob);
    let mut again = RawClient::authenticated(&node, "bob", None).await;
    // One stanza received on the first stream: the answer to the ping.
    again
        .send(&format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='1'/>"
        ))
        .await;
    let resumed = again.read_until("<show>away</show>").await;
    assert!(resumed.contains("<resumed"), "{resumed}");
}

/// XEP-0198: a client whose TCP connection is cut resumes and gets every message sent
/// meanwhile exactly once, in order.
#[tokio::test]
async fn xep0198_resumption_loses_and_duplicates_nothing() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let (proxy, mut bob) = client_behind_proxy(&node, "bob", "b").await;
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        send(
            &mut alice,
            &format!("<message to='bob@localhost' type='chat'><body>m{i}</body></message>"),
        )
        .await;
    }
    let mut seen = vec![];
    while seen.len() < 5 {
        let m = expect(&mut bob, 5, "first batch", |e| body(e).is_some()).await;
        seen.push(body(&m).unwrap());
    }
    proxy.cut();
    for i in 5..15 {
        send(
            &mut alice,
            &format!("<message to='bob@localhost' type='chat'><body>m{i}</body></message>"),
        )
        .await;
    }
    // tokio-xmpp reconnects through the proxy and resumes by itself.
    let rest = collect(&mut bob, 4000, |e| body(e).is_some()).await;
    seen.extend(rest.iter().filter_map(body));
    let expected: Vec<String> = (0..15).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(offline_count(&node, "bob").await, 0);
}

/// XEP-0198: when the resume window passes, unacknowledged messages go to offline storage.
#[tokio::test]
async fn xep0198_expired_session_stores_unacked_messages_offline() {
    let node = start_node_with_users(|c| c.limits.resume_timeout = 1, &["alice", "bob"]).await;
    let (proxy, mut bob) = client_behind_proxy(&node, "bob", "b").await;
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut_and_refuse();
    for i in 0..3 {
        send(
            &mut alice,
            &format!("<message to='bob@localhost' type='chat'><body>late{i}</body></message>"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stored = node
        .node
        .server
        .store
        .offline_messages("bob")
        .await
        .unwrap();
    let bodies: Vec<bool> = (0..3)
        .map(|i| {
            stored
                .iter()
                .any(|m| m.stanza.contains(&format!("late{i}")))
        })
        .collect();
    assert_eq!(bodies, [true, true, true], "{stored:?}");
}

/// XEP-0157: the contact addresses of `[contact]` in the server's disco#info, as the
/// serverinfo form a client library reads; none configured, no form.
#[tokio::test]
async fn xep0157_contact_addresses_in_service_discovery() {
    use tokio_xmpp::parsers::disco::DiscoInfoResult;
    async fn server_info(node: &TestNode) -> DiscoInfoResult {
        let mut alice = node.client("alice", PW, Some("a"));
        online(&mut alice).await;
        send(
            &mut alice,
            "<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        )
        .await;
        let reply = expect(&mut alice, 5, "disco#info", |e| e.attr("id") == Some("d")).await;
        let query = reply
            .get_child("query", "http://jabber.org/protocol/disco#info")
            .unwrap()
            .clone();
        DiscoInfoResult::try_from(query).unwrap()
    }
    let node = start_node_with_users(
        |c| {
            c.contact.abuse = vec!["mailto:abuse@example.com".into()];
            c.contact.admin = vec![
                "xmpp:ops@localhost".into(),
                "https://example.com/ops?a=1&b=2".into(),
            ];
        },
        &["alice"],
    )
    .await;
    const SERVERINFO: &str = "http://jabber.org/network/serverinfo";
    let info = server_info(&node).await;
    // Beside the upload service's form (XEP-0363), one of contact addresses.
    let forms: Vec<_> = info
        .extensions
        .iter()
        .filter(|f| f.form_type() == Some(SERVERINFO))
        .collect();
    let [form] = forms.as_slice() else {
        panic!("one serverinfo form: {:?}", info.extensions);
    };
    let fields: Vec<(&str, Vec<&str>)> = form
        .fields
        .iter()
        .filter(|f| f.var.as_deref() != Some("FORM_TYPE"))
        .map(|f| {
            (
                f.var.as_deref().unwrap_or_default(),
                f.values.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            ("abuse-addresses", vec!["mailto:abuse@example.com"]),
            (
                "admin-addresses",
                vec!["xmpp:ops@localhost", "https://example.com/ops?a=1&b=2"]
            ),
        ]
    );
    let plain = start_node_with_users(|_| {}, &["alice"]).await;
    let info = server_info(&plain).await;
    assert!(
        info.extensions
            .iter()
            .all(|f| f.form_type() != Some(SERVERINFO))
    );
}

/// XEP-0030, XEP-0199, XEP-0092, XEP-0054, XEP-0049, XEP-0191, and the catch-all error.
#[tokio::test]
async fn xep_iq_handlers() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    let ask = |xml: &'static str| xml;
    send(&mut alice, ask("<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await;
    let d = expect(&mut alice, 5, "disco", |e| e.attr("id") == Some("d")).await;
    let features: Vec<String> = d
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap()
        .children()
        .filter_map(|f| f.attr("var").map(String::from))
        .collect();
    for f in [
        "urn:xmpp:ping",
        "urn:xmpp:carbons:2",
        "urn:xmpp:blocking",
        "jabber:iq:version",
        "vcard-temp",
    ] {
        assert!(
            features.iter().any(|x| x == f),
            "{f} missing from {features:?}"
        );
    }
    send(
        &mut alice,
        "<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    assert_eq!(
        expect(&mut alice, 5, "ping", |e| e.attr("id") == Some("p"))
            .await
            .attr("type"),
        Some("result")
    );
    send(
        &mut alice,
        "<iq type='get' id='v' to='localhost'><query xmlns='jabber:iq:version'/></iq>",
    )
    .await;
    let v = expect(&mut alice, 5, "version", |e| e.attr("id") == Some("v")).await;
    assert!(String::from(&v).contains("impmesh"));
    send(
        &mut alice,
        "<iq type='set' id='vc'><vCard xmlns='vcard-temp'><FN>Alice A.</FN></vCard></iq>",
    )
    .await;
    expect(&mut alice, 5, "vcard set", |e| e.attr("id") == Some("vc")).await;
    send(
        &mut alice,
        "<iq type='get' id='vg'><vCard xmlns='vcard-temp'/></iq>",
    )
    .await;
    let vg = expect(&mut alice, 5, "vcard get", |e| e.attr("id") == Some("vg")).await;
    assert!(String::from(&vg).contains("Alice A."));
    send(&mut alice, "<iq type='set' id='ps'><query xmlns='jabber:iq:private'><prefs xmlns='urn:test:prefs'><x>1</x></prefs></query></iq>").await;
    expect(&mut alice, 5, "private set", |e| e.attr("id") == Some("ps")).await;
    send(&mut alice, "<iq type='get' id='pg'><query xmlns='jabber:iq:private'><prefs xmlns='urn:test:prefs'/></query></iq>").await;
    let pg = expect(&mut alice, 5, "private get", |e| e.attr("id") == Some("pg")).await;
    assert!(String::from(&pg).contains("<x>1</x>"));
    send(&mut alice, "<iq type='set' id='b'><block xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></block></iq>").await;
    expect(&mut alice, 5, "block", |e| e.attr("id") == Some("b")).await;
    send(
        &mut alice,
        "<message to='bob@localhost' type='chat' id='mb'><body>x</body></message>",
    )
    .await;
    let blocked = expect(&mut alice, 5, "blocked error", |e| {
        e.attr("id") == Some("mb")
    })
    .await;
    assert!(String::from(&blocked).contains("urn:xmpp:blocking:errors"));
    send(
        &mut alice,
        "<iq type='get' id='u' to='localhost'><unknown xmlns='urn:example:nothing'/></iq>",
    )
    .await;
    let u = expect(&mut alice, 5, "unknown", |e| e.attr("id") == Some("u")).await;
    assert!(
        String::from(&u).contains("service-unavailable"),
        "{}",
        String::from(&u)
    );
}

/// XEP-0077 is off by default and creates accounts when enabled.
#[tokio::test]
async fn xep0077_registration_only_when_enabled() {
    let off = start_node(|_| {}).await;
    let features = raw_features_after_tls(&off).await;
    assert!(!features.contains("iq-register"), "{features}");
    let on = start_node(|c| c.registration.enabled = true).await;
    let features = raw_features_after_tls(&on).await;
    assert!(features.contains("iq-register"), "{features}");
}

/// Reads the stream features offered after STARTTLS, with a bare TLS socket.
async fn raw_features_after_tls(node: &TestNode) -> String {
    let mut tcp = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
    tcp.write_all(HEADER.as_bytes()).await.unwrap();
    let first = read_until(&mut tcp, "</stream:features>").await;
    assert!(
        first.contains("<required/>") && !first.contains("mechanisms"),
        "{first}"
    );
    tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await
        .unwrap();
    read_until(&mut tcp, "<proceed").await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(node.cert()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(HEADER.as_bytes()).await.unwrap();
    read_until(&mut tls, "</stream:features>").await
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

async fn read_until<S: tokio::io::AsyncRead + Unpin>(s: &mut S, marker: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&out).contains(marker) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Hostile input before TLS: each closes the stream with the RFC 6120 error it deserves.
#[tokio::test]
async fn rfc6120_hostile_input_gets_the_right_stream_error() {
    let node = start_node(|_| {}).await;
    let cases: [(&str, String); 7] = [
        ("restricted-xml", "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>".into()),
        ("restricted-xml", format!("{HEADER}<message><body>&lol9;</body></message>")),
        ("not-well-formed", format!("{HEADER}<message><body></message>")),
        ("policy-violation", format!("{HEADER}<message><body>{}</body></message>", "a".repeat(20_000))),
        ("policy-violation", format!("{HEADER}<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHB3</auth>")),
        // H3: a few bytes per element, hundreds of bytes of tree each.
        ("policy-violation", format!("{HEADER}<message>{}</message>", "<a/>".repeat(100))),
        // RFC 6120 §4.9.3.10: a client stream's default namespace is jabber:client.
        ("invalid-namespace", HEADER.replace("jabber:client", "jabber:server")),
    ];
    for (condition, input) in cases {
        let mut tcp = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
        let _ = tcp.write_all(input.as_bytes()).await;
        let reply = read_until(&mut tcp, "</stream:stream>").await;
        assert!(
            reply.contains(&format!(
                "<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            )),
            "{condition}: {reply}"
        );
        assert!(reply.ends_with("</stream:stream>"), "{reply}");
    }
    // A stream for another host.
    let mut tcp = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
    tcp.write_all(
        HEADER
            .replace("to='localhost'", "to='evil.example'")
            .as_bytes(),
    )
    .await
    .unwrap();
    assert!(
        read_until(&mut tcp, "</stream:stream>")
            .await
            .contains("host-unknown")
    );
}

/// An oversized stanza after authentication ends that stream and is not delivered.
#[tokio::test]
async fn rfc6120_oversized_stanza_after_auth_is_refused() {
    let node = start_node_with_users(|c| c.limits.max_stanza_bytes = 4096, &["alice", "bob"]).await;
    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    let big = "x".repeat(8192);
    send(
        &mut alice,
        &format!("<message to='bob@localhost' type='chat'><body>{big}</body></message>"),
    )
    .await;
    let got = collect(&mut bob, 1500, |e| body(e).is_some()).await;
    assert!(got.is_empty());
}

/// A client of `user` whose connection runs through a [`Proxy`].
async fn client_behind_proxy(
    node: &TestNode,
    user: &str,
    resource: &str,
) -> (Proxy, tokio_xmpp::Client) {
    let proxy = Proxy::start(node.c2s()).await;
    let mut connector = node.connector();
    connector.addr = proxy.addr;
    let client = client_with(connector, user, PW, Some(resource));
    (proxy, client)
}

/// Sends a XEP-0077 registration on a fresh stream and returns the server's answer.
async fn register_in_band(node: &TestNode, user: &str, password: &str) -> minidom::Element {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_xmpp::connect::ServerConnector as _;
    use tokio_xmpp::xmlstream::{FallibleStreamElement, Timeouts, XmppStreamElement};
    let jid = tokio_xmpp::jid::Jid::new(&format!("{user}@localhost")).unwrap();
    let (stream, _) = node
        .connector()
        .connect(&jid, "jabber:client", Timeouts::default())
        .await
        .unwrap();
    let (_, mut stream) = stream
        .recv_features::<FallibleStreamElement>()
        .await
        .unwrap();
    let iq = stanza(&format!(
        "<iq type='set' id='reg'><query xmlns='jabber:iq:register'><username>{user}</username><password>{password}</password></query></iq>"
    ));
    stream.send(&XmppStreamElement::Stanza(iq)).await.unwrap();
    loop {
        match stream.next().await {
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(s)))) => return element(s),
            Some(Ok(_)) => continue,
            other => panic!("no reply: {other:?}"),
        }
    }
}

/// Failed logins from one address are throttled: after the limit even the right
/// password gets temporary-auth-failure until the window passes.
#[tokio::test]
async fn login_failures_are_throttled_per_address() {
    let node = start_node(|c| {
        c.limits.login_failures = 2;
        c.limits.login_failure_window = 60;
    })
    .await;
    node.add_user("alice", PW).await;
    node.add_user("mallory", PW).await;
    let wrong = || try_login_owned(node.connector(), "alice", "wrong");
    assert!(wrong().await.is_err());
    // A success in between (the attacker's own account) does not reset the count.
    assert!(try_login(&node.connector(), "mallory", PW).await.is_ok());
    assert!(wrong().await.is_err());
    let err = try_login(&node.connector(), "alice", PW).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("TemporaryAuthFailure"),
        "{err:?}"
    );
}

async fn try_login_owned(c: TestConnector, user: &str, pw: &str) -> Result<(), tokio_xmpp::Error> {
    try_login(&c, user, pw).await
}

/// XEP-0237: a client with the current version gets an empty result; the legacy
/// session IQ (RFC 3921) is answered.
#[tokio::test]
async fn xep0237_roster_versioning_and_legacy_session() {
    let node = start_node(|_| {}).await;
    node.add_user("alice", PW).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    send(
        &mut alice,
        "<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
    )
    .await;
    let r = expect(&mut alice, 5, "session result", |e| {
        e.attr("id") == Some("sess")
    })
    .await;
    assert_eq!(r.attr("type"), Some("result"));
    send(&mut alice, "<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='carol@localhost'/></query></iq>").await;
    expect(&mut alice, 5, "set result", |e| e.attr("id") == Some("s1")).await;
    send(
        &mut alice,
        "<iq type='get' id='g1'><query xmlns='jabber:iq:roster' ver=''/></iq>",
    )
    .await;
    let full = expect(&mut alice, 5, "full roster", |e| e.attr("id") == Some("g1")).await;
    let query = full.get_child("query", "jabber:iq:roster").unwrap();
    let ver = query.attr("ver").unwrap().to_owned();
    assert_eq!(query.children().count(), 1);
    send(
        &mut alice,
        &format!("<iq type='get' id='g2'><query xmlns='jabber:iq:roster' ver='{ver}'/></iq>"),
    )
    .await;
    let same = expect(&mut alice, 5, "empty result", |e| {
        e.attr("id") == Some("g2")
    })
    .await;
    assert_eq!(same.attr("type"), Some("result"));
    assert!(same.get_child("query", "jabber:iq:roster").is_none());
}

/// RFC 6121 §8.5.2.1.1: a resource with negative priority gets no messages sent to the
/// bare JID (they are stored offline), but still gets those sent to its full JID.
#[tokio::test]
async fn rfc6121_negative_priority_and_full_jid_delivery() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    let mut bob = node.client("bob", PW, Some("low"));
    online(&mut alice).await;
    online(&mut bob).await;
    send(&mut bob, "<presence><priority>-1</priority></presence>").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(
        &mut alice,
        "<message to='bob@localhost' type='chat'><body>to bare</body></message>",
    )
    .await;
    send(
        &mut alice,
        "<message to='bob@localhost/low' type='chat'><body>to full</body></message>",
    )
    .await;
    let got = collect(&mut bob, 800, |e| body(e).is_some()).await;
    assert_eq!(got.iter().filter_map(body).collect::<Vec<_>>(), ["to full"]);
    let stored = node
        .node
        .server
        .store
        .offline_messages("bob")
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].stanza.contains("to bare"));
}

/// XEP-0199: a client that stops answering (its network is a black hole) is found by
/// the server's pings and closed; its contacts then see it go unavailable.
#[tokio::test]
async fn xep0199_server_pings_find_dead_clients() {
    let node = start_node(|c| {
        c.limits.ping_interval = 1;
        c.limits.ping_timeout = 1;
        c.limits.resume_timeout = 1;
    })
    .await;
    node.add_user("alice", PW).await;
    node.add_user("bob", PW).await;
    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    let (proxy, mut alice) = client_behind_proxy(&node, "alice", "a").await;
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    send(
        &mut bob,
        "<presence to='alice@localhost' type='subscribe'/>",
    )
    .await;
    expect_presence(&mut alice, 5, "subscribe", "bob", Some("subscribe")).await;
    send(
        &mut alice,
        "<presence to='bob@localhost' type='subscribed'/>",
    )
    .await;
    expect_presence(&mut bob, 5, "alice online", "alice", None).await;
    proxy.freeze_and_refuse();
    expect_presence(
        &mut bob,
        15,
        "alice unavailable",
        "alice",
        Some("unavailable"),
    )
    .await;
    assert!(node.node.server.hub.session("alice", "a").is_none());
}

/// Shutdown closes every stream with system-shutdown and the footer, and frees the
/// ports (STYLE 6: rebinding them must work at once).
#[tokio::test]
async fn shutdown_closes_streams_and_frees_the_ports() {
    let node = start_node(|_| {}).await;
    node.add_user("alice", PW).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    let mut raw = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
    raw.write_all(HEADER.as_bytes()).await.unwrap();
    read_until(&mut raw, "</stream:features>").await;
    let (c2s, tls) = (node.c2s(), node.direct_tls());
    let server = node.node.server.clone();
    let shutdown = tokio::spawn(async move { server.shutdown(Duration::from_secs(5)).await });
    let reply = read_until(&mut raw, "</stream:stream>").await;
    assert!(reply.contains("system-shutdown"), "{reply}");
    shutdown.await.unwrap();
    assert_eq!(node.node.server.session_count(), 0);
    tokio::net::TcpListener::bind(c2s)
        .await
        .expect("5222-equivalent port is free again");
    tokio::net::TcpListener::bind(tls)
        .await
        .expect("5223-equivalent port is free again");
}

/// RFC 6121 §4.6: directed presence reaches a non-subscriber, and that contact is told
/// when the session ends.
#[tokio::test]
async fn rfc6121_directed_presence_and_its_end() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut alice).await;
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(&mut alice, "<presence/>").await;
    send(
        &mut alice,
        "<presence to='bob@localhost/b'><status>just for you</status></presence>",
    )
    .await;
    let p = expect_presence(&mut bob, 5, "directed presence", "alice", None).await;
    assert_eq!(
        p.get_child("status", "jabber:client").unwrap().text(),
        "just for you"
    );
    alice.send_end().await.unwrap();
    expect_presence(
        &mut bob,
        5,
        "unavailable after directed",
        "alice",
        Some("unavailable"),
    )
    .await;
}

/// XEP-0077: with registration on, an account created in-band can log in.
#[tokio::test]
async fn xep0077_register_then_log_in() {
    let node = start_node(|c| {
        c.registration.enabled = true;
        c.registration.min_interval = 0;
    })
    .await;
    let reply = register_in_band(&node, "carol", "s3cret-pw").await;
    assert_eq!(
        reply.attr("type"),
        Some("result"),
        "{}",
        String::from(&reply)
    );
    assert!(
        try_login(&node.connector(), "carol", "s3cret-pw")
            .await
            .is_ok()
    );
    // The same name again: conflict.
    let reply = register_in_band(&node, "carol", "other").await;
    assert!(
        String::from(&reply).contains("conflict"),
        "{}",
        String::from(&reply)
    );
}

/// XEP-0077 abuse control: one registration per address per interval.
#[tokio::test]
async fn xep0077_registrations_are_rate_limited_per_address() {
    let node = start_node(|c| c.registration.enabled = true).await;
    let first = register_in_band(&node, "dave", "pw-dave").await;
    assert_eq!(first.attr("type"), Some("result"));
    let second = register_in_band(&node, "erin", "pw-erin").await;
    assert!(
        String::from(&second).contains("resource-constraint"),
        "{}",
        String::from(&second)
    );
    assert!(!node.node.server.store.user_exists("erin").await.unwrap());
}

/// A connection that never finishes its handshake is closed with connection-timeout.
#[tokio::test]
async fn rfc6120_handshake_timeout() {
    let node = start_node(|c| c.limits.handshake_timeout = 1).await;
    let mut tcp = tokio::net::TcpStream::connect(node.c2s()).await.unwrap();
    tcp.write_all(HEADER.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let reply = read_until(&mut tcp, "</stream:stream>").await;
    assert!(reply.contains("connection-timeout"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// A burst larger than one write batch reaches the client whole: every stanza queued
/// for a session is written, none dropped between batches.
#[tokio::test]
async fn a_burst_of_queued_stanzas_arrives_whole_and_in_order() {
    let node = start_node_with_users(|_| {}, &["bob"]).await;
    let mut bob = node.client("bob", PW, Some("r"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let session = node.node.server.hub.sessions("bob").pop().unwrap();
    const N: usize = 500;
    for i in 0..N {
        // Five senders: one sender may fill only a quarter of the queue.
        let from = format!("s{}@localhost", i % 5);
        let xml = format!(
            "<message xmlns='jabber:client' from='{from}' to='bob@localhost/r' type='chat'>\
             <body>{i}</body></message>"
        );
        assert_eq!(session.send(xml.into(), &from), Ok(()));
    }
    let mut got = vec![];
    while got.len() < N {
        let m = expect(&mut bob, 10, "the burst", |e| body(e).is_some()).await;
        got.push(body(&m).unwrap().parse::<usize>().unwrap());
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>());
}

/// DESIGN: the store stays off the hot path. Presence broadcasts read the roster from
/// the session cache: twenty presence updates cost no roster query, and each reaches
/// the subscribed contact; a roster change made meanwhile is followed by the cache.
#[tokio::test]
async fn presence_broadcasts_read_the_roster_from_the_session_cache() {
    use impmesh_store::{RosterItem, Subscription};
    let node = start_node_with_users(|_| {}, &["alice", "bob", "carol"]).await;
    let store = &node.node.server.store;
    for (owner, contact) in [("alice", "bob"), ("bob", "alice")] {
        let item = RosterItem {
            contact: format!("{contact}@localhost"),
            subscription: Subscription::Both,
            ..Default::default()
        };
        store.put_roster_item(owner, &item).await.unwrap();
    }
    let mut alice = node.client("alice", PW, Some("a"));
    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut alice).await;
    online(&mut bob).await;
    send(&mut alice, "<presence/>").await;
    send(&mut bob, "<presence/>").await;
    expect_presence(&mut alice, 5, "bob's presence", "bob", None).await;
    // Alice may see Bob's presence through her probe before Bob's session has loaded
    // his roster: a ping answered by each session means both initial presences are
    // handled (a session handles its stanzas in order).
    for (c, id) in [(&mut alice, "sync-a"), (&mut bob, "sync-b")] {
        send(
            c,
            &format!("<iq type='get' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"),
        )
        .await;
        expect(c, 5, "the ping's answer", |e| e.attr("id") == Some(id)).await;
    }
    let before = store.latency().count("roster") + store.latency().count("roster_item");
    for i in 0..20 {
        send(
            &mut bob,
            &format!("<presence><status>s{i}</status></presence>"),
        )
        .await;
    }
    let mut seen = 0;
    while seen < 20 {
        let p = expect_presence(&mut alice, 5, "bob's updates", "bob", None).await;
        if p.get_child("status", "jabber:client").is_some() {
            seen += 1;
        }
    }
    let after = store.latency().count("roster") + store.latency().count("roster_item");
    assert_eq!(after, before, "presence updates queried the roster");
    // Bob removes Alice: the cache follows, and his next presence does not reach her.
    send(
        &mut bob,
        "<iq type='set' id='rm'><query xmlns='jabber:iq:roster'><item jid='alice@localhost' subscription='remove'/></query></iq>",
    )
    .await;
    expect(&mut bob, 5, "the removal", |e| e.attr("id") == Some("rm")).await;
    send(&mut bob, "<presence><status>after</status></presence>").await;
    // A message after it: a broadcast to Alice would have been queued before it.
    send(
        &mut bob,
        "<message to='alice@localhost/a' type='chat'><body>marker</body></message>",
    )
    .await;
    loop {
        let e = expect(&mut alice, 5, "the marker", |_| true).await;
        assert!(
            e.get_child("status", "jabber:client")
                .is_none_or(|s| s.text() != "after"),
            "a presence after the removal reached alice: {e:?}"
        );
        if body(&e).as_deref() == Some("marker") {
            break;
        }
    }
}

/// STYLE 6: the whole node stops as one tree under one grace period: with a client
/// connected, every port it had (STARTTLS, direct TLS, HTTPS for peers and admins,
/// router links) can be bound again at once afterwards.
#[tokio::test]
async fn stopping_a_node_frees_every_port() {
    let node = start_node_with_users(|_| {}, &["alice"]).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    let support::TestNode { node, dir, .. } = node;
    let mut ports = node.c2s.clone();
    ports.extend(&node.c2s_direct_tls);
    ports.extend([node.https_addr, node.admin_addr]);
    ports.extend(node.links_addr);
    assert_eq!(ports.len(), 5);
    node.shutdown().await;
    for addr in ports {
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    }
    drop((alice, dir));
}

/// XEP-0163: alice publishes; bob's resources get what their capabilities ask for (a
/// new resource gets the last item), as the access model allows; carol, not a contact,
/// may read open nodes only; the hostile and mismatched requests are refused.
#[tokio::test]
async fn xep0163_pep_notifies_by_capabilities_and_enforces_access() {
    use tokio_xmpp::parsers::avatar::Metadata;
    use tokio_xmpp::parsers::pubsub::event::Payload;
    let node = start_node_with_users(|_| {}, &["alice", "bob", "carol"]).await;
    befriend((&node, "alice"), (&node, "bob")).await;
    let caps = ClientCaps::wanting(&[AVATAR, DEVICES, BOOKMARKS]);
    let mut bob = node.client("bob", PW, Some("phone"));
    online(&mut bob).await;
    send(&mut bob, &caps.presence()).await;
    caps.answer(&mut bob, 5).await;
    let mut alice = node.client("alice", PW, Some("laptop"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;

    // The account's PEP service is discoverable.
    send(&mut alice, "<iq type='get' id='info' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
    let info = expect(&mut alice, 5, "the account's disco#info", |e| {
        e.attr("id") == Some("info")
    })
    .await;
    let info = tokio_xmpp::parsers::disco::DiscoInfoResult::try_from(
        info.get_child("query", "http://jabber.org/protocol/disco#info")
            .unwrap()
            .clone(),
    )
    .unwrap();
    assert!(
        info.identities
            .iter()
            .any(|i| i.category == "pubsub" && i.type_ == "pep")
    );
    assert!(
        info.features
            .contains("http://jabber.org/protocol/pubsub#publish-options")
    );

    alice
        .send_stanza(publish_iq("p1", AVATAR, "111f", AVATAR_META, &[]))
        .await
        .unwrap();
    let done = expect(&mut alice, 5, "the publication's result", |e| {
        e.attr("id") == Some("p1")
    })
    .await;
    assert_eq!(done.attr("type"), Some("result"), "{}", String::from(&done));
    let event = expect(&mut bob, 5, "the avatar event", |e| is_event_of(e, AVATAR)).await;
    assert_eq!(event.attr("from"), Some("alice@localhost"));
    let Some(Payload::Items { published, .. }) = pep_event(&event) else {
        panic!("{}", String::from(&event));
    };
    let meta = Metadata::try_from(published[0].payload.clone().unwrap()).unwrap();
    assert_eq!(meta.infos[0].bytes, 12);

    // A new resource with the same capabilities: no second query, the last item.
    let mut tablet = node.client("bob", PW, Some("tablet"));
    online(&mut tablet).await;
    send(&mut tablet, &caps.presence()).await;
    let last = expect(&mut tablet, 5, "the last avatar on coming online", |e| {
        e.name() == "iq" || is_event_of(e, AVATAR)
    })
    .await;
    assert_eq!(
        last.name(),
        "message",
        "asked again: {}",
        String::from(&last)
    );

    // Retrieval: a contact may, a stranger may not (presence access model).
    bob.send_stanza(items_iq("i1", "alice", AVATAR))
        .await
        .unwrap();
    let items = expect(&mut bob, 5, "alice's items", |e| e.attr("id") == Some("i1")).await;
    assert!(String::from(&items).contains("111f4b3c50d7b0df729d299bc6f8e9ef9066971f"));
    let mut carol = node.client("carol", PW, Some("c"));
    online(&mut carol).await;
    carol
        .send_stanza(items_iq("i2", "alice", AVATAR))
        .await
        .unwrap();
    let refused = expect(&mut carol, 5, "a refusal", |e| e.attr("id") == Some("i2")).await;
    assert_eq!(
        pubsub_error(&refused),
        (
            "not-authorized".into(),
            "presence-subscription-required".into()
        )
    );

    // OMEMO's device list is open: carol may read it. Publish options that differ
    // from the node's configuration are refused, nothing changed.
    let devices = "<list xmlns='eu.siacs.conversations.axolotl'><device id='4223'/></list>";
    let open = [("pubsub#access_model", "open"), ("pubsub#max_items", "max")];
    alice
        .send_stanza(publish_iq("p2", DEVICES, "current", devices, &open))
        .await
        .unwrap();
    expect(&mut alice, 5, "the device list's result", |e| {
        e.attr("id") == Some("p2") && e.attr("type") == Some("result")
    })
    .await;
    expect(&mut bob, 5, "the device list event", |e| {
        is_event_of(e, DEVICES)
    })
    .await;
    carol
        .send_stanza(items_iq("i3", "alice", DEVICES))
        .await
        .unwrap();
    let items = expect(&mut carol, 5, "the open device list", |e| {
        e.attr("id") == Some("i3")
    })
    .await;
    assert!(
        String::from(&items).contains("4223"),
        "{}",
        String::from(&items)
    );
    let other = "<list xmlns='eu.siacs.conversations.axolotl'><device id='1'/></list>";
    alice
        .send_stanza(publish_iq(
            "p3",
            DEVICES,
            "current",
            other,
            &[("pubsub#access_model", "presence")],
        ))
        .await
        .unwrap();
    let refused = expect(&mut alice, 5, "a precondition refusal", |e| {
        e.attr("id") == Some("p3")
    })
    .await;
    assert_eq!(
        pubsub_error(&refused),
        ("conflict".into(), "precondition-not-met".into())
    );

    // Bookmarks are the owner's only: bob, who asks for them, gets nothing and may not
    // read them; the next event he sees is the avatar published after them.
    let bookmark = "<conference xmlns='urn:xmpp:bookmarks:1' autojoin='true' name='Team'/>";
    let private = [
        ("pubsub#persist_items", "true"),
        ("pubsub#max_items", "max"),
        ("pubsub#send_last_published_item", "never"),
        ("pubsub#access_model", "whitelist"),
    ];
    alice
        .send_stanza(publish_iq(
            "p4",
            BOOKMARKS,
            "team@conference.localhost",
            bookmark,
            &private,
        ))
        .await
        .unwrap();
    expect(&mut alice, 5, "the bookmark's result", |e| {
        e.attr("id") == Some("p4") && e.attr("type") == Some("result")
    })
    .await;
    alice
        .send_stanza(publish_iq("p5", AVATAR, "222f", AVATAR_META, &[]))
        .await
        .unwrap();
    let next = expect(&mut bob, 5, "the next event", |e| pep_event(e).is_some()).await;
    assert!(
        is_event_of(&next, AVATAR),
        "a bookmark leaked: {}",
        String::from(&next)
    );
    bob.send_stanza(items_iq("i4", "alice", BOOKMARKS))
        .await
        .unwrap();
    let refused = expect(&mut bob, 5, "a closed node", |e| e.attr("id") == Some("i4")).await;
    assert_eq!(
        pubsub_error(&refused),
        ("not-allowed".into(), "closed-node".into())
    );
    alice
        .send_stanza(items_iq("i5", "alice", BOOKMARKS))
        .await
        .unwrap();
    let own = expect(&mut alice, 5, "her own bookmarks", |e| {
        e.attr("id") == Some("i5")
    })
    .await;
    assert!(String::from(&own).contains("team@conference.localhost"));

    // Retraction notifies; an item over the size limit is refused; others may not
    // publish to alice's service.
    send(&mut alice, "<iq type='set' id='r1'><pubsub xmlns='http://jabber.org/protocol/pubsub'><retract node='urn:xmpp:avatar:metadata' notify='true'><item id='222f'/></retract></pubsub></iq>").await;
    let retracted = expect(&mut bob, 5, "the retraction", |e| is_event_of(e, AVATAR)).await;
    let Some(Payload::Items { retracted, .. }) = pep_event(&retracted) else {
        panic!("not a retraction");
    };
    assert_eq!(retracted[0].0, "222f");
    let huge = format!(
        "<data xmlns='urn:xmpp:avatar:data'>{}</data>",
        "A".repeat(140 * 1024)
    );
    alice
        .send_stanza(publish_iq("p6", "urn:xmpp:avatar:data", "x", &huge, &[]))
        .await
        .unwrap();
    let refused = expect(&mut alice, 5, "a refusal of the huge item", |e| {
        e.attr("id") == Some("p6")
    })
    .await;
    assert_eq!(
        pubsub_error(&refused),
        ("not-acceptable".into(), "payload-too-big".into())
    );
    let mut foreign = publish_iq("p7", AVATAR, "x", AVATAR_META, &[]);
    if let tokio_xmpp::Stanza::Iq(iq) = &mut foreign {
        *iq.to_mut() = Some(tokio_xmpp::jid::Jid::from(bare("alice")));
    }
    carol.send_stanza(foreign).await.unwrap();
    let refused = expect(&mut carol, 5, "a foreign publication refused", |e| {
        e.attr("id") == Some("p7")
    })
    .await;
    assert_eq!(pubsub_error(&refused).0, "forbidden");

    // Purge and delete (the owner's namespace) reach the contacts too.
    send(&mut alice, "<iq type='set' id='o1'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><purge node='urn:xmpp:avatar:metadata'/></pubsub></iq>").await;
    let purged = expect(&mut bob, 5, "the purge", |e| is_event_of(e, AVATAR)).await;
    assert!(matches!(pep_event(&purged), Some(Payload::Purge { .. })));
    send(&mut alice, "<iq type='set' id='o2'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='eu.siacs.conversations.axolotl.devicelist'/></pubsub></iq>").await;
    let deleted = expect(&mut bob, 5, "the deletion", |e| is_event_of(e, DEVICES)).await;
    assert!(matches!(pep_event(&deleted), Some(Payload::Delete { .. })));
    carol
        .send_stanza(items_iq("i6", "alice", DEVICES))
        .await
        .unwrap();
    let gone = expect(&mut carol, 5, "no such node", |e| {
        e.attr("id") == Some("i6")
    })
    .await;
    assert_eq!(pubsub_error(&gone).0, "item-not-found");
}

/// `asker` subscribes to `approver`'s presence and `approver` approves, both online.
async fn subscribe_live(
    asker: &mut tokio_xmpp::Client,
    asker_name: &str,
    approver: &mut tokio_xmpp::Client,
    approver_name: &str,
) {
    send(
        asker,
        &format!("<presence to='{approver_name}@localhost' type='subscribe'/>"),
    )
    .await;
    expect_presence(approver, 5, "the request", asker_name, Some("subscribe")).await;
    send(
        approver,
        &format!("<presence to='{asker_name}@localhost' type='subscribed'/>"),
    )
    .await;
    expect_presence(asker, 5, "the approver's presence", approver_name, None).await;
}

/// XEP-0163 with contacts made while both are online: the presence a subscription
/// approval sends tells the owner's PEP service of the contact's capabilities (the
/// contact's own presence went out before they were contacts).
#[tokio::test]
async fn xep0163_a_new_contact_gets_events() {
    let node = start_node_with_users(|_| {}, &["alice", "carol"]).await;
    let caps = ClientCaps::wanting(&[AVATAR]);
    let mut carol = node.client("carol", PW, Some("c"));
    online(&mut carol).await;
    send(&mut carol, &caps.presence()).await;
    caps.answer(&mut carol, 5).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    // carol subscribes to alice, then alice to carol, each approved by hand.
    subscribe_live(&mut carol, "carol", &mut alice, "alice").await;
    subscribe_live(&mut alice, "alice", &mut carol, "carol").await;
    alice
        .send_stanza(publish_iq("p1", AVATAR, "111f", AVATAR_META, &[]))
        .await
        .unwrap();
    expect(&mut carol, 5, "the avatar event", |e| {
        is_event_of(e, AVATAR)
    })
    .await;
}

/// XEP-0163: a resource is notified of the nodes its own capabilities ask for only
/// (two resources of one account with different hashes).
#[tokio::test]
async fn xep0163_each_resource_gets_what_its_capabilities_ask_for() {
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    befriend((&node, "alice"), (&node, "bob")).await;
    let mut watch = node.client("bob", PW, Some("watch"));
    online(&mut watch).await;
    let devices_only = ClientCaps::wanting(&[DEVICES]);
    send(&mut watch, &devices_only.presence()).await;
    // Asked for bob's own service, then for alice's is the same hash: once.
    devices_only.answer(&mut watch, 5).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    sync_with_server(&mut alice, "s0").await;
    alice
        .send_stanza(publish_iq("p1", AVATAR, "111f", AVATAR_META, &[]))
        .await
        .unwrap();
    let devices = "<list xmlns='eu.siacs.conversations.axolotl'><device id='1'/></list>";
    alice
        .send_stanza(publish_iq("p2", DEVICES, "current", devices, &[]))
        .await
        .unwrap();
    let first = expect(&mut watch, 5, "the first event", |e| pep_event(e).is_some()).await;
    assert!(
        is_event_of(&first, DEVICES),
        "the watch got an avatar it did not ask for: {}",
        String::from(&first)
    );
    // disco#info on a node: a leaf, for those who may see it.
    send(&mut watch, "<iq type='get' id='n1' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info' node='eu.siacs.conversations.axolotl.devicelist'/></iq>").await;
    let info = expect(&mut watch, 5, "the node's disco#info", |e| {
        e.attr("id") == Some("n1")
    })
    .await;
    let identity = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .and_then(|q| q.get_child("identity", "http://jabber.org/protocol/disco#info"))
        .map(|i| (i.attr("category"), i.attr("type")));
    assert_eq!(
        identity,
        Some((Some("pubsub"), Some("leaf"))),
        "{}",
        String::from(&info)
    );
}

/// XEP-0313: both sides archive on their home node, each message stamped with the
/// recipient's archive id (a forged one is removed); a second device reads the
/// history page by page; the sender's carbons carry its own archive id; preferences,
/// hints, a huge page, an unknown id and another's archive are handled as the XEP says.
#[tokio::test]
async fn xep0313_archives_both_sides_and_pages_history_for_a_second_device() {
    let node = start_node_with_users(|c| c.archive.max_page = 3, &["alice", "bob"]).await;
    let mut phone = node.client("alice", PW, Some("phone"));
    online(&mut phone).await;
    send(&mut phone, "<presence/>").await;
    let mut desk = node.client("alice", PW, Some("desk"));
    online(&mut desk).await;
    send(&mut desk, "<presence/>").await;
    send(
        &mut desk,
        "<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
    )
    .await;
    expect(&mut desk, 5, "carbons on", |e| e.attr("id") == Some("c")).await;
    let mut laptop = node.client("bob", PW, Some("laptop"));
    online(&mut laptop).await;
    send(&mut laptop, "<presence/>").await;
    // Bob is available before Alice writes: otherwise her first message may be
    // stored for him (no available resource yet) instead of delivered.
    sync_with_server(&mut laptop, "ready").await;

    let mut received = vec![];
    for i in 1..=4 {
        // The first one carries a forged stanza-id for bob's archive.
        let forged = if i == 1 {
            "<stanza-id xmlns='urn:xmpp:sid:0' id='forged' by='bob@localhost'/>"
        } else {
            ""
        };
        send(&mut phone, &format!("<message to='bob@localhost' type='chat' id='m{i}'><body>hello {i}</body>{forged}</message>")).await;
        let m = expect(&mut laptop, 5, "alice's message", |e| body(e).is_some()).await;
        let id = stanza_id_by(&m, "bob@localhost").expect("stamped for bob's archive");
        assert_ne!(id, "forged");
        received.push(id);
    }
    let carbon = expect(&mut desk, 5, "a sent carbon", |e| {
        e.has_child("sent", "urn:xmpp:carbons:2")
    })
    .await;
    let inner = carbon
        .get_child("sent", "urn:xmpp:carbons:2")
        .and_then(|s| s.get_child("forwarded", "urn:xmpp:forward:0"))
        .and_then(|f| f.get_child("message", "jabber:client"))
        .unwrap();
    let alice_first = stanza_id_by(inner, "alice@localhost").expect("the sender's archive id");
    // Not archived: a hint says so, or there is no body.
    send(&mut phone, "<message to='bob@localhost' type='chat'><body>off the record</body><no-store xmlns='urn:xmpp:hints'/></message>").await;
    send(&mut phone, "<message to='bob@localhost' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>").await;
    sync_with_server(&mut phone, "s1").await;

    // A second device of bob reads the history, three at a time (the page limit).
    let mut tablet = node.client("bob", PW, Some("tablet"));
    online(&mut tablet).await;
    tablet
        .send_stanza(mam_query_iq(
            "q1",
            Some("alice@localhost"),
            1_000_000,
            None,
            None,
        ))
        .await
        .unwrap();
    let (page, fin) = mam_results(&mut tablet, "q1").await;
    let bodies: Vec<&str> = page.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(bodies, ["hello 1", "hello 2", "hello 3"]);
    assert!(
        !fin.complete,
        "a huge page gets the largest page, not complete"
    );
    let ids: Vec<&String> = page.iter().map(|(id, _)| id).collect();
    assert_eq!(ids, received[..3].iter().collect::<Vec<_>>());
    let last = fin.set.last.clone().unwrap();
    tablet
        .send_stanza(mam_query_iq(
            "q2",
            Some("alice@localhost"),
            3,
            Some(&last),
            None,
        ))
        .await
        .unwrap();
    let (page, fin) = mam_results(&mut tablet, "q2").await;
    assert_eq!(
        page.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>(),
        ["hello 4"]
    );
    assert!(fin.complete);
    // The last page, as clients ask on first sync.
    tablet
        .send_stanza(mam_query_iq("q3", None, 2, None, Some(None)))
        .await
        .unwrap();
    let (page, _) = mam_results(&mut tablet, "q3").await;
    assert_eq!(
        page.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>(),
        ["hello 3", "hello 4"]
    );

    // alice's archive has her side, with the id her carbon carried.
    phone
        .send_stanza(mam_query_iq("q4", Some("bob@localhost"), 3, None, None))
        .await
        .unwrap();
    let (page, _) = mam_results(&mut phone, "q4").await;
    assert_eq!(page[0], (alice_first, "hello 1".to_owned()));

    // An unknown id, and bob's archive asked by alice.
    phone
        .send_stanza(mam_query_iq("q5", None, 3, Some("no-such-id"), None))
        .await
        .unwrap();
    let e = expect(&mut phone, 5, "item-not-found", |e| {
        e.attr("id") == Some("q5")
    })
    .await;
    assert!(
        String::from(&e).contains("item-not-found"),
        "{}",
        String::from(&e)
    );
    let mut foreign = mam_query_iq("q6", None, 3, None, None);
    if let tokio_xmpp::Stanza::Iq(iq) = &mut foreign {
        *iq.to_mut() = Some(tokio_xmpp::jid::Jid::from(bare("bob")));
    }
    phone.send_stanza(foreign).await.unwrap();
    let e = expect(&mut phone, 5, "forbidden", |e| e.attr("id") == Some("q6")).await;
    assert!(
        String::from(&e).contains("forbidden"),
        "{}",
        String::from(&e)
    );

    // bob turns archiving off: what comes next is delivered, unstamped, not archived.
    send(
        &mut tablet,
        "<iq type='set' id='p1'><prefs xmlns='urn:xmpp:mam:2' default='never'/></iq>",
    )
    .await;
    let prefs = expect(&mut tablet, 5, "the preferences", |e| {
        e.attr("id") == Some("p1")
    })
    .await;
    let default = prefs
        .get_child("prefs", "urn:xmpp:mam:2")
        .and_then(|p| p.attr("default"));
    assert_eq!(default, Some("never"), "{}", String::from(&prefs));
    send(
        &mut phone,
        "<message to='bob@localhost' type='chat'><body>unarchived</body></message>",
    )
    .await;
    let m = expect(&mut laptop, 5, "the unarchived message", |e| {
        body(e).as_deref() == Some("unarchived")
    })
    .await;
    assert_eq!(stanza_id_by(&m, "bob@localhost"), None);
    tablet
        .send_stanza(mam_query_iq("q7", None, 3, None, Some(None)))
        .await
        .unwrap();
    let (page, _) = mam_results(&mut tablet, "q7").await;
    assert_eq!(page.last().map(|(_, b)| b.as_str()), Some("hello 4"));
}

/// XEP-0363 on one node: the service in disco, a slot, its PUT (the token, the size and
/// the type checked; once only), GET, HEAD and a range, the size limit, the quota,
/// names that try to leave the directory, and the files of a deleted account removed.
#[tokio::test]
async fn xep0363_slots_uploads_downloads_and_refusals() {
    let node = start_node_with_users(
        |c| {
            c.upload.max_file_bytes = 1000;
            c.upload.quota_bytes = 1500;
        },
        &["alice", "bob"],
    )
    .await;
    let cert = node.cert();
    let mut alice = node.client("alice", PW, Some("phone"));
    online(&mut alice).await;

    send(
        &mut alice,
        "<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    )
    .await;
    let info = expect(&mut alice, 5, "disco#info", |e| e.attr("id") == Some("d")).await;
    let query = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap();
    assert!(query.children().any(
        |c| c.is("identity", "http://jabber.org/protocol/disco#info")
            && c.attr("category") == Some("store")
            && c.attr("type") == Some("file")
    ));
    assert!(
        query
            .children()
            .any(|c| c.attr("var") == Some("urn:xmpp:http:upload:0"))
    );
    let form = query.get_child("x", "jabber:x:data").unwrap();
    let max = form
        .children()
        .find(|f| f.attr("var") == Some("max-file-size"))
        .map(|f| f.children().map(|v| v.text()).collect::<String>());
    assert_eq!(max.as_deref(), Some("1000"));

    let file: Vec<u8> = (0..600u32).map(|i| (i % 251) as u8).collect();
    let reply = upload_slot(&mut alice, "s1", "cat picture.png", 600, "image/png").await;
    assert_eq!(
        reply.attr("type"),
        Some("result"),
        "{}",
        String::from(&reply)
    );
    let (put, auth, get) = slot_parts(&reply);
    assert_eq!(put, get);
    assert!(put.starts_with("https://localhost:"), "{put}");
    assert!(put.ends_with("/cat%20picture.png"), "{put}");

    let png = ("content-type", "image/png");
    // No token, a wrong one, the wrong type, the wrong size: refused, nothing stored.
    let r = https_request(&cert, "PUT", &put, &[png], &file).await;
    assert_eq!(r.status, 401);
    let r = https_request(
        &cert,
        "PUT",
        &put,
        &[png, ("authorization", "Bearer nope")],
        &file,
    )
    .await;
    assert_eq!(r.status, 401);
    let with_auth = [("authorization", auth.as_str()), png];
    let r = https_request(
        &cert,
        "PUT",
        &put,
        &[with_auth[0], ("content-type", "text/html")],
        &file,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = https_request(&cert, "PUT", &put, &with_auth, &file[..599]).await;
    assert_eq!(r.status, 400);
    let r = https_request(
        &cert,
        "PUT",
        &put,
        &with_auth,
        &[file.as_slice(), b"x"].concat(),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(
        https_request(&cert, "GET", &get, &[], b"").await.status,
        404
    );

    let r = https_request(&cert, "PUT", &put, &with_auth, &file).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = https_request(&cert, "PUT", &put, &with_auth, &file).await;
    assert_eq!(r.status, 409, "a slot takes one file");

    // Anyone with the URL downloads it, with its type, whole or in part.
    let r = https_request(&cert, "GET", &get, &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, file);
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let r = https_request(&cert, "GET", &get, &[("range", "bytes=10-19")], b"").await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &file[10..20]);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/600"));
    let r = https_request(&cert, "GET", &get, &[("range", "bytes=600-")], b"").await;
    assert_eq!(r.status, 416);
    let r = https_request(&cert, "GET", &get, &[("range", "bytes=-5")], b"").await;
    assert_eq!((r.status, r.body.as_slice()), (206, &file[595..]));
    assert!(
        r.header("content-security-policy")
            .unwrap()
            .contains("sandbox")
    );
    // HEAD says what a GET would send, whole: ranges are for GET.
    let r = https_request(&cert, "HEAD", &get, &[("range", "bytes=0-9")], b"").await;
    assert_eq!((r.status, r.header("content-length")), (200, Some("600")));
    assert!(r.body.is_empty());
    // A web client's preflight.
    let r = https_request(
        &cert,
        "OPTIONS",
        &put,
        &[("origin", "https://web.example")],
        b"",
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(
        r.header("access-control-allow-methods")
            .unwrap()
            .contains("PUT")
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    // The same id under another name, or a path out of the directory: nothing.
    let base = &get[..get.find("/upload/").unwrap()];
    let renamed = format!("{}/other.png", &get[..get.rfind('/').unwrap()]);
    assert_eq!(
        https_request(&cert, "GET", &renamed, &[], b"").await.status,
        404
    );
    for path in [
        "/upload/../../etc/passwd",
        "/upload/localhost/..%2F..%2Fimpmesh.db/x",
        "/impmesh.db",
    ] {
        let r = https_request(&cert, "GET", &format!("{base}{path}"), &[], b"").await;
        assert_eq!(r.status, 404, "{path}");
    }

    // A slot that named no type takes the PUT's.
    let reply = upload_slot_untyped(&mut alice, "s5", "photo", 4).await;
    let (put5, auth5, get5) = slot_parts(&reply);
    let r = https_request(
        &cert,
        "PUT",
        &put5,
        &[("authorization", &auth5), ("content-type", "image/webp")],
        b"RIFF",
    )
    .await;
    assert_eq!(r.status, 201);
    let r = https_request(&cert, "GET", &get5, &[], b"").await;
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("image/webp"))
    );
    // An unused slot goes when its time is over, a file after expiry_days (30).
    let reply = upload_slot(
        &mut alice,
        "s6",
        "never.bin",
        10,
        "application/octet-stream",
    )
    .await;
    let (put6, auth6, _) = slot_parts(&reply);
    let now = impmesh_store::now_unix();
    node.node.server.expire_uploads_at(now + 301).await.unwrap();
    let r = https_request(&cert, "PUT", &put6, &[("authorization", &auth6)], &[0; 10]).await;
    assert_eq!(r.status, 404, "the slot is gone");
    assert_eq!(
        https_request(&cert, "GET", &get5, &[], b"").await.status,
        200
    );
    node.node
        .server
        .expire_uploads_at(now + 31 * 86_400)
        .await
        .unwrap();
    assert_eq!(
        https_request(&cert, "GET", &get5, &[], b"").await.status,
        404
    );
    assert_eq!(
        https_request(&cert, "GET", &get, &[], b"").await.status,
        404
    );
    let reply = upload_slot(&mut alice, "s7", "again.png", 600, "image/png").await;
    let (put, auth, get) = slot_parts(&reply);
    let r = https_request(&cert, "PUT", &put, &[("authorization", &auth), png], &file).await;
    assert_eq!(r.status, 201);

    // Too large: not-acceptable with the limit; over the quota: resource-constraint;
    // a name with a path: bad-request.
    let reply = upload_slot(
        &mut alice,
        "s2",
        "big.bin",
        1001,
        "application/octet-stream",
    )
    .await;
    let xml = String::from(&reply);
    assert!(
        xml.contains("<not-acceptable") && xml.contains("<max-file-size>1000</max-file-size>"),
        "{xml}"
    );
    let reply = upload_slot(&mut alice, "s3", "b.bin", 901, "application/octet-stream").await;
    assert!(
        String::from(&reply).contains("<resource-constraint"),
        "{}",
        String::from(&reply)
    );
    let reply = upload_slot(&mut alice, "s4", "../../x", 10, "text/plain").await;
    assert!(
        String::from(&reply).contains("<bad-request"),
        "{}",
        String::from(&reply)
    );
    // bob has his own quota.
    let mut bob = node.client("bob", PW, None);
    online(&mut bob).await;
    let reply = upload_slot(&mut bob, "b1", "b.bin", 900, "application/octet-stream").await;
    assert_eq!(reply.attr("type"), Some("result"));

    // A deleted account's files go at the next expiry pass.
    let files = node.dir.path().join("uploads");
    let count = || std::fs::read_dir(&files).map(|d| d.count()).unwrap_or(0);
    assert_eq!(count(), 1);
    drop(alice);
    node.node.server.store.delete_user("alice").await.unwrap();
    node.node.server.expire_uploads_now().await.unwrap();
    assert_eq!(count(), 0);
    assert_eq!(
        https_request(&cert, "GET", &get, &[], b"").await.status,
        404
    );
}

/// A `[upload] public_url` whose host the client certificate does not cover stops the
/// node at start, naming the setting; one it covers (the node name) serves.
#[tokio::test]
async fn xep0363_the_upload_url_must_be_covered_by_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = impmesh::config::Config {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    config.listen.c2s = vec!["127.0.0.1:0".parse().unwrap()];
    config.listen.c2s_direct_tls = vec![];
    config.listen.https = "127.0.0.1:0".parse().unwrap();
    config.listen.admin = "127.0.0.1:0".parse().unwrap();
    config.listen.links = None;
    config.listen.client_https = "127.0.0.1:0".parse().unwrap();
    config.listen.turn = Some("127.0.0.1:0".parse().unwrap());
    config.listen.turns = Some("127.0.0.1:0".parse().unwrap());
    config.upload.public_url = Some("https://files.elsewhere.example:5443".into());
    let Err(err) = impmesh::node::Node::start(&config).await else {
        panic!("a node started with an upload URL its certificate does not cover");
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("upload.public_url") && text.contains("files.elsewhere.example"),
        "{text}"
    );

    let node = start_node(|c| {
        c.node.name = Some("node1.a.example".into());
        c.upload.public_url = Some("https://node1.a.example:5443".into());
    })
    .await;
    assert_eq!(
        node.node.server.upload_url(),
        Some("https://node1.a.example:5443")
    );
}

/// XEP-0357: a client registers an app server at a full JID of this domain; the app
/// server hears of messages stored offline (with the body, as the client allowed)
/// and of messages for the client's hibernated session (counted from the
/// hibernation); an app server of another domain is refused; one that answers with
/// an error is disabled.
#[tokio::test]
async fn xep0357_notifications_for_offline_and_hibernated_sessions() {
    let node = start_node_with_users(|_| {}, &["alice", "carol", "pushd"]).await;
    let mut app = node.client("pushd", PW, Some("app"));
    online(&mut app).await;
    let mut carol = node.client("carol", PW, Some("c"));
    online(&mut carol).await;

    let mut alice = RawClient::login(&node, "alice", "phone", false, None).await;
    alice
        .send("<iq type='get' id='d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        .await;
    let info = alice.read_until("</iq>").await;
    assert!(info.contains("urn:xmpp:push:0"), "{info}");
    alice.send("<iq type='set' id='x'><enable xmlns='urn:xmpp:push:0' jid='push.example.net' node='n'/></iq>").await;
    let refused = alice.read_until("</iq>").await;
    assert!(refused.contains("remote-server-not-found"), "{refused}");
    // In this domain an app server is a client, at a full JID.
    alice.send("<iq type='set' id='y'><enable xmlns='urn:xmpp:push:0' jid='pushd@localhost' node='n'/></iq>").await;
    let refused = alice.read_until("</iq>").await;
    assert!(refused.contains("not-acceptable"), "{refused}");
    alice
        .send(
            "<iq type='set' id='e'><enable xmlns='urn:xmpp:push:0' jid='pushd@localhost/app' node='n1'>\
             <x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>\
             <field var='secret'><value>s3cr3t</value></field>\
             <field var='include-body'><value>true</value></field>\
             <field var='include-sender'><value>true</value></field></x></enable></iq>",
        )
        .await;
    let enabled = alice.read_until("id='e'").await;
    assert!(enabled.contains("type='result'"), "{enabled}");

    // Offline: each message stored tells the app server, with the count waiting.
    drop(alice);
    eventually(10, "alice offline", || async {
        node.node.server.hub.sessions("alice").is_empty()
    })
    .await;
    for i in 1..=2 {
        send(
            &mut carol,
            &format!("<message to='alice@localhost' type='chat'><body>hi {i}</body></message>"),
        )
        .await;
        let (from, pnode, fields, options) = notification(&mut app, "result").await;
        assert_eq!((from.as_str(), pnode.as_str()), ("alice@localhost", "n1"));
        assert_eq!(
            field(&fields, "message-count"),
            Some(i.to_string().as_str())
        );
        assert_eq!(
            field(&fields, "last-message-sender"),
            Some("carol@localhost")
        );
        assert_eq!(
            field(&fields, "last-message-body"),
            Some(format!("hi {i}").as_str())
        );
        assert!(
            options.contains("s3cr3t") && !options.contains("include-"),
            "{options}"
        );
    }
    // A chat state wakes nobody.
    send(&mut carol, "<message to='alice@localhost' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>").await;

    // Hibernated: alice's stream-managed session lost its connection.
    let mut alice = RawClient::login(&node, "alice", "phone", false, None).await;
    alice
        .send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await;
    alice.read_until("<enabled").await;
    alice
        .send("<iq type='set' id='e2'><enable xmlns='urn:xmpp:push:0' jid='pushd@localhost/app' node='n2'/></iq>")
        .await;
    alice.read_until("id='e2'").await;
    alice.send("<presence/>").await;
    alice.sync_with_server("s").await;
    // The two offline messages reached the new session but were never acknowledged:
    // when its connection drops, one notification counts them.
    drop(alice);
    let (_, pnode, fields, options) = notification(&mut app, "result").await;
    assert_eq!(pnode, "n2");
    assert_eq!(field(&fields, "message-count"), Some("2"));
    assert_eq!(
        (
            field(&fields, "last-message-sender"),
            field(&fields, "last-message-body")
        ),
        (None, None),
        "n2 allowed neither sender nor body"
    );
    assert!(options.is_empty());
    // Each message for the hibernated session adds one.
    send(
        &mut carol,
        "<message to='alice@localhost/phone' type='chat'><body>still there?</body></message>",
    )
    .await;
    let (_, _, fields, _) = notification(&mut app, "result").await;
    assert_eq!(field(&fields, "message-count"), Some("3"));
    // The app server refuses: that registration is disabled, the other stays.
    send(
        &mut carol,
        "<message to='alice@localhost/phone' type='chat'><body>hello?</body></message>",
    )
    .await;
    let (_, _, fields, _) = notification(&mut app, "error").await;
    assert_eq!(field(&fields, "message-count"), Some("4"));
    let store = node.node.server.store.clone();
    eventually(10, "n2 disabled", || async {
        let nodes: Vec<String> = store
            .push_registrations("alice")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.node)
            .collect();
        nodes == ["n1"]
    })
    .await;

    // A disable from one session stops the others, hibernated ones too.
    let mut tablet = RawClient::login(&node, "alice", "tablet", false, None).await;
    tablet
        .send("<iq type='set' id='e3'><enable xmlns='urn:xmpp:push:0' jid='pushd@localhost/app' node='n1'/></iq>")
        .await;
    tablet.read_until("id='e3'").await;
    let mut desk = RawClient::login(&node, "alice", "desk", false, None).await;
    desk.send(
        "<iq type='set' id='d1'><disable xmlns='urn:xmpp:push:0' jid='pushd@localhost/app'/></iq>",
    )
    .await;
    let disabled = desk.read_until("id='d1'").await;
    assert!(disabled.contains("type='result'"), "{disabled}");
    assert!(store.push_registrations("alice").await.unwrap().is_empty());
    for s in node.node.server.hub.sessions("alice") {
        assert!(s.state.lock().unwrap().push.is_none(), "{}", s.jid);
    }
}

/// XEP-0398 and XEP-0153: an avatar published over PEP in an open node becomes the
/// vCard's PHOTO and the hash in the owner's presence (whatever the client put there,
/// unless it says it has none); one in a presence-only node stays out of the public
/// vCard; a vCard PHOTO becomes the PEP avatar, data and metadata, under its SHA-1,
/// and a vCard without one turns it off.
#[tokio::test]
async fn xep0398_pep_avatars_and_vcard_photos_follow_each_other() {
    use base64::Engine as _;
    use impmesh_router::core::avatar::sha1_hex;
    use support::{befriend, items_iq, publish_iq};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let node = start_node_with_users(|_| {}, &["alice", "bob"]).await;
    befriend((&node, "alice"), (&node, "bob")).await;
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    send(
        &mut alice,
        "<iq type='get' id='d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    )
    .await;
    let info = String::from(&expect(&mut alice, 5, "disco", |e| e.attr("id") == Some("d")).await);
    assert!(info.contains("urn:xmpp:pep-vcard-conversion:0"), "{info}");

    // For contacts only: the vCard (public) does not take it.
    let secret: &[u8] = b"\x89PNG for contacts";
    let secret_id = sha1_hex(secret);
    alice
        .send_stanza(publish_iq(
            "p0",
            "urn:xmpp:avatar:data",
            &secret_id,
            &format!("<data xmlns='urn:xmpp:avatar:data'>{}</data>", b64(secret)),
            &[],
        ))
        .await
        .unwrap();
    expect(&mut alice, 5, "published", |e| e.attr("id") == Some("p0")).await;
    alice
        .send_stanza(publish_iq("p00", "urn:xmpp:avatar:metadata", &secret_id, &format!("<metadata xmlns='urn:xmpp:avatar:metadata'><info id='{secret_id}' bytes='{}' type='image/png'/></metadata>", secret.len()), &[]))
        .await
        .unwrap();
    expect(&mut alice, 5, "published", |e| e.attr("id") == Some("p00")).await;
    send(
        &mut alice,
        "<iq type='get' id='v0'><vCard xmlns='vcard-temp'/></iq>",
    )
    .await;
    let card =
        String::from(&expect(&mut alice, 5, "the vCard", |e| e.attr("id") == Some("v0")).await);
    assert!(!card.contains("BINVAL"), "{card}");
    // Made public.
    for (n, pep_node) in [
        ("c1", "urn:xmpp:avatar:data"),
        ("c2", "urn:xmpp:avatar:metadata"),
    ] {
        send(
            &mut alice,
            &format!("<iq type='set' id='{n}'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='{pep_node}'/></pubsub></iq>"),
        )
        .await;
        expect(&mut alice, 5, "the node deleted", |e| {
            e.attr("id") == Some(n)
        })
        .await;
    }

    let png: &[u8] = b"\x89PNG alice's avatar";
    let (id, data) = (sha1_hex(png), b64(png));
    for (n, node_name, payload) in [
        (
            "p1",
            "urn:xmpp:avatar:data",
            format!("<data xmlns='urn:xmpp:avatar:data'>{data}</data>"),
        ),
        (
            "p2",
            "urn:xmpp:avatar:metadata",
            format!(
                "<metadata xmlns='urn:xmpp:avatar:metadata'><info id='{id}' bytes='{}' type='image/png'/></metadata>",
                png.len()
            ),
        ),
    ] {
        alice
            .send_stanza(publish_iq(
                n,
                node_name,
                &id,
                &payload,
                &[("pubsub#access_model", "open")],
            ))
            .await
            .unwrap();
        let r = expect(&mut alice, 5, "published", |e| e.attr("id") == Some(n)).await;
        assert_eq!(r.attr("type"), Some("result"));
    }
    send(
        &mut alice,
        "<iq type='get' id='v'><vCard xmlns='vcard-temp'/></iq>",
    )
    .await;
    let card =
        String::from(&expect(&mut alice, 5, "the vCard", |e| e.attr("id") == Some("v")).await);
    assert!(card.contains(&format!("<BINVAL>{data}</BINVAL>")), "{card}");
    assert!(card.contains("<TYPE>image/png</TYPE>"), "{card}");

    let mut bob = node.client("bob", PW, Some("b"));
    online(&mut bob).await;
    send(&mut bob, "<presence/>").await;
    send(
        &mut alice,
        "<presence><x xmlns='vcard-temp:x:update'><photo>stale</photo></x></presence>",
    )
    .await;
    let p = expect(&mut bob, 5, "alice's presence", |e| {
        e.is("presence", "jabber:client") && e.attr("from").is_some_and(|f| f.starts_with("alice@"))
    })
    .await;
    let x = p
        .get_child("x", "vcard-temp:x:update")
        .expect("the avatar hash");
    assert_eq!(
        x.get_child("photo", "vcard-temp:x:update").unwrap().text(),
        id
    );
    assert_eq!(
        p.children()
            .filter(|c| c.is("x", "vcard-temp:x:update"))
            .count(),
        1
    );

    // bob sets a vCard with a photo: it becomes his PEP avatar.
    let gif: &[u8] = b"GIF89a bob";
    send(
        &mut bob,
        &format!("<iq type='set' id='vc'><vCard xmlns='vcard-temp'><FN>Bob</FN><PHOTO><TYPE>image/gif</TYPE><BINVAL>{}</BINVAL></PHOTO></vCard></iq>", b64(gif)),
    )
    .await;
    expect(&mut bob, 5, "the vCard stored", |e| {
        e.attr("id") == Some("vc")
    })
    .await;
    alice
        .send_stanza(items_iq("i1", "bob", "urn:xmpp:avatar:metadata"))
        .await
        .unwrap();
    let items = String::from(
        &expect(&mut alice, 5, "bob's avatar metadata", |e| {
            e.attr("id") == Some("i1")
        })
        .await,
    );
    let bob_id = sha1_hex(gif);
    assert!(
        items.contains(&format!("id=\"{bob_id}\"")) || items.contains(&format!("id='{bob_id}'")),
        "{items}"
    );
    assert!(items.contains("image/gif"), "{items}");
    alice
        .send_stanza(items_iq("i2", "bob", "urn:xmpp:avatar:data"))
        .await
        .unwrap();
    let items = String::from(
        &expect(&mut alice, 5, "bob's avatar data", |e| {
            e.attr("id") == Some("i2")
        })
        .await,
    );
    assert!(items.contains(&b64(gif)), "{items}");
    // A vCard without a photo turns bob's PEP avatar off.
    send(
        &mut bob,
        "<iq type='set' id='vc2'><vCard xmlns='vcard-temp'><FN>Bob</FN></vCard></iq>",
    )
    .await;
    expect(&mut bob, 5, "the vCard stored", |e| {
        e.attr("id") == Some("vc2")
    })
    .await;
    alice
        .send_stanza(items_iq("i3", "bob", "urn:xmpp:avatar:metadata"))
        .await
        .unwrap();
    let items = String::from(
        &expect(&mut alice, 5, "bob's metadata", |e| {
            e.attr("id") == Some("i3")
        })
        .await,
    );
    assert!(!items.contains("<info"), "{items}");
    // A client that says it has no avatar is believed.
    send(
        &mut alice,
        "<presence><show>away</show><x xmlns='vcard-temp:x:update'><photo/></x></presence>",
    )
    .await;
    let p = expect(&mut bob, 5, "alice's away presence", |e| {
        e.is("presence", "jabber:client") && e.has_child("show", "jabber:client")
    })
    .await;
    let photo = p
        .get_child("x", "vcard-temp:x:update")
        .and_then(|x| x.get_child("photo", "vcard-temp:x:update"))
        .unwrap();
    assert!(photo.text().is_empty());
}

/// XEP-0215: the node's relay, with credentials for the asking user that the
/// cluster's secret signs; advertised in the server's disco#info.
#[tokio::test]
async fn xep0215_external_services_give_the_relay_and_credentials() {
    let node = start_node_with_users(|_| {}, &["alice"]).await;
    let relay = node
        .node
        .relay
        .as_ref()
        .expect("the relay is on by default");
    let port = relay.udp_addr().port().to_string();
    let tls_port = relay.tls_addr().unwrap().port().to_string();
    let mut alice = node.client("alice", PW, Some("a"));
    online(&mut alice).await;
    send(
        &mut alice,
        "<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    )
    .await;
    let info = expect(&mut alice, 5, "disco#info", |e| e.attr("id") == Some("d")).await;
    let features: Vec<&str> = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap()
        .children()
        .filter_map(|f| f.attr("var"))
        .collect();
    assert!(features.contains(&"urn:xmpp:extdisco:2"), "{features:?}");
    send(
        &mut alice,
        "<iq type='get' id='s' to='localhost'><services xmlns='urn:xmpp:extdisco:2'/></iq>",
    )
    .await;
    let reply = expect(&mut alice, 5, "services", |e| e.attr("id") == Some("s")).await;
    let services = reply.get_child("services", "urn:xmpp:extdisco:2").unwrap();
    let found: Vec<(&str, &str, &str, &str)> = services
        .children()
        .map(|s| {
            (
                s.attr("type").unwrap(),
                s.attr("transport").unwrap(),
                s.attr("host").unwrap(),
                s.attr("port").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            ("stun", "udp", "127.0.0.1", port.as_str()),
            ("turn", "udp", "127.0.0.1", port.as_str()),
            ("turn", "tcp", "127.0.0.1", port.as_str()),
            // TLS by the name the certificate covers.
            ("turns", "tcp", "localhost", tls_port.as_str()),
        ]
    );
    // The TURN REST API form, signed with the cluster's current secret.
    let turn = services.children().nth(1).unwrap();
    let username = turn.attr("username").unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "alice");
    let expiry: i64 = expiry.parse().unwrap();
    let now = impmesh_store::now_unix();
    assert!(
        (now + 3500..=now + 3700).contains(&expiry),
        "an hour by default"
    );
    let secrets = node
        .node
        .server
        .store
        .turn_secrets(now, 86_400)
        .await
        .unwrap();
    assert_eq!(
        turn.attr("password"),
        Some(impmesh_media::auth::password(&secrets[0].secret, username).as_str())
    );
    assert_eq!(turn.attr("restricted"), Some("1"));
    // Credentials for one service; an unknown one is item-not-found.
    send(
        &mut alice,
        &format!(
            "<iq type='get' id='c' to='localhost'><credentials xmlns='urn:xmpp:extdisco:2'>\
             <service type='turn' host='127.0.0.1' port='{port}'/></credentials></iq>"
        ),
    )
    .await;
    let reply = expect(&mut alice, 5, "credentials", |e| e.attr("id") == Some("c")).await;
    let credentials = reply
        .get_child("credentials", "urn:xmpp:extdisco:2")
        .unwrap();
    assert_eq!(credentials.children().count(), 2);
    send(
        &mut alice,
        "<iq type='get' id='u' to='localhost'><credentials xmlns='urn:xmpp:extdisco:2'>\
         <service type='turn' host='turn.elsewhere.example'/></credentials></iq>",
    )
    .await;
    let reply = expect(&mut alice, 5, "unknown service", |e| {
        e.attr("id") == Some("u")
    })
    .await;
    assert_eq!(reply.attr("type"), Some("error"));
    assert!(String::from(&reply).contains("item-not-found"));
}
