//! The admin API under `/admin/v1/` (JSON). Every route needs the node's admin token
//! (`Authorization: Bearer …`, from `DATA_DIR/admin.token`) or an admin account
//! (`Basic`). The CLI uses it when the node runs.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;

use crate::api::{
    AddTrust, ApiError, AxlUser, Check, CsrRequest, Fingerprint, ForceSync, ImportCertificate,
    NewPeer, NewUser, NodeStatus, OverlapEnded, Password, Peer, PeerAction, Pem, RoomDestroy,
    TrustRemoved, User, Username,
};
use crate::auth::Outcome;
use crate::state::ConnInfo;
use crate::{CertSource, ControlError, Https, NodeControl};

type AppState<C> = State<Arc<Https<C>>>;

pub(crate) fn routes<C: NodeControl>(https: Arc<Https<C>>) -> Router<Arc<Https<C>>> {
    Router::new()
        .route("/status", get(status::<C>))
        .route("/users", get(list_users::<C>).post(add_user::<C>))
        .route("/users/{name}", delete(delete_user::<C>))
        .route("/users/{name}/password", put(set_password::<C>))
        .route(
            "/users/{name}/tokens",
            get(list_tokens::<C>).delete(revoke_tokens::<C>),
        )
        .route("/users/{name}/tokens/{client}", delete(revoke_client::<C>))
        .route("/certificates", get(certificates::<C>))
        .route("/certificates/csr", post(csr::<C>))
        .route("/certificates/import", post(import::<C>))
        .route("/certificates/regenerate", post(regenerate::<C>))
        .route("/certificates/reload", post(reload::<C>))
        .route("/certificates/end-overlap", post(end_overlap::<C>))
        .route("/trust", get(list_trust::<C>).post(add_trust::<C>))
        .route("/trust/{fingerprint}", delete(remove_trust::<C>))
        .route("/alarms", get(alarms::<C>))
        .route("/alarms/history", get(alarm_history::<C>))
        .route("/troubleshoot", get(troubleshoot::<C>))
        .route("/peers", get(peers::<C>).post(peer_add::<C>))
        .route("/peers/{cluster}", delete(peer_delete::<C>))
        .route("/peers/{cluster}/accept", post(peer_accept::<C>))
        .route("/peers/{cluster}/sync", post(peer_sync::<C>))
        .route("/rooms", get(rooms::<C>))
        .route("/rooms/{name}", get(room::<C>))
        .route("/rooms/{name}/destroy", post(destroy_room::<C>))
        .route("/axl-users", get(axl_users::<C>))
        .route(
            "/axl-users/{name}",
            put(set_axl_user::<C>).delete(delete_axl_user::<C>),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            https,
            authenticate::<C>,
        ))
}

/// A JSON error body with its status.
pub(crate) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let body = ApiError {
        error: message.to_string(),
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = match &self {
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self)
    }
}

fn internal(e: impl std::error::Error + Send + Sync + 'static) -> ControlError {
    tracing::error!(error = %e, "admin API failure");
    ControlError::Internal(Box::new(e))
}

/// Rejects the request unless it carries admin credentials.
async fn authenticate<C: NodeControl>(
    State(https): AppState<C>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(ip) = req.extensions().get::<ConnInfo>().map(|c| c.peer.ip()) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match https.auth.admin(&https.store, ip, authorization).await {
        Outcome::Ok { .. } => next.run(req).await,
        Outcome::Challenge(challenges) => {
            let mut r = error(StatusCode::UNAUTHORIZED, "admin credentials required");
            for c in challenges {
                if let Ok(v) = HeaderValue::from_str(&c) {
                    r.headers_mut().append(header::WWW_AUTHENTICATE, v);
                }
            }
            r
        }
        Outcome::Denied(why) => error(StatusCode::UNAUTHORIZED, why),
        Outcome::Throttled => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed authentications; wait and retry",
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(https.limits.auth.failure_window.as_secs()),
            );
            r
        }
    }
}

async fn status<C: NodeControl>(State(https): AppState<C>) -> Json<NodeStatus> {
    Json(NodeStatus {
        cluster: https.identity.cluster.clone(),
        domain: https.identity.domain.clone(),
        node: https.identity.node.clone(),
        version: https.identity.version.clone(),
        usn: https.store.current_usn().await.ok(),
        runtime: https.control.status(),
    })
}

async fn list_users<C: NodeControl>(
    State(https): AppState<C>,
) -> Result<Json<Vec<User>>, ControlError> {
    let users = https.store.list_users().await.map_err(internal)?;
    Ok(Json(
        users
            .into_iter()
            .map(|u| User::new(u, &https.identity.domain))
            .collect(),
    ))
}

