//! The generator's XMPP client side, on tokio-xmpp's stream layer (no reconnects, no
//! stream management: one plain session per simulated user, like the anchors' tool).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_xmpp::connect::AsyncReadAndWrite;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::{
    bind::BindQuery, iq::Iq, message::Message, presence::Presence, starttls,
};
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, StreamHeader, Timeouts, XmppStream, XmppStreamElement,
    initiate_stream,
};
use tokio_xmpp::{Stanza, client_login};

type Io = Box<dyn AsyncReadAndWrite>;

/// Filler so that a chat message is about 190 bytes on the wire, as in the anchors.
const PAD: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusm";

fn header(domain: &str) -> StreamHeader<'_> {
    StreamHeader {
        to: Some(Cow::Borrowed(domain)),
        from: None,
        id: None,
    }
}

/// Connects and, with `starttls`, upgrades to TLS; returns a stream after its header.
async fn connect(
    addr: &SocketAddr,
    domain: &str,
    starttls: bool,
) -> anyhow::Result<tokio_xmpp::xmlstream::PendingFeaturesRecv<Io>> {
    let tcp = TcpStream::connect(addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let timeouts = Timeouts::default();
    if !starttls {
        let io: Io = Box::new(BufStream::new(tcp));
        return Ok(initiate_stream(io, "jabber:client", header(domain), timeouts).await?);
    }
    let stream = initiate_stream(
        BufStream::new(tcp),
        "jabber:client",
        header(domain),
        timeouts,
    )
    .await?;
    let (features, mut stream) = stream
        .recv_features::<XmppStreamElement>()
        .await
        .map_err(|e| anyhow::anyhow!("features: {e:?}"))?;
    if !features.can_starttls() {
        bail!("the server offers no STARTTLS");
    }
    stream
        .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
            starttls::Request,
        )))
        .await?;
    loop {
        match stream.next().await {
            Some(Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)))) => break,
            Some(Ok(_)) => {}
            _ => bail!("no <proceed/>"),
        }
    }
    let tcp = stream.into_inner().into_inner();
    let config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny::new()))
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(domain.to_owned())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let io: Io = Box::new(BufStream::new(tls));
    Ok(initiate_stream(io, "jabber:client", header(domain), timeouts).await?)
}

/// The next element, skipping soft timeouts.
async fn next(stream: &mut XmppStream<Io>) -> anyhow::Result<XmppStreamElement> {
    loop {
        match stream.next().await {
            Some(Ok(FallibleStreamElement::Ok(el))) => return Ok(el),
            Some(Ok(_)) => continue,
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(e)) => bail!("stream: {e:?}"),
            None => bail!("stream closed"),
        }
    }
}

async fn send_stanza(stream: &mut XmppStream<Io>, stanza: impl Into<Stanza>) -> anyhow::Result<()> {
    stream
        .send(&XmppStreamElement::Stanza(stanza.into()))
        .await?;
    Ok(())
}

/// XEP-0077 registration; an existing account counts as done.
pub async fn register(
    addr: &SocketAddr,
    domain: &str,
    user: &str,
    password: &str,
    starttls: bool,
) -> anyhow::Result<()> {
    let stream = connect(addr, domain, starttls).await?;
    let (_, mut stream) = stream
        .recv_features::<FallibleStreamElement>()
        .await
        .map_err(|e| anyhow::anyhow!("features: {e:?}"))?;
    let el: Element = format!(
        "<iq xmlns='jabber:client' type='set' id='reg'><query xmlns='jabber:iq:register'><username>{user}</username><password>{password}</password></query></iq>"
    )
    .parse()?;
    send_stanza(&mut stream, Iq::try_from(el)?).await?;
    loop {
        if let XmppStreamElement::Stanza(Stanza::Iq(iq)) = next(&mut stream).await? {
            let el: Element = iq.into();
            return match el.attr("type") {
                Some("result") => Ok(()),
                _ if String::from(&el).contains("conflict") => Ok(()),
                _ => bail!("registration refused: {}", String::from(&el)),
            };
        }
    }
}

/// A logged-in session.
pub struct Session {
    stream: XmppStream<Io>,
}

/// A full login: connect, optional STARTTLS, SASL PLAIN, bind, initial presence, presence echo.
pub async fn login(
    addr: &SocketAddr,
    domain: &str,
    user: &str,
    password: &str,
    starttls: bool,
) -> anyhow::Result<Session> {
    let stream = connect(addr, domain, starttls).await?;
    let (features, stream) = stream
        .recv_features::<FallibleStreamElement>()
        .await
        .map_err(|e| anyhow::anyhow!("features: {e:?}"))?;
    if !features.sasl_mechanisms.contains("PLAIN") {
        bail!("the server offers no PLAIN: {:?}", features.sasl_mechanisms);
    }
    let creds = sasl::common::Credentials::default()
        .with_username(user)
        .with_password(password);
    let plain_only: BTreeSet<String> = ["PLAIN".to_owned()].into();
    let stream = client_login(stream, plain_only, creds).await?;
    let (_, mut stream) = stream
        .send_header(header(domain))
        .await?
        .recv_features::<FallibleStreamElement>()
        .await
        .map_err(|e| anyhow::anyhow!("features: {e:?}"))?;
    send_stanza(
        &mut stream,
        Iq::from_set("bind", BindQuery::new(Some("bench".into()))),
    )
    .await?;
    let jid = loop {
        if let XmppStreamElement::Stanza(Stanza::Iq(iq)) = next(&mut stream).await? {
            let el: Element = iq.into();
            let jid = el
                .get_child("bind", "urn:ietf:params:xml:ns:xmpp-bind")
                .and_then(|b| b.get_child("jid", "urn:ietf:params:xml:ns:xmpp-bind"))
                .map(|j| j.text())
                .context("bind failed")?;
            break Jid::new(&jid)?;
        }
    };
    // The legacy session IQ, as the anchors' scenario sends it.
    let el: Element = "<iq xmlns='jabber:client' type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>".parse()?;
    send_stanza(&mut stream, Iq::try_from(el)?).await?;
    send_stanza(&mut stream, Presence::available()).await?;
    loop {
        if let XmppStreamElement::Stanza(Stanza::Presence(p)) = next(&mut stream).await?
            && p.from.as_ref() == Some(&jid)
        {
            break;
        }
    }
    Ok(Session { stream })
}

