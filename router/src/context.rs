//! What a stanza handler gets: a narrow context, not the live session task.
//!
//! A handler (an IQ the server answers, a presence or a message from the client) sees
//! the session's handle (its full JID and presence state), the server's shared parts
//! (store, hub, configuration, limits; time is tokio's, so tests pause it), the session's
//! directed-presence targets, and an outbound sink for stanzas to its own client. It
//! never sees the connection, the stream-management window or the queue: the session
//! task builds a context per stanza, and afterwards writes what the handler produced
//! through its XEP-0198 count. So each handler is unit-tested without sockets (the
//! tests below), and the end-to-end tests prove the wiring.

use std::collections::HashSet;
use std::sync::Arc;

use jid::{FullJid, Jid};
use minidom::Element;

use crate::Server;
use crate::error::StanzaErrorCondition;
use crate::hub::SessionHandle;
use crate::stanza;

/// The narrow context of one handled stanza (module docs).
pub(crate) struct Context<'a> {
    pub(crate) server: &'a Arc<Server>,
    pub(crate) handle: &'a SessionHandle,
    /// Targets of directed presence (RFC 6121 §4.6); the session keeps the set.
    pub(crate) directed: &'a mut HashSet<Jid>,
    /// Stanzas for this session's own client, in order.
    out: Vec<Arc<str>>,
    /// The client sent initial presence: offline messages are due.
    offline_due: bool,
}

/// What a handler left for the session task to do.
pub(crate) struct Handled {
    /// Stanzas for the client, in order (each counted by stream management).
    pub out: Vec<Arc<str>>,
    /// Start handing out offline messages (XEP-0160, after initial presence).
    pub offline_due: bool,
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        server: &'a Arc<Server>,
        handle: &'a SessionHandle,
        directed: &'a mut HashSet<Jid>,
    ) -> Context<'a> {
        Context {
            server,
            handle,
            directed,
            out: Vec::new(),
            offline_due: false,
        }
    }

    pub(crate) fn finish(self) -> Handled {
        Handled {
            out: self.out,
            offline_due: self.offline_due,
        }
    }

    pub(crate) fn jid(&self) -> &FullJid {
        &self.handle.jid
    }

    /// The localpart of the session's user.
    pub(crate) fn user(&self) -> String {
        self.handle.user()
    }

    /// A stanza for this session's client.
    pub(crate) fn push_out(&mut self, stanza: Arc<str>) {
        self.out.push(stanza);
    }

    /// Sends a stanza to this session's own client.
    pub(crate) fn send_self(&mut self, element: &Element) {
        self.push_out(String::from(element).into());
    }

    /// An error reply to a stanza this session's client sent.
    pub(crate) fn reply_error(
        &mut self,
        stanza: &Element,
        condition: StanzaErrorCondition,
        text: Option<&str>,
    ) {
        if let Some(reply) = error_to(self.jid(), stanza, condition, text) {
            self.push_out(reply);
        }
    }

    /// Initial presence went out: offline messages are due.
    pub(crate) fn start_offline(&mut self) {
        self.offline_due = true;
    }
}

/// The error reply to `stanza`, addressed to the client at `jid` that sent it.
pub(crate) fn error_to(
    jid: &FullJid,
    stanza: &Element,
    condition: StanzaErrorCondition,
    text: Option<&str>,
) -> Option<Arc<str>> {
    let mut reply = crate::error::error_reply(stanza, condition, text)?;
    stanza::set_attr(&mut reply, "to", &jid.to_string());
    Some(String::from(&reply).into())
}

/// A server and a session handle without listeners or sockets, for handler tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use jid::FullJid;
    use minidom::Element;

    use crate::Server;
    use crate::config::RouterConfig;
    use crate::hub::{QueueLimits, SessionHandle};

    pub(crate) const DOMAIN: &str = "example.org";

    /// A router over a fresh SQLite store in `dir`, with `users` created.
    pub(crate) async fn server(
        dir: &std::path::Path,
        tweak: impl FnOnce(&mut RouterConfig),
        users: &[&str],
    ) -> Arc<Server> {
        let store = impmesh_store::Store::open("sqlite://test.db", dir)
            .await
            .unwrap();
        let mut config = RouterConfig::new(DOMAIN);
        tweak(&mut config);
        for user in users {
            store
                .add_user(impmesh_store::NewUser {
                    username: user,
                    password: "pw",
                    home_cluster: &config.cluster_name,
                    home_node: &config.node_name,
                })
                .await
                .unwrap();
        }
        let identity =
            impmesh_certs::NodeIdentity::load_or_generate(dir, &[DOMAIN.to_owned()]).unwrap();
        let tls = identity.server_config(&[]).unwrap();
        Server::new(config, store, tls.clone(), tls)
    }

    /// A registered session of `user` with resource `resource`.
    pub(crate) fn session(server: &Server, user: &str, resource: &str) -> Arc<SessionHandle> {
        let jid = FullJid::new(&format!("{user}@{DOMAIN}/{resource}")).unwrap();
        let limits = QueueLimits {
            stanzas: 64,
            bytes: 1 << 20,
        };
        let handle = Arc::new(SessionHandle::new(
            server.hub.next_session_id(),
            jid,
            limits,
        ));
        server
            .hub
            .register(handle.clone(), 16, Default::default())
            .unwrap();
        handle
    }

    /// Parses one stanza (the XML names its namespace).
    pub(crate) fn stanza(xml: &str) -> Element {
        xml.parse().unwrap()
    }
}

