//! The HTTPS listener: our own TLS accept loop (so every request knows its connection's
//! TLS exporter value, and the certificate can be swapped at run time), HTTP/1.1 by
//! hyper, routes by axum.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use impmesh_store::StoreError;
use tokio::net::TcpListener;

use crate::NodeControl;
use crate::auth::Outcome;
use crate::cache::PageKey;
use crate::soap::{
    ClusterInfo, Cursor, Fault, NodeCertificate, NodeInfo, Request as AxlRequest,
    Response as AxlResponse, RoomEntry, UserEntry, UserPage,
};
use crate::state::{ChangeNotice, ConnInfo, Https, OpName, Surface};

impl<C: NodeControl> Https<C> {
    /// Binds `addr` and serves `surface` on it until [`Self::shutdown`]; returns the
    /// bound address.
    pub async fn listen(
        self: &Arc<Self>,
        addr: SocketAddr,
        surface: Surface,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        if let Err(e) = impmesh_limits::set_dscp(&listener, self.limits.dscp) {
            tracing::debug!(error = %e, "cannot set the DSCP class of the HTTPS listener");
        }
        let bound = listener.local_addr()?;
        if surface == Surface::Peers {
            let sweeper = self.clone();
            self.tracker
                .spawn(async move { sweeper.sweep_refusals().await });
        }
        let this = self.clone();
        let app = router(self.clone(), surface);
        let slots = Arc::new(tokio::sync::Semaphore::new(self.limits.max_connections));
        let per_address = impmesh_limits::PerAddress::new(self.limits.max_connections_per_address);
        self.tracker.spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = this.shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(pair) => pair,
                        Err(e) => {
                            tracing::warn!(error = %e, "HTTPS accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let Some(slot) = per_address.acquire(peer.ip()) else {
                    tracing::debug!(%peer, "HTTPS connection refused: too many from its address");
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "HTTPS connection refused: too many connections");
                    continue;
                };
                let (this, app) = (this.clone(), app.clone());
                this.tracker.clone().spawn(async move {
                    this.serve_connection(tcp, peer, app).await;
                    drop((permit, slot));
                });
            }
        });
        Ok(bound)
    }

    async fn serve_connection(&self, tcp: tokio::net::TcpStream, peer: SocketAddr, app: Router) {
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let stream =
            match tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTPS TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "HTTPS TLS handshake timed out");
                    return;
                }
            };
        let conn = stream.get_ref().1;
        let exporter = impmesh_certs::tls_exporter(conn);
        let client_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let info = ConnInfo {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            peer,
            exporter,
            client_cert,
        };
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(info.clone());
                let app = app.clone();
                async move {
                    use tower::ServiceExt as _;
                    app.oneshot(req.map(Body::new)).await
                }
            });
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.request_timeout)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(http);
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTPS connection ended with an error");
                }
            }
            _ = self.shutdown.cancelled() => {
                http.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
            }
        }
    }
}

/// Every route of the service.
fn router<C: NodeControl>(https: Arc<Https<C>>, surface: Surface) -> Router {
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<C>));
    let routes = match surface {
        Surface::Peers => routes
            .route("/axl", post(axl::<C>))
            .route("/axl/", post(axl::<C>)),
        Surface::Admin => routes
            .route("/metrics", get(crate::metrics::metrics::<C>))
            .nest("/admin/v1", crate::admin::routes(https.clone())),
    };
    routes
        .layer(axum::extract::DefaultBodyLimit::max(
            https.limits.body_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            https.clone(),
            log_request::<C>,
        ))
        .with_state(https)
}