impl Session {
    /// Closes the stream politely.
    pub async fn close(mut self) {
        let close = futures::SinkExt::<&XmppStreamElement>::close(&mut self.stream);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), close).await;
    }

    /// Enters the chat room `room` (XEP-0045) as `nick`, without history, and waits
    /// for its own presence from the room. With `create`, the room is expected to be
    /// new: it is opened with the default configuration (an instant room) and made
    /// big enough for `max_users` occupants.
    pub async fn enter_room(
        &mut self,
        room: &str,
        nick: &str,
        create: Option<usize>,
    ) -> anyhow::Result<()> {
        let presence: Element = format!(
            "<presence xmlns='jabber:client' to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
        )
        .parse()?;
        send_stanza(&mut self.stream, Presence::try_from(presence)?).await?;
        let own = format!("{room}/{nick}");
        loop {
            if let XmppStreamElement::Stanza(Stanza::Presence(p)) = next(&mut self.stream).await? {
                let el: Element = p.into();
                if el.attr("from") != Some(own.as_str()) {
                    continue;
                }
                if el.attr("type") == Some("error") {
                    bail!("{nick} could not enter {room}: {}", String::from(&el));
                }
                break;
            }
        }
        let Some(max_users) = create else {
            return Ok(());
        };
        let form: Element = format!(
            "<iq xmlns='jabber:client' type='set' id='open' to='{room}'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field><field var='muc#roomconfig_maxusers'><value>{max_users}</value></field><field var='muc#roomconfig_persistentroom'><value>0</value></field></x></query></iq>"
        )
        .parse()?;
        send_stanza(&mut self.stream, Iq::try_from(form)?).await?;
        loop {
            if let XmppStreamElement::Stanza(Stanza::Iq(iq)) = next(&mut self.stream).await? {
                let el: Element = iq.into();
                if el.attr("id") != Some("open") {
                    continue;
                }
                if el.attr("type") != Some("result") {
                    bail!("{room} was not opened: {}", String::from(&el));
                }
                return Ok(());
            }
        }
    }

    /// Reads and drops what comes until `stop` changes (or the stream ends), then
    /// gives the session back: while the others enter a room, those already in it
    /// read the presence they get, as a client does (a session left unread fills its
    /// queue on the server, which drops it as too slow).
    pub async fn drain(mut self, mut stop: tokio::sync::watch::Receiver<bool>) -> Session {
        loop {
            tokio::select! {
                _ = stop.changed() => return self,
                el = next(&mut self.stream) => {
                    if el.is_err() {
                        return self;
                    }
                }
            }
        }
    }

    /// In a room: sends a `groupchat` message for every `()` received on `rx`, and
    /// reports every benchmark message the room brings (its sender and send time in
    /// ns since start), its own included.
    pub async fn run_room(
        self,
        index: usize,
        room: String,
        rx: mpsc::Receiver<()>,
        on_delivery: impl Fn(usize, u64) + Send + 'static,
        start: Instant,
    ) {
        self.run(index, room, true, rx, on_delivery, start).await;
    }

    /// Sends a message to `peer` for every `()` received on `rx`, and reports every
    /// benchmark message received as `(sender index, send time in ns since start)`.
    pub async fn run_messages(
        self,
        index: usize,
        peer: String,
        rx: mpsc::Receiver<()>,
        on_delivery: impl Fn(usize, u64) + Send + 'static,
        start: Instant,
    ) {
        self.run(index, peer, false, rx, on_delivery, start).await;
    }

    async fn run(
        mut self,
        index: usize,
        to: String,
        groupchat: bool,
        mut rx: mpsc::Receiver<()>,
        on_delivery: impl Fn(usize, u64) + Send + 'static,
        start: Instant,
    ) {
        let Ok(to) = Jid::new(&to) else { return };
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    if cmd.is_none() {
                        return;
                    }
                    let sent = start.elapsed().as_nanos() as u64;
                    let message = if groupchat {
                        Message::groupchat(Some(to.clone()))
                    } else {
                        Message::chat(Some(to.clone()))
                    }
                    .with_body(Default::default(), format!("{index}.{sent}.{PAD}"));
                    if send_stanza(&mut self.stream, message).await.is_err() {
                        return;
                    }
                }
                el = next(&mut self.stream) => {
                    let Ok(el) = el else { return };
                    if let XmppStreamElement::Stanza(Stanza::Message(m)) = el
                        && let Some(body) = m.bodies.values().next()
                    {
                        let mut parts = body.splitn(3, '.');
                        if let (Some(Ok(sender)), Some(Ok(sent))) = (
                            parts.next().map(str::parse::<usize>),
                            parts.next().map(str::parse::<u64>),
                        ) {
                            on_delivery(sender, sent);
                        }
                    }
                }
            }
        }
    }
}

/// Accepts any server certificate: the generator only talks to loopback servers it
/// was pointed at, and measures them; it does not protect anything.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl AcceptAny {
    fn new() -> Self {
        AcceptAny(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
