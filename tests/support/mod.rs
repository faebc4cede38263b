//! Shared test support: in-process nodes on 127.0.0.1 port 0, and a tokio-xmpp
//! connector that trusts a node's self-signed certificate (tokio-xmpp's own STARTTLS
//! connector only trusts the system roots).

#![allow(dead_code)]

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use impmesh::config::Config;
use impmesh::node::Node;
use minidom::Element;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::xmlstream::{
    PendingFeaturesRecv, StreamHeader, Timeouts, XmppStreamElement, initiate_stream,
};
use tokio_xmpp::{Client, Event, Stanza};

pub const DOMAIN: &str = "localhost";

/// A node running in this process, with its data directory.
pub struct TestNode {
    pub node: Node,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl TestNode {
    /// Stops the node and starts it again on the same data directory and store (its
    /// listeners get new ports when the config asked for port 0).
    pub async fn restart(self) -> TestNode {
        let TestNode { node, dir, config } = self;
        node.shutdown().await;
        let node = Node::start(&config).await.unwrap();
        TestNode { node, dir, config }
    }

    pub fn c2s(&self) -> SocketAddr {
        self.node.c2s[0]
    }

    pub fn direct_tls(&self) -> SocketAddr {
        self.node.c2s_direct_tls[0]
    }

    pub fn cert(&self) -> rustls_pki_types::CertificateDer<'static> {
        self.node.identity().chain[0].clone()
    }

    pub async fn add_user(&self, name: &str, password: &str) {
        impmesh::users::add(&self.node.server.store, &self.config, name, password)
            .await
            .unwrap();
    }

    /// A connector for this node's STARTTLS port.
    pub fn connector(&self) -> TestConnector {
        TestConnector {
            addr: self.c2s(),
            cert: self.cert(),
            direct: false,
            binding: Binding::Real,
        }
    }

    /// A client for `user` with its password, through STARTTLS.
    pub fn client(&self, user: &str, password: &str, resource: Option<&str>) -> Client {
        client_with(self.connector(), user, password, resource)
    }
}

pub fn client_with(
    connector: TestConnector,
    user: &str,
    password: &str,
    resource: Option<&str>,
) -> Client {
    let jid = match resource {
        Some(r) => Jid::new(&format!("{user}@{DOMAIN}/{r}")).unwrap(),
        None => Jid::new(&format!("{user}@{DOMAIN}")).unwrap(),
    };
    Client::new_with_connector(jid, password.to_owned(), connector, Timeouts::default())
}

/// Starts a node for `localhost` on 127.0.0.1 port 0, after `tweak` edits its config.
pub async fn start_node(tweak: impl FnOnce(&mut Config)) -> TestNode {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    config.listen.c2s = vec!["127.0.0.1:0".parse().unwrap()];
    config.listen.c2s_direct_tls = vec!["127.0.0.1:0".parse().unwrap()];
    config.listen.https = "127.0.0.1:0".parse().unwrap();
    config.listen.admin = "127.0.0.1:0".parse().unwrap();
    config.listen.links = Some("127.0.0.1:0".parse().unwrap());
    config.listen.client_https = "127.0.0.1:0".parse().unwrap();
    config.listen.turn = Some("127.0.0.1:0".parse().unwrap());
    config.listen.turns = Some("127.0.0.1:0".parse().unwrap());
    if let Ok(url) = std::env::var("IMPMESH_TEST_POSTGRES") {
        config.store.url = fresh_postgres_schema(&url).await;
    }
    tweak(&mut config);
    let node = Node::start(&config).await.unwrap();
    TestNode { node, dir, config }
}

/// [`start_node`], then creates `users`, each with the password [`PW`].
pub async fn start_node_with_users(tweak: impl FnOnce(&mut Config), users: &[&str]) -> TestNode {
    let node = start_node(tweak).await;
    for user in users {
        node.add_user(user, PW).await;
    }
    node
}

/// The password of the users made by [`start_node_with_users`].
pub const PW: &str = "correct horse battery";