/// Logs every request with its outcome and counts it by operation and status.
async fn log_request<C: NodeControl>(
    State(https): State<Arc<Https<C>>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let peer = req
        .extensions()
        .get::<ConnInfo>()
        .map(|c| c.peer.to_string())
        .unwrap_or_default();
    let matched = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let op = response
        .extensions()
        .get::<OpName>()
        .map(|o| o.0)
        .unwrap_or_else(|| static_label(matched.as_deref()));
    https.stats.count(op, status);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let quiet = matches!(path.as_str(), "/metrics" | "/healthz" | "/readyz") && status < 400;
    if quiet {
        tracing::debug!(%method, %path, status, op, %peer, ms, "https request");
    } else {
        tracing::info!(%method, %path, status, op, %peer, ms, "https request");
    }
    response
}

/// A bounded set of metric labels for routes (never the raw path: it could be anything).
fn static_label(matched: Option<&str>) -> &'static str {
    const KNOWN: &[&str] = &[
        "/healthz",
        "/readyz",
        "/metrics",
        "/axl",
        "/axl/",
        "/admin/v1/status",
        "/admin/v1/users",
        "/admin/v1/users/{name}",
        "/admin/v1/users/{name}/password",
        "/admin/v1/certificates",
        "/admin/v1/certificates/csr",
        "/admin/v1/certificates/import",
        "/admin/v1/certificates/regenerate",
        "/admin/v1/certificates/reload",
        "/admin/v1/trust",
        "/admin/v1/trust/{fingerprint}",
        "/admin/v1/alarms",
        "/admin/v1/alarms/history",
        "/admin/v1/troubleshoot",
        "/admin/v1/peers",
        "/admin/v1/peers/{cluster}",
        "/admin/v1/peers/{cluster}/accept",
        "/admin/v1/peers/{cluster}/sync",
        "/admin/v1/axl-users",
        "/admin/v1/axl-users/{name}",
    ];
    matched
        .and_then(|m| KNOWN.iter().find(|k| **k == m).copied())
        .unwrap_or("other")
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz<C: NodeControl>(State(https): State<Arc<Https<C>>>) -> Response {
    let store_ok = tokio::time::timeout(Duration::from_secs(2), https.store.current_usn())
        .await
        .is_ok_and(|r| r.is_ok());
    match (store_ok, https.control.ready()) {
        (true, true) => (StatusCode::OK, "ready\n").into_response(),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response(),
        (_, false) => (StatusCode::SERVICE_UNAVAILABLE, "node not ready\n").into_response(),
    }
}

fn soap(status: StatusCode, body: impl Into<Bytes>, op: &'static str) -> Response {
    let body: Bytes = body.into();
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    response.extensions_mut().insert(OpName(op));
    response
}

fn fault(status: StatusCode, fault: &Fault, op: &'static str) -> Response {
    soap(status, fault.to_envelope(), op)
}

/// `POST /axl/`: authenticate, parse, run one operation.
async fn axl<C: NodeControl>(State(https): State<Arc<Https<C>>>, req: Request) -> Response {
    let Some(conn) = req.extensions().get::<ConnInfo>().cloned() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let outcome = https
        .auth
        .axl(
            &https.store,
            conn.peer.ip(),
            conn.id,
            conn.exporter.as_ref().map(|e| &e[..]),
            authorization.as_deref(),
        )
        .await;
    let (user, info) = match outcome {
        Outcome::Ok { user, info } => (user, info),
        Outcome::Challenge(challenges) => {
            let mut r = fault(
                StatusCode::UNAUTHORIZED,
                &Fault::client(
                    "authenticationRequired",
                    "authenticate as the intercluster application user",
                ),
                "auth",
            );
            for c in challenges {
                if let Ok(v) = HeaderValue::from_str(&c) {
                    r.headers_mut().append(header::WWW_AUTHENTICATE, v);
                }
            }
            return r;
        }
        Outcome::Denied(why) => {
            return fault(
                StatusCode::UNAUTHORIZED,
                &Fault::client("authenticationFailed", why),
                "auth",
            );
        }
        Outcome::Throttled => {
            let mut r = fault(
                StatusCode::TOO_MANY_REQUESTS,
                &Fault::client(
                    "tooManyFailures",
                    "too many failed authentications; wait and retry",
                ),
                "auth",
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(https.limits.auth.failure_window.as_secs()),
            );
            return r;
        }
    };
    let body = match https.read_body(req.into_body()).await {
        Ok(b) => b,
        Err(status) => {
            let why = match status {
                StatusCode::PAYLOAD_TOO_LARGE => {
                    format!("the body exceeds {} bytes", https.limits.body_limit)
                }
                StatusCode::REQUEST_TIMEOUT => "the body did not arrive in time".to_owned(),
                _ => "the body could not be read".to_owned(),
            };
            return fault(status, &Fault::client("badBody", why), "invalid");
        }
    };
    let mut response = match AxlRequest::parse(&body) {
        Err(f) => fault(StatusCode::BAD_REQUEST, &f, "invalid"),
        Ok(request) => {
            let op = request.name();
            match answer(&https, request, &user, &conn).await {
                Ok(body) => soap(StatusCode::OK, body, op),
                Err(f) if f.client => fault(StatusCode::BAD_REQUEST, &f, op),
                Err(f) => fault(StatusCode::INTERNAL_SERVER_ERROR, &f, op),
            }
        }
    };
    if let Some(info) = info
        && let Ok(v) = HeaderValue::from_str(&info)
    {
        response.headers_mut().insert("authentication-info", v);
    }
    response
}

