//! Client-to-server stream negotiation (RFC 6120 §4–§7): stream headers, STARTTLS
//! (required on 5222; 5223 is TLS from the first byte, XEP-0368), SASL, then resource
//! binding or XEP-0198 resumption. The whole negotiation runs under the handshake
//! timeout; afterwards the connection becomes a session (`session.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use jid::{BareJid, FullJid};
use minidom::Element;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::Server;
use crate::conn::{Conn, ReadError, Transport};
use crate::core::negotiate::{
    self, AuthStep, Authenticated, BindStep, NeedAuth, NeedTls, Offer, Refusal, Request, Start,
};
use crate::error::StreamErrorCondition;
use crate::hub::{Control, QueueLimits, ResumeRequest, SessionHandle};
use crate::names::{normalize_username, random_id};
use crate::sasl::{self, Mechanism, SaslFailure};
use crate::session::Bound;
use crate::xml::{Frame, Header, ns};

/// Why negotiation ended without a session.
enum End {
    /// Close the stream with this error.
    Error(StreamErrorCondition, &'static str),
    /// The user is homed on another node: close with `see-other-host` naming it.
    Redirect(String),
    /// The peer went away, or the connection was handed to another task.
    Gone,
}

impl From<ReadError> for End {
    fn from(e: ReadError) -> End {
        match e {
            ReadError::Closed => End::Gone,
            ReadError::Stream(c) => End::Error(c, "the stream broke the XML rules of RFC 6120"),
        }
    }
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> End {
        End::Gone
    }
}

impl From<Refusal> for End {
    fn from(r: Refusal) -> End {
        End::Error(r.condition, r.text)
    }
}

/// Negotiation ended without a session; the connection, where one is left, to close.
struct Stopped {
    conn: Option<Conn>,
    end: End,
}

impl Stopped {
    fn with(conn: Conn) -> impl FnOnce(End) -> Stopped {
        move |end| Stopped {
            conn: Some(conn),
            end,
        }
    }