/// A throw-away schema on the PostgreSQL test server, as a URL that selects it.
async fn fresh_postgres_schema(url: &str) -> String {
    use sqlx_free::create_schema;
    let schema = format!("e2e{:016x}", rand_u64());
    create_schema(url, &schema).await;
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

fn rand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

mod sqlx_free {
    /// Creates a schema with `psql`, keeping sqlx out of the test's dependencies.
    pub async fn create_schema(url: &str, schema: &str) {
        let status = tokio::process::Command::new("psql")
            .arg(url)
            .arg("-q")
            .arg("-c")
            .arg(format!("CREATE SCHEMA {schema}"))
            .status()
            .await
            .expect("psql must be installed when IMPMESH_TEST_POSTGRES is set");
        assert!(status.success(), "could not create schema {schema}");
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// What channel-binding data the connector hands to the SASL layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The real `tls-exporter` value (so the client picks -PLUS mechanisms).
    Real,
    /// None: the client uses plain SCRAM.
    None,
    /// A wrong value: a -PLUS login must fail.
    Wrong,
}

/// Connects to a test node over STARTTLS or direct TLS, trusting its certificate.
#[derive(Debug, Clone)]
pub struct TestConnector {
    pub addr: SocketAddr,
    pub cert: rustls_pki_types::CertificateDer<'static>,
    pub direct: bool,
    pub binding: Binding,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConnectError(String);
impl tokio_xmpp::connect::ServerConnectorError for ConnectError {}

impl TestConnector {
    async fn tls(
        &self,
        tcp: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, sasl::common::ChannelBinding), tokio_xmpp::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        if self.direct {
            config.alpn_protocols = vec![b"xmpp-client".to_vec()];
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls_pki_types::ServerName::try_from(DOMAIN).unwrap();
        let tls = connector.connect(name, tcp).await?;
        let binding = {
            let (_, session) = tls.get_ref();
            let exporter = session
                .export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None)
                .map_err(|e| tokio_xmpp::Error::Io(std::io::Error::other(e)))?;
            match self.binding {
                Binding::Real => sasl::common::ChannelBinding::TlsExporter(exporter),
                Binding::None => sasl::common::ChannelBinding::None,
                Binding::Wrong => sasl::common::ChannelBinding::TlsExporter(vec![7u8; 32]),
            }
        };
        Ok((tls, binding))
    }
}

fn header() -> StreamHeader<'static> {
    StreamHeader {
        to: Some(Cow::Borrowed(DOMAIN)),
        from: None,
        id: None,
    }
}

impl ServerConnector for TestConnector {
    type Stream = BufStream<TlsStream<TcpStream>>;

    async fn connect(
        &self,
        _jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<
        (
            PendingFeaturesRecv<Self::Stream>,
            sasl::common::ChannelBinding,
        ),
        tokio_xmpp::Error,
    > {
        let tcp = TcpStream::connect(self.addr).await?;
        if self.direct {
            let (tls, binding) = self.tls(tcp).await?;
            let stream = initiate_stream(BufStream::new(tls), ns, header(), timeouts).await?;
            return Ok((stream, binding));
        }
        let stream = initiate_stream(BufStream::new(tcp), ns, header(), timeouts).await?;
        let (features, mut stream) = stream
            .recv_features::<XmppStreamElement>()
            .await
            .map_err(|e| tokio_xmpp::Error::Io(std::io::Error::other(format!("{e:?}"))))?;
        if !features.can_starttls() {
            return Err(tokio_xmpp::Error::Io(std::io::Error::other(ConnectError(
                "no STARTTLS offered".into(),
            ))));
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
                _ => return Err(tokio_xmpp::Error::Disconnected),
            }
        }
        let tcp = stream.into_inner().into_inner();
        let (tls, binding) = self.tls(tcp).await?;
        let stream = initiate_stream(BufStream::new(tls), ns, header(), timeouts).await?;
        Ok((stream, binding))
    }
}

/// Parses a stanza written as XML (default namespace jabber:client).
pub fn stanza(xml: &str) -> Stanza {
    let xml = xml.replacen('>', " xmlns='jabber:client'>", 1);
    let xml = if xml.contains("/ xmlns") {
        xml.replacen("/ xmlns='jabber:client'>", " xmlns='jabber:client'/>", 1)
    } else {
        xml
    };
    let el: Element = xml.parse().unwrap_or_else(|e| panic!("{e}: {xml}"));
    match el.name() {
        "message" => Stanza::Message(el.try_into().unwrap()),
        "presence" => Stanza::Presence(el.try_into().unwrap()),
        _ => Stanza::Iq(el.try_into().unwrap()),
    }
}

pub fn element(stanza: Stanza) -> Element {
    match stanza {
        Stanza::Message(m) => m.into(),
        Stanza::Presence(p) => p.into(),
        Stanza::Iq(iq) => iq.into(),
    }
}

/// Waits for the client to come online; returns its bound JID.
pub async fn online(client: &mut Client) -> Jid {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), client.next()).await {
            Ok(Some(Event::Online { bound_jid, .. })) => return bound_jid,
            Ok(Some(Event::Disconnected(e))) => panic!("disconnected before online: {e}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("client ended"),
            Err(_) => panic!("not online within 10 s"),
        }
    }
}

