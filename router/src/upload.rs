//! HTTP file upload (XEP-0363): slots handed out by the user's home node (the domain
//! answers `<request/>`), and the HTTPS service on `[listen] client_https` that takes
//! each slot's PUT and serves its GETs (ranges too) from files under the data
//! directory, until they expire. Names, sizes and ranges are checked in
//! `core::upload`; this does the I/O.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use impmesh_store::{Claim, Expiry, Reserved, SlotState, Upload};
use minidom::Element;
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::Server;
use crate::context::Context;
use crate::core::upload::{self as core, Range, SlotRefusal, SlotRequest};

type Body = BoxBody<Bytes, std::io::Error>;

/// How long a PUT may wait for the next part of its body.
const BODY_IDLE: Duration = Duration::from_secs(30);
/// How long one connection may last, requests and transfers included: a client that
/// stops reading a download, or trickles an upload, lets go of its place by then.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(3600);
/// An upload claimed this long after its slot's time is left over from a crash (a
/// live one ended within [`CONNECTION_LIFETIME`]).
const STALE_UPLOAD: i64 = 2 * 3600;
/// Files and open slots one account may have.
pub const MAX_FILES: u64 = 1000;
/// How often expired slots and files are removed, at most.
const EXPIRY_PERIOD: Duration = Duration::from_secs(300);
/// Slots looked at per expiry statement.
const EXPIRY_BATCH: usize = 1000;
/// How often files without a slot are looked for.
const ORPHAN_PERIOD: Duration = Duration::from_secs(3600);
/// A partial file untouched this long is left over from a crash.
const STALE_PART: Duration = Duration::from_secs(3600);

impl Context<'_> {
    /// `<request xmlns='urn:xmpp:http:upload:0'/>` to the domain: a slot, or the
    /// refusal XEP-0363 §5 names.
    pub(crate) async fn upload_slot(&mut self, iq: &Element, request: &Element) {
        let (Some(settings), Some(base)) = (
            self.server.config.upload.clone(),
            self.server.upload_url.get().cloned(),
        ) else {
            self.reply_error(
                iq,
                crate::error::StanzaErrorCondition::ServiceUnavailable,
                None,
            );
            return;
        };
        let slot = match SlotRequest::parse(request, settings.max_file_bytes) {
            Ok(slot) => slot,
            Err(refusal) => return self.refuse_slot(iq, &refusal),
        };
        let id = random_hex();
        let token = random_hex();
        let now = impmesh_store::now_unix();
        let record = Upload {
            id: id.clone(),
            owner: self.user(),
            node: self.server.config.node_name.to_string(),
            filename: slot.filename,
            size: slot.size,
            content_type: slot.content_type.unwrap_or_default(),
            token_sha256: sha256_hex(&token),
            created: now,
            put_before: now
                .saturating_add(i64::try_from(settings.slot_ttl.as_secs()).unwrap_or(i64::MAX)),
            state: SlotState::Open,
        };
        match self
            .server
            .store
            .upload_reserve(&record, settings.quota_bytes, MAX_FILES)
            .await
        {
            Ok(Reserved::Reserved) => {
                let url = format!(
                    "{base}{}",
                    core::file_path(&record.node, &id, &record.filename)
                );
                self.reply_result(iq, Some(core::slot_xml(&url, &token)));
            }
            Ok(Reserved::QuotaFull { .. }) => self.refuse_slot(
                iq,
                &SlotRefusal::QuotaFull {
                    quota: settings.quota_bytes,
                },
            ),
            Ok(Reserved::TooMany) => {
                self.refuse_slot(iq, &SlotRefusal::TooMany { max: MAX_FILES });
            }
            Ok(Reserved::NoAccount) | Err(_) => self.reply_error(
                iq,
                crate::error::StanzaErrorCondition::InternalServerError,
                Some("the store failed"),
            ),
        }
    }

    fn refuse_slot(&mut self, iq: &Element, refusal: &SlotRefusal) {
        self.reply_iq(iq, "error", Some(core::refusal_xml(refusal)));
    }
}

/// 128 random bits, hex.
fn random_hex() -> String {
    crate::names::hex(&rand::random::<[u8; 16]>())
}

