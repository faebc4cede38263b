//! The typed client of the HTTPS service, for the CLI (admin API) and the sync agent
//! (AXL API). One client is one TLS connection, so a channel-bound session stays on
//! the channel it was bound to.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
pub use hyper::Method;
use hyper::client::conn::http1::SendRequest;
use hyper::{StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::auth::OPAQUE_SCHEME;
use crate::pake::{ClientStart, PakeError};
use crate::soap::{Fault, Request, Response};

/// Time to connect and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for one request and its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer read.
const MAX_RESPONSE: usize = 32 * 1024 * 1024;

/// How the client decides to trust the server's certificate.
#[derive(Clone)]
pub enum ServerTrust {
    /// A verifier over the trust store (pinned or CA-signed). A server it refuses is
    /// dropped during the handshake, before any request (or credential) is sent.
    Verified(Arc<dyn ServerCertVerifier>),
    /// Not trusted yet: only the channel-bound first contact may run on it.
    FirstContact,
}

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, std::io::Error),
    #[error("{0} did not answer in time")]
    Timeout(String),
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("{status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("SOAP fault {0}")]
    Fault(Fault),
    #[error(transparent)]
    Pake(#[from] PakeError),
    #[error("refusing to send a password to a server whose certificate is not verified")]
    NotTrusted,
    #[error("the channel-bound exchange needs TLS 1.3")]
    NoExporter,
    #[error("the TLS client configuration was refused: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("cannot build the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("cannot read the answer: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("an OPAQUE step did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the server's OPAQUE challenge lacks sid or data")]
    Challenge,
    #[error("{0} answered with something else")]
    UnexpectedAnswer(&'static str),
    #[error("{addr} is a node of this cluster ({cluster})")]
    OwnCluster { addr: String, cluster: String },
    #[error(
        "{addr} serves the XMPP domain {theirs}, this cluster serves {ours}: a mesh serves one domain"
    )]
    DomainMismatch {
        addr: String,
        theirs: String,
        ours: String,
    },
    #[error("the server showed no certificate")]
    NoServerCertificate,
    #[error("the peer's certificate list does not include the certificate it presented ({0})")]
    UnlistedCertificate(String),
    #[error("cannot pin the peer's certificate: {0}")]
    Pin(#[from] crate::trust::PinError),
    #[error("{0:?} is not host:port")]
    Address(String),
    #[error("cannot resolve {host}: {reason}")]
    Unresolved { host: String, reason: String },
    #[error("the answer does not match the admin API: {0}")]
    Answer(serde_json::Error),
}

/// A connection to a node's HTTPS service.
pub struct AxlClient {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
    exporter: Option<[u8; 32]>,
    server_chain: Vec<CertificateDer<'static>>,
    verified: bool,
    authorization: Option<String>,
    /// The channel-bound first contact succeeded on this connection: the server
    /// proved it knows the AXL credential, so a peer credential may be sent too.
    contacted: bool,
    /// The server's clock minus ours at the last answer, in seconds (HTTP `Date`,
    /// one-second resolution).
    clock_skew: Option<i64>,
}

impl AxlClient {
    /// Connects to `addr` (host:port), expecting `server_name` in the certificate.
    pub async fn connect(
        addr: &str,
        server_name: &str,
        trust: ServerTrust,
    ) -> Result<AxlClient, ClientError> {
        AxlClient::connect_as(addr, server_name, trust, None).await
    }

    /// [`AxlClient::connect`], presenting `identity` as the TLS client certificate (a
    /// node calling a peer: it proves it holds the key of the certificate it asks
    /// the peer to pin).
    pub async fn connect_as(
        addr: &str,
        server_name: &str,
        trust: ServerTrust,
        identity: Option<&impmesh_certs::NodeIdentity>,
    ) -> Result<AxlClient, ClientError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (verifier, versions, verified): (Arc<dyn ServerCertVerifier>, &[_], bool) = match trust
        {
            ServerTrust::Verified(v) => (v, rustls::DEFAULT_VERSIONS, true),
            ServerTrust::FirstContact => (
                impmesh_certs::FirstContactVerifier::new(),
                &[&rustls::version::TLS13],
                false,
            ),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match identity {
            Some(identity) => {
                let (chain, key) = identity.client_auth();
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| ClientError::ServerName(server_name.to_owned()))?;
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| ClientError::Connect(addr.to_owned(), e))?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| ClientError::Tls(addr.to_owned(), e))
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ClientError::Timeout(addr.to_owned()))??;
        let conn = tls.get_ref().1;
        let server_chain = conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let exporter = impmesh_certs::tls_exporter(conn);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTPS client connection ended");
            }
        });
        Ok(AxlClient {
            sender,
            authority: addr.to_owned(),
            exporter,
            server_chain,
            verified,
            authorization: None,
            contacted: false,
            clock_skew: None,
        })
    }

    /// The certificate chain the server presented.
    pub fn server_chain(&self) -> &[CertificateDer<'static>] {
        &self.server_chain
    }

    /// Uses HTTP Basic from now on; refused unless the server's certificate verified.
    pub fn use_basic(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        if !self.verified {
            return Err(ClientError::NotTrusted);
        }
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.authorization = Some(format!("Basic {token}"));
        Ok(())
    }

    /// Uses a bearer token (the node's admin token) from now on; refused unless the
    /// server's certificate verified.
    pub fn use_bearer(&mut self, token: &str) -> Result<(), ClientError> {
        if !self.verified {
            return Err(ClientError::NotTrusted);
        }
        self.authorization = Some(format!("Bearer {token}"));
        Ok(())
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(
                header::USER_AGENT,
                concat!("impmesh/", env!("CARGO_PKG_VERSION")),
            );
        if !body.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        if let Some(a) = authorization {
            builder = builder.header(header::AUTHORIZATION, a);
        }
        let request = builder.body(Full::new(Bytes::from(body)))?;
        let exchange = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(ClientError::Body)?
                .to_bytes();
            Ok::<_, ClientError>((parts.status, parts.headers, body))
        };
        let sent = std::time::SystemTime::now();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.authority.clone()))??;
        let received = std::time::SystemTime::now();
        if let Some(date) = answer
            .1
            .get(header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
        {
            // The server stamped the answer between our sending and receiving it.
            let secs = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
            };
            let middle = (secs(sent) + secs(received)) / 2.0;
            // Date truncates to the second: compare with the middle of that second.
            self.clock_skew = Some((secs(date) + 0.5 - middle).round() as i64);
        }
        Ok(answer)
    }

    /// The server's clock minus ours, in seconds, from the last answer's `Date`.
    pub fn clock_skew(&self) -> Option<i64> {
        self.clock_skew
    }

    /// Runs one AXL operation with the credentials set before.
    pub async fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let auth = self.authorization.clone();
        let (status, _, body) = self
            .send(
                Method::POST,
                "/axl/",
                auth.as_deref(),
                "text/xml; charset=utf-8",
                request.to_envelope(),
            )
            .await?;
        answer(request, status, &body)
    }

    /// The channel-bound first contact: authenticates this server and this client to
    /// each other with the shared AXL credential, bound to this TLS connection, and then
    /// runs `request`. The password never leaves this process; when the server cannot
    /// prove it knows the credential over this very channel (a wrong password, or a man
    /// in the middle), this fails before the client's proof is sent. Later calls on this
    /// client use the session it opened.
    pub async fn first_contact(
        &mut self,
        user: &str,
        password: &str,
        request: &Request,
    ) -> Result<Response, ClientError> {
        let exporter = self.exporter.ok_or(ClientError::NoExporter)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let pw = password.to_owned();
        let start = tokio::task::spawn_blocking(move || ClientStart::new(&pw)).await??;
        let ke1 = format!(
            "{OPAQUE_SCHEME} user=\"{}\", data=\"{}\"",
            b64.encode(user),
            b64.encode(&start.ke1)
        );
        let (status, headers, body) = self
            .send(Method::POST, "/axl/", Some(&ke1), "", vec![])
            .await?;
        if status != StatusCode::UNAUTHORIZED {
            return Err(status_error(status, &body));
        }
        let challenge = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case(OPAQUE_SCHEME)
                    .then(|| rest.to_owned())
            })
            .ok_or_else(|| status_error(status, &body))?;
        let params = crate::auth::params(&challenge);
        let (Some(sid), Some(ke2)) = (
            params.get("sid").cloned(),
            params.get("data").and_then(|d| b64.decode(d).ok()),
        ) else {
            return Err(ClientError::Challenge);
        };
        let pw = password.to_owned();
        let ke3 = tokio::task::spawn_blocking(move || start.finish(&pw, &ke2, &exporter)).await??;
        let finish = format!(
            "{OPAQUE_SCHEME} sid=\"{sid}\", data=\"{}\"",
            b64.encode(ke3)
        );
        let (status, headers, body) = self
            .send(
                Method::POST,
                "/axl/",
                Some(&finish),
                "text/xml; charset=utf-8",
                request.to_envelope(),
            )
            .await?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(status_error(status, &body));
        }
        if let Some(token) = headers
            .get("authentication-info")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::auth::params(v).remove("token"))
        {
            self.authorization = Some(format!("Bearer {token}"));
        }
        let answer = answer(request, status, &body)?;
        self.contacted = true;
        Ok(answer)
    }

    /// One admin API call; returns the status and the JSON answer as it came (tests
    /// look at the wire format; the CLI uses [`Self::admin_call`]).
    pub async fn admin(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let (status, answer) = self.admin_request(method, path, body).await?;
        let value = serde_json::from_slice(&answer)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&answer).into()));
        Ok((status, value))
    }

    /// Sends a JSON body to `/admin/v1{path}` with this client's credential.
    async fn admin_request(
        &mut self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let auth = self.authorization.clone();
        let (status, _, answer) = self
            .send(
                method,
                &format!("/admin/v1{path}"),
                auth.as_deref(),
                "application/json",
                body,
            )
            .await?;
        Ok((status, answer))
    }

    /// One admin API call with the types of [`crate::api`]: the answer, or
    /// [`ClientError::Status`] with the API's message.
    pub async fn admin_call<T, B>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError>
    where
        T: serde::de::DeserializeOwned,
        B: serde::Serialize + ?Sized,
    {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(ClientError::Answer)?,
            None => vec![],
        };
        let (status, answer) = self.admin_request(method, path, body).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<crate::api::ApiError>(&answer)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&answer).into_owned());
            return Err(ClientError::Status { status, message });
        }
        serde_json::from_slice(&answer).map_err(ClientError::Answer)
    }

    /// A plain GET (for `/metrics`, `/healthz`, `/readyz`): status and body text.
    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, String), ClientError> {
        self.raw(Method::GET, path, vec![]).await
    }

    /// Any request with the credentials set before: status and body text.
    pub async fn raw(
        &mut self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, String), ClientError> {
        let auth = self.authorization.clone();
        let (status, _, body) = self
            .send(
                method,
                path,
                auth.as_deref(),
                "text/xml; charset=utf-8",
                body,
            )
            .await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> ClientError {
    let text = String::from_utf8_lossy(body);
    // A SOAP fault says why better than the status line.
    let message = crate::xml::El::parse(body, &[crate::soap::SOAP_NS, crate::soap::AXL_NS])
        .ok()
        .and_then(|env| {
            env.children
                .first()
                .and_then(|b| b.children.first())
                .and_then(|f| f.child("", "faultstring"))
                .map(|s| s.text.clone())
        })
        .unwrap_or_else(|| text.chars().take(200).collect());
    ClientError::Status { status, message }
}

fn answer(request: &Request, status: StatusCode, body: &[u8]) -> Result<Response, ClientError> {
    match Response::parse(request, body) {
        Ok(r) if status.is_success() => Ok(r),
        Ok(_) => Err(status_error(status, body)),
        Err(fault)
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::TOO_MANY_REQUESTS =>
        {
            Err(ClientError::Status {
                status,
                message: fault.message,
            })
        }
        Err(fault) => Err(ClientError::Fault(fault)),
    }
}

/// This cluster's side of a peering, as offered to a peer.
#[derive(Debug, Clone)]
pub struct OurSide {
    pub cluster: String,
    /// The XMPP domain we serve (a peer must serve the same).
    pub domain: String,
    /// host:port where the peer reaches our AXL endpoint.
    pub address: String,
    pub server_name: String,
    /// The credential the peer will call us with (we keep its hash).
    pub token: String,
    pub certificates: Vec<crate::soap::NodeCertificate>,
}

/// What a first contact established with a peer cluster.
#[derive(Debug, Clone)]
pub struct Peering {
    pub info: crate::soap::ClusterInfo,
    pub certificates: Vec<crate::soap::NodeCertificate>,
    /// The credential we call the peer with.
    pub token: String,
}

/// The first contact with a peer cluster, as `peer add` runs it: connects to `addr`
/// without trusting its certificate yet, runs the channel-bound exchange with the
/// peer's AXL credential (learning the peer's cluster from `getClusterInfo`), then
/// `exchangeCertificates`: offers our certificates and a credential for the peer to
/// call us with, and gets the peer's certificates and a credential to call it with.
/// Checks that the certificates include the one the TLS handshake showed and pins
/// them in `store` for the peer's cluster. Nothing is pinned, and no password or
/// proof leaves this process, when the peer cannot prove it knows the credential over
/// this very channel.
pub async fn exchange_certificates(
    store: &impmesh_store::Store,
    addr: &str,
    server_name: &str,
    credential: (&str, &str),
    ours: OurSide,
    identity: &impmesh_certs::NodeIdentity,
    peer_token: Option<&str>,
) -> Result<Peering, ClientError> {
    let mut client =
        AxlClient::connect_as(addr, server_name, ServerTrust::FirstContact, Some(identity)).await?;
    let Response::ClusterInfo(info) = client
        .first_contact(credential.0, credential.1, &Request::GetClusterInfo)
        .await?
    else {
        return Err(ClientError::UnexpectedAnswer("getClusterInfo"));
    };
    if info.cluster.eq_ignore_ascii_case(&ours.cluster) {
        return Err(ClientError::OwnCluster {
            addr: addr.to_owned(),
            cluster: info.cluster,
        });
    }
    if !info.domain.eq_ignore_ascii_case(&ours.domain) {
        return Err(ClientError::DomainMismatch {
            addr: addr.to_owned(),
            theirs: info.domain,
            ours: ours.domain,
        });
    }
    // A peer we already have: speak as that peering (its credential), so the peer
    // lets us change our own pins, address and credential, and nobody else's.
    let session = client.authorization.clone();
    if let Some(token) = peer_token {
        client.use_peer_token(&ours.cluster, token)?;
    }
    let request = Request::ExchangeCertificates {
        cluster: ours.cluster,
        address: ours.address,
        server_name: ours.server_name,
        token: ours.token,
        certificates: ours.certificates,
    };
    let answer = match client.call(&request).await {
        // The peer no longer knows our credential (it removed us): run the exchange
        // as the first contact it now is, on the session opened above.
        Err(ClientError::Status { status, .. })
            if status == StatusCode::UNAUTHORIZED && peer_token.is_some() =>
        {
            client.authorization = session;
            client.call(&request).await?
        }
        other => other?,
    };
    let Response::Exchanged {
        certificates,
        token,
    } = answer
    else {
        return Err(ClientError::UnexpectedAnswer("exchangeCertificates"));
    };
    // Only the certificate the peer presented on this connection is proven (it signed
    // the handshake with its key); it must be one it lists.
    let seen = client
        .server_chain()
        .first()
        .cloned()
        .ok_or(ClientError::NoServerCertificate)?;
    let fingerprint = impmesh_certs::fingerprint(&seen);
    if !certificates
        .iter()
        .any(|c| c.fingerprint.eq_ignore_ascii_case(&fingerprint))
    {
        return Err(ClientError::UnlistedCertificate(fingerprint));
    }
    crate::trust::pin_proven(store, &info.cluster, &seen).await?;
    Ok(Peering {
        info,
        certificates,
        token,
    })
}

/// Uses the credential a peer issued to this cluster from now on.
impl AxlClient {
    pub fn use_peer_token(&mut self, our_cluster: &str, token: &str) -> Result<(), ClientError> {
        if !self.verified && !self.contacted {
            return Err(ClientError::NotTrusted);
        }
        self.authorization = Some(format!(
            "{} cluster=\"{our_cluster}\", token=\"{token}\"",
            crate::auth::PEER_SCHEME
        ));
        Ok(())
    }
}