    fn gone() -> Stopped {
        Stopped {
            conn: None,
            end: End::Gone,
        }
    }
}

/// Runs one client connection until its stream is bound, then starts its session.
///
/// The session runs as a task of its own, and this one ends: an idle session is one
/// task holding its session and nothing else, the negotiation's state (connection
/// slots, TLS accept, the closing of a refused stream) gone with the task that held it
/// (DESIGN: memory per session is a budget).
///
/// `preauth` is the connection's place in its address's count of unauthenticated
/// streams: given back once the stream is bound (or ends). `admitted` is its place
/// among the node's connections: the session keeps it.
pub async fn handle(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    direct_tls: bool,
    preauth: impmesh_limits::AddressSlot,
    admitted: tokio::sync::OwnedSemaphorePermit,
) {
    let bound = negotiate_connection(&server, tcp, peer, direct_tls).await;
    drop(preauth);
    if let Some(bound) = bound {
        // Spawned as it is: an async block awaiting it would hold it twice.
        let session = crate::session::start(server.clone(), bound, admitted);
        server.tasks.spawn(session);
    }
}

/// TLS (for direct TLS), then negotiation; a refused stream is closed here.
async fn negotiate_connection(
    server: &Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    direct_tls: bool,
) -> Option<Bound> {
    let _ = tcp.set_nodelay(true);
    let limits = &server.config.limits;
    let start = negotiate::start(direct_tls, Instant::now(), limits.handshake_timeout);
    let transport = match &start {
        Start::NeedAuth(stage) => accept_tls(server, tcp, stage.deadline(), true).await?,
        Start::NeedTls(_) => Transport::Plain(tcp),
    };
    let mut conn = Conn::new(transport, peer, limits);
    if direct_tls {
        set_channel_binding(&mut conn);
    }
    let Stopped { conn, end } = match negotiate(server, conn, start).await {
        Ok(bound) => return Some(bound),
        Err(stopped) => stopped,
    };
    let conn = conn?;
    match end {
        End::Gone => {}
        End::Redirect(address) => {
            tracing::info!(%peer, %address, "client sent to its home node");
            let xml = StreamErrorCondition::see_other_host_xml(
                &address,
                Some("this account is homed on another node of the mesh"),
            );
            conn.close_with(xml, limits.close_timeout).await;
        }
        End::Error(condition, text) => {
            tracing::debug!(%peer, %condition, "closing stream during negotiation");
            conn.close(Some((condition, Some(text))), limits.close_timeout)
                .await;
        }
    }
    None
}

async fn accept_tls(
    server: &Server,
    tcp: TcpStream,
    deadline: Instant,
    direct: bool,
) -> Option<Transport> {
    let config = server.tls_config(direct);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let result = tokio::select! {
        r = timeout_at(deadline, acceptor.accept(tcp)) => r,
        _ = server.shutdown.cancelled() => return None,
    };
    server.stats.tls_handshake(matches!(result, Ok(Ok(_))));
    match result {
        Ok(Ok(tls)) => Some(Transport::Tls(Box::new(tls))),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

/// Computes the `tls-exporter` value (RFC 9266) on TLS 1.3 connections.
fn set_channel_binding(conn: &mut Conn) {
    if let Transport::Tls(tls) = &conn.io {
        let (_, session) = tls.get_ref();
        conn.channel_binding = impmesh_certs::tls_exporter(session).map(|e| e.to_vec());
    }
}

/// Reads the next frame before the deadline; a shutdown ends the negotiation with
/// `system-shutdown`.
async fn read(server: &Server, conn: &mut Conn, deadline: Instant) -> Result<Frame, End> {
    // A stream that waits here may be one of many abandoned before authentication:
    // it holds no parser scratch space while it waits (security review H3).
    conn.idle();
    tokio::select! {
        r = timeout_at(deadline, conn.next_frame()) => match r {
            Ok(frame) => Ok(frame?),
            Err(_) => Err(End::Error(
                StreamErrorCondition::ConnectionTimeout,
                "negotiation took too long",
            )),
        },
        _ = server.shutdown.cancelled() => Err(End::Error(
            StreamErrorCondition::SystemShutdown,
            "the server is shutting down",
        )),
    }
}

/// Reads the next top-level element of the negotiation and classifies it.
async fn next_request(
    server: &Server,
    conn: &mut Conn,
    deadline: Instant,
) -> Result<(Request, Element), End> {
    match read(server, conn, deadline).await? {
        Frame::Element(e) => {
            let request = Request::classify(e.name(), e.ns().as_str(), |n, x| e.has_child(n, x));
            Ok((request, e))
        }
        Frame::Footer | Frame::Header(_) => Err(End::Gone),
    }
}

/// A new stream (RFC 6120 §4.3): the client's header, ours, and this stage's features.
async fn open_stream(
    server: &Server,
    conn: &mut Conn,
    deadline: Instant,
    offer: Offer,
) -> Result<Vec<Mechanism>, End> {
    let domain = &server.config.domain;
    let header = match read(server, conn, deadline).await? {
        Frame::Header(h) => h,
        _ => return Err(End::Gone),
    };
    conn.send(&header_xml(domain, &random_id())).await?;
    check_header(&header, domain)?;
    let mechanisms = match offer {
        Offer::Sasl => offered_mechanisms(server, conn),
        _ => Vec::new(),
    };
    conn.send(&features_xml(server, offer, &mechanisms)).await?;
    Ok(mechanisms)
}

/// The negotiation, one typed stage after another: each phase takes its stage and
/// gives the next, so a step out of order does not compile (`core::negotiate`).
async fn negotiate(server: &Arc<Server>, conn: Conn, start: Start) -> Result<Bound, Stopped> {
    let (conn, stage) = match start {
        Start::NeedTls(stage) => starttls(server, conn, stage).await?,
        Start::NeedAuth(stage) => (conn, stage),
    };
    match authenticate_stream(server, conn, stage).await? {
        Authed::Sasl(conn, stage) => bind_or_resume(server, conn, stage, true).await,
        Authed::Sasl2(conn, stage) => bind_or_resume(server, conn, stage, false).await,
        Authed::Bound(bound) => Ok(bound),
        Authed::Resumed => Err(Stopped::gone()),
    }
}

/// How authentication ended.
enum Authed {
    /// RFC 6120 SASL: binding comes next, on a new stream.
    Sasl(Conn, Authenticated),
    /// SASL2 without Bind 2: binding comes next, on the same stream (its features
    /// were sent with the success).
    Sasl2(Conn, Authenticated),
    /// SASL2 with Bind 2: the session starts.
    Bound(Bound),
    /// SASL2 with an XEP-0198 resumption: the connection went to its session.
    Resumed,
}

/// Plain TCP: STARTTLS, then a TLS connection that authenticates next.
async fn starttls(
    server: &Server,
    mut conn: Conn,
    stage: NeedTls,
) -> Result<(Conn, NeedAuth), Stopped> {
    let deadline = stage.deadline();
    let asked = async {
        open_stream(server, &mut conn, deadline, stage.offer()).await?;
        let (request, _) = next_request(server, &mut conn, deadline).await?;
        stage.on(request, Instant::now())?;
        conn.send(&format!("<proceed xmlns='{}'/>", ns::TLS))
            .await?;
        Ok::<_, End>(())
    };
    if let Err(end) = asked.await {
        return Err(Stopped::with(conn)(end));
    }
    let Conn {
        io: Transport::Plain(tcp),
        peer,
        ..
    } = conn
    else {
        return Err(Stopped::gone());
    };
    let tls = accept_tls(server, tcp, deadline, false)
        .await
        .ok_or_else(Stopped::gone)?;
    let mut conn = Conn::new(tls, peer, &server.config.limits);
    set_channel_binding(&mut conn);
    Ok((conn, stage.secured()))
}

/// TLS up: SASL or SASL2 (and XEP-0077 registration where allowed) until one exchange
/// succeeds.
async fn authenticate_stream(
    server: &Arc<Server>,
    mut conn: Conn,
    mut stage: NeedAuth,
) -> Result<Authed, Stopped> {
    let deadline = stage.deadline();
    let mechanisms = match open_stream(server, &mut conn, deadline, stage.offer()).await {
        Ok(m) => m,
        Err(end) => return Err(Stopped::with(conn)(end)),
    };
    loop {
        let step = async {
            let (request, element) = next_request(server, &mut conn, deadline).await?;
            let step = stage.on(request, server.config.allow_registration, Instant::now())?;
            Ok::<_, End>((step, element))
        };
        let (step, element) = match step.await {
            Ok(step) => step,
            Err(end) => return Err(Stopped::with(conn)(end)),
        };
        let failed = match step {
            AuthStep::Authenticate => {
                match authenticate(server, &mut conn, &element, &mechanisms, deadline).await {
                    Ok(Some(user)) => {
                        conn.reset_stream(crate::xml::FrameLimits::authenticated(
                            server.config.limits.max_stanza_bytes,
                        ));
                        // Channel binding served SASL; the session has no use for it.
                        conn.channel_binding = None;
                        return Ok(Authed::Sasl(conn, stage.succeeded(user)));
                    }
                    Ok(None) => true,
                    Err(end) => return Err(Stopped::with(conn)(end)),
                }
            }
            AuthStep::Authenticate2 => {
                match run_sasl2(server, &mut conn, &element, &mechanisms, deadline).await {
                    Ok(Some(done)) => {
                        conn.set_limits(crate::xml::FrameLimits::authenticated(
                            server.config.limits.max_stanza_bytes,
                        ));
                        conn.channel_binding = None;
                        let stage = stage.succeeded(done.user.clone());
                        return finish_sasl2(server, conn, stage, done).await;
                    }
                    Ok(None) => true,
                    Err(end) => return Err(Stopped::with(conn)(end)),
                }
            }
            AuthStep::Register => {
                let reply =
                    crate::iq::register_unauthenticated(server, &element, conn.peer.ip()).await;
                if let Err(e) = conn.send(&reply).await {
                    return Err(Stopped::with(conn)(e.into()));
                }
                false
            }
        };
        if failed && let Err(refusal) = stage.failed() {
            return Err(Stopped::with(conn)(refusal.into()));
        }
    }
}

/// Authenticated: a resource bound (the stream becomes a session) or a session resumed
/// (the connection goes to it). `restart`: the client opens a new stream first (RFC
/// 6120 SASL; after SASL2 the features went out with the success).
async fn bind_or_resume(
    server: &Server,
    mut conn: Conn,
    stage: Authenticated,
    restart: bool,
) -> Result<Bound, Stopped> {
    let deadline = stage.deadline();
    if restart && let Err(end) = open_stream(server, &mut conn, deadline, stage.offer()).await {
        return Err(Stopped::with(conn)(end));
    }
    loop {
        let step = async {
            let (request, element) = next_request(server, &mut conn, deadline).await?;
            Ok::<_, End>((stage.on(request, Instant::now())?, element))
        };
        let (step, element) = match step.await {
            Ok(step) => step,
            Err(end) => return Err(Stopped::with(conn)(end)),
        };
        let sent = match step {
            BindStep::Bind => match try_bind(server, stage.user(), &element).await {
                Ok((handle, reply)) => {
                    if let Err(e) = conn.send(&reply).await {
                        abandon(server, &handle, None);
                        return Err(Stopped::with(conn)(e.into()));
                    }
                    return Ok(Bound {
                        conn,
                        handle,
                        inline: Default::default(),
                    });
                }
                Err(reply) => conn.send(&reply).await,
            },
            BindStep::Resume => {
                let previd = element.attr("previd").unwrap_or_default();
                let h = element.attr("h").and_then(|h| h.parse::<u32>().ok());
                match resume(server, conn, stage.user(), previd, h) {
                    None => return Err(Stopped::gone()),
                    Some(back) => {
                        conn = back;
                        failed_resume(&mut conn).await
                    }
                }
            }
            BindStep::EnableTooEarly => {
                conn.send(&format!(
                    "<failed xmlns='{}'><unexpected-request xmlns='{}'/></failed>",
                    ns::SM,
                    ns::STANZAS
                ))
                .await
            }
            BindStep::IqTooEarly => {
                let reply = crate::error::error_reply(
                    &element,
                    crate::error::StanzaErrorCondition::NotAllowed,
                    Some("bind a resource first"),
                );
                match reply {
                    Some(reply) => conn.send(&String::from(&reply)).await,
                    None => Ok(()),
                }
            }
        };
        if let Err(e) = sent {
            return Err(Stopped::with(conn)(e.into()));
        }
    }
}

/// A bind request: the session's handle, inbox and the reply to send, or an error
/// reply (the stream goes on).
#[allow(clippy::type_complexity)]
async fn try_bind(
    server: &Server,
    user: &str,
    element: &Element,
) -> Result<(Arc<SessionHandle>, String), String> {
    // The session's block list is cached for its life: a list that cannot be read
    // refuses the bind (the client retries) rather than blocking nothing (security
    // review L2).
    let Ok(blocked) = server.store.blocklist(user).await else {
        let reply = crate::error::error_reply(
            element,
            crate::error::StanzaErrorCondition::InternalServerError,
            Some("the server cannot read your block list; try again"),
        );
        return Err(reply.map(|r| String::from(&r)).unwrap_or_default());
    };
    bind(server, user, element, blocked.into_iter().collect())
}

/// RFC 6120 §4.7: `to` must name our domain (also after restarts: a stream cannot move
/// to another host), the version must be 1.0, and the default namespace `jabber:client`
/// (§4.9.3.10).
fn check_header(header: &Header, domain: &str) -> Result<(), End> {
    if header.default_ns.as_deref() != Some(ns::CLIENT) {
        return Err(End::Error(
            StreamErrorCondition::InvalidNamespace,
            "the default namespace of a client stream is jabber:client",
        ));
    }
    match header.version.as_deref() {
        Some(v) if v.split('.').next() == Some("1") => {}
        _ => {
            return Err(End::Error(
                StreamErrorCondition::UnsupportedVersion,
                "XMPP 1.0 streams only",
            ));
        }
    }
    let to = header.to.as_deref().unwrap_or_default();
    if !to.eq_ignore_ascii_case(domain) {
        return Err(End::Error(
            StreamErrorCondition::HostUnknown,
            "this server does not serve that domain",
        ));
    }
    Ok(())
}

fn header_xml(domain: &str, id: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' id='{id}' from='{}' version='1.0' xml:lang='en'>",
        ns::CLIENT,
        ns::STREAM,
        crate::xml::escape(domain)
    )
}

fn offered_mechanisms(server: &Server, conn: &Conn) -> Vec<Mechanism> {
    server
        .config
        .sasl_mechanisms
        .iter()
        .filter_map(|m| Mechanism::parse(m))
        .filter(|m| !m.is_plus() || conn.channel_binding.is_some())
        .collect()
}

fn features_xml(server: &Server, offer: Offer, mechanisms: &[Mechanism]) -> String {
    let mut out = String::from("<stream:features>");
    match offer {
        Offer::StartTls => {
            out.push_str(&format!(
                "<starttls xmlns='{}'><required/></starttls>",
                ns::TLS
            ));
        }
        Offer::Sasl => {
            out.push_str(&format!("<mechanisms xmlns='{}'>", ns::SASL));
            for m in mechanisms {
                out.push_str(&format!("<mechanism>{}</mechanism>", m.name()));
            }
            out.push_str("</mechanisms>");
            if !mechanisms.is_empty() {
                let names: Vec<&str> = mechanisms.iter().map(|m| m.name()).collect();
                out.push_str(&crate::core::sasl2::feature(
                    &names,
                    server.config.fast_token_lifetime.is_some(),
                ));
            }
            if mechanisms.iter().any(|m| m.is_plus()) {
                // XEP-0440: which channel-binding types the server supports.
                out.push_str(&format!(
                    "<sasl-channel-binding xmlns='{}'><channel-binding type='tls-exporter'/></sasl-channel-binding>",
                    ns::SASL_CB
                ));
            }
            if server.config.allow_registration {
                out.push_str(&format!("<register xmlns='{}'/>", ns::REGISTER_FEATURE));
            }
        }
        Offer::Bind => {
            out.push_str(&format!(
                "<bind xmlns='{}'/><session xmlns='{}'><optional/></session><sm xmlns='{}'/><ver xmlns='{}'/><csi xmlns='{}'/>",
                ns::BIND,
                ns::SESSION,
                ns::SM,
                ns::ROSTERVER,
                crate::core::csi::NS
            ));
            out.push_str(&server.caps_feature());
        }
    }
    out.push_str("</stream:features>");
    out
}

fn sasl_failure(failure: SaslFailure, text: Option<&str>) -> String {
    let text = text
        .map(|t| format!("<text xml:lang='en'>{}</text>", crate::xml::escape(t)))
        .unwrap_or_default();
    format!(
        "<failure xmlns='{}'><{}/>{text}</failure>",
        ns::SASL,
        failure.as_str()
    )
}

/// Decodes SASL element content (`=` stands for an empty response).
fn sasl_data(element: &Element) -> Result<Vec<u8>, SaslFailure> {
    let text = element.text();
    let text = text.trim();
    if text == "=" || text.is_empty() {
        return Ok(Vec::new());
    }
    B64.decode(text).map_err(|_| SaslFailure::IncorrectEncoding)
}

/// Checks an authorization identity: absent, or the user's own bare JID.
fn authzid_ok(authzid: Option<&str>, user: &str, domain: &str) -> bool {
    match authzid {
        None => true,
        Some(a) => BareJid::new(a).ok().is_some_and(|j| {
            j.node().map(|n| n.as_str()) == Some(user) && j.domain().as_str() == domain
        }),
    }
}

/// Runs one SASL exchange. `Ok(Some(user))` on success; `Ok(None)` after a failure was
/// sent (the client may try again).
async fn authenticate(
    server: &Arc<Server>,
    conn: &mut Conn,
    auth: &Element,
    offered: &[Mechanism],
    deadline: Instant,
) -> Result<Option<String>, End> {
    let ip = conn.peer.ip();
    let mechanism = auth.attr("mechanism").and_then(Mechanism::parse);
    let data = sasl_data(auth);
    let result = run_sasl(
        server,
        conn,
        Profile::Sasl,
        mechanism,
        data,
        offered,
        deadline,
    )
    .await?;
    match result {
        Ok((user, additional, _)) => {
            tracing::info!(%user, peer = %conn.peer, "authenticated");
            server.release_login(ip, &user);
            server.stats.login(true);
            // RFC 6120 §6.3.10: SCRAM's server-final-message rides in <success/>.
            let success = match additional {
                Some(data) => format!(
                    "<success xmlns='{}'>{}</success>",
                    ns::SASL,
                    B64.encode(data)
                ),
                None => format!("<success xmlns='{}'/>", ns::SASL),
            };
            conn.send(&success).await?;
            Ok(Some(user))
        }
        Err((failure, text)) => {
            // The attempt was counted when it began (an abort after the challenge
            // included: the salt was the answer).
            server.stats.login(false);
            tracing::info!(peer = %conn.peer, failure = failure.as_str(), "authentication failed");
            conn.send(&sasl_failure(failure, text)).await?;
            Ok(None)
        }
    }
}

/// The most clients of one account that hold FAST tokens: a new one beyond it takes
/// the place of the client whose tokens expire first.
const MAX_FAST_CLIENTS: usize = 32;

/// A SASL2 exchange that succeeded, and what the client asked for with it.
struct Sasl2Done {
    user: String,
    request: crate::core::sasl2::Authenticate,
    /// The mechanism's final data.
    additional: Option<Vec<u8>>,
    /// The FAST token logged in with: when it was issued, when it expires.
    used: Option<(i64, i64)>,
    /// The account's credentials as read when the exchange began.
    stamp: String,
}

/// Runs one SASL2 exchange (XEP-0388): a password mechanism, or a FAST token
/// (XEP-0484). `Ok(None)` after a failure was sent (the client may try again).
async fn run_sasl2(
    server: &Arc<Server>,
    conn: &mut Conn,
    element: &Element,
    offered: &[Mechanism],
    deadline: Instant,
) -> Result<Option<Sasl2Done>, End> {
    use crate::core::sasl2;
    let ip = conn.peer.ip();
    let result = match sasl2::parse(element) {
        Err(f) => Err((f, None)),
        Ok(request) => {
            let outcome = if request.mechanism == sasl2::HT_SHA_256_NONE
                && server.config.fast_token_lifetime.is_some()
            {
                fast_login(server, conn, &request).await?
            } else {
                let mechanism = Mechanism::parse(&request.mechanism);
                let data = Ok(request.initial_response.clone().unwrap_or_default());
                let profile = Profile::Sasl2;
                run_sasl(server, conn, profile, mechanism, data, offered, deadline)
                    .await?
                    .map(|(user, additional, stamp)| (user, additional, None, stamp))
            };
            outcome.map(|done| (done, request))
        }
    };
    match result {
        Ok(((user, additional, used, stamp), request)) => {
            tracing::info!(%user, peer = %conn.peer, fast = used.is_some(), "authenticated (SASL2)");
            server.release_login(ip, &user);
            server.stats.login(true);
            Ok(Some(Sasl2Done {
                user,
                request,
                additional,
                used,
                stamp,
            }))
        }
        Err((failure, text)) => {
            server.stats.login(false);
            tracing::info!(peer = %conn.peer, failure = failure.as_str(), "authentication failed (SASL2)");
            conn.send(&sasl2::failure(failure, text)).await?;
            Ok(None)
        }
    }
}

/// A FAST login: the user, the responder proof, the token's issue and expiry times,
/// and the account's credentials; or why it failed.
type FastResult = Result<
    (String, Option<Vec<u8>>, Option<(i64, i64)>, String),
    (SaslFailure, Option<&'static str>),
>;

/// `HT-SHA-256-NONE` with a token this client was given (XEP-0484 §4.3). The attempt
/// counts against the address and the account as a password's does.
async fn fast_login(
    server: &Arc<Server>,
    conn: &Conn,
    request: &crate::core::sasl2::Authenticate,
) -> Result<FastResult, End> {
    use crate::core::sasl2;
    use impmesh_store::FastCheck;
    let ip = conn.peer.ip();
    if request.fast.is_none() {
        return Ok(Err((
            SaslFailure::InvalidMechanism,
            Some("a FAST mechanism goes with <fast xmlns='urn:xmpp:fast:0'/>"),
        )));
    }
    let Some(client) = request.user_agent.id.as_deref() else {
        return Ok(Err((
            SaslFailure::NotAuthorized,
            Some("FAST tokens belong to a client: send <user-agent id='...'/>"),
        )));
    };
    if server.login_blocked(ip) {
        return Ok(Err(too_many_logins()));
    }
    let data = request.initial_response.as_deref().unwrap_or_default();
    let (name, proof) = match sasl2::ht_response(data) {
        Ok(parts) => parts,
        Err(f) => return Ok(Err((f, None))),
    };
    let Some(user) = normalize_username(&name, &server.config.domain) else {
        return Ok(Err((SaslFailure::NotAuthorized, None)));
    };
    if !server.reserve_login(ip, &user) {
        return Ok(Err(too_many_logins()));
    }
    // The same reads for every name, whether it exists or not (no timing oracle);
    // only a proof that matches leads to a write.
    let now = impmesh_store::now_unix();
    let record = server.store.user(&user).await;
    let checked = server
        .store
        .fast_use(&user, client, sasl2::HT_SHA_256_NONE, &proof, now)
        .await;
    let (Ok(record), Ok(checked)) = (record, checked) else {
        server.release_login(ip, &user);
        return Ok(Err(store_failed()));
    };
    Ok(match (checked, record) {
        (
            FastCheck::Valid {
                responder,
                issued,
                expires,
            },
            Some(record),
        ) => Ok((
            user,
            B64.decode(responder).ok(),
            Some((issued, expires)),
            record.scram_sha256.encode(),
        )),
        (FastCheck::Expired, _) => Err((
            SaslFailure::CredentialsExpired,
            Some("the token has expired; log in with the password"),
        )),
        (_, None) => {
            if let Some(address) = server.client_address_of_home(&user).await {
                server.release_login(ip, &user);
                return Err(End::Redirect(address));
            }
            Err((SaslFailure::NotAuthorized, None))
        }
        (FastCheck::Unknown, Some(_)) => Err((SaslFailure::NotAuthorized, None)),
    })
}

/// After a successful SASL2 exchange: revokes the token used if the client asked
/// (`invalidate`), and issues a new one when asked for or when the one used is past
/// half its life. Returns the `<token/>` element, or nothing. Called once what the
/// success answers can no longer fail, just before it is sent.
async fn fast_token(server: &Server, done: &Sasl2Done) -> String {
    use crate::core::sasl2;
    let Sasl2Done {
        user,
        request,
        used,
        stamp,
        ..
    } = done;
    let (Some(lifetime), Some(client)) = (
        server.config.fast_token_lifetime,
        request.user_agent.id.as_deref(),
    ) else {
        return String::new();
    };
    let now = impmesh_store::now_unix();
    let invalidate = request.fast == Some(true) && used.is_some();
    if invalidate && let Err(e) = server.store.fast_revoke(user, Some(client)).await {
        tracing::warn!(%user, error = %e, "could not revoke a FAST token");
    }
    let requested = request.request_token.as_deref() == Some(sasl2::HT_SHA_256_NONE);
    let rotate = !invalidate && used.is_some_and(|(i, e)| sasl2::rotation_due(i, e, now));
    if !requested && !rotate {
        return String::new();
    }
    let token = sasl2::IssuedToken::generate();
    let expires = now.saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX));
    let new = impmesh_store::NewFastToken {
        owner: user,
        client,
        mechanism: sasl2::HT_SHA_256_NONE,
        initiator: &token.initiator,
        responder: &token.responder,
        software: &request.user_agent.software,
        device: &request.user_agent.device,
        issued: now,
        expires,
        credentials: stamp,
    };
    match server.store.fast_issue(&new, MAX_FAST_CLIENTS).await {
        Ok(true) => token.xml(expires),
        Ok(false) => String::new(),
        Err(e) => {
            tracing::warn!(%user, error = %e, "could not store a FAST token");
            String::new()
        }
    }
}

/// After a SASL2 success, what the client asked for inline, in XEP-0386's order: an
/// XEP-0198 resumption (the connection goes to its session), else a Bind 2 request
/// (the session starts), else the features for binding on the same stream.
async fn finish_sasl2(
    server: &Arc<Server>,
    mut conn: Conn,
    stage: Authenticated,
    done: Sasl2Done,
) -> Result<Authed, Stopped> {
    use crate::core::sasl2;
    let mut completion = sasl2::Completion {
        additional: done.additional.clone(),
        extra: String::new(),
        features: format!(
            "<stream:features>{}</stream:features>",
            server.caps_feature()
        ),
    };
    let mut inner = String::new();
    let mut token_due = true;
    if let Some(r) = &done.request.resume {
        // The session sends the success: the token goes with it.
        completion.extra = fast_token(server, &done).await;
        token_due = false;
        let deadline = stage.deadline();
        match resume_inline(server, conn, &done.user, r, completion, deadline).await {
            Ok(()) => return Ok(Authed::Resumed),
            Err((back, given_back)) => {
                conn = back;
                completion = given_back;
                inner.push_str(&crate::session::sm_failed("item-not-found"));
            }
        }
    }
    let user = &done.user;
    let Some(bind) = &done.request.bind else {
        if token_due {
            completion.extra = fast_token(server, &done).await;
        }
        let bare = format!("{user}@{}", server.config.domain);
        let mut out = sasl2::success(
            completion.additional.as_deref(),
            &bare,
            &format!("{inner}{}", completion.extra),
        );
        out.push_str(&features_xml(server, Offer::Bind, &[]));
        if let Err(e) = conn.send(&out).await {
            return Err(Stopped::with(conn)(e.into()));
        }
        return Ok(Authed::Sasl2(conn, stage));
    };
    let key = match server.bind_key().await {
        Ok(key) => key,
        Err(_) => return Err(Stopped::with(conn)(bind_unavailable())),
    };
    let resource = sasl2::resource(
        key,
        user,
        done.request.user_agent.id.as_deref(),
        bind.tag.as_deref(),
    );
    // As for RFC 6120 binding: a block list that cannot be read refuses the bind.
    let Ok(blocked) = server.store.blocklist(user).await else {
        return Err(Stopped::with(conn)(bind_unavailable()));
    };
    let handle = match bind_resource(server, user, &resource, blocked.into_iter().collect()) {
        Ok(handle) => handle,
        Err((_, text)) => {
            return Err(Stopped::with(conn)(End::Error(
                StreamErrorCondition::ResourceConstraint,
                text,
            )));
        }
    };
    if bind.carbons {
        crate::hub::lock(&handle.state).carbons = true;
    }
    let mut inline = crate::session::Inline {
        sm: None,
        inactive: bind.inactive,
    };
    inner.push_str(&format!("<bound xmlns='{}'>", sasl2::BIND2));
    if let Some(resumable) = bind.sm {
        let id = random_id();
        if resumable {
            server.hub.add_resumable(&id, handle.clone());
        }
        let max = server.config.limits.resume_timeout.as_secs();
        inner.push_str(&crate::session::sm_enabled(&id, resumable, max));
        inline.sm = Some((id, resumable));
    }
    // XEP-0386 §3: where the archive stands as the session starts, so the client
    // knows what to fetch: what waits for the writer is stored first, as for a query
    // (left out if the store cannot say).
    if server.config.archive.enabled {
        server.archive_flush().await;
        if let Ok(metadata) = server.archive_metadata(user).await {
            inner.push_str(&metadata);
        }
    }
    inner.push_str("</bound>");
    if token_due {
        completion.extra = fast_token(server, &done).await;
    }
    let out = completion.bound(&handle.jid.to_string(), &inner);
    if let Err(e) = conn.send(&out).await {
        let resumable = inline.sm.as_ref().map(|(id, _)| id.as_str());
        abandon(server, &handle, resumable);
        return Err(Stopped::with(conn)(e.into()));
    }
    tracing::debug!(jid = %handle.jid, "bound inline (Bind 2)");
    Ok(Authed::Bound(Bound {
        conn,
        handle,
        inline,
    }))
}

/// The store cannot be read while binding: the client logs in again.
fn bind_unavailable() -> End {
    End::Error(
        StreamErrorCondition::InternalServerError,
        "the server cannot start a session right now; try again",
    )
}

/// The user and any additional success data, or why it failed.
/// The user, any additional success data, and the account's credentials as read when
/// the exchange began (see [`impmesh_store::NewFastToken::credentials`]); or why it
/// failed.
type SaslResult = Result<(String, Option<Vec<u8>>, String), (SaslFailure, Option<&'static str>)>;

/// Which SASL profile an exchange runs in: RFC 6120's, or XEP-0388's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    Sasl,
    Sasl2,
}

impl Profile {
    fn ns(self) -> &'static str {
        match self {
            Profile::Sasl => ns::SASL,
            Profile::Sasl2 => crate::core::sasl2::NS,
        }
    }