/// The next stanza matching `pred`, skipping others; panics after `secs`.
pub async fn expect(
    client: &mut Client,
    secs: u64,
    what: &str,
    pred: impl Fn(&Element) -> bool,
) -> Element {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, client.next()).await {
            Ok(Some(Event::Stanza(s))) => {
                let el = element(s);
                if pred(&el) {
                    return el;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("client ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Collects stanzas matching `pred` for `millis` milliseconds.
pub async fn collect(
    client: &mut Client,
    millis: u64,
    pred: impl Fn(&Element) -> bool,
) -> Vec<Element> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
    let mut out = vec![];
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, client.next()).await {
        if let Event::Stanza(s) = ev {
            let el = element(s);
            if pred(&el) {
                out.push(el);
            }
        }
    }
    out
}

pub async fn send(client: &mut Client, xml: &str) {
    client.send_stanza(stanza(xml)).await.unwrap();
}

/// Pings the server and waits for the answer: in-order processing (RFC 6120 §10.1)
/// makes it a sync point, everything `client` sent before has been handled.
pub async fn sync_with_server(client: &mut Client, id: &str) {
    send(
        client,
        &format!("<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"),
    )
    .await;
    expect(client, 5, "the server's answer to a ping", |e| {
        e.attr("id") == Some(id)
    })
    .await;
}

/// The value of the first `name='…'` attribute in `xml` as the server writes it.
pub fn attr_in(xml: &str, name: &str) -> String {
    xml.split(&format!("{name}='"))
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no {name} in {xml}"))
        .to_owned()
}

pub fn bare(user: &str) -> BareJid {
    BareJid::new(&format!("{user}@{DOMAIN}")).unwrap()
}

/// Waits for a presence from `user` of type `ty` (`None`: available).
pub async fn expect_presence(
    client: &mut Client,
    secs: u64,
    what: &str,
    user: &str,
    ty: Option<&str>,
) -> Element {
    expect(client, secs, what, |e| is_presence_from(e, user, ty)).await
}

pub fn is_presence_from(el: &Element, user: &str, ty: Option<&str>) -> bool {
    el.name() == "presence"
        && el
            .attr("from")
            .is_some_and(|f| f.starts_with(&format!("{user}@")))
        && el.attr("type") == ty
}

pub fn body(el: &Element) -> Option<String> {
    el.get_child("body", "jabber:client").map(|b| b.text())
}

/// Connects and runs SASL only, with tokio-xmpp's own `auth`: the outcome of one login
/// attempt (the full `Client` retries failed logins silently).
pub async fn try_login(
    connector: &TestConnector,
    user: &str,
    password: &str,
) -> Result<(), tokio_xmpp::Error> {
    let jid = Jid::new(&format!("{user}@{DOMAIN}")).unwrap();
    let (stream, binding) = connector
        .connect(&jid, "jabber:client", Timeouts::default())
        .await?;
    let (features, stream) = stream
        .recv_features::<tokio_xmpp::xmlstream::FallibleStreamElement>()
        .await
        .map_err(|e| tokio_xmpp::Error::Io(std::io::Error::other(format!("{e:?}"))))?;
    let creds = sasl::common::Credentials::default()
        .with_username(user)
        .with_password(password)
        .with_channel_binding(binding);
    tokio_xmpp::client_login(stream, features.sasl_mechanisms, creds).await?;
    Ok(())
}

/// A test certificate authority made with rcgen.
pub struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pub cert: rcgen::Certificate,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { params, key, cert }
    }

    /// A certificate for `names` and a fresh key, valid for `days` from now:
    /// (certificate PEM, key PEM).
    pub fn issue(&self, names: &[&str], days: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(days);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A TCP proxy that a test can cut (connections reset) or freeze (connections stay
/// open but nothing passes: a black hole), to simulate network failures.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u32>,
    freeze: tokio::sync::watch::Sender<bool>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(0u32);
        let (freeze, freeze_rx) = tokio::sync::watch::channel(false);
        let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse2 = refuse.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refuse2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let mut cut_rx = cut_rx.clone();
                cut_rx.mark_unchanged();
                let mut freeze_rx = freeze_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let frozen = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                        _ = cut_rx.changed() => false,
                        _ = freeze_rx.wait_for(|f| *f) => true,
                    };
                    if frozen {
                        // Keep both sockets open and silent until the test ends.
                        std::future::pending::<()>().await;
                    }
                    // Otherwise both ends are dropped without any XMPP close.
                });
            }
        });
        Proxy {
            addr,
            cut,
            freeze,
            refuse,
        }
    }

    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn cut_and_refuse(&self) {
        self.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
    }

    pub fn freeze_and_refuse(&self) {
        self.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        self.freeze.send_replace(true);
    }

    /// Accepts connections again after a cut or freeze (connections frozen before
    /// stay frozen).
    pub fn restore(&self) {
        self.freeze.send_replace(false);
        self.refuse
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits until `cond` holds, for up to `secs`; returns how long it took.
pub async fn eventually<F, Fut>(secs: u64, what: &str, cond: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        if cond().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {secs} s");
}

/// Resolves every name of the test clusters to 127.0.0.1.
pub fn test_dns() -> std::sync::Arc<MapDns> {
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let mut names = vec!["localhost".to_owned()];
    for c in ["a", "b", "c"] {
        names.push(format!("cluster-{c}.example.com"));
        names.push(format!("node1.cluster-{c}.example.com"));
    }
    std::sync::Arc::new(MapDns {
        names: names.into_iter().map(|n| (n, vec![local])).collect(),
        down: false.into(),
    })
}

/// A resolver for tests: a fixed map, and a switch that makes every lookup fail.
pub struct MapDns {
    pub names: std::collections::HashMap<String, Vec<std::net::IpAddr>>,
    pub down: std::sync::atomic::AtomicBool,
}

impl impmesh_sync_agent::dns::NameResolver for MapDns {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<std::net::IpAddr>, String>> + Send + 'a>,
    > {
        Box::pin(async move {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("no connections available (simulated outage)".into());
            }
            self.names
                .get(name)
                .cloned()
                .ok_or_else(|| format!("{name}: NXDOMAIN"))
        })
    }
}

