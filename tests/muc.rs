//! Multi-user chat (XEP-0045) on one node, with real clients (tokio-xmpp).

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

mod support;

use support::*;
use tokio_xmpp::Stanza;
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

/// The role a room's presence gives its occupant.
fn role(el: &Element) -> Option<&str> {
    el.get_child("x", MUC_USER)?
        .get_child("item", MUC_USER)?
        .attr("role")
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

async fn ask(client: &mut tokio_xmpp::Client, id: &str, xml: &str) -> Element {
    send(client, xml).await;
    expect(client, 5, id, |e| e.attr("id") == Some(id)).await
}

/// An owner configures a room through its form (a password), kicks and bans an
/// occupant and destroys the room naming another; what a client without the standing
/// for it gets, and a banned user entering again.
#[tokio::test]
async fn xep0045_configuration_kicks_and_bans() {
    let node = start_node_with_users(|c| c.muc.enabled = true, &["alice", "bob"]).await;
    let mut alice = node.client("alice", PW, Some("laptop"));
    let mut bob = node.client("bob", PW, Some("phone"));
    for c in [&mut alice, &mut bob] {
        online(c).await;
        send(c, "<presence/>").await;
    }
    enter(&mut alice, "Alice").await;
    expect(&mut alice, 5, "alice's own presence", |e| {
        e.name() == "presence" && from_occupant(e, "Alice")
    })
    .await;

    // A reserved room (XEP-0045 §10.1.3): the form, then a password and a name.
    let form = ask(
        &mut alice,
        "form",
        &format!("<iq type='get' id='form' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#owner'/></iq>"),
    )
    .await;
    let x = form
        .get_child("query", "http://jabber.org/protocol/muc#owner")
        .and_then(|q| q.get_child("x", "jabber:x:data"))
        .unwrap();
    assert!(
        x.children()
            .any(|f| f.attr("var") == Some("muc#roomconfig_roomsecret")),
        "{}",
        String::from(&form)
    );
    let ok = ask(
        &mut alice,
        "config",
        &format!(
            "<iq type='set' id='config' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#owner'>\
             <x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
             <field var='muc#roomconfig_roomname'><value>Team</value></field>\
             <field var='muc#roomconfig_passwordprotectedroom'><value>1</value></field>\
             <field var='muc#roomconfig_roomsecret'><value>s3cret</value></field>\
             </x></query></iq>"
        ),
    )
    .await;
    assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));

    // Bob needs the password.
    enter(&mut bob, "Bob").await;
    let refused = expect(&mut bob, 5, "the refusal without a password", |e| {
        e.name() == "presence" && e.attr("type") == Some("error")
    })
    .await;
    assert_eq!(error_condition(&refused).as_deref(), Some("not-authorized"));
    let with_password = format!(
        "<presence to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'><password>s3cret</password></x></presence>"
    );
    send(&mut bob, &with_password).await;
    expect(&mut bob, 5, "bob in the room", |e| {
        e.name() == "presence" && from_occupant(e, "Bob") && status_codes(e) == ["110"]
    })
    .await;

    // Bob, a participant, may neither kick nor read the ban list.
    let e = ask(
        &mut bob,
        "bob-kicks",
        &format!("<iq type='set' id='bob-kicks' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#admin'><item nick='Alice' role='none'/></query></iq>"),
    )
    .await;
    assert_eq!(error_condition(&e).as_deref(), Some("forbidden"));
    let e = ask(
        &mut bob,
        "bob-lists",
        &format!("<iq type='get' id='bob-lists' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='outcast'/></query></iq>"),
    )
    .await;
    assert_eq!(error_condition(&e).as_deref(), Some("forbidden"));

    // XEP-0410: bob's self-ping says he is in the room.
    let pong = ask(
        &mut bob,
        "self-ping",
        &format!(
            "<iq type='get' id='self-ping' to='{ROOM}/Bob'><ping xmlns='urn:xmpp:ping'/></iq>"
        ),
    )
    .await;
    assert_eq!(pong.attr("type"), Some("result"), "{}", String::from(&pong));

    // Alice kicks him, with a reason: he may come back.
    let ok = ask(
        &mut alice,
        "kick",
        &format!("<iq type='set' id='kick' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#admin'><item nick='Bob' role='none'><reason>calm down</reason></item></query></iq>"),
    )
    .await;
    assert_eq!(ok.attr("type"), Some("result"));
    let kicked = expect(&mut bob, 5, "bob kicked", |e| {
        e.name() == "presence" && from_occupant(e, "Bob") && e.attr("type") == Some("unavailable")
    })
    .await;
    assert_eq!(status_codes(&kicked), ["307", "110"]);
    assert!(String::from(&kicked).contains("calm down"));
    // Out of the room, his self-ping says so.
    let e = ask(
        &mut bob,
        "self-ping-out",
        &format!(
            "<iq type='get' id='self-ping-out' to='{ROOM}/Bob'><ping xmlns='urn:xmpp:ping'/></iq>"
        ),
    )
    .await;
    assert_eq!(error_condition(&e).as_deref(), Some("not-acceptable"));
    send(&mut bob, &with_password).await;
    expect(&mut bob, 5, "bob back in the room", |e| {
        e.name() == "presence" && from_occupant(e, "Bob") && status_codes(e) == ["110"]
    })
    .await;

    // Alice bans him: out, and refused when he tries again.
    let ok = ask(
        &mut alice,
        "ban",
        &format!("<iq type='set' id='ban' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#admin'><item jid='bob@localhost' affiliation='outcast'/></query></iq>"),
    )
    .await;
    assert_eq!(ok.attr("type"), Some("result"));
    let banned = expect(&mut bob, 5, "bob banned", |e| {
        e.name() == "presence" && from_occupant(e, "Bob") && e.attr("type") == Some("unavailable")
    })
    .await;
    assert_eq!(status_codes(&banned), ["301", "110"]);
    send(&mut bob, &with_password).await;
    let refused = expect(&mut bob, 5, "the banned user refused", |e| {
        e.name() == "presence" && e.attr("type") == Some("error")
    })
    .await;
    assert_eq!(error_condition(&refused).as_deref(), Some("forbidden"));
    let list = ask(
        &mut alice,
        "outcasts",
        &format!("<iq type='get' id='outcasts' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='outcast'/></query></iq>"),
    )
    .await;
    assert!(
        String::from(&list).contains("bob@localhost"),
        "{}",
        String::from(&list)
    );

    // Alice destroys the room, naming another.
    let ok = ask(
        &mut alice,
        "destroy",
        &format!("<iq type='set' id='destroy' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#owner'><destroy jid='elsewhere@conference.localhost'><reason>moved</reason></destroy></query></iq>"),
    )
    .await;
    assert_eq!(ok.attr("type"), Some("result"));
    let gone = expect(&mut alice, 5, "the room destroyed", |e| {
        e.name() == "presence" && e.attr("type") == Some("unavailable")
    })
    .await;
    let destroy = gone
        .get_child("x", MUC_USER)
        .and_then(|x| x.get_child("destroy", MUC_USER))
        .unwrap();
    assert_eq!(destroy.attr("jid"), Some("elsewhere@conference.localhost"));
    let m = metrics(&node).await;
    assert!(m.contains("impmesh_muc_rooms 0\n"), "{m}");
    node.node.shutdown().await;
}