    fn challenge(self, data: &[u8]) -> String {
        match self {
            // RFC 6120 §6.4.2: `=` stands for empty data.
            Profile::Sasl if data.is_empty() => {
                format!("<challenge xmlns='{}'>=</challenge>", ns::SASL)
            }
            Profile::Sasl => format!(
                "<challenge xmlns='{}'>{}</challenge>",
                ns::SASL,
                B64.encode(data)
            ),
            Profile::Sasl2 => crate::core::sasl2::challenge(data),
        }
    }
}

/// Runs a password mechanism: `mechanism` as the client named it (`None`: unknown),
/// `data` its initial response (empty for none).
async fn run_sasl(
    server: &Arc<Server>,
    conn: &mut Conn,
    profile: Profile,
    mechanism: Option<Mechanism>,
    data: Result<Vec<u8>, SaslFailure>,
    offered: &[Mechanism],
    deadline: Instant,
) -> Result<SaslResult, End> {
    let domain = &server.config.domain;
    let Some(mechanism) = mechanism.filter(|m| offered.contains(m)) else {
        return Ok(Err((SaslFailure::InvalidMechanism, None)));
    };
    if server.login_blocked(conn.peer.ip()) {
        return Ok(Err(too_many_logins()));
    }
    let mut data = match data {
        Ok(d) => d,
        Err(f) => return Ok(Err((f, None))),
    };
    let Some(hash) = mechanism.scram_hash() else {
        // PLAIN.
        let creds = match sasl::parse_plain(&data) {
            Ok(c) => c,
            Err(f) => return Ok(Err((f, None))),
        };
        let Some(user) = normalize_username(&creds.username, domain) else {
            return Ok(Err((SaslFailure::NotAuthorized, None)));
        };
        if !authzid_ok(creds.authzid.as_deref(), &user, domain) {
            return Ok(Err((SaslFailure::InvalidAuthzid, None)));
        }
        if !server.reserve_login(conn.peer.ip(), &user) {
            return Ok(Err(too_many_logins()));
        }
        let Ok(record) = server.store.user(&user).await else {
            server.release_login(conn.peer.ip(), &user);
            return Ok(Err(store_failed()));
        };
        if record.is_none()
            && let Some(address) = server.client_address_of_home(&user).await
        {
            // Sent home: not a guess at anything here.
            server.release_login(conn.peer.ip(), &user);
            return Err(End::Redirect(address));
        }
        // PBKDF2 runs off the async workers, bounded; an unknown user costs the same
        // derivation as a known one (no timing oracle, security review M8).
        let stamp = record.as_ref().map(|r| r.scram_sha256.encode());
        let verifier = record.map(|r| r.scram_sha256);
        let ok = server.store.check_password(verifier, &creds.password).await;
        return Ok(if ok {
            Ok((user, None, stamp.unwrap_or_default()))
        } else {
            Err((SaslFailure::NotAuthorized, None))
        });
    };
    if data.is_empty() {
        // No initial response: an empty challenge asks for the client-first-message.
        conn.send(&profile.challenge(&[])).await?;
        data = match next_sasl_response(server, conn, deadline, profile).await? {
            Ok(d) => d,
            Err(f) => return Ok(Err((f, None))),
        };
    }
    let plus_offered = offered.iter().any(|m| m.is_plus());
    let first = match sasl::scram_client_first(mechanism, &data, plus_offered) {
        Ok(f) => f,
        Err(f) => return Ok(Err((f, None))),
    };
    let user = normalize_username(&first.username, domain);
    // The attempt counts from here: the challenge below lets the client test a guess.
    if !server.reserve_login(conn.peer.ip(), user.as_deref().unwrap_or(&first.username)) {
        return Ok(Err(too_many_logins()));
    }
    let authz_ok = user
        .as_deref()
        .is_some_and(|u| authzid_ok(first.authzid.as_deref(), u, domain));
    let attempt_key = user.clone().unwrap_or_else(|| first.username.clone());
    let record = match &user {
        Some(u) => match server.store.user(u).await {
            Ok(record) => record,
            Err(_) => {
                server.release_login(conn.peer.ip(), &attempt_key);
                return Ok(Err(store_failed()));
            }
        },
        None => None,
    };
    if record.is_none()
        && let Some(u) = &user
        && let Some(address) = server.client_address_of_home(u).await
    {
        server.release_login(conn.peer.ip(), &attempt_key);
        return Err(End::Redirect(address));
    }
    let stamp = record.as_ref().map(|r| r.scram_sha256.encode());
    let verifier = record.map(|r| match hash {
        impmesh_store::scram::ScramHash::Sha1 => r.scram_sha1,
        _ => r.scram_sha256,
    });
    // An unknown user's salt is derived from the normalised name (so `alice` and
    // `ALICE` look alike, as for a real user) with a key the whole cluster keeps.
    let fake_salt = match verifier {
        Some(_) => Vec::new(),
        None => match server
            .fake_salt(user.as_deref().unwrap_or(&first.username))
            .await
        {
            Ok(salt) => salt,
            Err(_) => {
                server.release_login(conn.peer.ip(), &attempt_key);
                return Ok(Err(store_failed()));
            }
        },
    };
    let iterations = server.store.scram_iterations();
    let (scram, challenge) =
        sasl::ScramServer::new(first, hash, verifier, || (fake_salt, iterations));
    conn.send(&profile.challenge(&challenge)).await?;
    let response = match next_sasl_response(server, conn, deadline, profile).await? {
        Ok(d) => d,
        Err(f) => return Ok(Err((f, None))),
    };
    let binding = conn.channel_binding.clone();
    match scram.finish(&response, binding.as_deref()) {
        Ok(_) if !authz_ok => Ok(Err((SaslFailure::InvalidAuthzid, None))),
        Ok(server_final) => match user {
            Some(user) => Ok(Ok((user, Some(server_final), stamp.unwrap_or_default()))),
            None => Ok(Err((SaslFailure::NotAuthorized, None))),
        },
        Err(f) => Ok(Err((f, None))),
    }
}