/// The intercluster application user of the test clusters.
pub const AXL_USER: &str = "icsync";
pub const AXL_PW: &str = "intercluster-secret";

/// A one-node cluster `name` (its node `node1.NAME`) that syncs peers only when
/// nudged (the period is an hour), with the AXL user and `users` (password `pw`),
/// after `tweak` edits its config.
pub async fn mesh_cluster(name: &str, users: &[&str], tweak: impl FnOnce(&mut Config)) -> TestNode {
    let name = name.to_owned();
    let node = start_node(move |c| {
        c.node.name = Some(format!("node1.{name}"));
        c.node.cluster = Some(name);
        c.sync.period = 3600;
        // Every peer is on 127.0.0.1: the per-address caps would count them as one.
        c.https.max_connections_per_address = 4096;
        c.limits.link_handshakes_per_address = 4096;
        tweak(c);
    })
    .await;
    impmesh_axl::set_axl_user(&node.node.server.store, AXL_USER, AXL_PW)
        .await
        .unwrap();
    for user in users {
        node.add_user(user, "pw").await;
    }
    node
}

/// `from` adds `to` as a peer and `to` accepts; waits until each knows the other's
/// users (`users_of_to`, `users_of_from` of them) and link port.
pub async fn peer_clusters(from: &TestNode, to: &TestNode, users_of_from: i64, users_of_to: i64) {
    use impmesh_axl::NodeControl as _;
    from.node
        .control
        .peer_add(&to.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    to.node
        .control
        .peer_accept(&from.config.cluster_name())
        .await
        .unwrap();
    for (node, other, count) in [(from, to, users_of_to), (to, from, users_of_from)] {
        let store = node.node.server.store.clone();
        let other_cluster = other.config.cluster_name();
        let other_node = other.config.node_name();
        eventually(10, "the peer's users and nodes known", || async {
            store.remote_user_count(&other_cluster).await.unwrap() >= count
                && store
                    .peer_node(&other_node)
                    .await
                    .unwrap()
                    .is_some_and(|n| n.link_port != 0)
        })
        .await;
    }
}

/// How many offline messages `user` has waiting on `node`.
/// A node's `/metrics`, as Prometheus scrapes it (on the admin listener).
pub async fn metrics(node: &TestNode) -> String {
    let anchors = impmesh_certs::TrustAnchors {
        cas: vec![],
        pinned: [node.node.identity().fingerprint()].into(),
    };
    let mut client = impmesh_axl::client::AxlClient::connect(
        &node.node.admin_addr.to_string(),
        "localhost",
        impmesh_axl::client::ServerTrust::Verified(
            impmesh_certs::PeerVerifier::new(&anchors).unwrap(),
        ),
    )
    .await
    .unwrap();
    client.get("/metrics").await.unwrap().1
}

pub async fn offline_count(node: &TestNode, user: &str) -> usize {
    node.node
        .server
        .store
        .offline_messages(user)
        .await
        .unwrap()
        .len()
}

/// Whether `node` has the alarm `name` raised for `subject`.
pub async fn has_alarm(node: &TestNode, name: &str, subject: &str) -> bool {
    node.node
        .server
        .store
        .active_alarms()
        .await
        .unwrap()
        .iter()
        .any(|a| a.name == name && a.subject == subject)
}

/// A bare XMPP connection driven by hand, for clients that misbehave on purpose (never
/// acknowledge, never read): STARTTLS, SASL PLAIN and a bound resource, optionally
/// with XEP-0198 enabled. Well-behaved clients in tests are tokio-xmpp.
pub struct RawClient {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
    /// Bytes read and not consumed by [`RawClient::read_until`] yet.
    pub pending: String,
    /// The latest `<stream:features/>` the server sent (after authentication once
    /// logged in).
    pub features: String,
}

pub const RAW_HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

impl RawClient {
    /// Logs `user` in with [`PW`] and binds resource `resource`; `recv_buffer` shrinks
    /// the socket's receive buffer (a client that stops reading then blocks the
    /// server's writes sooner).
    pub async fn login(
        node: &TestNode,
        user: &str,
        resource: &str,
        sm: bool,
        recv_buffer: Option<u32>,
    ) -> RawClient {
        let mut client = RawClient::authenticated(node, user, recv_buffer).await;
        client
            .send(&format!(
                "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
            ))
            .await;
        client.read_until("</iq>").await;
        if sm {
            client.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
            client.read_until("<enabled").await;
        }
        client
    }

    /// A stream after STARTTLS and SASL PLAIN as `user` with [`PW`], restarted, its
    /// features read: ready to bind or to resume (XEP-0198).
    pub async fn authenticated(node: &TestNode, user: &str, recv_buffer: Option<u32>) -> RawClient {
        use base64::Engine as _;
        let mut client = RawClient::connect(node, recv_buffer).await;
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PW}"));
        client
            .send(&format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
            ))
            .await;
        let success = client.read_until("urn:ietf:params:xml:ns:xmpp-sasl").await;
        assert!(success.contains("success"), "{success}");
        client.send(RAW_HEADER).await;
        client.features = client.read_until("</stream:features>").await;
        client
    }

    /// A stream after STARTTLS, its features read: ready for SASL.
    pub async fn connect(node: &TestNode, recv_buffer: Option<u32>) -> RawClient {
        use tokio::io::AsyncWriteExt as _;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut tcp = socket.connect(node.c2s()).await.unwrap();
        tcp.write_all(RAW_HEADER.as_bytes()).await.unwrap();
        let mut plain = String::new();
        raw_read_until(&mut tcp, &mut plain, "</stream:features>").await;
        tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await
            .unwrap();
        raw_read_until(&mut tcp, &mut plain, "<proceed").await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(node.cert()).unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let mut client = RawClient {
            tls,
            pending: String::new(),
            features: String::new(),
        };
        client.send(RAW_HEADER).await;
        client.features = client.read_until("</stream:features>").await;
        client
    }

    pub async fn send(&mut self, xml: &str) {
        use tokio::io::AsyncWriteExt as _;
        self.tls.write_all(xml.as_bytes()).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// Reads until `marker` has arrived (at most 10 s); returns everything up to and
    /// including it, keeping the rest for the next call.
    pub async fn read_until(&mut self, marker: &str) -> String {
        let found = raw_read_until(&mut self.tls, &mut self.pending, marker).await;
        assert!(
            found,
            "{marker:?} not seen within 10 s; got {:?}",
            self.pending
        );
        let end = self.pending.find(marker).unwrap_or(0) + marker.len();
        self.pending.drain(..end).collect()
    }

    /// Pings the server and reads up to its answer, which it returns with what came
    /// before: a sync point, as [`sync_with_server`] is for tokio-xmpp clients.
    pub async fn sync_with_server(&mut self, id: &str) -> String {
        self.send(&format!(
            "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await;
        self.read_until(&format!("id='{id}'")).await
    }

    /// How often `marker` occurs in what arrives within `millis`.
    pub async fn count_within(&mut self, marker: &str, millis: u64) -> usize {
        use tokio::io::AsyncReadExt as _;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
        let mut buf = vec![0u8; 16384];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.tls.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            self.pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        self.pending.matches(marker).count()
    }
}

/// Reads into `acc` until it contains `marker` or 10 s pass; whether it was seen.
async fn raw_read_until<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    acc: &mut String,
    marker: &str,
) -> bool {
    use tokio::io::AsyncReadExt as _;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 16384];
    while !acc.contains(marker) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(n)) => acc.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    true
}