async fn add_user<C: NodeControl>(
    State(https): AppState<C>,
    Json(body): Json<NewUser>,
) -> Result<Response, ControlError> {
    let username = https.control.add_user(&body.name, &body.password).await?;
    Ok((StatusCode::CREATED, Json(Username { username })).into_response())
}

async fn delete_user<C: NodeControl>(
    State(https): AppState<C>,
    Path(name): Path<String>,
) -> Result<Response, ControlError> {
    let username = https.control.delete_user(&name).await?;
    Ok(Json(Username { username }).into_response())
}

async fn set_password<C: NodeControl>(
    State(https): AppState<C>,
    Path(name): Path<String>,
    Json(body): Json<Password>,
) -> Result<Response, ControlError> {
    let username = https.control.set_password(&name, &body.password).await?;
    Ok(Json(Username { username }).into_response())
}

async fn list_tokens<C: NodeControl>(
    State(https): AppState<C>,
    Path(name): Path<String>,
) -> Result<Response, ControlError> {
    Ok(Json(https.control.fast_tokens(&name).await?).into_response())
}

async fn revoke_tokens<C: NodeControl>(
    State(https): AppState<C>,
    Path(name): Path<String>,
) -> Result<Response, ControlError> {
    Ok(Json(https.control.revoke_fast_tokens(&name, None).await?).into_response())
}

async fn revoke_client<C: NodeControl>(
    State(https): AppState<C>,
    Path((name, client)): Path<(String, String)>,
) -> Result<Response, ControlError> {
    let revoked = https
        .control
        .revoke_fast_tokens(&name, Some(&client))
        .await?;
    Ok(Json(revoked).into_response())
}

async fn rooms<C: NodeControl>(State(https): AppState<C>) -> Result<Response, ControlError> {
    Ok(Json(https.control.rooms()?).into_response())
}

async fn room<C: NodeControl>(
    State(https): AppState<C>,
    Path(name): Path<String>,
) -> Result<Response, ControlError> {
    Ok(Json(https.control.room(&name)?).into_response())
}

async fn destroy_room<C: NodeControl>(
    State(https): AppState<C>,
    Path(name): Path<String>,
    Json(body): Json<RoomDestroy>,
) -> Result<Response, ControlError> {
    Ok(Json(https.control.destroy_room(&name, &body)?).into_response())
}

async fn certificates<C: NodeControl>(State(https): AppState<C>) -> Result<Response, ControlError> {
    Ok(Json(https.control.certificates()?).into_response())
}

async fn csr<C: NodeControl>(
    State(https): AppState<C>,
    Json(body): Json<CsrRequest>,
) -> Result<Response, ControlError> {
    let pem = https.control.csr(&body.cn, &body.sans)?;
    Ok(Json(Pem { pem }).into_response())
}

async fn import<C: NodeControl>(
    State(https): AppState<C>,
    Json(body): Json<ImportCertificate>,
) -> Result<Response, ControlError> {
    let source = match (body.cert, body.p12) {
        (Some(cert), None) => CertSource::Pem {
            cert,
            key: body.key,
            chain: body.chain,
        },
        (None, Some(p12)) => CertSource::Pkcs12 {
            archive: base64::engine::general_purpose::STANDARD
                .decode(p12.trim())
                .map_err(|_| ControlError::Invalid("p12 is not base64".into()))?,
            password: body.password.unwrap_or_default(),
        },
        _ => {
            return Err(ControlError::Invalid(
                "give either cert (PEM) or p12 (base64)".into(),
            ));
        }
    };
    let fingerprint = https.control.import_certificate(source).await?;
    Ok(Json(Fingerprint { fingerprint }).into_response())
}

async fn regenerate<C: NodeControl>(State(https): AppState<C>) -> Result<Response, ControlError> {
    let fingerprint = https.control.regenerate_certificate().await?;
    Ok(Json(Fingerprint { fingerprint }).into_response())
}

async fn reload<C: NodeControl>(State(https): AppState<C>) -> Result<Response, ControlError> {
    let fingerprint = https.control.reload_certificates().await?;
    Ok(Json(Fingerprint { fingerprint }).into_response())
}

async fn end_overlap<C: NodeControl>(State(https): AppState<C>) -> Result<Response, ControlError> {
    let ended = https.control.end_certificate_overlap().await?;
    Ok(Json(OverlapEnded { ended }).into_response())
}

async fn list_trust<C: NodeControl>(State(https): AppState<C>) -> Result<Response, ControlError> {
    Ok(Json(https.store.trust_entries().await.map_err(internal)?).into_response())
}

