//! The HTTPS service of a node (default port 8443): the AXL-like intercluster API
//! under `/axl/`, the admin API under `/admin/v1/`, `/metrics`, `/healthz` and
//! `/readyz`; and the typed client the CLI and the sync agent use.
//!
//! docs/axl.md describes the API for its users.

#![forbid(unsafe_code)]

use std::future::Future;

pub mod admin;
pub mod api;
pub mod auth;
pub mod cache;
pub mod client;
mod exchange;
pub mod features;
mod metrics;
pub mod pake;
mod refusals;
pub mod server;
pub mod soap;
mod state;
pub mod trust;
pub mod xml;

pub use state::{ApiStats, ChangeNotice, ConnInfo, Https, HttpsLimits, ServiceIdentity, Surface};

/// A certificate to install, as the admin API receives it.
#[derive(Debug, Clone)]
pub enum CertSource {
    Pem {
        cert: String,
        key: Option<String>,
        chain: Option<String>,
    },
    Pkcs12 {
        archive: Vec<u8>,
        password: String,
    },
}

/// What caused a refused admin action: an error of the layer that refused it, or the
/// refusal's own words when nothing failed below it.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why the node refused an admin action; the admin API maps it to an HTTP status and
/// answers with the cause's message.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// 400: the input is wrong.
    #[error("{0}")]
    Invalid(Cause),
    /// 404
    #[error("{0}")]
    NotFound(Cause),
    /// 409: it exists already.
    #[error("{0}")]
    Conflict(Cause),
    /// 500
    #[error("{0}")]
    Internal(Cause),
}

/// What the HTTPS service needs from the node it runs in (the binary implements it):
/// actions that involve the router, the configuration or the certificate files.
pub trait NodeControl: Send + Sync + 'static {
    /// What the running node knows about itself, for `GET /status`.
    fn status(&self) -> api::NodeRuntime;
    /// Appends the node's own metrics in Prometheus text format.
    fn render_metrics(&self, out: &mut String);
    /// Whether the node serves clients (for `/readyz`).
    fn ready(&self) -> bool;
    /// The node's chat rooms (XEP-0045), by name.
    fn rooms(&self) -> Result<Vec<api::Room>, ControlError>;
    /// One chat room, by name or address.
    fn room(&self, name: &str) -> Result<api::Room, ControlError>;
    /// Destroys a chat room as its owner would: occupants are told, with where to go
    /// instead and why.
    fn destroy_room(
        &self,
        name: &str,
        destroy: &api::RoomDestroy,
    ) -> Result<api::RoomDestroyed, ControlError>;
    /// Creates an account; returns its normalised name.
    fn add_user(
        &self,
        name: &str,
        password: &str,
    ) -> impl Future<Output = Result<String, ControlError>> + Send;
    /// Deletes an account (and disconnects its sessions); returns its normalised name.
    fn delete_user(&self, name: &str) -> impl Future<Output = Result<String, ControlError>> + Send;
    /// Changes a password; returns the normalised name.
    fn set_password(
        &self,
        name: &str,
        password: &str,
    ) -> impl Future<Output = Result<String, ControlError>> + Send;
    /// An account's FAST tokens (XEP-0484), with its normalised name.
    fn fast_tokens(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<api::Tokens, ControlError>> + Send;
    /// Revokes an account's FAST tokens: one client's, or every client's.
    fn revoke_fast_tokens(
        &self,
        name: &str,
        client: Option<&str>,
    ) -> impl Future<Output = Result<api::TokensRevoked, ControlError>> + Send;
    /// The certificate chain in use.
    fn certificates(&self) -> Result<Vec<impmesh_certs::CertInfo>, ControlError>;
    /// A PKCS#10 request for the node key.
    fn csr(&self, cn: &str, sans: &[String]) -> Result<String, ControlError>;
    /// Checks and installs a certificate and uses it for new handshakes at once;
    /// returns the new fingerprint.
    fn import_certificate(
        &self,
        source: CertSource,
    ) -> impl Future<Output = Result<String, ControlError>> + Send;
    /// A new key and self-signed certificate, in use at once; returns the fingerprint.
    fn regenerate_certificate(&self) -> impl Future<Output = Result<String, ControlError>> + Send;
    /// Reads the certificate files again (after an outside renewal) and uses them for
    /// new handshakes; returns the node certificate's fingerprint.
    fn reload_certificates(&self) -> impl Future<Output = Result<String, ControlError>> + Send;
    /// Ends the overlap of a certificate rotation at once (the new certificate goes in
    /// use for peers now); false when no rotation is under way.
    fn end_certificate_overlap(&self) -> impl Future<Output = Result<bool, ControlError>> + Send;
    /// The System Troubleshooter's checks.
    fn troubleshoot(&self) -> impl Future<Output = Result<Vec<api::Check>, ControlError>> + Send;
    /// The status of every peer cluster, with its router links.
    fn peers(&self) -> impl Future<Output = Result<Vec<api::Peer>, ControlError>> + Send;
    /// Adds a peer by the address of its AXL endpoint, with its AXL credential.
    fn peer_add(
        &self,
        address: &str,
        user: &str,
        password: &str,
    ) -> impl Future<Output = Result<api::PeerAdded, ControlError>> + Send;
    /// Accepts a peer that added this cluster.
    fn peer_accept(&self, cluster: &str) -> impl Future<Output = Result<(), ControlError>> + Send;
    /// Removes a peer, its users and its pinned certificates.
    fn peer_delete(&self, cluster: &str) -> impl Future<Output = Result<(), ControlError>> + Send;
    /// A peer cluster told us (authenticated as itself) that it removed this cluster:
    /// stop syncing from it, drop its users and links, show it as removed.
    fn peer_removed_us(
        &self,
        cluster: &str,
    ) -> impl Future<Output = Result<(), ControlError>> + Send;
    /// A full resync; with a credential, after exchanging certificates again.
    fn peer_sync(
        &self,
        cluster: &str,
        credential: Option<(String, String)>,
    ) -> impl Future<Output = Result<(), ControlError>> + Send;
}