/// Runs one operation and serializes its answer. A listing page comes from
/// [`crate::cache::AnswerCache`] when another peer just asked for the same one: a first
/// page is pinned to the current USN first, so that every page has its full name.
async fn answer<C: NodeControl>(
    https: &Https<C>,
    mut request: AxlRequest,
    user: &str,
    conn: &ConnInfo,
) -> Result<Bytes, Fault> {
    let op = request.name();
    // Rooms are listed only while the feature is on here ([sync] disable_features):
    // a peer that asks anyway gets users only, as from a release without rooms.
    let rooms_on = https
        .identity
        .features
        .iter()
        .any(|f| f == crate::features::ROOMS);
    match &mut request {
        AxlRequest::ListUsers { rooms, .. } | AxlRequest::GetDirectoryDigest { rooms } => {
            *rooms &= rooms_on;
        }
        _ => {}
    }
    let key = match &mut request {
        AxlRequest::ListUsers {
            since_usn,
            cursor,
            page_size,
            rooms,
        } => {
            let c = match *cursor {
                Some(c) => c,
                None => Cursor {
                    snapshot_usn: https.store.current_usn().await.map_err(store_fault)?,
                    after_usn: *since_usn,
                },
            };
            *cursor = Some(c);
            Some(PageKey {
                since_usn: *since_usn,
                after_usn: c.after_usn,
                snapshot_usn: c.snapshot_usn,
                page_size: *page_size,
                rooms: *rooms,
            })
        }
        _ => None,
    };
    let Some(key) = key else {
        return Ok(Bytes::from(
            run(https, &request, user, conn).await?.to_envelope(op),
        ));
    };
    if let Some(body) = https.answers.page(&key) {
        return Ok(body);
    }
    // Peers that ask for the page while another request reads it wait for that one.
    let _turn = https.answers.read_turn(key).await;
    if let Some(body) = https.answers.page(&key) {
        return Ok(body);
    }
    let body = Bytes::from(run(https, &request, user, conn).await?.to_envelope(op));
    https.answers.keep_page(key, body.clone());
    Ok(body)
}

fn store_fault(e: StoreError) -> Fault {
    match e {
        StoreError::UsnTooOld { .. } => Fault::client("usnTooOld", e.to_string()),
        other => {
            tracing::error!(error = %other, "store error in the AXL API");
            Fault::server("storeUnavailable", "the store failed; retry later")
        }
    }
}