/// Mediated invitations (XEP-0045 §7.8.2): through the room to a user online and to
/// one offline (stored, delivered when she comes), and a decline back to the
/// inviter.
#[tokio::test]
async fn xep0045_invitations_and_declines() {
    let node = start_node_with_users(|c| c.muc.enabled = true, &["alice", "bob", "carol"]).await;
    let mut alice = node.client("alice", PW, Some("laptop"));
    let mut bob = node.client("bob", PW, Some("phone"));
    for c in [&mut alice, &mut bob] {
        online(c).await;
        send(c, "<presence/>").await;
    }
    enter(&mut alice, "Alice").await;
    expect(&mut alice, 5, "alice in the room", |e| {
        e.name() == "presence" && from_occupant(e, "Alice")
    })
    .await;
    send(
        &mut alice,
        &format!(
            "<message to='{ROOM}'><x xmlns='{MUC_USER}'>\
             <invite to='bob@localhost'><reason>standup</reason></invite>\
             <invite to='carol@localhost'/></x></message>"
        ),
    )
    .await;
    let invitation = expect(&mut bob, 5, "bob's invitation", |e| {
        e.name() == "message" && e.attr("from") == Some(ROOM)
    })
    .await;
    let invite = invitation
        .get_child("x", MUC_USER)
        .and_then(|x| x.get_child("invite", MUC_USER))
        .unwrap();
    assert_eq!(invite.attr("from"), Some("alice@localhost"));
    send(
        &mut bob,
        &format!(
            "<message to='{ROOM}'><x xmlns='{MUC_USER}'><decline to='alice@localhost'><reason>busy</reason></decline></x></message>"
        ),
    )
    .await;
    let declined = expect(&mut alice, 5, "bob's decline", |e| {
        e.name() == "message"
            && e.get_child("x", MUC_USER)
                .is_some_and(|x| x.get_child("decline", MUC_USER).is_some())
    })
    .await;
    assert!(String::from(&declined).contains("busy"));
    // Carol was offline: her invitation waited for her.
    let mut carol = node.client("carol", PW, Some("x"));
    online(&mut carol).await;
    send(&mut carol, "<presence/>").await;
    let invitation = expect(&mut carol, 5, "carol's stored invitation", |e| {
        e.name() == "message" && e.attr("from") == Some(ROOM)
    })
    .await;
    assert!(invitation.get_child("x", MUC_USER).is_some());
    node.node.shutdown().await;
}