fn sha256_hex(s: &str) -> String {
    crate::names::hex(&sha2::Sha256::digest(s.as_bytes()))
}

impl Server {
    /// Binds the client HTTPS listener (XEP-0363 PUT and GET) and serves it until
    /// shutdown, with the client certificate, the client connection cap and the
    /// per-address cap of unauthenticated connections; starts the expiry of slots and
    /// files. Returns the bound address.
    /// Where this node serves uploaded files: `None` until [`Self::listen_upload`].
    pub fn upload_url(&self) -> Option<&str> {
        self.upload_url.get().map(String::as_str)
    }

    pub async fn listen_upload(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let Some(settings) = self.config.upload.clone() else {
            return Err(std::io::Error::other("uploads are not configured"));
        };
        tokio::fs::create_dir_all(&settings.dir).await?;
        let listener = TcpListener::bind(addr).await?;
        if let Err(e) = impmesh_limits::set_dscp(&listener, self.config.dscp) {
            tracing::debug!(error = %e, "cannot set the DSCP class of a listener");
        }
        let local = listener.local_addr()?;
        let url = settings
            .public_url
            .clone()
            .unwrap_or_else(|| match local.port() {
                443 => format!("https://{}", settings.default_host),
                port => format!("https://{}:{port}", settings.default_host),
            });
        tracing::info!(addr = %local, %url, "listening for file uploads");
        let _ = self.upload_url.set(url);
        let server = self.clone();
        self.tasks.spawn(async move {
            while let Some((permit, tcp, peer)) = crate::admit(
                &server.shutdown,
                &listener,
                &server.admission,
                "client https",
            )
            .await
            {
                let Some(slot) = server.preauth.acquire(peer.ip()) else {
                    server.stats.refused_preauth();
                    continue;
                };
                let server2 = server.clone();
                server.tasks.spawn(async move {
                    server2.serve_https(tcp, peer).await;
                    drop((permit, slot));
                });
            }
        });
        let server = self.clone();
        self.tasks
            .spawn(async move { server.expire_uploads().await });
        Ok(local)
    }