async fn run<C: NodeControl>(
    https: &Https<C>,
    request: &AxlRequest,
    user: &str,
    conn: &ConnInfo,
) -> Result<AxlResponse, Fault> {
    let store = &https.store;
    let from = conn.peer.ip();
    match request {
        AxlRequest::GetClusterInfo => {
            let nodes = store
                .cluster_nodes(&https.identity.cluster)
                .await
                .map_err(store_fault)?;
            Ok(AxlResponse::ClusterInfo(ClusterInfo {
                cluster: https.identity.cluster.clone(),
                domain: https.identity.domain.clone(),
                version: https.identity.version.clone(),
                protocol: crate::features::PROTOCOL,
                features: https.identity.features.clone(),
                usn: store.current_usn().await.map_err(store_fault)?,
                nodes: nodes
                    .into_iter()
                    .map(|n| NodeInfo {
                        name: n.name,
                        host: n.host,
                        c2s_port: n.c2s_port,
                        c2s_tls_port: n.c2s_tls_port,
                        link_port: n.link_port,
                        https_port: n.https_port,
                        upload_url: n.upload_url,
                        fingerprint: n.fingerprint,
                    })
                    .collect(),
            }))
        }
        AxlRequest::ListUsers {
            since_usn,
            cursor,
            page_size,
            rooms,
        } => {
            let page = store
                .directory_page(
                    *since_usn,
                    cursor.map(|c| c.after_usn),
                    cursor.map(|c| c.snapshot_usn),
                    *page_size,
                    *rooms,
                )
                .await
                .map_err(store_fault)?;
            let next_cursor = page.more.then(|| Cursor {
                snapshot_usn: page.snapshot_usn,
                after_usn: page.last_usn().unwrap_or(*since_usn),
            });
            Ok(AxlResponse::Users(UserPage {
                snapshot_usn: page.snapshot_usn,
                next_cursor,
                users: page
                    .entries
                    .into_iter()
                    .map(|e| UserEntry {
                        name: e.username.into(),
                        home_cluster: e.home_cluster.into(),
                        home_node: e.home_node.into(),
                        usn: e.usn,
                        deleted: e.deleted,
                    })
                    .collect(),
                rooms: page
                    .rooms
                    .into_iter()
                    .map(|r| RoomEntry {
                        name: r.name,
                        home_cluster: r.home_cluster.into(),
                        home_node: r.home_node.into(),
                        created_at: r.created_at,
                        usn: r.usn,
                        deleted: r.deleted,
                    })
                    .collect(),
            }))
        }
        AxlRequest::GetCertificates => {
            Ok(AxlResponse::Certificates(node_certificates(https).await?))
        }
        AxlRequest::ExchangeCertificates {
            cluster,
            address,
            server_name,
            token,
            certificates,
        } => {
            check_peering(
                &https.identity.cluster,
                cluster,
                address,
                server_name,
                token,
            )?;
            let proven =
                match crate::exchange::authorize(https, conn, user, cluster, certificates).await {
                    Ok(p) => p,
                    Err(refusal) => {
                        return Err(https.refuse_exchange(conn, user, cluster, refusal).await);
                    }
                };
            let added = crate::trust::pin_proven(store, cluster, &proven.cert)
                .await
                .map_err(|e| Fault::client("badCertificate", e.to_string()))?;
            let issued = crate::auth::random_token();
            store
                .upsert_peer(&impmesh_store::PeerRecord {
                    cluster: cluster.as_str().into(),
                    address: address.clone(),
                    server_name: server_name.clone(),
                    state: impmesh_store::PeerState::Pending,
                    added_here: false,
                    our_token: Some(token.clone()),
                    their_token_hash: Some(crate::auth::token_hash(&issued)),
                    added_at: impmesh_store::now_unix(),
                    accepted_at: None,
                })
                .await
                .map_err(store_fault)?;
            let state = if proven.existing == Some(impmesh_store::PeerState::Active) {
                "active"
            } else {
                let message = format!(
                    "cluster {cluster} ({address}) added this cluster as a peer; accept it with \
                     `impmesh peer accept {cluster}` or remove it with `impmesh peer del {cluster}`"
                );
                store
                    .raise_alarm(impmesh_store::alarms::PEER_PENDING, cluster, &message)
                    .await
                    .map_err(store_fault)?;
                "pending: accept it with `impmesh peer accept`"
            };
            tracing::info!(peer = %cluster, %address, %user, %from, pinned = added, state, "peer cluster exchanged certificates");
            let _ = https.peerings.send(cluster.clone());
            Ok(AxlResponse::Exchanged {
                certificates: node_certificates(https).await?,
                token: issued,
            })
        }
        AxlRequest::GetDirectoryDigest { rooms } => {
            let usn = store.current_usn().await.map_err(store_fault)?;
            // The kept digest covers the rooms too (they are few): one answer for
            // every asker.
            let d = https
                .answers
                .digest_at(usn, async || store.directory_digest(true).await)
                .await
                .map_err(store_fault)?;
            Ok(AxlResponse::Digest {
                usn: d.usn,
                count: d.count,
                sha256: d.sha256,
                rooms: d.rooms.filter(|_| *rooms),
            })
        }
        AxlRequest::NotifyChange { cluster, usn } => {
            // A peer nudges only its own sync.
            if !user.eq_ignore_ascii_case(&format!("peer:{cluster}")) {
                return Err(Fault::client(
                    "forbidden",
                    format!("notifyChange for {cluster} needs that peer's own credential"),
                ));
            }
            tracing::info!(peer = %cluster, usn, %user, %from, "peer asks to be pulled");
            let _ = https.notices.send(ChangeNotice {
                cluster: cluster.clone(),
                usn: *usn,
                from,
            });
            Ok(AxlResponse::NotifyAccepted)
        }
        AxlRequest::RemovePeer { cluster } => {
            if !https
                .identity
                .features
                .iter()
                .any(|f| f == crate::features::PEER_REMOVAL)
            {
                return Err(Fault::client(
                    "unknownOperation",
                    "removePeer is turned off here ([sync] disable_features)",
                ));
            }
            if !user.eq_ignore_ascii_case(&format!("peer:{cluster}")) {
                return Err(Fault::client(
                    "forbidden",
                    format!("removePeer for {cluster} needs that peer's own credential"),
                ));
            }
            tracing::warn!(peer = %cluster, %from, "the peer removed this cluster");
            https
                .control
                .peer_removed_us(cluster)
                .await
                .map_err(|e| Fault::server("internal", e.to_string()))?;
            Ok(AxlResponse::PeerRemoved)
        }
    }
}