/// A persistent room survives a restart: its name, subject and bans; a temporary
/// one does not.
#[tokio::test]
async fn xep0045_a_persistent_room_survives_a_restart() {
    let node =
        start_node_with_users(|c| c.muc.enabled = true, &["alice", "bob", "carol", "dave"]).await;
    let mut alice = node.client("alice", PW, Some("laptop"));
    online(&mut alice).await;
    send(&mut alice, "<presence/>").await;
    for (room, persistent) in [("team", "1"), ("chat", "0")] {
        send(
            &mut alice,
            &format!("<presence to='{room}@conference.localhost/Alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        )
        .await;
        let ok = ask(
            &mut alice,
            room,
            &format!(
                "<iq type='set' id='{room}' to='{room}@conference.localhost'><query xmlns='http://jabber.org/protocol/muc#owner'>\
                 <x xmlns='jabber:x:data' type='submit'>\
                 <field var='muc#roomconfig_roomname'><value>Room {room}</value></field>\
                 <field var='muc#roomconfig_persistentroom'><value>{persistent}</value></field>\
                 </x></query></iq>"
            ),
        )
        .await;
        assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
    }
    send(
        &mut alice,
        &format!("<message type='groupchat' to='{ROOM}'><subject>plans</subject></message>"),
    )
    .await;
    expect(&mut alice, 5, "the new subject", |e| {
        e.get_child("subject", "jabber:client")
            .is_some_and(|s| s.text() == "plans")
    })
    .await;
    let ok = ask(
        &mut alice,
        "ban",
        &format!("<iq type='set' id='ban' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#admin'><item jid='bob@localhost' affiliation='outcast'/></query></iq>"),
    )
    .await;
    assert_eq!(ok.attr("type"), Some("result"));
    // An avatar (XEP-0486), kept with the room.
    let ok = ask(
        &mut alice,
        "avatar",
        &format!("<iq type='set' id='avatar' to='{ROOM}'><vCard xmlns='vcard-temp'><PHOTO><TYPE>image/png</TYPE><BINVAL>aGVsbG8=</BINVAL></PHOTO></vCard></iq>"),
    )
    .await;
    assert_eq!(ok.attr("type"), Some("result"));
    alice.send_end().await.unwrap();
    // Carol registers with the room (XEP-0045 §7.10): the nick Caz is hers.
    let mut carol = node.client("carol", PW, Some("pc"));
    online(&mut carol).await;
    let form = ask(
        &mut carol,
        "form",
        &format!("<iq type='get' id='form' to='{ROOM}'><query xmlns='jabber:iq:register'/></iq>"),
    )
    .await;
    assert!(String::from(&form).contains("muc#register_roomnick"));
    let ok = ask(
        &mut carol,
        "register",
        &format!(
            "<iq type='set' id='register' to='{ROOM}'><query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>\
             <field var='muc#register_roomnick'><value>Caz</value></field></x></query></iq>"
        ),
    )
    .await;
    assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
    carol.send_end().await.unwrap();

    let node = node.restart().await;
    let m = metrics(&node).await;
    assert!(m.contains("impmesh_muc_rooms 1\n"), "{m}");
    let mut bob = node.client("bob", PW, Some("phone"));
    online(&mut bob).await;
    enter(&mut bob, "Bob").await;
    let refused = expect(&mut bob, 5, "the ban, still there", |e| {
        e.name() == "presence" && e.attr("type") == Some("error")
    })
    .await;
    assert_eq!(error_condition(&refused).as_deref(), Some("forbidden"));
    let mut alice = node.client("alice", PW, Some("laptop"));
    online(&mut alice).await;
    enter(&mut alice, "Alice").await;
    expect(&mut alice, 5, "the subject, still there", |e| {
        e.get_child("subject", "jabber:client")
            .is_some_and(|s| s.text() == "plans")
    })
    .await;
    let info = ask(
        &mut alice,
        "info",
        &format!("<iq type='get' id='info' to='{ROOM}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
    )
    .await;
    let xml = String::from(&info);
    assert!(
        xml.contains("Room team") && xml.contains("muc_persistent"),
        "{xml}"
    );
    // SHA-1 of "hello", the avatar's bytes.
    assert!(
        xml.contains("aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
        "{xml}"
    );
    // Carol's nick is still hers: Dave may not take it, and the room tells her.
    let mut dave = node.client("dave", PW, Some("x"));
    online(&mut dave).await;
    enter(&mut dave, "Caz").await;
    let refused = expect(&mut dave, 5, "the reserved nick", |e| {
        e.name() == "presence" && e.attr("type") == Some("error")
    })
    .await;
    assert_eq!(error_condition(&refused).as_deref(), Some("conflict"));
    let mut carol = node.client("carol", PW, Some("pc"));
    online(&mut carol).await;
    let nick = ask(
        &mut carol,
        "nick",
        &format!("<iq type='get' id='nick' to='{ROOM}'><query xmlns='http://jabber.org/protocol/disco#info' node='x-roomuser-item'/></iq>"),
    )
    .await;
    assert!(
        String::from(&nick).contains("name='Caz'"),
        "{}",
        String::from(&nick)
    );
    node.node.shutdown().await;
}

/// The chat service is on by default: the domain lists it. With `[muc] enabled =
/// false`, rooms are nobody's: the domain does not list the service and a presence to
/// a room is an error from a server that does not exist.
#[tokio::test]
async fn xep0045_on_by_default_and_off_when_turned_off() {
    let items = |node: TestNode| async move {
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
        let jids: Vec<String> = items
            .children()
            .next()
            .unwrap()
            .children()
            .filter_map(|i| i.attr("jid").map(str::to_owned))
            .collect();
        (node, alice, jids)
    };
    let (on, _, jids) = items(start_node_with_users(|_| {}, &["alice"]).await).await;
    assert_eq!(jids, ["conference.localhost"]);
    on.node.shutdown().await;

    let (node, mut alice, jids) =
        items(start_node_with_users(|c| c.muc.enabled = false, &["alice"]).await).await;
    assert!(jids.is_empty(), "{jids:?}");
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

/// Rooms are a directory of their own, synced between clusters beside users: a room
/// made on A is known to B (and user `team` of B is no obstacle); B's users enter it
/// there rather than getting a second room of that name; and two rooms of one
/// name made before the clusters knew of each other are settled by the documented
/// rule: the older stays, the other is destroyed, naming the winner's address.
#[tokio::test]
async fn rooms_are_in_every_clusters_directory_and_the_older_name_wins() {
    use impmesh_store::RoomHome;
    const A: &str = "cluster-a.example.com";
    const B: &str = "cluster-b.example.com";
    let a = mesh_cluster(A, &["alice"], |c| c.muc.enabled = true).await;
    let b = mesh_cluster(B, &["bob", "team"], |c| c.muc.enabled = true).await;
    let mut alice = a.client("alice", "pw", Some("laptop"));
    let mut bob = b.client("bob", "pw", Some("phone"));
    for c in [&mut alice, &mut bob] {
        online(c).await;
        send(c, "<presence/>").await;
    }
    let open = |id: &str, room: &str| {
        format!(
            "<iq type='set' id='{id}' to='{room}@conference.localhost'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>"
        )
    };
    // Both make room "dup" before they are peers: Alice's is the older.
    for (client, nick, id) in [(&mut alice, "Alice", "a-dup"), (&mut bob, "Bob", "b-dup")] {
        send(
            client,
            &format!("<presence to='dup@conference.localhost/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        )
        .await;
        expect(client, 5, "in the room", |e| {
            status_codes(e).contains(&"110".to_owned())
        })
        .await;
        send(client, &open(id, "dup")).await;
        expect(client, 5, "the room opened", |e| e.attr("id") == Some(id)).await;
    }
    for (node, cluster) in [(&a, A), (&b, B)] {
        let store = node.node.server.store.clone();
        eventually(5, "the room claimed in the directory", || async {
            store.room_home("dup").await.unwrap() != RoomHome::Unknown
        })
        .await;
        let listed = store.node_rooms(&node.config.node_name()).await.unwrap();
        assert_eq!(listed[0].home_cluster.as_str(), cluster);
    }
    // Alice makes "team" too.
    send(
        &mut alice,
        "<presence to='team@conference.localhost/Alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>",
    )
    .await;
    send(&mut alice, &open("a-team", "team")).await;
    expect(&mut alice, 5, "team opened", |e| {
        e.attr("id") == Some("a-team")
    })
    .await;

    peer_clusters(&a, &b, 1, 2).await;
    // B learns of A's rooms; its own "dup" is the younger and goes: Bob is told to
    // go to the same address, which is now A's room.
    let gone = expect(&mut bob, 10, "B's dup destroyed", |e| {
        e.name() == "presence"
            && e.attr("type") == Some("unavailable")
            && e.attr("from") == Some("dup@conference.localhost/Bob")
    })
    .await;
    let destroy = gone
        .get_child("x", MUC_USER)
        .and_then(|x| x.get_child("destroy", MUC_USER))
        .unwrap_or_else(|| panic!("{}", String::from(&gone)));
    assert_eq!(destroy.attr("jid"), Some("dup@conference.localhost"));
    assert!(
        destroy
            .get_child("reason", MUC_USER)
            .is_some_and(|r| r.text().contains(A)),
        "{}",
        String::from(&gone)
    );
    let store_b = b.node.server.store.clone();
    for room in ["dup", "team"] {
        eventually(10, "A's rooms known to B", || async {
            matches!(store_b.room_home(room).await.unwrap(), RoomHome::Remote { cluster, .. } if cluster == A)
        })
        .await;
    }
    // A keeps its "dup", and learns that B withdrew its own.
    let store_a = a.node.server.store.clone();
    eventually(10, "B's dup withdrawn", || async {
        store_a.remote_user_count(B).await.is_ok_and(|n| n == 2)
            && store_a.lost_rooms().await.unwrap().is_empty()
            && matches!(
                store_a.room_home("dup").await.unwrap(),
                RoomHome::Local { .. }
            )
    })
    .await;
    // User "team" of B is still user "team".
    assert!(store_a.remote_user("team").await.unwrap().len() == 1);
    // Bob enters A's room from B: no second room is made on B.
    send(
        &mut bob,
        "<presence to='team@conference.localhost/Bob'><x xmlns='http://jabber.org/protocol/muc'/></presence>",
    )
    .await;
    expect(&mut bob, 10, "in A's room", |e| {
        e.attr("from") == Some("team@conference.localhost/Bob")
            && status_codes(e).contains(&"110".to_owned())
    })
    .await;
    assert!(b.node.server.muc_room_list().unwrap().is_empty());
    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// Rooms go only to peers that announce the `rooms` feature: with it turned off on B,
/// neither lists its rooms to the other, and users sync as before.
#[tokio::test]
async fn rooms_are_listed_only_to_peers_that_announce_them() {
    use impmesh_store::RoomHome;
    const A: &str = "cluster-a.example.com";
    const B: &str = "cluster-b.example.com";
    let a = mesh_cluster(A, &["alice"], |c| c.muc.enabled = true).await;
    let b = mesh_cluster(B, &["bob"], |c| {
        c.muc.enabled = true;
        c.sync.disable_features = vec!["rooms".into()];
    })
    .await;
    for (node, user) in [(&a, "alice"), (&b, "bob")] {
        let mut client = node.client(user, "pw", Some("x"));
        online(&mut client).await;
        send(
            &mut client,
            &format!("<presence to='{user}room@conference.localhost/{user}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        )
        .await;
        expect(&mut client, 5, "in the room", |e| {
            status_codes(e).contains(&"110".to_owned())
        })
        .await;
        let store = node.node.server.store.clone();
        let room = format!("{user}room");
        eventually(5, "claimed", || async {
            store.room_home(&room).await.unwrap() != RoomHome::Unknown
        })
        .await;
    }
    peer_clusters(&a, &b, 1, 1).await;
    for (node, other, room) in [(&a, B, "bobroom"), (&b, A, "aliceroom")] {
        let store = node.node.server.store.clone();
        eventually(10, "synced", || async {
            store
                .peer_sync(other)
                .await
                .is_ok_and(|s| s.last_full_at.is_some())
        })
        .await;
        assert!(!store.peer_sync(other).await.unwrap().rooms);
        assert_eq!(store.room_home(room).await.unwrap(), RoomHome::Unknown);
    }
    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// A node whose chat service is turned off withdraws the rooms it served from the
/// room directory when it starts: their names are no one's any more.
#[tokio::test]
async fn a_node_without_the_service_withdraws_its_rooms() {
    use impmesh_store::RoomHome;
    let mut node = start_node_with_users(|c| c.muc.enabled = true, &["alice"]).await;
    let mut alice = node.client("alice", PW, Some("laptop"));
    online(&mut alice).await;
    enter(&mut alice, "Alice").await;
    expect(&mut alice, 5, "in", |e| {
        status_codes(e).contains(&"201".to_owned())
    })
    .await;
    let store = node.node.server.store.clone();
    eventually(5, "claimed", || async {
        store.room_home("team").await.unwrap() != RoomHome::Unknown
    })
    .await;
    drop(alice);
    node.config.muc.enabled = false;
    let node = node.restart().await;
    assert_eq!(
        node.node.server.store.room_home("team").await.unwrap(),
        RoomHome::Unknown
    );
    node.node.shutdown().await;
}

/// Occupants homed on B in a room homed on A: entering, talking both ways, private
/// messages, nick changes, IQs to the room and a kick cross the router links; each
/// broadcast crosses once for B, whatever the number of B's occupants; a cut link
/// takes B's occupants out with status 333, and they enter again when it is back.
#[tokio::test]
async fn rooms_of_another_cluster_are_entered_over_the_links() {
    const A: &str = "cluster-a.example.com";
    const B: &str = "cluster-b.example.com";
    const A_NODE: &str = "node1.cluster-a.example.com";
    let a = mesh_cluster(A, &["alice"], |c| c.muc.enabled = true).await;
    let b = mesh_cluster(B, &["bob", "carol"], |c| c.muc.enabled = true).await;
    peer_clusters(&a, &b, 1, 2).await;
    // A's link to B through a proxy the test can cut.
    let proxy = support::Proxy::start(b.node.links_addr.unwrap()).await;
    let store_a = a.node.server.store.clone();
    let b_node = b.config.node_name();
    let mut node = store_a.peer_node(&b_node).await.unwrap().unwrap();
    node.link_port = proxy.addr.port();
    store_a.set_peer_nodes(B, &[node]).await.unwrap();
    let mut alice = a.client("alice", "pw", Some("laptop"));
    let mut bob = b.client("bob", "pw", Some("phone"));
    let mut carol = b.client("carol", "pw", Some("desk"));
    for c in [&mut alice, &mut bob, &mut carol] {
        online(c).await;
        send(c, "<presence/>").await;
    }
    open_room(&mut alice, "Alice", &[]).await;
    room_known_remote(&b).await;

    // Bob and Carol enter from B; Alice sees them come.
    for (client, nick) in [(&mut bob, "Bob"), (&mut carol, "Carol")] {
        enter(client, nick).await;
        expect(client, 10, "Alice's presence in the room", |e| {
            from_occupant(e, "Alice") && e.name() == "presence"
        })
        .await;
        expect(client, 10, "own presence", |e| {
            from_occupant(e, nick) && status_codes(e).contains(&"110".to_owned())
        })
        .await;
        expect(&mut alice, 10, "the newcomer", |e| from_occupant(e, nick)).await;
    }
    let from_a = |b: &TestNode| {
        b.node
            .server
            .link_status()
            .into_iter()
            .find(|l| l.node == A_NODE && l.direction == impmesh_router::LinkDirection::In)
            .map(|l| l.stanzas)
            .unwrap_or_default()
    };

    // Alice talks: one stanza crosses to B, and both occupants there get it.
    let before = from_a(&b);
    say(&mut alice, "hello B").await;
    let mut ids = vec![];
    for client in [&mut bob, &mut carol] {
        let m = expect(client, 10, "Alice's message", |e| {
            from_occupant(e, "Alice") && body(e).as_deref() == Some("hello B")
        })
        .await;
        // XEP-0421: the room names Alice's account by one opaque id.
        let id = m
            .get_child("occupant-id", "urn:xmpp:occupant-id:0")
            .and_then(|o| o.attr("id"))
            .map(str::to_owned);
        ids.push(id.unwrap_or_else(|| panic!("{}", String::from(&m))));
    }
    assert_eq!(ids[0], ids[1]);
    assert!(!ids[0].contains("alice"));
    assert_eq!(
        from_a(&b) - before,
        1,
        "one broadcast for B's two occupants"
    );

    // Bob talks back, privately too, and asks the room's disco#info.
    say(&mut bob, "hi A").await;
    expect(&mut alice, 10, "Bob's message", |e| {
        from_occupant(e, "Bob") && body(e).as_deref() == Some("hi A")
    })
    .await;
    expect(&mut carol, 10, "Bob's message", |e| {
        from_occupant(e, "Bob") && body(e).as_deref() == Some("hi A")
    })
    .await;
    send(
        &mut bob,
        &format!("<message type='chat' to='{ROOM}/Alice'><body>psst</body></message>"),
    )
    .await;
    expect(&mut alice, 10, "the private message", |e| {
        from_occupant(e, "Bob") && body(e).as_deref() == Some("psst")
    })
    .await;
    send(
        &mut bob,
        &format!("<iq type='get' id='info' to='{ROOM}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
    )
    .await;
    let info = expect(&mut bob, 10, "the room's info", |e| {
        e.attr("id") == Some("info")
    })
    .await;
    assert_eq!(info.attr("type"), Some("result"), "{}", String::from(&info));

    // A nick change, seen on A.
    send(&mut bob, &format!("<presence to='{ROOM}/Robert'/>")).await;
    expect(&mut alice, 10, "303", |e| {
        from_occupant(e, "Bob") && status_codes(e).contains(&"303".to_owned())
    })
    .await;
    expect(&mut bob, 10, "own new nick", |e| {
        from_occupant(e, "Robert") && status_codes(e).contains(&"110".to_owned())
    })
    .await;

    // Alice kicks Carol.
    send(
        &mut alice,
        &format!("<iq type='set' id='kick' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#admin'><item nick='Carol' role='none'/></query></iq>"),
    )
    .await;
    expect(&mut carol, 10, "kicked", |e| {
        e.attr("type") == Some("unavailable") && status_codes(e).contains(&"307".to_owned())
    })
    .await;

    // The link from A to B goes: Bob is told he is out, with 333.
    proxy.cut_and_refuse();
    let out = expect(&mut bob, 15, "out with 333", |e| {
        e.attr("type") == Some("unavailable") && status_codes(e).contains(&"333".to_owned())
    })
    .await;
    assert_eq!(out.attr("from"), Some(&*format!("{ROOM}/Robert")));
    // It comes back; Bob's client enters again, as clients do after 333.
    proxy.restore();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        send(
            &mut bob,
            &format!("<presence to='{ROOM}/Robert'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        )
        .await;
        let back = collect(&mut bob, 1000, |e| {
            from_occupant(e, "Robert") && status_codes(e).contains(&"110".to_owned())
        })
        .await;
        if !back.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Bob not back in the room"
        );
    }
    assert_eq!(a.node.server.muc_room_list().unwrap().len(), 1);
    assert!(b.node.server.muc_room_list().unwrap().is_empty());
    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// Voice requests (XEP-0045 §7.13, §8.6) with real clients: a visitor of a moderated
/// room asks, the moderator gets the form, submits it approved, and the visitor
/// speaks.
#[tokio::test]
async fn xep0045_voice_requests() {
    let node = start_node_with_users(|c| c.muc.enabled = true, &["alice", "bob"]).await;
    let mut alice = node.client("alice", PW, Some("laptop"));
    let mut bob = node.client("bob", PW, Some("phone"));
    for c in [&mut alice, &mut bob] {
        online(c).await;
        send(c, "<presence/>").await;
    }
    open_room(
        &mut alice,
        "Alice",
        &[("muc#roomconfig_moderatedroom", "1")],
    )
    .await;
    enter(&mut bob, "Bob").await;
    let own = expect(&mut bob, 5, "in, as a visitor", |e| {
        from_occupant(e, "Bob") && status_codes(e).contains(&"110".to_owned())
    })
    .await;
    assert_eq!(role(&own), Some("visitor"), "{}", String::from(&own));
    send(
        &mut bob,
        &format!("<message to='{ROOM}'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field><field var='muc#role' type='list-single'><value>participant</value></field></x></message>"),
    )
    .await;
    let request = expect(&mut alice, 5, "the request", |e| {
        e.get_child("x", "jabber:x:data").is_some()
    })
    .await;
    assert_eq!(request.attr("from"), Some(ROOM));
    send(
        &mut alice,
        &format!("<message to='{ROOM}'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field><field var='muc#role'><value>participant</value></field><field var='muc#jid'><value>bob@localhost/phone</value></field><field var='muc#roomnick'><value>Bob</value></field><field var='muc#request_allow'><value>true</value></field></x></message>"),
    )
    .await;
    expect(&mut bob, 5, "voice", |e| {
        from_occupant(e, "Bob") && role(e) == Some("participant")
    })
    .await;
    say(&mut bob, "thanks").await;
    expect(&mut alice, 5, "Bob speaks", |e| {
        from_occupant(e, "Bob") && body(e).as_deref() == Some("thanks")
    })
    .await;
    node.node.shutdown().await;
}

/// `client` says `text` in the room `ROOM`.
async fn say(client: &mut tokio_xmpp::Client, text: &str) {
    send(
        client,
        &format!("<message type='groupchat' to='{ROOM}'><body>{text}</body></message>"),
    )
    .await;
}

/// Waits until `node`'s cluster knows that the room `ROOM` lives on another cluster.
async fn room_known_remote(node: &TestNode) {
    let store = node.node.server.store.clone();
    eventually(10, "the room known to another cluster", || async {
        matches!(
            store.room_home("team").await.unwrap(),
            impmesh_store::RoomHome::Remote { .. }
        )
    })
    .await;
}

/// Creates the room `ROOM` as `client`'s (entering as `nick`) and opens it with the
/// `muc#roomconfig` fields given (none: the default configuration, an instant room).
async fn open_room(client: &mut tokio_xmpp::Client, nick: &str, fields: &[(&str, &str)]) {
    enter(client, nick).await;
    expect(client, 5, "in, as the creator", |e| {
        status_codes(e).contains(&"201".to_owned())
    })
    .await;
    let mut form = String::new();
    if !fields.is_empty() {
        form.push_str("<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>");
        for (var, value) in fields {
            form.push_str(&format!(
                "<field var='{var}'><value>{value}</value></field>"
            ));
        }
    }
    let answer = ask(
        client,
        "open",
        &format!("<iq type='set' id='open' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'>{form}</x></query></iq>"),
    )
    .await;
    assert_eq!(
        answer.attr("type"),
        Some("result"),
        "{}",
        String::from(&answer)
    );
}

/// An occupant of another cluster flaps its presence 10,000 times and floods the room
/// with messages: the others see its allowance of presence changes and then its
/// newest status, its messages beyond the allowance are refused with
/// `resource-constraint` and counted, and the others still talk.
#[tokio::test]
async fn an_occupants_floods_are_held_to_its_allowance() {
    use std::cell::Cell;
    const A: &str = "cluster-a.example.com";
    const B: &str = "cluster-b.example.com";
    let a = mesh_cluster(A, &["alice"], |c| c.muc.enabled = true).await;
    let b = mesh_cluster(B, &["bob", "carol"], |c| {
        c.muc.enabled = true;
        // Bob's client may send as fast as it can: the room's limits are the test.
        c.limits.read_rate = 100_000_000;
    })
    .await;
    peer_clusters(&a, &b, 1, 2).await;
    let mut alice = a.client("alice", "pw", Some("laptop"));
    let mut bob = b.client("bob", "pw", Some("phone"));
    let mut carol = b.client("carol", "pw", Some("desk"));
    for c in [&mut alice, &mut bob, &mut carol] {
        online(c).await;
        send(c, "<presence/>").await;
    }
    open_room(&mut alice, "Alice", &[]).await;
    room_known_remote(&b).await;
    for (client, nick) in [(&mut bob, "Bob"), (&mut carol, "Carol")] {
        enter(client, nick).await;
        expect(client, 10, "own presence", |e| {
            from_occupant(e, nick) && status_codes(e).contains(&"110".to_owned())
        })
        .await;
        expect(&mut alice, 10, "the newcomer", |e| from_occupant(e, nick)).await;
    }

    // 10,000 changes of status, then one last.
    for i in 0..10_000 {
        let show = if i % 2 == 0 { "away" } else { "dnd" };
        send(
            &mut bob,
            &format!("<presence to='{ROOM}/Bob'><show>{show}</show></presence>"),
        )
        .await;
    }
    send(
        &mut bob,
        &format!("<presence to='{ROOM}/Bob'><show>xa</show></presence>"),
    )
    .await;
    // Carol is not held up by Bob.
    say(&mut carol, "still here").await;
    let seen = Cell::new(0);
    let last = |e: &Element| {
        e.get_child("show", "jabber:client")
            .is_some_and(|s| s.text() == "xa")
    };
    let counted = |e: &Element| {
        if from_occupant(e, "Bob") && e.name() == "presence" {
            seen.set(seen.get() + 1);
        }
    };
    expect(&mut alice, 30, "Carol's message", |e| {
        counted(e);
        from_occupant(e, "Carol") && body(e).as_deref() == Some("still here")
    })
    .await;
    expect(&mut alice, 30, "Bob's newest status", |e| {
        counted(e);
        from_occupant(e, "Bob") && last(e)
    })
    .await;
    // The burst (10, less the entry) and one every two seconds of the test.
    eprintln!("{} of Bob's presences", seen.get());
    assert!(seen.get() < 100, "{} of Bob's presences", seen.get());
    expect(&mut carol, 30, "Bob's newest status, on B", |e| {
        from_occupant(e, "Bob") && last(e)
    })
    .await;

    // 20 messages at once: 10 pass, the others are refused, and counted.
    for i in 0..20 {
        send(
            &mut bob,
            &format!(
                "<message type='groupchat' id='m{i}' to='{ROOM}'><body>spam {i}</body></message>"
            ),
        )
        .await;
    }
    let refused = expect(&mut bob, 10, "a refusal", |e| {
        e.attr("type") == Some("error") && e.name() == "message"
    })
    .await;
    assert_eq!(
        error_condition(&refused).as_deref(),
        Some("resource-constraint")
    );
    let mut metrics = String::new();
    a.node.server.stats.render(&mut metrics);
    assert!(
        metrics.contains("impmesh_muc_refused_total{limit=\"message_rate\"} "),
        "{metrics}"
    );
    assert!(
        !metrics.contains("impmesh_muc_refused_total{limit=\"message_rate\"} 0\n"),
        "{metrics}"
    );
    say(&mut alice, "calm down").await;
    expect(&mut carol, 10, "Alice's message", |e| {
        from_occupant(e, "Alice") && body(e).as_deref() == Some("calm down")
    })
    .await;
    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// A persistent room's archive (XEP-0313 on its address): each message carries the
/// room's stanza id (XEP-0359), and occupants on the room's cluster and on another
/// read the same archive under those ids; a session of another cluster outside the
/// room is refused; the archive goes with the room.
#[tokio::test]
async fn a_rooms_archive_is_read_from_both_clusters() {
    const A: &str = "cluster-a.example.com";
    const B: &str = "cluster-b.example.com";
    let a = mesh_cluster(A, &["alice"], |c| c.muc.enabled = true).await;
    let b = mesh_cluster(B, &["bob"], |c| c.muc.enabled = true).await;
    peer_clusters(&a, &b, 1, 1).await;
    let mut alice = a.client("alice", "pw", Some("laptop"));
    let mut bob = b.client("bob", "pw", Some("phone"));
    for c in [&mut alice, &mut bob] {
        online(c).await;
        send(c, "<presence/>").await;
    }
    open_room(
        &mut alice,
        "Alice",
        &[("muc#roomconfig_persistentroom", "1")],
    )
    .await;
    let info = ask(
        &mut alice,
        "info",
        &format!("<iq type='get' id='info' to='{ROOM}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
    )
    .await;
    let features: Vec<&str> = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap()
        .children()
        .filter_map(|f| f.attr("var"))
        .collect();
    assert!(features.contains(&"urn:xmpp:mam:2"), "{features:?}");
    room_known_remote(&b).await;
    enter(&mut bob, "Bob").await;
    expect(&mut bob, 10, "in", |e| {
        from_occupant(e, "Bob") && status_codes(e).contains(&"110".to_owned())
    })
    .await;
    let mut ids = vec![];
    for text in ["one", "two", "three"] {
        send(
            &mut alice,
            &format!("<message type='groupchat' to='{ROOM}'><body>{text}</body></message>"),
        )
        .await;
        let m = expect(&mut bob, 10, "Alice's message", |e| {
            from_occupant(e, "Alice") && body(e).as_deref() == Some(text)
        })
        .await;
        ids.push(stanza_id_by(&m, ROOM).expect("the room's stanza id"));
    }
    let expected: Vec<(String, String)> = ids
        .iter()
        .cloned()
        .zip(["one", "two", "three"].map(String::from))
        .collect();
    let room: tokio_xmpp::jid::Jid = ROOM.parse().unwrap();
    for client in [&mut alice, &mut bob] {
        let Stanza::Iq(iq) = mam_query_iq("q1", None, 10, None, None) else {
            unreachable!()
        };
        client
            .send_stanza(Stanza::Iq(iq.with_to(room.clone())))
            .await
            .unwrap();
        let (results, fin) = mam_results(client, "q1").await;
        assert_eq!(results, expected);
        assert!(fin.complete);
    }
    // XEP-0425: Bob may not retract Alice's message; Alice, a moderator, may, and
    // the archive keeps a tombstone in its place, then the retraction.
    let moderate = |id: &str, iq: &str| {
        format!(
            "<iq type='set' id='{iq}' to='{ROOM}'><moderate xmlns='urn:xmpp:message-moderate:1' id='{id}'><retract xmlns='urn:xmpp:message-retract:1'/><reason>off topic</reason></moderate></iq>"
        )
    };
    let refused = ask(&mut bob, "m1", &moderate(&ids[1], "m1")).await;
    assert_eq!(error_condition(&refused).as_deref(), Some("forbidden"));
    let done = ask(&mut alice, "m2", &moderate(&ids[1], "m2")).await;
    assert_eq!(done.attr("type"), Some("result"), "{}", String::from(&done));
    let retraction = expect(&mut bob, 10, "the retraction", |e| {
        e.get_child("retract", "urn:xmpp:message-retract:1")
            .is_some_and(|r| r.attr("id") == Some(ids[1].as_str()))
    })
    .await;
    assert_eq!(retraction.attr("from"), Some(ROOM));
    let unknown = ask(&mut alice, "m3", &moderate("no-such-id", "m3")).await;
    assert_eq!(error_condition(&unknown).as_deref(), Some("item-not-found"));
    let Stanza::Iq(iq) = mam_query_iq("q3", None, 10, None, None) else {
        unreachable!()
    };
    bob.send_stanza(Stanza::Iq(iq.with_to(room.clone())))
        .await
        .unwrap();
    let (results, _) = mam_results(&mut bob, "q3").await;
    let bodies: Vec<&str> = results.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(bodies, ["one", "", "three", ""]);
    assert_eq!(results[1].0, ids[1]);
    assert_eq!(
        Some(results[3].0.clone()),
        stanza_id_by(&retraction, ROOM),
        "the retraction is archived under its stanza id"
    );

    // XEP-0486: Alice gives the room an avatar; Bob on B is told (104), finds its
    // hash in the room's disco#info and reads the vCard over the link.
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
    let set = ask(
        &mut alice,
        "avatar",
        &format!("<iq type='set' id='avatar' to='{ROOM}'><vCard xmlns='vcard-temp'><PHOTO><TYPE>image/png</TYPE><BINVAL>{png}</BINVAL></PHOTO></vCard></iq>"),
    )
    .await;
    assert_eq!(set.attr("type"), Some("result"), "{}", String::from(&set));
    expect(&mut bob, 10, "the configuration change", |e| {
        e.attr("from") == Some(ROOM) && status_codes(e).contains(&"104".to_owned())
    })
    .await;
    let info = ask(
        &mut bob,
        "info-b",
        &format!("<iq type='get' id='info-b' to='{ROOM}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
    )
    .await;
    let hash = {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png)
            .unwrap();
        impmesh_router::core::avatar::sha1_hex(&bytes)
    };
    assert!(
        String::from(&info).contains(&hash),
        "{}",
        String::from(&info)
    );
    let card = ask(
        &mut bob,
        "vcard",
        &format!("<iq type='get' id='vcard' to='{ROOM}'><vCard xmlns='vcard-temp'/></iq>"),
    )
    .await;
    assert!(String::from(&card).contains(png), "{}", String::from(&card));

    // Bob leaves and enters again at once, before the room answered the leave: he
    // is in again, and the room's messages still reach him.
    send(
        &mut bob,
        &format!("<presence type='unavailable' to='{ROOM}/Bob'/>"),
    )
    .await;
    enter(&mut bob, "Bob").await;
    expect(&mut bob, 10, "in again", |e| {
        from_occupant(e, "Bob")
            && e.attr("type").is_none()
            && status_codes(e).contains(&"110".to_owned())
    })
    .await;
    say(&mut alice, "still with us").await;
    expect(&mut bob, 10, "Alice's message after the re-entry", |e| {
        body(e).as_deref() == Some("still with us")
    })
    .await;

    // Out of the room, Bob's cluster would drop the results: he is told so.
    send(
        &mut bob,
        &format!("<presence type='unavailable' to='{ROOM}/Bob'/>"),
    )
    .await;
    expect(&mut bob, 10, "out", |e| {
        from_occupant(e, "Bob") && e.attr("type") == Some("unavailable")
    })
    .await;
    let Stanza::Iq(iq) = mam_query_iq("q2", None, 10, None, None) else {
        unreachable!()
    };
    bob.send_stanza(Stanza::Iq(iq.with_to(room.clone())))
        .await
        .unwrap();
    let refused = expect(&mut bob, 10, "a refusal", |e| e.attr("id") == Some("q2")).await;
    assert_eq!(error_condition(&refused).as_deref(), Some("forbidden"));

    // The room goes, and its archive with it.
    ask(
        &mut alice,
        "destroy",
        &format!("<iq type='set' id='destroy' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#owner'><destroy/></query></iq>"),
    )
    .await;
    let store_a = a.node.server.store.clone();
    eventually(10, "the archive forgotten", || async {
        store_a.archive_bounds(ROOM).await.unwrap().is_none()
    })
    .await;
    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// A room on A with occupants homed on A, B and C (each cluster peered with the
/// others): a message from C reaches everyone, crossing to each other cluster once;
/// a private message goes from B to C through the room on A; a kick on A reaches C;
/// A's link to C goes down: C's occupants see 333 while B's keep talking; C's client
/// enters again once the link is back, and gets each message once.
#[tokio::test]
async fn a_room_serves_three_clusters() {
    const A: &str = "cluster-a.example.com";
    const B: &str = "cluster-b.example.com";
    const C: &str = "cluster-c.example.com";
    const A_NODE: &str = "node1.cluster-a.example.com";
    let a = mesh_cluster(A, &["alice"], |c| c.muc.enabled = true).await;
    let b = mesh_cluster(B, &["bob"], |c| c.muc.enabled = true).await;
    let c = mesh_cluster(C, &["carol", "dave"], |c| c.muc.enabled = true).await;
    peer_clusters(&a, &b, 1, 1).await;
    peer_clusters(&a, &c, 1, 2).await;
    peer_clusters(&b, &c, 1, 2).await;
    // A's link to C through a proxy the test can cut.
    let proxy = support::Proxy::start(c.node.links_addr.unwrap()).await;
    let store_a = a.node.server.store.clone();
    let mut c_node = store_a
        .peer_node(&c.config.node_name())
        .await
        .unwrap()
        .unwrap();
    c_node.link_port = proxy.addr.port();
    store_a.set_peer_nodes(C, &[c_node]).await.unwrap();

    let mut alice = a.client("alice", "pw", Some("laptop"));
    let mut bob = b.client("bob", "pw", Some("phone"));
    let mut carol = c.client("carol", "pw", Some("desk"));
    let mut dave = c.client("dave", "pw", Some("pc"));
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        online(client).await;
        send(client, "<presence/>").await;
    }
    open_room(&mut alice, "Alice", &[]).await;
    for other in [&b, &c] {
        room_known_remote(other).await;
    }
    for (client, nick) in [
        (&mut bob, "Bob"),
        (&mut carol, "Carol"),
        (&mut dave, "Dave"),
    ] {
        enter(client, nick).await;
        expect(client, 10, "own presence", |e| {
            from_occupant(e, nick) && status_codes(e).contains(&"110".to_owned())
        })
        .await;
        expect(&mut alice, 10, "the newcomer", |e| from_occupant(e, nick)).await;
    }
    let from_a = |node: &TestNode| {
        node.node
            .server
            .link_status()
            .into_iter()
            .find(|l| l.node == A_NODE && l.direction == impmesh_router::LinkDirection::In)
            .map(|l| l.stanzas)
            .unwrap_or_default()
    };

    // Carol (C) talks: everyone gets it, and it crosses to B once and to C once.
    let (to_b, to_c) = (from_a(&b), from_a(&c));
    say(&mut carol, "hello from C").await;
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        expect(client, 10, "Carol's message", |e| {
            from_occupant(e, "Carol") && body(e).as_deref() == Some("hello from C")
        })
        .await;
    }
    assert_eq!(from_a(&b) - to_b, 1, "one stanza to B");
    assert_eq!(
        from_a(&c) - to_c,
        1,
        "one stanza to C for its two occupants"
    );

    // Bob (B) whispers to Dave (C) through the room on A.
    send(
        &mut bob,
        &format!("<message type='chat' to='{ROOM}/Dave'><body>psst, Dave</body></message>"),
    )
    .await;
    expect(&mut dave, 10, "Bob's private message", |e| {
        from_occupant(e, "Bob") && body(e).as_deref() == Some("psst, Dave")
    })
    .await;

    // Alice kicks Dave: he and Carol see it on C.
    ask(
        &mut alice,
        "kick",
        &format!("<iq type='set' id='kick' to='{ROOM}'><query xmlns='http://jabber.org/protocol/muc#admin'><item nick='Dave' role='none'/></query></iq>"),
    )
    .await;
    for client in [&mut dave, &mut carol] {
        expect(client, 10, "Dave kicked", |e| {
            from_occupant(e, "Dave")
                && e.attr("type") == Some("unavailable")
                && status_codes(e).contains(&"307".to_owned())
        })
        .await;
    }

    // A's link to C goes: Carol is out with 333; Bob on B talks on with Alice.
    proxy.cut_and_refuse();
    expect(&mut carol, 15, "out with 333", |e| {
        e.attr("type") == Some("unavailable") && status_codes(e).contains(&"333".to_owned())
    })
    .await;
    say(&mut bob, "B is still here").await;
    expect(&mut alice, 10, "Bob's message while C is cut off", |e| {
        from_occupant(e, "Bob") && body(e).as_deref() == Some("B is still here")
    })
    .await;

    // The link is back: Carol's client enters again, as clients do after 333.
    proxy.restore();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        send(
            &mut carol,
            &format!("<presence to='{ROOM}/Carol'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"),
        )
        .await;
        let back = collect(&mut carol, 1000, |e| {
            from_occupant(e, "Carol")
                && e.attr("type").is_none()
                && status_codes(e).contains(&"110".to_owned())
        })
        .await;
        if !back.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Carol not back in the room"
        );
    }
    say(&mut alice, "welcome back").await;
    expect(&mut alice, 10, "own message", |e| {
        body(e).as_deref() == Some("welcome back")
    })
    .await;
    // Once, not twice: Bob's message is a sync point behind Alice's.
    say(&mut bob, "sync").await;
    let seen = std::cell::Cell::new(0);
    expect(&mut carol, 10, "Bob's sync message", |e| {
        if body(e).as_deref() == Some("welcome back") {
            seen.set(seen.get() + 1);
        }
        body(e).as_deref() == Some("sync")
    })
    .await;
    assert_eq!(seen.get(), 1, "Alice's message reached Carol once");
    for node in [a, b, c] {
        node.node.shutdown().await;
    }
}

/// XEP-0352 and XEP-0357 for an occupant homed on another cluster than the room's:
/// while its client is inactive, the room's presence and chat states wait (the latest
/// per occupant) until a message with a body brings them, and what the room says of
/// the client's own seat (status 110) goes out at once; while its session is
/// hibernated, each message of the room with a body wakes its app server, and a chat
/// state or a change of subject does not. (The client is driven by hand: tokio-xmpp
/// sends neither the CSI nonzas nor resumable stream management.)
#[tokio::test]
async fn an_occupant_across_the_mesh_gets_the_room_by_the_csi_and_push_rules() {
    const A: &str = "cluster-a.example.com";
    const B: &str = "cluster-b.example.com";
    let states = "http://jabber.org/protocol/chatstates";
    let a = mesh_cluster(A, &["alice"], |c| c.muc.enabled = true).await;
    let b = mesh_cluster(B, &["carol", "pushd"], |c| c.muc.enabled = true).await;
    b.add_user("bob", PW).await;
    peer_clusters(&a, &b, 1, 3).await;
    let mut alice = a.client("alice", "pw", Some("laptop"));
    let mut carol = b.client("carol", "pw", Some("desk"));
    let mut app = b.client("pushd", "pw", Some("app"));
    for c in [&mut alice, &mut carol, &mut app] {
        online(c).await;
        send(c, "<presence/>").await;
    }
    open_room(&mut alice, "Alice", &[]).await;
    room_known_remote(&b).await;

    // Bob's phone: resumable, with an app server that may show senders and bodies.
    let mut bob = RawClient::login(&b, "bob", "phone", false, None).await;
    bob.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await;
    bob.read_until("<enabled").await;
    bob.send(
        "<iq type='set' id='e'><enable xmlns='urn:xmpp:push:0' jid='pushd@localhost/app' node='n'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='include-body'><value>true</value></field>\
         <field var='include-sender'><value>true</value></field></x></enable></iq>",
    )
    .await;
    let enabled = bob.read_until("id='e'").await;
    assert!(!enabled.contains("type='error'"), "{enabled}");
    bob.send(&format!(
        "<presence to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    ))
    .await;
    bob.read_until("code='110'").await;
    // The subject is the last stanza of entering.
    bob.read_until("</message>").await;
    bob.send("<inactive xmlns='urn:xmpp:csi:0'/>").await;
    bob.sync_with_server("inactive").await;

    // What the room says of Bob's own seat does not wait: a change of nick.
    bob.send(&format!("<presence to='{ROOM}/Robert'/>")).await;
    let gone = bob.read_until("</presence>").await;
    assert!(
        gone.contains("type='unavailable'")
            && gone.contains("code='303'")
            && gone.contains("code='110'"),
        "{gone}"
    );
    let back = bob.read_until("</presence>").await;
    assert!(
        back.contains(&format!("from='{ROOM}/Robert'")) && back.contains("code='110'"),
        "{back}"
    );

    // Carol enters from B and types: both wait for Bob.
    enter(&mut carol, "Carol").await;
    expect(&mut carol, 10, "own presence", |e| {
        from_occupant(e, "Carol") && status_codes(e).contains(&"110".to_owned())
    })
    .await;
    for state in ["composing", "paused"] {
        send(
            &mut carol,
            &format!("<message type='groupchat' to='{ROOM}'><{state} xmlns='{states}'/></message>"),
        )
        .await;
    }
    expect(&mut carol, 10, "own chat state from the room", |e| {
        from_occupant(e, "Carol") && e.has_child("paused", states)
    })
    .await;
    // B handed the room's copies to Carol's session and Bob's together.
    let meanwhile = bob.sync_with_server("held").await;
    assert!(!meanwhile.contains("Carol"), "{meanwhile}");

    // Alice talks: what waited goes out first, the latest of each, in its order.
    say(&mut alice, "news").await;
    let before = bob.read_until("<body>news</body>").await;
    let presence = before.find(&format!("from='{ROOM}/Carol'"));
    let paused = before.find("<paused");
    assert!(!before.contains("<composing"), "{before}");
    assert!(
        presence.is_some() && paused.is_some() && presence < paused,
        "Carol's presence, then her latest chat state: {before}"
    );

    // Bob's connection drops: the message he never acknowledged wakes his phone, with
    // the room as its sender.
    drop(bob);
    let (from, _, fields, _) = notification(&mut app, "result").await;
    assert_eq!(from, "bob@localhost");
    assert_eq!(field(&fields, "message-count"), Some("1"));
    assert_eq!(field(&fields, "last-message-sender"), Some(ROOM));
    assert_eq!(field(&fields, "last-message-body"), Some("news"));
    // A chat state, a new subject and Bob's own message do not; the next message
    // does, and is counted as the second.
    send(
        &mut carol,
        &format!("<message type='groupchat' to='{ROOM}'><composing xmlns='{states}'/></message>"),
    )
    .await;
    send(
        &mut alice,
        &format!("<message type='groupchat' to='{ROOM}'><subject>Plans</subject></message>"),
    )
    .await;
    expect(&mut carol, 10, "the new subject", |e| {
        e.get_child("subject", "jabber:client")
            .is_some_and(|s| s.text() == "Plans")
    })
    .await;
    // Nor does Bob's own message, from his desk under the same nick.
    let mut desk = b.client("bob", PW, Some("desk"));
    online(&mut desk).await;
    send(
        &mut desk,
        &format!(
            "<presence to='{ROOM}/Robert'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
        ),
    )
    .await;
    expect(&mut desk, 10, "in, beside the phone", |e| {
        from_occupant(e, "Robert") && status_codes(e).contains(&"110".to_owned())
    })
    .await;
    say(&mut desk, "from my desk").await;
    expect(&mut desk, 10, "own message back", |e| {
        body(e).as_deref() == Some("from my desk")
    })
    .await;
    say(&mut alice, "wake up").await;
    let (_, _, fields, _) = notification(&mut app, "result").await;
    assert_eq!(field(&fields, "message-count"), Some("2"));
    assert_eq!(field(&fields, "last-message-body"), Some("wake up"));
}