    async fn serve_https(self: Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls_https());
        let handshake = self.config.limits.handshake_timeout;
        let stream = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "client HTTPS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "client HTTPS handshake timed out");
                return;
            }
        };
        let server = self.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.http(req).await) }
        });
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(handshake)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(http);
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "client HTTPS connection ended with an error");
                }
            }
            () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                tracing::debug!(%peer, "client HTTPS connection closed: it lasted too long");
            }
            () = self.shutdown.cancelled() => {
                http.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
            }
        }
    }

    async fn http(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(settings) = self.config.upload.as_ref() else {
            return status(StatusCode::NOT_FOUND, "no uploads here");
        };
        let Some((node, id, name)) = core::parse_file_path(req.uri().path()) else {
            return status(StatusCode::NOT_FOUND, "no such file");
        };
        let mut response = match *req.method() {
            Method::OPTIONS => cors_preflight(),
            Method::PUT if node == self.config.node_name.as_str() => {
                self.put(req, settings, &id, &name).await
            }
            Method::GET | Method::HEAD if node == self.config.node_name.as_str() => {
                self.get(&req, settings, &id, &name).await
            }
            Method::GET | Method::HEAD => self.elsewhere(&node, &id, &name).await,
            Method::PUT => status(StatusCode::NOT_FOUND, "this slot is not on this node"),
            _ => {
                let mut r = status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
                r.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
                );
                r
            }
        };
        // Web clients upload and show files from their own origin.
        response.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        response
    }

    /// A GET for a file another node keeps: redirected to that node's upload URL when
    /// this node knows it.
    async fn elsewhere(&self, node: &str, id: &str, name: &str) -> Response<Body> {
        match self.store.upload_url_of(node).await {
            // Never to this node's own URL (nodes sharing one name): that would loop.
            Ok(Some(base)) if !base.is_empty() && Some(base.as_str()) != self.upload_url() => {
                let location = format!("{base}{}", core::file_path(node, id, name));
                match HeaderValue::from_str(&location) {
                    Ok(value) => {
                        let mut r = status(StatusCode::TEMPORARY_REDIRECT, "on another node");
                        r.headers_mut().insert(header::LOCATION, value);
                        r
                    }
                    Err(_) => status(StatusCode::NOT_FOUND, "no such file"),
                }
            }
            Ok(_) => status(StatusCode::NOT_FOUND, "no such file"),
            Err(_) => status(StatusCode::SERVICE_UNAVAILABLE, "the store failed"),
        }
    }

    async fn put(
        &self,
        req: Request<Incoming>,
        settings: &crate::config::UploadSettings,
        id: &str,
        name: &str,
    ) -> Response<Body> {
        let slot = match self.store.upload(id).await {
            Ok(Some(slot))
                if slot.filename == name && slot.node == self.config.node_name.as_str() =>
            {
                slot
            }
            Ok(_) => return status(StatusCode::NOT_FOUND, "no such slot"),
            Err(_) => return status(StatusCode::SERVICE_UNAVAILABLE, "the store failed"),
        };
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !bool::from(
            sha256_hex(token)
                .as_bytes()
                .ct_eq(slot.token_sha256.as_bytes()),
        ) {
            let mut r = status(
                StatusCode::UNAUTHORIZED,
                "the slot's Authorization header is missing or wrong",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        let length = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match length {
            None => return status(StatusCode::LENGTH_REQUIRED, "Content-Length is required"),
            Some(n) if n > slot.size => {
                return status(StatusCode::PAYLOAD_TOO_LARGE, "larger than the slot's size");
            }
            Some(n) if n < slot.size => {
                return status(StatusCode::BAD_REQUEST, "smaller than the slot's size");
            }
            Some(_) => {}
        }
        // The type the slot named, or the PUT's own when it named none (XEP-0363 §4).
        let sent = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("\u{0}"));
        let content_type = if slot.content_type.is_empty() {
            match core::clean_content_type(sent) {
                Ok(ty) => ty,
                Err(_) => {
                    return status(StatusCode::BAD_REQUEST, "Content-Type is not a media type");
                }
            }
        } else {
            let essence = |t: &str| {
                t.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            };
            if sent.is_some_and(|t| essence(t) != essence(&slot.content_type)) {
                return status(
                    StatusCode::BAD_REQUEST,
                    "Content-Type differs from the slot's",
                );
            }
            slot.content_type.clone()
        };
        match self.store.upload_claim(id, impmesh_store::now_unix()).await {
            Ok(Claim::Claimed) => {}
            Ok(Claim::Busy) => {
                return status(
                    StatusCode::CONFLICT,
                    "another upload to this slot is under way",
                );
            }
            Ok(Claim::Stored) => {
                return status(StatusCode::CONFLICT, "this slot already holds its file");
            }
            Ok(Claim::Expired) => return status(StatusCode::GONE, "this slot expired"),
            Err(_) => return status(StatusCode::SERVICE_UNAVAILABLE, "the store failed"),
        }
        // From here the slot is this request's: stored, or given back.
        let response = self
            .receive_file(req.into_body(), settings, id, slot.size, &content_type)
            .await;
        if response.status() != StatusCode::CREATED
            && let Err(e) = self.store.upload_release(id).await
        {
            tracing::warn!(error = %e, id, "cannot give a failed upload's slot back");
        }
        response
    }

    /// Writes a claimed slot's file and marks the slot stored.
    async fn receive_file(
        &self,
        body: Incoming,
        settings: &crate::config::UploadSettings,
        id: &str,
        size: u64,
        content_type: &str,
    ) -> Response<Body> {
        let part = settings.dir.join(format!("{id}.part"));
        // The claim makes this request the only writer; a partial file a crash left
        // is overwritten.
        let file = match tokio::fs::File::create(&part).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, path = %part.display(), "cannot create an upload file");
                return status(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file");
            }
        };
        let mut guard = PartFile(Some(part.clone()));
        match receive(body, file, size).await {
            Ok(()) => {}
            Err(Receive::TooLarge) => {
                return status(StatusCode::PAYLOAD_TOO_LARGE, "larger than the slot's size");
            }
            Err(Receive::Short) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "the body ended before the slot's size",
                );
            }
            Err(Receive::Timeout) => {
                return status(StatusCode::REQUEST_TIMEOUT, "the body stopped arriving");
            }
            Err(Receive::Io(e)) => {
                tracing::error!(error = %e, path = %part.display(), "cannot write an upload file");
                return status(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file");
            }
        }
        let path = settings.dir.join(id);
        if let Err(e) = tokio::fs::rename(&part, &path).await {
            tracing::error!(error = %e, path = %path.display(), "cannot store an upload file");
            return status(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file");
        }
        guard.0 = Some(path);
        match self.store.upload_stored(id, content_type).await {
            Ok(true) => {
                guard.0 = None;
                tracing::debug!(id, bytes = size, "file uploaded");
                status(StatusCode::CREATED, "stored")
            }
            // The slot went (its account was deleted): so does the file.
            Ok(false) => status(StatusCode::GONE, "this slot is gone"),
            Err(_) => {
                // The update may have committed: the file stays. If it did not, the
                // slot is given back open and the file is replaced by the next PUT or
                // removed with the slot when it expires.
                guard.0 = None;
                status(StatusCode::SERVICE_UNAVAILABLE, "the store failed")
            }
        }
    }

    async fn get(
        &self,
        req: &Request<Incoming>,
        settings: &crate::config::UploadSettings,
        id: &str,
        name: &str,
    ) -> Response<Body> {
        let now = impmesh_store::now_unix();
        let expired = |created: i64| {
            settings
                .expiry
                .is_some_and(|e| created < now - i64::try_from(e.as_secs()).unwrap_or(i64::MAX))
        };
        let slot = match self.store.upload(id).await {
            Ok(Some(slot))
                if slot.state == SlotState::Stored
                    && slot.filename == name
                    && !expired(slot.created) =>
            {
                slot
            }
            Ok(_) => return status(StatusCode::NOT_FOUND, "no such file"),
            Err(_) => return status(StatusCode::SERVICE_UNAVAILABLE, "the store failed"),
        };
        let mut file = match tokio::fs::File::open(settings.dir.join(id)).await {
            Ok(f) => f,
            Err(_) => return status(StatusCode::NOT_FOUND, "no such file"),
        };
        let len = match file.metadata().await {
            Ok(m) => m.len(),
            Err(_) => return status(StatusCode::NOT_FOUND, "no such file"),
        };
        let head = req.method() == Method::HEAD;
        // Ranges are for GET (RFC 9110 §14.2).
        let range = if head {
            Range::Whole
        } else {
            core::parse_range(
                req.headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok()),
                len,
            )
        };
        let (code, start, count) = match range {
            Range::Whole => (StatusCode::OK, 0, len),
            Range::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
            Range::Unsatisfiable => {
                let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
        };
        let body = if head {
            Empty::new().map_err(|never| match never {}).boxed()
        } else {
            if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
                return status(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file");
            }
            FileBody { file, left: count }.boxed()
        };
        let mut r = Response::new(body);
        *r.status_mut() = code;
        let h = r.headers_mut();
        let content_type = HeaderValue::from_str(&slot.content_type)
            .ok()
            .filter(|_| !slot.content_type.is_empty())
            .unwrap_or_else(|| HeaderValue::from_static(core::DEFAULT_CONTENT_TYPE));
        h.insert(header::CONTENT_TYPE, content_type);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if code == StatusCode::PARTIAL_CONTENT
            && let Ok(v) =
                HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
        // A file is shown, never run as a page of this origin.
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'; sandbox"),
        );
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, max-age=86400"),
        );
        r
    }

    /// Removes expired slots and files of this node every few minutes, and files
    /// without a slot (their account was deleted) every hour, until shutdown.
    async fn expire_uploads(self: Arc<Self>) {
        let Some(settings) = self.config.upload.clone() else {
            return;
        };
        let period = settings
            .slot_ttl
            .clamp(Duration::from_secs(60), EXPIRY_PERIOD);
        let mut tick = tokio::time::interval(period);
        let mut last_sweep: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let sweep = last_sweep.is_none_or(|t| t.elapsed() >= ORPHAN_PERIOD);
            if sweep {
                last_sweep = Some(tokio::time::Instant::now());
            }
            let now = impmesh_store::now_unix();
            if let Err(e) = self.expire_uploads_pass(&settings, now, sweep).await {
                tracing::warn!(error = %e, "upload expiry failed; retried later");
            }
        }
    }

    /// Removes what has expired now (the node does it every few minutes): files past
    /// `[upload] expiry_days`, slots whose PUT did not come, files whose account is
    /// gone.
    pub async fn expire_uploads_now(&self) -> Result<(), impmesh_store::StoreError> {
        self.expire_uploads_at(impmesh_store::now_unix()).await
    }

    /// [`Self::expire_uploads_now`] as if it were `now` (Unix seconds).
    pub async fn expire_uploads_at(&self, now: i64) -> Result<(), impmesh_store::StoreError> {
        match self.config.upload.as_ref() {
            Some(settings) => self.expire_uploads_pass(settings, now, true).await,
            None => Ok(()),
        }
    }

    async fn expire_uploads_pass(
        &self,
        settings: &crate::config::UploadSettings,
        now: i64,
        sweep: bool,
    ) -> Result<(), impmesh_store::StoreError> {
        let node = self.config.node_name.to_string();
        let at = Expiry {
            now,
            stored_before: settings.expiry.map_or(i64::MIN, |e| {
                now.saturating_sub(i64::try_from(e.as_secs()).unwrap_or(i64::MAX))
            }),
            stale_before: now.saturating_sub(STALE_UPLOAD),
        };
        let mut removed = 0usize;
        loop {
            let ids = self.store.uploads_expired(&node, at, EXPIRY_BATCH).await?;
            for id in &ids {
                // Checked again as it goes: a PUT may have completed since.
                if self.store.upload_delete_expired(id, at).await? {
                    remove_quietly(&settings.dir.join(id)).await;
                    remove_quietly(&settings.dir.join(format!("{id}.part"))).await;
                    removed += 1;
                }
            }
            if ids.len() < EXPIRY_BATCH {
                break;
            }
        }
        if sweep {
            removed += self.remove_orphans(&settings.dir).await?;
        }
        if removed > 0 {
            tracing::info!(files = removed, "expired uploads removed");
        }
        Ok(())
    }

    /// Files of the upload directory that no slot names (their account is gone), and
    /// partial files a crash left.
    async fn remove_orphans(&self, dir: &Path) -> Result<usize, impmesh_store::StoreError> {
        let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
            return Ok(0);
        };
        let mut removed = 0;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.ends_with(".part") {
                let stale = entry
                    .metadata()
                    .await
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_PART);
                // Under way, unless it is this old.
                if stale {
                    remove_quietly(&path).await;
                    removed += 1;
                }
            } else if self.store.upload(&name).await?.is_none() {
                remove_quietly(&path).await;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

async fn remove_quietly(path: &PathBuf) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %e, path = %path.display(), "cannot remove an upload file");
    }
}