/// A client's entity capabilities (XEP-0115) as a stock client builds them with
/// xmpp-parsers: the disco#info it answers and the `<c/>` of its presence.
pub struct ClientCaps {
    pub info: tokio_xmpp::parsers::disco::DiscoInfoResult,
    pub ver: String,
}

pub const CAPS_NODE: &str = "https://impmesh.test/client";

impl ClientCaps {
    /// A client that wants the notifications of `nodes` (`NODE+notify`, XEP-0163 §4).
    pub fn wanting(nodes: &[&str]) -> ClientCaps {
        use base64::Engine as _;
        use tokio_xmpp::parsers::{caps, disco, hashes::Algo};
        let mut features: std::collections::BTreeSet<String> = [
            "http://jabber.org/protocol/caps",
            "http://jabber.org/protocol/disco#info",
        ]
        .iter()
        .map(|f| f.to_string())
        .collect();
        features.extend(nodes.iter().map(|n| format!("{n}+notify")));
        let mut info = disco::DiscoInfoResult {
            node: None,
            identities: vec![disco::Identity::new("client", "pc", "en", "impmesh tests")],
            features,
            extensions: vec![],
        };
        let hash = caps::hash_caps(&caps::compute_disco(&info), Algo::Sha_1).unwrap();
        let ver = base64::engine::general_purpose::STANDARD.encode(&hash.hash);
        info.node = Some(format!("{CAPS_NODE}#{ver}"));
        ClientCaps { info, ver }
    }