fn too_many_logins() -> (SaslFailure, Option<&'static str>) {
    (
        SaslFailure::TemporaryAuthFailure,
        Some("too many failed logins from this address or for this account; try again later"),
    )
}

/// A store failure during authentication: `temporary-auth-failure`, never "unknown
/// user" (a database hiccup must not count against the address or send anyone away:
/// the caller gives the reserved attempt back).
fn store_failed() -> (SaslFailure, Option<&'static str>) {
    (
        SaslFailure::TemporaryAuthFailure,
        Some("the server cannot check credentials right now; try again later"),
    )
}

/// Reads a `<response/>` (or `<abort/>`) during a SASL exchange.
async fn next_sasl_response(
    server: &Server,
    conn: &mut Conn,
    deadline: Instant,
    profile: Profile,
) -> Result<Result<Vec<u8>, SaslFailure>, End> {
    match read(server, conn, deadline).await? {
        Frame::Element(e) if e.is("response", profile.ns()) => Ok(sasl_data(&e)),
        Frame::Element(e) if e.is("abort", profile.ns()) => Ok(Err(SaslFailure::Aborted)),
        _ => Err(End::Error(
            StreamErrorCondition::PolicyViolation,
            "expected a SASL response",
        )),
    }
}

/// Binds a resource (RFC 6120 §7): the client's choice, or one we make up. A session
/// already holding the resource is replaced (§7.7.2.2, "override").
#[allow(clippy::type_complexity)]
fn bind(
    server: &Server,
    user: &str,
    iq: &Element,
    blocked: std::collections::HashSet<String>,
) -> Result<(Arc<SessionHandle>, String), String> {
    let id = crate::xml::escape(iq.attr("id").unwrap_or_default()).into_owned();
    let err = |condition: crate::error::StanzaErrorCondition, text: &str| {
        crate::error::error_reply(iq, condition, Some(text))
            .map(|e| String::from(&e))
            .unwrap_or_default()
    };
    if iq.attr("type") != Some("set") {
        return Err(err(
            crate::error::StanzaErrorCondition::BadRequest,
            "bind is a set",
        ));
    }
    let requested = iq
        .get_child("bind", ns::BIND)
        .and_then(|b| b.get_child("resource", ns::BIND))
        .map(|r| r.text())
        .filter(|r| !r.trim().is_empty());
    let resource = requested.unwrap_or_else(|| format!("impmesh-{}", &random_id()[..12]));
    let handle = bind_resource(server, user, &resource, blocked).map_err(|(c, t)| err(c, t))?;
    let reply = format!(
        "<iq type='result' id='{id}'><bind xmlns='{}'><jid>{}</jid></bind></iq>",
        ns::BIND,
        crate::xml::escape(&handle.jid.to_string())
    );
    Ok((handle, reply))
}