/// Deletes a partial file when a PUT does not complete.
struct PartFile(Option<PathBuf>);

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Receive {
    TooLarge,
    Short,
    Timeout,
    Io(std::io::Error),
}

/// Writes a PUT's body to `file`: exactly `size` bytes, each part within
/// [`BODY_IDLE`] of the last; synced before it counts as stored.
async fn receive(mut body: Incoming, file: tokio::fs::File, size: u64) -> Result<(), Receive> {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, file);
    let mut got: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(BODY_IDLE, body.frame()).await {
            Err(_) => return Err(Receive::Timeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(Receive::Short),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        got += data.len() as u64;
        if got > size {
            return Err(Receive::TooLarge);
        }
        out.write_all(&data).await.map_err(Receive::Io)?;
    }
    if got < size {
        return Err(Receive::Short);
    }
    out.flush().await.map_err(Receive::Io)?;
    out.get_ref().sync_data().await.map_err(Receive::Io)?;
    Ok(())
}

/// A file's bytes as a response body, read 64 KiB at a time as hyper asks.
struct FileBody {
    file: tokio::fs::File,
    left: u64,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(self.left.min(64 * 1024)).unwrap_or(64 * 1024);
        let mut buf = vec![0u8; want];
        let mut read = tokio::io::ReadBuf::new(&mut buf);
        match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut self.file), cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file is shorter than it was",
                    ))));
                }
                buf.truncate(n);
                self.left -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

fn status(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn cors_preflight() -> Response<Body> {
    let mut r = status(StatusCode::NO_CONTENT, "");
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}