/// Refuses a peering that cannot work: ourselves, or unusable names and credentials.
fn check_peering(
    ours: &str,
    cluster: &str,
    address: &str,
    server_name: &str,
    token: &str,
) -> Result<(), Fault> {
    let bad = |what: String| Err(Fault::client("badPeering", what));
    if cluster.eq_ignore_ascii_case(ours) {
        return bad(format!("{cluster} is this cluster"));
    }
    if !impmesh_certs::is_dns_name(cluster) {
        return bad(format!("{cluster:?} is not a cluster name"));
    }
    let port_ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return bad(format!("address {address:?} is not host:port"));
    }
    if server_name.is_empty() || server_name.len() > 253 {
        return bad("bad serverName".into());
    }
    if !(32..=256).contains(&token.len())
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("the token must be 32 to 256 URL-safe characters".into());
    }
    Ok(())
}

async fn node_certificates<C: NodeControl>(
    https: &Https<C>,
) -> Result<Vec<NodeCertificate>, Fault> {
    Ok(https
        .store
        .cluster_nodes(&https.identity.cluster)
        .await
        .map_err(store_fault)?
        .into_iter()
        .filter(|n| !n.cert_pem.is_empty())
        .map(|n| NodeCertificate {
            node: n.name,
            fingerprint: n.fingerprint,
            pem: n.cert_pem,
        })
        .collect())
}