/// A session registered with the hub whose task will not start (the answer to its
/// bind could not be sent): it leaves the hub and its resumption id goes, and what
/// others sent it meanwhile is rerouted, as when a session ends.
fn abandon(server: &Server, handle: &Arc<SessionHandle>, resumable: Option<&str>) {
    server.hub.unregister(handle);
    if let Some(id) = resumable {
        server.hub.remove_resumable(id);
    }
    drop(handle.control.close());
    let undelivered = handle.close();
    if let (false, Some(server)) = (undelivered.is_empty(), server.me.upgrade()) {
        let jid = handle.jid.clone();
        server.tasks.clone().spawn(async move {
            for stanza in undelivered {
                server.reroute_undelivered(&jid, &stanza).await;
            }
        });
    }
}

/// Registers a session for `user` at `resource` with the hub, replacing one there.
fn bind_resource(
    server: &Server,
    user: &str,
    resource: &str,
    blocked: std::collections::HashSet<String>,
) -> Result<Arc<SessionHandle>, (crate::error::StanzaErrorCondition, &'static str)> {
    let domain = &server.config.domain;
    let Ok(jid) = FullJid::new(&format!("{user}@{domain}/{resource}")) else {
        return Err((
            crate::error::StanzaErrorCondition::BadRequest,
            "the resource is not a valid resourcepart (RFC 7622)",
        ));
    };
    let limits = &server.config.limits;
    let handle = Arc::new(SessionHandle::new(
        server.hub.next_session_id(),
        jid.clone(),
        QueueLimits {
            stanzas: limits.session_queue,
            bytes: limits.session_queue_bytes,
        },
    ));
    match server.hub.register(
        handle.clone(),
        server.config.limits.max_sessions_per_user,
        blocked,
    ) {
        Ok(Some(old)) => {
            let _ = old.tell(Control::Replaced);
        }
        Ok(None) => {}
        Err(crate::hub::TooManySessions) => {
            return Err((
                crate::error::StanzaErrorCondition::ResourceConstraint,
                "too many sessions for this account",
            ));
        }
    }
    Ok(handle)
}

