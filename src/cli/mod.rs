//! The admin commands. A running node is driven through its admin API, with the
//! request and answer types of `impmesh_axl::api` on both sides; a stopped node's files
//! and store are worked on directly.

pub mod admin;
pub mod alarms;
pub mod axl_user;
pub mod cert;
pub mod node;
pub mod peer;
pub mod room;
pub mod serve;
pub mod trust;
pub mod user;

use impmesh::config::Config;
use impmesh_axl::client::{AxlClient, ClientError, Method};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// An admin API call without a body.
pub async fn call<T: DeserializeOwned>(
    api: &mut AxlClient,
    method: Method,
    path: &str,
) -> anyhow::Result<T> {
    api.admin_call(method, path, None::<&()>)
        .await
        .map_err(refused)
}

/// An admin API call with `body`.
pub async fn send<T: DeserializeOwned, B: Serialize>(
    api: &mut AxlClient,
    method: Method,
    path: &str,
    body: &B,
) -> anyhow::Result<T> {
    api.admin_call(method, path, Some(body))
        .await
        .map_err(refused)
}

/// A refusal says what the node said, as it said it.
fn refused(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Status { message, .. } => anyhow::anyhow!(message),
        e => e.into(),
    }
}

/// The running node's API, or why the command needs one.
pub fn running<'a>(
    api: Option<&'a mut AxlClient>,
    config: &Config,
    why: &str,
) -> anyhow::Result<&'a mut AxlClient> {
    api.ok_or_else(|| {
        anyhow::anyhow!(
            "the node is not running (nothing answers on {}){why}",
            config.listen.admin
        )
    })
}

/// Runs `local` on a store opened for the command, and closes the store after.
pub async fn with_store<T>(
    config: &Config,
    local: impl AsyncFnOnce(&impmesh_store::Store) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let store = impmesh::files::open_store(config).await?;
    let result = local(&store).await;
    store.close().await;
    result
}

/// A Unix time as RFC 3339 UTC, or "-".
pub fn when(unix: Option<i64>) -> String {
    unix.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

/// `--json` output: one line.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Percent-encodes a name for one URL path segment.
pub fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