async fn add_trust<C: NodeControl>(
    State(https): AppState<C>,
    Json(body): Json<AddTrust>,
) -> Result<Response, ControlError> {
    if body.kind == impmesh_store::TrustKind::Pinned && body.peer.is_none() {
        return Err(ControlError::Invalid(
            "a pinned certificate needs its peer".into(),
        ));
    }
    let added = crate::trust::add(
        &https.store,
        body.pem.as_bytes(),
        body.kind,
        body.peer.as_deref(),
        "imported",
    )
    .await
    .map_err(|e| ControlError::Invalid(e.into()))?;
    Ok(Json(added).into_response())
}

async fn remove_trust<C: NodeControl>(
    State(https): AppState<C>,
    Path(fingerprint): Path<String>,
) -> Result<Response, ControlError> {
    let fp = fingerprint.to_ascii_uppercase();
    if !https.store.remove_trust(&fp).await.map_err(internal)? {
        return Err(ControlError::NotFound(
            format!("no trusted certificate with fingerprint {fingerprint}").into(),
        ));
    }
    Ok(Json(TrustRemoved { removed: fp }).into_response())
}

async fn alarms<C: NodeControl>(State(https): AppState<C>) -> Result<Response, ControlError> {
    Ok(Json(https.store.active_alarms().await.map_err(internal)?).into_response())
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<i64>,
}

async fn alarm_history<C: NodeControl>(
    State(https): AppState<C>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ControlError> {
    let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
    Ok(Json(https.store.alarm_history(limit).await.map_err(internal)?).into_response())
}

async fn axl_users<C: NodeControl>(
    State(https): AppState<C>,
) -> Result<Json<Vec<AxlUser>>, ControlError> {
    let users = https.store.axl_users().await.map_err(internal)?;
    Ok(Json(users.into_iter().map(AxlUser::from).collect()))
}

async fn set_axl_user<C: NodeControl>(
    State(https): AppState<C>,
    Path(name): Path<String>,
    Json(body): Json<Password>,
) -> Result<Response, ControlError> {
    crate::set_axl_user(&https.store, &name, &body.password)
        .await
        .map_err(|e| {
            if e.is_invalid() {
                ControlError::Invalid(e.into())
            } else {
                internal(e)
            }
        })?;
    Ok(Json(Username { username: name }).into_response())
}

async fn delete_axl_user<C: NodeControl>(
    State(https): AppState<C>,
    Path(name): Path<String>,
) -> Result<Response, ControlError> {
    if !https.store.delete_axl_user(&name).await.map_err(internal)? {
        return Err(ControlError::NotFound(format!("no AXL user {name}").into()));
    }
    Ok(Json(Username { username: name }).into_response())
}

async fn peers<C: NodeControl>(State(https): AppState<C>) -> Result<Json<Vec<Peer>>, ControlError> {
    Ok(Json(https.control.peers().await?))
}

async fn peer_add<C: NodeControl>(
    State(https): AppState<C>,
    Json(body): Json<NewPeer>,
) -> Result<Response, ControlError> {
    let peer = https
        .control
        .peer_add(&body.address, &body.user, &body.password)
        .await?;
    Ok((StatusCode::CREATED, Json(peer)).into_response())
}

async fn peer_accept<C: NodeControl>(
    State(https): AppState<C>,
    Path(cluster): Path<String>,
) -> Result<Response, ControlError> {
    https.control.peer_accept(&cluster).await?;
    Ok(Json(PeerAction::Accepted(cluster)).into_response())
}

async fn peer_delete<C: NodeControl>(
    State(https): AppState<C>,
    Path(cluster): Path<String>,
) -> Result<Response, ControlError> {
    https.control.peer_delete(&cluster).await?;
    Ok(Json(PeerAction::Deleted(cluster)).into_response())
}

async fn peer_sync<C: NodeControl>(
    State(https): AppState<C>,
    Path(cluster): Path<String>,
    body: Option<Json<ForceSync>>,
) -> Result<Response, ControlError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    let credential = match (body.with_certificates, body.user, body.password) {
        (false, _, _) => None,
        (true, Some(u), Some(p)) => Some((u, p)),
        (true, _, _) => {
            return Err(ControlError::Invalid(
                "with_certificates needs the peer's AXL user and password".into(),
            ));
        }
    };
    https.control.peer_sync(&cluster, credential).await?;
    Ok(Json(PeerAction::Syncing(cluster)).into_response())
}

async fn troubleshoot<C: NodeControl>(
    State(https): AppState<C>,
) -> Result<Json<Vec<Check>>, ControlError> {
    Ok(Json(https.control.troubleshoot().await?))
}