/// XEP-0198 §5: hands the connection to the session named by `previd` (`None`); the
/// connection comes back when there is no such session (answer `<failed/>` and keep
/// negotiating).
fn resume(server: &Server, conn: Conn, user: &str, previd: &str, h: Option<u32>) -> Option<Conn> {
    let (Some(h), Some(session)) = (h, server.hub.resumable(previd, user)) else {
        return Some(conn);
    };
    let request = Box::new(ResumeRequest {
        conn,
        h,
        username: user.to_owned(),
        sasl2: None,
    });
    // Left in the session's control slots; refused when it has ended (or has a few
    // control messages waiting already): then the client hears `<failed/>`.
    match session.tell(Control::Resume(request)) {
        Ok(()) => None,
        Err(Control::Resume(request)) => Some(request.conn),
        Err(_) => unreachable!("send gives back what it was given"),
    }
}

/// An XEP-0198 resumption asked inline in SASL2: `Ok` when the session took the
/// connection (it answers inside the success); the connection and the success come
/// back when it cannot be resumed, here or in the session (XEP-0386: `<failed/>`
/// inside the success, then the bind).
#[allow(clippy::result_large_err)]
async fn resume_inline(
    server: &Server,
    conn: Conn,
    user: &str,
    resume: &crate::core::sasl2::Resume,
    completion: crate::core::sasl2::Completion,
    deadline: Instant,
) -> Result<(), (Conn, crate::core::sasl2::Completion)> {
    let (Some(h), Some(session)) = (resume.h, server.hub.resumable(&resume.previd, user)) else {
        return Err((conn, completion));
    };
    let (back, given_back) = tokio::sync::oneshot::channel();
    let request = Box::new(ResumeRequest {
        conn,
        h,
        username: user.to_owned(),
        sasl2: Some(crate::hub::Sasl2Resume { completion, back }),
    });
    match session.tell(Control::Resume(request)) {
        Ok(()) => {}
        Err(Control::Resume(request)) => {
            let ResumeRequest { conn, sasl2, .. } = *request;
            let completion = sasl2.map(|s| s.completion).unwrap_or_default();
            return Err((conn, completion));
        }
        Err(_) => unreachable!("send gives back what it was given"),
    }
    // Dropped unsent: the session took the connection (or ended with it).
    match timeout_at(deadline, given_back).await {
        Ok(Ok(back)) => Err(back),
        Ok(Err(_)) | Err(_) => Ok(()),
    }
}