    /// Available presence carrying these capabilities.
    pub fn presence(&self) -> String {
        format!(
            "<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='{CAPS_NODE}' ver='{}'/></presence>",
            self.ver
        )
    }

    /// Waits for the server's disco#info query about these capabilities and answers it
    /// as the client would.
    pub async fn answer(&self, client: &mut Client, secs: u64) {
        let node = self.info.node.clone();
        let query = expect(client, secs, "the server's capabilities query", |e| {
            e.name() == "iq"
                && e.attr("type") == Some("get")
                && e.get_child("query", "http://jabber.org/protocol/disco#info")
                    .is_some_and(|q| q.attr("node") == node.as_deref())
        })
        .await;
        let to = Jid::new(query.attr("from").unwrap()).unwrap();
        let iq = tokio_xmpp::parsers::iq::Iq::from_result(
            query.attr("id").unwrap(),
            Some(self.info.clone()),
        )
        .with_to(to);
        client.send_stanza(Stanza::Iq(iq)).await.unwrap();
    }
}

/// Makes `a` and `b` contacts with a mutual subscription (RFC 6121 `both`), each in
/// the store of the node homing them, before either logs in.
pub async fn befriend(a: (&TestNode, &str), b: (&TestNode, &str)) {
    for ((node, owner), (_, contact)) in [(a, b), (b, a)] {
        let item = impmesh_store::RosterItem {
            contact: format!("{contact}@{DOMAIN}"),
            subscription: impmesh_store::Subscription::Both,
            ..Default::default()
        };
        node.node
            .server
            .store
            .put_roster_item(owner, &item)
            .await
            .unwrap();
    }
}

/// The PEP event (XEP-0163) a message carries, typed by xmpp-parsers.
pub fn pep_event(el: &Element) -> Option<tokio_xmpp::parsers::pubsub::event::Payload> {
    let event = el.get_child("event", "http://jabber.org/protocol/pubsub#event")?;
    tokio_xmpp::parsers::pubsub::event::Event::try_from(event.clone())
        .ok()
        .map(|e| e.payload)
}

/// Whether a message is a PEP event of `node`.
pub fn is_event_of(el: &Element, node: &str) -> bool {
    use tokio_xmpp::parsers::pubsub::event::Payload;
    el.name() == "message"
        && pep_event(el).is_some_and(|p| match p {
            Payload::Items { node: n, .. }
            | Payload::Purge { node: n }
            | Payload::Delete { node: n, .. }
            | Payload::Configuration { node: n, .. }
            | Payload::Subscription { node: n, .. } => n.0 == node,
        })
}

/// A PEP publication (typed by xmpp-parsers) to the account's own node.
pub fn publish_iq(
    id: &str,
    node: &str,
    item_id: &str,
    payload: &str,
    options: &[(&str, &str)],
) -> Stanza {
    use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field};
    use tokio_xmpp::parsers::pubsub::{ItemId, NodeName, PubSub, pubsub};
    let publish_options = (!options.is_empty()).then(|| pubsub::PublishOptions {
        form: Some(DataForm::new(
            DataFormType::Submit,
            "http://jabber.org/protocol/pubsub#publish-options",
            options
                .iter()
                .map(|(var, value)| Field::text_single(var, value))
                .collect(),
        )),
    });
    let request = PubSub::Publish {
        publish: pubsub::Publish {
            node: NodeName(node.into()),
            items: vec![pubsub::Item {
                id: Some(ItemId(item_id.into())),
                publisher: None,
                payload: Some(payload.parse().unwrap()),
            }],
        },
        publish_options,
    };
    Stanza::Iq(tokio_xmpp::parsers::iq::Iq::from_set(id, request))
}