/// Why the intercluster application user could not be set.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AxlUserError {
    #[error("bad AXL user name {0:?}: 1-64 characters, no ':', ' ', '/', '@'")]
    BadName(String),
    #[error("the AXL password must have at least 8 characters")]
    ShortPassword,
    #[error(transparent)]
    Password(#[from] impmesh_store::scram::InvalidPassword),
    #[error(transparent)]
    Pake(#[from] pake::PakeError),
    #[error(transparent)]
    Store(#[from] impmesh_store::StoreError),
    #[error("the key derivation task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl AxlUserError {
    /// The request was wrong (as opposed to the server failing).
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            AxlUserError::BadName(_) | AxlUserError::ShortPassword | AxlUserError::Password(_)
        )
    }
}

/// Creates or replaces the intercluster application user: a SCRAM-SHA-256 verifier
/// (HTTP Basic over a trusted channel) and an OPAQUE record (channel-bound first
/// contact). The password itself is not stored.
pub async fn set_axl_user(
    store: &impmesh_store::Store,
    username: &str,
    password: &str,
) -> Result<(), AxlUserError> {
    if username.is_empty() || username.contains([':', ' ', '/', '@']) || username.len() > 64 {
        return Err(AxlUserError::BadName(username.to_owned()));
    }
    if password.len() < 8 {
        return Err(AxlUserError::ShortPassword);
    }
    let setup = store
        .cluster_secret(pake::SETUP_SECRET, pake::new_server_setup)
        .await?;
    let (user, pw) = (username.to_owned(), password.to_owned());
    let (scram, record) = tokio::task::spawn_blocking(move || {
        let setup = pake::Setup::load(&setup)?;
        let record = setup.register(&user, &pw)?;
        let scram = impmesh_store::scram::ScramVerifier::new(
            impmesh_store::scram::ScramHash::Sha256,
            &pw,
            impmesh_store::scram::DEFAULT_ITERATIONS,
        )?;
        Ok::<_, AxlUserError>((scram, record))
    })
    .await??;
    store.set_axl_user(username, &scram, &record).await?;
    Ok(())
}