async fn failed_resume(conn: &mut Conn) -> std::io::Result<()> {
    conn.send(&format!(
        "<failed xmlns='{}'><item-not-found xmlns='{}'/></failed>",
        ns::SM,
        ns::STANZAS
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(to: Option<&str>, version: Option<&str>) -> Header {
        Header {
            to: to.map(String::from),
            version: version.map(String::from),
            default_ns: Some(ns::CLIENT.into()),
            ..Default::default()
        }
    }

    fn condition(r: Result<(), End>) -> Option<StreamErrorCondition> {
        match r {
            Ok(()) => None,
            Err(End::Error(c, _)) => Some(c),
            Err(End::Gone | End::Redirect(_)) => panic!("unexpected"),
        }
    }

    /// Every header, also the ones after STARTTLS and SASL restarts, must name our
    /// domain: a stream cannot move to another host (Prosody CVE-2018-10847).
    #[test]
    fn rfc6120_headers_must_name_the_domain_and_version_1() {
        let ok = check_header(&header(Some("example.com"), Some("1.0")), "example.com");
        assert_eq!(condition(ok), None);
        let other = check_header(&header(Some("evil.example"), Some("1.0")), "example.com");
        assert_eq!(condition(other), Some(StreamErrorCondition::HostUnknown));
        let missing = check_header(&header(None, Some("1.0")), "example.com");
        assert_eq!(condition(missing), Some(StreamErrorCondition::HostUnknown));
        let old = check_header(&header(Some("example.com"), None), "example.com");
        assert_eq!(
            condition(old),
            Some(StreamErrorCondition::UnsupportedVersion)
        );
        for default_ns in [None, Some("jabber:server"), Some("")] {
            let h = Header {
                default_ns: default_ns.map(String::from),
                ..header(Some("example.com"), Some("1.0"))
            };
            assert_eq!(
                condition(check_header(&h, "example.com")),
                Some(StreamErrorCondition::InvalidNamespace),
                "{default_ns:?}"
            );
        }
    }

    #[test]
    fn an_authorization_identity_is_the_users_own() {
        assert!(authzid_ok(Some("alice@d"), "alice", "d"));
        assert!(!authzid_ok(Some("bob@d"), "alice", "d"));
        assert!(!authzid_ok(Some("alice@other"), "alice", "d"));
    }
}