/// A retrieval of `owner`'s items of `node`.
pub fn items_iq(id: &str, owner: &str, node: &str) -> Stanza {
    use tokio_xmpp::parsers::pubsub::{NodeName, PubSub, pubsub};
    let request = PubSub::Items(pubsub::Items {
        max_items: None,
        node: NodeName(node.into()),
        subid: None,
        items: vec![],
    });
    Stanza::Iq(tokio_xmpp::parsers::iq::Iq::from_get(id, request).with_to(Jid::from(bare(owner))))
}

/// The error condition and XEP-0060 application condition of an IQ error.
pub fn pubsub_error(el: &Element) -> (String, String) {
    let error = el.get_child("error", "jabber:client").expect("an error");
    let name = |ns: &str| {
        error
            .children()
            .find(|c| c.ns() == ns)
            .map(|c| c.name().to_owned())
            .unwrap_or_default()
    };
    (
        name("urn:ietf:params:xml:ns:xmpp-stanzas"),
        name("http://jabber.org/protocol/pubsub#errors"),
    )
}

pub const AVATAR: &str = "urn:xmpp:avatar:metadata";
pub const DEVICES: &str = "eu.siacs.conversations.axolotl.devicelist";
pub const BOOKMARKS: &str = "urn:xmpp:bookmarks:1";
pub const AVATAR_META: &str = "<metadata xmlns='urn:xmpp:avatar:metadata'><info bytes='12' id='111f4b3c50d7b0df729d299bc6f8e9ef9066971f' type='image/png' width='64' height='64'/></metadata>";

/// A message archive query (XEP-0313) typed by xmpp-parsers: `with`, and a page of
/// `max` after `after` (or the last page with `before = Some(None)`).
pub fn mam_query_iq(
    id: &str,
    with: Option<&str>,
    max: usize,
    after: Option<&str>,
    before: Option<Option<&str>>,
) -> Stanza {
    use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
    use tokio_xmpp::parsers::{mam, rsm};
    let fields = with
        .map(|w| vec![Field::new("with", FieldType::JidSingle).with_value(w)])
        .unwrap_or_default();
    let query = mam::Query {
        queryid: Some(mam::QueryId(id.into())),
        node: None,
        form: Some(DataForm::new(
            DataFormType::Submit,
            "urn:xmpp:mam:2",
            fields,
        )),
        set: Some(rsm::SetQuery {
            max: Some(max),
            after: after.map(String::from),
            before: before.map(|b| b.unwrap_or_default().to_owned()),
            index: None,
        }),
        flip_page: false,
    };
    Stanza::Iq(tokio_xmpp::parsers::iq::Iq::from_set(id, query))
}

/// The archived messages a query returned (their archive ids and bodies, in order)
/// and its `<fin/>`, typed by xmpp-parsers.
pub async fn mam_results(
    client: &mut Client,
    id: &str,
) -> (Vec<(String, String)>, tokio_xmpp::parsers::mam::Fin) {
    use tokio_xmpp::parsers::mam;
    let mut results = vec![];
    loop {
        let el = expect(client, 10, "archive results", |e| {
            e.attr("id") == Some(id) || e.has_child("result", "urn:xmpp:mam:2")
        })
        .await;
        if el.name() == "iq" {
            assert_eq!(el.attr("type"), Some("result"), "{}", String::from(&el));
            let fin = el
                .get_child("fin", "urn:xmpp:mam:2")
                .expect("a fin")
                .clone();
            return (results, mam::Fin::try_from(fin).unwrap());
        }
        let result =
            mam::Result_::try_from(el.get_child("result", "urn:xmpp:mam:2").unwrap().clone())
                .unwrap();
        assert_eq!(result.queryid.as_ref().map(|q| q.0.as_str()), Some(id));
        let message = result.forwarded.message;
        let body = message.bodies.values().next().cloned().unwrap_or_default();
        results.push((result.id, body));
    }
}

/// The stanza-id (XEP-0359) `by` stamped on a message.
pub fn stanza_id_by(el: &Element, by: &str) -> Option<String> {
    el.children()
        .find(|c| c.is("stanza-id", "urn:xmpp:sid:0") && c.attr("by") == Some(by))
        .and_then(|c| c.attr("id"))
        .map(String::from)
}

