//! Multi-user chat (XEP-0045) on one node, with real clients (tokio-xmpp).

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

mod support;

use support::*;
use tokio_xmpp::minidom::Element;

const ROOM: &str = "team@conference.localhost";
const MUC_USER: &str = "http://jabber.org/protocol/muc#user";

fn status_codes(el: &Element) -> Vec<String> {
    el.get_child("x", MUC_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.name() == "status")
                .filter_map(|c| c.attr("code").map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn from_occupant(el: &Element, nick: &str) -> bool {
    el.attr("from") == Some(&format!("{ROOM}/{nick}"))
}

fn error_condition(el: &Element) -> Option<String> {
    el.get_child("error", "jabber:client")?
        .children()
        .next()
        .map(|c| c.name().to_owned())
}

async fn enter(client: &mut tokio_xmpp::Client, nick: &str) {
    send(
        client,
        &format!(
            "<presence to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'>\
             <history maxstanzas='10'/></x></presence>"
        ),
    )
    .await;
}

/// Create a room, open it, enter, talk, talk privately, change nicks, leave by going
/// offline; the errors a client gets for a nick in use, a message to a room it is not
/// in, and a room that does not exist.
#[tokio::test]
async fn xep0045_rooms_on_one_node() {
    let node =
        start_node_with_users(|c| c.muc.enabled = true, &["alice", "bob", "carol", "dave"]).await;
    let mut alice = node.client("alice", PW, Some("laptop"));
    let mut bob = node.client("bob", PW, Some("phone"));
    let mut carol = node.client("carol", PW, Some("x"));
    for c in [&mut alice, &mut bob, &mut carol] {
        online(c).await;
        send(c, "<presence/>").await;
    }

    // The service is found through the server's disco#items.
    send(
        &mut alice,
        "<iq type='get' id='items' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
    )
    .await;
    let items = expect(&mut alice, 5, "the server's items", |e| {
        e.attr("id") == Some("items")
    })
    .await;
    let query = items.children().next().unwrap();
    assert!(
        query
            .children()
            .any(|i| i.attr("jid") == Some("conference.localhost")),
        "{}",
        String::from(&items)
    );

    // Alice creates the room: owner, 110 and 201; it stays locked until she accepts
    // the default configuration.
    enter(&mut alice, "Alice").await;
    let own = expect(&mut alice, 5, "alice's own presence in the room", |e| {
        e.name() == "presence" && from_occupant(e, "Alice")
    })
    .await;
    assert_eq!(status_codes(&own), ["110", "201"]);
    enter(&mut bob, "Bob").await;
    let refused = expect(&mut bob, 5, "the locked room's refusal", |e| {
        e.name() == "presence" && e.attr("type") == Some("error")
    })
    .await;
    assert_eq!(error_condition(&refused).as_deref(), Some("item-not-found"));
    send(
        &mut alice,
        &format!(
            "<iq type='set' id='instant' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#owner'>\
             <x xmlns='jabber:x:data' type='submit'/></query></iq>"
        ),
    )
    .await;
    let ok = expect(&mut alice, 5, "the instant room accepted", |e| {
        e.attr("id") == Some("instant")
    })
    .await;
    assert_eq!(ok.attr("type"), Some("result"));

    // Bob enters: he sees Alice, then himself; Alice sees him.
    enter(&mut bob, "Bob").await;
    expect(&mut bob, 5, "alice's presence, to bob", |e| {
        e.name() == "presence" && from_occupant(e, "Alice")
    })
    .await;
    let own = expect(&mut bob, 5, "bob's own presence", |e| {
        e.name() == "presence" && from_occupant(e, "Bob")
    })
    .await;
    assert_eq!(status_codes(&own), ["110"]);
    expect(&mut bob, 5, "the subject", |e| {
        e.get_child("subject", "jabber:client").is_some()
    })
    .await;
    expect(&mut alice, 5, "bob's presence, to alice", |e| {
        e.name() == "presence" && from_occupant(e, "Bob")
    })
    .await;

    // A nick in use, a message from outside, a room that is not there.
    enter(&mut carol, "Alice").await;
    let conflict = expect(&mut carol, 5, "the nick conflict", |e| {
        e.name() == "presence" && e.attr("type") == Some("error")
    })
    .await;
    assert_eq!(error_condition(&conflict).as_deref(), Some("conflict"));
    send(
        &mut carol,
        &format!("<message type='groupchat' to='{ROOM}' id='outside'><body>hi</body></message>"),
    )
    .await;
    let e = expect(&mut carol, 5, "the refusal from outside", |e| {
        e.attr("id") == Some("outside")
    })
    .await;
    assert_eq!(error_condition(&e).as_deref(), Some("not-acceptable"));
    send(
        &mut carol,
        "<message type='groupchat' to='nowhere@conference.localhost' id='nowhere'><body>hi</body></message>",
    )
    .await;
    let e = expect(&mut carol, 5, "no such room", |e| {
        e.attr("id") == Some("nowhere")
    })
    .await;
    assert_eq!(error_condition(&e).as_deref(), Some("item-not-found"));

    // A message reaches both, from Alice's occupant JID.
    send(
        &mut alice,
        &format!("<message type='groupchat' to='{ROOM}' id='m1'><body>hello room</body></message>"),
    )
    .await;
    for c in [&mut alice, &mut bob] {
        let m = expect(c, 5, "the room's message", |e| {
            body(e).as_deref() == Some("hello room")
        })
        .await;
        assert!(from_occupant(&m, "Alice"));
        assert_eq!(m.attr("type"), Some("groupchat"));
    }

    // Counted in /metrics.
    let m = metrics(&node).await;
    assert!(m.contains("impmesh_muc_rooms 1\n"), "{m}");
    assert!(m.contains("impmesh_muc_occupants 2\n"), "{m}");
    assert!(m.contains("impmesh_muc_messages_relayed_total 2\n"), "{m}");

    // Carol enters under another nick and gets the history, delayed.
    enter(&mut carol, "Carol").await;
    let old = expect(&mut carol, 5, "the history", |e| {
        body(e).as_deref() == Some("hello room")
    })
    .await;
    assert!(old.get_child("delay", "urn:xmpp:delay").is_some());

    // A private message, marked as through the room.
    send(
        &mut bob,
        &format!("<message type='chat' to='{ROOM}/Alice' id='pm'><body>psst</body></message>"),
    )
    .await;
    let pm = expect(&mut alice, 5, "bob's private message", |e| {
        body(e).as_deref() == Some("psst")
    })
    .await;
    assert!(from_occupant(&pm, "Bob"));
    assert!(pm.get_child("x", MUC_USER).is_some());

    // Bob becomes Robert: 303 under the old nick, then the new one.
    send(&mut bob, &format!("<presence to='{ROOM}/Robert'/>")).await;
    let gone = expect(&mut alice, 5, "bob's nick change", |e| {
        e.name() == "presence" && from_occupant(e, "Bob") && e.attr("type") == Some("unavailable")
    })
    .await;
    assert_eq!(status_codes(&gone), ["303"]);
    expect(&mut alice, 5, "robert's presence", |e| {
        e.name() == "presence" && from_occupant(e, "Robert")
    })
    .await;

    // Robert's client goes away: the room tells the others he left.
    bob.send_end().await.unwrap();
    expect(&mut alice, 10, "robert leaving with his session", |e| {
        e.name() == "presence"
            && from_occupant(e, "Robert")
            && e.attr("type") == Some("unavailable")
    })
    .await;

    // Dave enters without ever sending initial presence, and his client goes away:
    // he leaves all the same.
    let mut dave = node.client("dave", PW, Some("x"));
    online(&mut dave).await;
    enter(&mut dave, "Dave").await;
    expect(&mut alice, 5, "dave entering", |e| {
        e.name() == "presence" && from_occupant(e, "Dave") && e.attr("type").is_none()
    })
    .await;
    dave.send_end().await.unwrap();
    expect(&mut alice, 10, "dave leaving with his session", |e| {
        e.name() == "presence" && from_occupant(e, "Dave") && e.attr("type") == Some("unavailable")
    })
    .await;

    // The room's disco#info.
    send(
        &mut carol,
        &format!("<iq type='get' id='info' to='{ROOM}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
    )
    .await;
    let info = expect(&mut carol, 5, "the room's info", |e| {
        e.attr("id") == Some("info")
    })
    .await;
    let xml = String::from(&info);
    for feature in [
        "http://jabber.org/protocol/muc",
        "muc_open",
        "muc_temporary",
        "muc_semianonymous",
    ] {
        assert!(
            xml.contains(&format!("var='{feature}'"))
                || xml.contains(&format!("var=\"{feature}\"")),
            "{feature}: {xml}"
        );
    }
    node.node.shutdown().await;
}

/// Without `[muc] enabled`, rooms are nobody's: the domain does not list the service
/// and a presence to a room is an error from a server that does not exist.
#[tokio::test]
async fn xep0045_off_by_default() {
    let node = start_node_with_users(|_| {}, &["alice"]).await;
    let mut alice = node.client("alice", PW, Some("laptop"));
    online(&mut alice).await;
    send(
        &mut alice,
        "<iq type='get' id='items' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
    )
    .await;
    let items = expect(&mut alice, 5, "the server's items", |e| {
        e.attr("id") == Some("items")
    })
    .await;
    assert_eq!(items.children().next().unwrap().children().count(), 0);
    enter(&mut alice, "Alice").await;
    let e = expect(&mut alice, 5, "the refusal", |e| {
        e.attr("type") == Some("error")
    })
    .await;
    assert_eq!(
        error_condition(&e).as_deref(),
        Some("remote-server-not-found")
    );
    node.node.shutdown().await;
}