/// The handlers, each on its own: a server over a fresh SQLite store, a registered
/// session handle, no listener and no socket.
#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use jid::Jid;
    use minidom::Element;

    use super::testing::{DOMAIN, server, session, stanza};
    use super::{Context, Handled};
    use crate::core::envelope::Envelope;
    use crate::core::envelope::Type;
    use crate::iq::SERVER_FEATURES;
    use crate::xml::ns;

    /// Handles `xml` as sent by `handle`'s client, as the session task does.
    async fn handle(
        server: &std::sync::Arc<crate::Server>,
        handle: &crate::hub::SessionHandle,
        directed: &mut HashSet<Jid>,
        xml: &str,
    ) -> Handled {
        let mut element = stanza(xml);
        crate::stanza::set_attr(&mut element, "from", &handle.jid.to_string());
        let env = Envelope::parse(&element).unwrap();
        let mut cx = Context::new(server, handle, directed);
        match env.ty {
            Type::Message(_) => cx.on_message(element, env.to).await,
            Type::Presence(ty) => cx.on_presence(element, ty, env.to).await,
            Type::Iq(ty) => cx.on_iq(element, ty, env.to).await,
        }
        cx.finish()
    }

    /// The stanzas a handler left for the client, parsed.
    fn replies(handled: &Handled) -> Vec<Element> {
        handled
            .out
            .iter()
            .map(|x| {
                let wrapped: Element = format!("<w xmlns='{}'>{x}</w>", ns::CLIENT)
                    .parse()
                    .unwrap();
                wrapped.children().next().unwrap().clone()
            })
            .collect()
    }

    /// The one reply to a request: its type, and its error condition if any.
    fn answer(handled: &Handled) -> (String, Option<String>) {
        let replies = replies(handled);
        assert_eq!(replies.len(), 1, "{:?}", handled.out);
        let reply = &replies[0];
        let condition = reply
            .get_child("error", ns::CLIENT)
            .and_then(|e| e.children().next())
            .map(|c| c.name().to_owned());
        (reply.attr("type").unwrap_or_default().to_owned(), condition)
    }

    fn iq(ty: &str, id: &str, payload: &str) -> String {
        format!("<iq xmlns='jabber:client' type='{ty}' id='{id}'>{payload}</iq>")
    }

    #[tokio::test]
    async fn a_request_needs_an_id_and_exactly_one_payload() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}, &["alice"]).await;
        let alice = session(&server, "alice", "a");
        let mut directed = HashSet::new();
        let ping = "<ping xmlns='urn:xmpp:ping'/>";
        let no_id = format!("<iq xmlns='jabber:client' type='get'>{ping}</iq>");
        let two = iq("get", "2", &format!("{ping}{ping}"));
        for xml in [no_id, two] {
            let handled = handle(&server, &alice, &mut directed, &xml).await;
            assert_eq!(
                answer(&handled),
                ("error".into(), Some("bad-request".into()))
            );
        }
        let handled = handle(&server, &alice, &mut directed, &iq("get", "3", ping)).await;
        assert_eq!(answer(&handled), ("result".into(), None));
    }

    #[tokio::test]
    async fn the_server_lists_exactly_its_features_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}, &["alice"]).await;
        let alice = session(&server, "alice", "a");
        let mut directed = HashSet::new();
        let disco = format!(
            "<iq xmlns='jabber:client' type='get' id='d' to='{DOMAIN}'><query xmlns='{}'/></iq>",
            ns::DISCO_INFO
        );
        let handled = handle(&server, &alice, &mut directed, &disco).await;
        let listed = replies(&handled);
        let query = listed[0].get_child("query", ns::DISCO_INFO).unwrap();
        let features: Vec<&str> = query
            .children()
            .filter(|c| c.name() == "feature")
            .filter_map(|c| c.attr("var"))
            .collect();
        assert_eq!(features, SERVER_FEATURES);
        // The server's own capabilities (XEP-0115): the `ver` it announces is its
        // disco#info's, which it answers under `node#ver` too, and no other node.
        let ver = server.caps_ver().unwrap();
        assert_eq!(
            crate::core::caps::verified_features(query, &ver).map(|f| f.len()),
            Some(SERVER_FEATURES.len())
        );
        let node = format!("{}#{ver}", server.caps_node());
        let disco = format!(
            "<iq xmlns='jabber:client' type='get' id='n' to='{DOMAIN}'><query xmlns='{}' node='{node}'/></iq>",
            ns::DISCO_INFO
        );
        let handled = handle(&server, &alice, &mut directed, &disco).await;
        let answered = replies(&handled);
        let query = answered[0].get_child("query", ns::DISCO_INFO).unwrap();
        assert_eq!(query.attr("node"), Some(node.as_str()));
        assert!(crate::core::caps::verified_features(query, &ver).is_some());
        let other = disco.replace(&ver, "AAAA");
        let handled = handle(&server, &alice, &mut directed, &other).await;
        assert_eq!(
            answer(&handled),
            ("error".into(), Some("item-not-found".into()))
        );
        // External services (XEP-0215, the media relay) are not there yet: the
        // protocol's own refusal, not silence.
        let services = format!(
            "<iq xmlns='jabber:client' type='get' id='x' to='{DOMAIN}'><services xmlns='urn:xmpp:extdisco:2'/></iq>"
        );
        let handled = handle(&server, &alice, &mut directed, &services).await;
        assert_eq!(
            answer(&handled),
            ("error".into(), Some("service-unavailable".into()))
        );
        // Nor is HTTP upload on a node that does not listen for it.
        let upload = format!(
            "<iq xmlns='jabber:client' type='get' id='u' to='{DOMAIN}'><request xmlns='urn:xmpp:http:upload:0' filename='a.png' size='10'/></iq>"
        );
        let handled = handle(&server, &alice, &mut directed, &upload).await;
        assert_eq!(
            answer(&handled),
            ("error".into(), Some("service-unavailable".into()))
        );
        // The archive answers (its form).
        let mam = iq("get", "m", "<query xmlns='urn:xmpp:mam:2'/>");
        let handled = handle(&server, &alice, &mut directed, &mam).await;
        assert_eq!(answer(&handled), ("result".into(), None));
    }

    /// RFC 6121 §2.3–2.6 and XEP-0237: an item set is in the next get with a new
    /// version; a get with the current version is an empty result; removal of an
    /// unknown item is item-not-found.
    #[tokio::test]
    async fn roster_set_get_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}, &["alice", "bob"]).await;
        let alice = session(&server, "alice", "a");
        let mut directed = HashSet::new();
        let set = iq(
            "set",
            "s",
            &format!(
                "<query xmlns='{}'><item jid='bob@{DOMAIN}' name='Bob'><group>Friends</group></item></query>",
                ns::ROSTER
            ),
        );
        let handled = handle(&server, &alice, &mut directed, &set).await;
        assert_eq!(replies(&handled)[0].attr("type"), Some("result"));
        let get = iq("get", "g", &format!("<query xmlns='{}'/>", ns::ROSTER));
        let handled = handle(&server, &alice, &mut directed, &get).await;
        let reply = &replies(&handled)[0];
        let query = reply.get_child("query", ns::ROSTER).unwrap();
        let item = query.children().next().unwrap();
        assert_eq!(item.attr("jid"), Some(format!("bob@{DOMAIN}").as_str()));
        assert_eq!(item.attr("name"), Some("Bob"));
        assert_eq!(item.attr("subscription"), Some("none"));
        let ver = query.attr("ver").unwrap().to_owned();
        let current = iq(
            "get",
            "g2",
            &format!("<query xmlns='{}' ver='{ver}'/>", ns::ROSTER),
        );
        let handled = handle(&server, &alice, &mut directed, &current).await;
        let reply = &replies(&handled)[0];
        assert_eq!(reply.attr("type"), Some("result"));
        assert!(reply.children().next().is_none(), "{reply:?}");
        let remove = iq(
            "set",
            "r",
            &format!(
                "<query xmlns='{}'><item jid='carol@{DOMAIN}' subscription='remove'/></query>",
                ns::ROSTER
            ),
        );
        let handled = handle(&server, &alice, &mut directed, &remove).await;
        assert_eq!(
            answer(&handled),
            ("error".into(), Some("item-not-found".into()))
        );
    }

    /// XEP-0049 quota (limit 8): the 101st namespace is refused with
    /// resource-constraint and changes nothing; replacing a stored one still works.
    #[tokio::test]
    async fn private_storage_is_capped_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}, &["alice"]).await;
        let alice = session(&server, "alice", "a");
        let mut directed = HashSet::new();
        let store = |i: usize| {
            iq(
                "set",
                &format!("p{i}"),
                &format!(
                    "<query xmlns='{}'><data xmlns='urn:example:{i}'>v</data></query>",
                    ns::PRIVATE
                ),
            )
        };
        for i in 0..100 {
            let handled = handle(&server, &alice, &mut directed, &store(i)).await;
            assert_eq!(answer(&handled), ("result".into(), None), "item {i}");
        }
        let handled = handle(&server, &alice, &mut directed, &store(100)).await;
        assert_eq!(
            answer(&handled),
            ("error".into(), Some("resource-constraint".into()))
        );
        let handled = handle(&server, &alice, &mut directed, &store(7)).await;
        assert_eq!(answer(&handled), ("result".into(), None));
        assert_eq!(
            server
                .store
                .private_xml("alice", "urn:example:100")
                .await
                .unwrap(),
            None
        );
    }

    /// H5: the fourth XEP-0077 password change within the window is refused and
    /// changes nothing.
    #[tokio::test]
    async fn password_changes_are_limited_per_account() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}, &["alice"]).await;
        let alice = session(&server, "alice", "a");
        let mut directed = HashSet::new();
        for i in 0..4 {
            let change = iq(
                "set",
                &format!("c{i}"),
                &format!(
                    "<query xmlns='{}'><username>alice</username><password>new{i}</password></query>",
                    ns::REGISTER
                ),
            );
            let handled = handle(&server, &alice, &mut directed, &change).await;
            let expected = if i < 3 {
                ("result".into(), None)
            } else {
                ("error".into(), Some("resource-constraint".into()))
            };
            assert_eq!(answer(&handled), expected, "change {i}");
        }
        let record = server.store.user("alice").await.unwrap().unwrap();
        let verifier = Some(record.scram_sha256);
        assert!(server.store.check_password(verifier.clone(), "new2").await);
        assert!(!server.store.check_password(verifier, "new3").await);
    }

    /// RFC 6121 §8.5.2.2: a chat message to a user with no session is stored for
    /// later; the sender gets nothing back. A message to the domain itself is refused.
    #[tokio::test]
    async fn messages_are_stored_for_offline_users_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}, &["alice", "bob"]).await;
        let alice = session(&server, "alice", "a");
        let mut directed = HashSet::new();
        let chat = format!(
            "<message xmlns='jabber:client' type='chat' to='bob@{DOMAIN}'><body>hi</body></message>"
        );
        let handled = handle(&server, &alice, &mut directed, &chat).await;
        assert!(handled.out.is_empty(), "{:?}", handled.out);
        let stored = server.store.offline_messages("bob").await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(
            stored[0].stanza.contains("<body>hi</body>"),
            "{}",
            stored[0].stanza
        );
        let to_domain =
            format!("<message xmlns='jabber:client' to='{DOMAIN}'><body>hi</body></message>");
        let handled = handle(&server, &alice, &mut directed, &to_domain).await;
        assert_eq!(
            answer(&handled),
            ("error".into(), Some("service-unavailable".into()))
        );
    }

    /// Initial presence makes offline messages due (once); directed presence to a
    /// non-contact is remembered, so the target hears when the session ends.
    #[tokio::test]
    async fn presence_starts_offline_delivery_and_tracks_directed_targets() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), |_| {}, &["alice", "bob"]).await;
        let alice = session(&server, "alice", "a");
        let mut directed = HashSet::new();
        let handled = handle(
            &server,
            &alice,
            &mut directed,
            "<presence xmlns='jabber:client'/>",
        )
        .await;
        assert!(handled.offline_due);
        assert!(alice.presence().available);
        let handled = handle(
            &server,
            &alice,
            &mut directed,
            "<presence xmlns='jabber:client'><show>away</show></presence>",
        )
        .await;
        assert!(!handled.offline_due, "only initial presence starts it");
        let bob = format!("bob@{DOMAIN}/b");
        handle(
            &server,
            &alice,
            &mut directed,
            &format!("<presence xmlns='jabber:client' to='{bob}'/>"),
        )
        .await;
        assert!(directed.contains(&Jid::new(&bob).unwrap()));
        handle(
            &server,
            &alice,
            &mut directed,
            &format!("<presence xmlns='jabber:client' type='unavailable' to='{bob}'/>"),
        )
        .await;
        assert!(directed.is_empty());
    }
}