/// An HTTP response as a test reads it.
pub struct HttpResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One HTTPS request to `url` (`https://HOST:PORT/PATH`; HOST is checked against a
/// certificate `cert` issued, and reached on 127.0.0.1), with hyper's client.
pub async fn https_request(
    cert: &rustls_pki_types::CertificateDer<'static>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    use http_body_util::BodyExt as _;
    let rest = url.strip_prefix("https://").expect("an https URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = authority.rsplit_once(':').expect("a port in the URL");
    let tcp = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap()))
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(if path.is_empty() { "/" } else { path })
        .header("host", authority);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            body,
        )))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// Asks the domain for an upload slot (XEP-0363); the reply, result or error.
pub async fn upload_slot(
    client: &mut Client,
    id: &str,
    filename: &str,
    size: u64,
    content_type: &str,
) -> Element {
    send(
        client,
        &format!(
            "<iq type='get' id='{id}' to='localhost'><request xmlns='urn:xmpp:http:upload:0' filename='{}' size='{size}' content-type='{content_type}'/></iq>",
            impmesh_router::xml::escape(filename)
        ),
    )
    .await;
    expect(client, 5, "the slot", |e| e.attr("id") == Some(id)).await
}

/// Asks for a slot without naming a content type.
pub async fn upload_slot_untyped(
    client: &mut Client,
    id: &str,
    filename: &str,
    size: u64,
) -> Element {
    send(
        client,
        &format!(
            "<iq type='get' id='{id}' to='localhost'><request xmlns='urn:xmpp:http:upload:0' filename='{filename}' size='{size}'/></iq>"
        ),
    )
    .await;
    expect(client, 5, "the slot", |e| e.attr("id") == Some(id)).await
}

/// The PUT URL, its Authorization header and the GET URL of a slot.
pub fn slot_parts(reply: &Element) -> (String, String, String) {
    let slot = reply
        .get_child("slot", "urn:xmpp:http:upload:0")
        .unwrap_or_else(|| panic!("no slot in {}", String::from(reply)));
    let put = slot.get_child("put", "urn:xmpp:http:upload:0").unwrap();
    let auth = put
        .children()
        .find(|h| h.attr("name") == Some("Authorization"))
        .map(|h| h.text())
        .unwrap();
    let get = slot.get_child("get", "urn:xmpp:http:upload:0").unwrap();
    (
        put.attr("url").unwrap().to_owned(),
        auth,
        get.attr("url").unwrap().to_owned(),
    )
}

/// The app server's side of XEP-0357 in these tests: the next notification it gets
/// (answered with `answer`), as (from, node, summary fields, publish-options text).
pub async fn notification(
    app: &mut Client,
    answer: &str,
) -> (String, String, Vec<(String, String)>, String) {
    let iq = expect(app, 10, "a notification", |e| {
        e.is("iq", "jabber:client")
            && e.get_child("pubsub", "http://jabber.org/protocol/pubsub")
                .is_some()
    })
    .await;
    let pubsub = iq
        .get_child("pubsub", "http://jabber.org/protocol/pubsub")
        .unwrap();
    let publish = pubsub
        .get_child("publish", "http://jabber.org/protocol/pubsub")
        .unwrap();
    let form = publish
        .get_child("item", "http://jabber.org/protocol/pubsub")
        .and_then(|i| i.get_child("notification", "urn:xmpp:push:0"))
        .and_then(|n| n.get_child("x", "jabber:x:data"))
        .unwrap();
    let fields = form
        .children()
        .map(|f| {
            (
                f.attr("var").unwrap_or_default().to_owned(),
                f.children().map(|v| v.text()).collect::<String>(),
            )
        })
        .filter(|(var, _)| var != "FORM_TYPE")
        .collect();
    let options = pubsub
        .get_child("publish-options", "http://jabber.org/protocol/pubsub")
        .map(String::from)
        .unwrap_or_default();
    let reply = match answer {
        "result" => format!(
            "<iq type='result' id='{}' to='{}'/>",
            iq.attr("id").unwrap(),
            iq.attr("from").unwrap()
        ),
        _ => format!(
            "<iq type='error' id='{}' to='{}'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
            iq.attr("id").unwrap(),
            iq.attr("from").unwrap()
        ),
    };
    send(app, &reply).await;
    (
        iq.attr("from").unwrap_or_default().to_owned(),
        publish.attr("node").unwrap_or_default().to_owned(),
        fields,
        options,
    )
}

pub fn field<'a>(fields: &'a [(String, String)], var: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(v, _)| v == var)
        .map(|(_, value)| value.as_str())
}
