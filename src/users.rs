//! Account administration on the store: what `impmesh user …` does on a stopped node,
//! and what the admin API does on a running one.

use impmesh_store::{NewUser, Store, StoreError};

use crate::config::Config;

/// Why an account command failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("bad user name {0:?}: not a valid XMPP localpart (RFC 7622)")]
    BadName(String),
    #[error("the password is empty")]
    EmptyPassword,
    #[error("user {0} already exists")]
    Exists(String),
    #[error("no such user: {0}")]
    NotFound(String),
    /// A peer cluster homes the name: one name lives in one cluster of the mesh.
    #[error(transparent)]
    HomedAtPeer(StoreError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for UserError {
    fn from(e: StoreError) -> UserError {
        match e {
            StoreError::UserExists(u) => UserError::Exists(u),
            StoreError::UserNotFound(u) => UserError::NotFound(u),
            e @ StoreError::HomedAtPeer { .. } => UserError::HomedAtPeer(e),
            other => UserError::Store(other),
        }
    }
}

/// Checks and normalises a user name per RFC 7622 (localpart, nodeprep).
pub fn normalize(name: &str, domain: &str) -> Result<String, UserError> {
    let bad = || UserError::BadName(name.to_owned());
    if name.is_empty() || name.contains(['@', '/']) {
        return Err(bad());
    }
    impmesh_router::names::normalize_username(name, domain).ok_or_else(bad)
}

pub async fn add(
    store: &Store,
    config: &Config,
    name: &str,
    password: &str,
) -> Result<String, UserError> {
    let user = normalize(name, &config.domain)?;
    check_password(password)?;
    let node = config.node_name();
    let cluster = config.cluster_name();
    store
        .add_user(NewUser {
            username: &user,
            password,
            home_cluster: &cluster,
            home_node: &node,
        })
        .await?;
    Ok(user)
}

pub async fn delete(store: &Store, config: &Config, name: &str) -> Result<String, UserError> {
    let user = normalize(name, &config.domain)?;
    store.delete_user(&user).await?;
    Ok(user)
}

pub async fn passwd(
    store: &Store,
    config: &Config,
    name: &str,
    password: &str,
) -> Result<String, UserError> {
    let user = normalize(name, &config.domain)?;
    check_password(password)?;
    store.set_password(&user, password).await?;
    Ok(user)
}

/// The FAST tokens (XEP-0484) of an account's clients, with its normalised name.
pub async fn tokens(
    store: &Store,
    config: &Config,
    name: &str,
) -> Result<(String, Vec<impmesh_store::FastToken>), UserError> {
    let user = normalize(name, &config.domain)?;
    if !store.user_exists(&user).await? {
        return Err(UserError::NotFound(user));
    }
    let tokens = store.fast_tokens(&user).await?;
    Ok((user, tokens))
}

/// Revokes an account's FAST tokens: one client's, or all; with the normalised name
/// and how many tokens went. The clients log in with their passwords next time.
pub async fn revoke_tokens(
    store: &Store,
    config: &Config,
    name: &str,
    client: Option<&str>,
) -> Result<(String, u64), UserError> {
    let user = normalize(name, &config.domain)?;
    if !store.user_exists(&user).await? {
        return Err(UserError::NotFound(user));
    }
    let revoked = store.fast_revoke(&user, client).await?;
    Ok((user, revoked))
}

fn check_password(password: &str) -> Result<(), UserError> {
    if password.is_empty() {
        return Err(UserError::EmptyPassword);
    }
    Ok(())
}

/// Reads a new password: the first line of stdin with `--password-stdin`, else a prompt
/// without echo (asked twice).
pub fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin {
        return read_secret(true, "");
    }
    let first = rpassword::prompt_password("Password: ")?;
    let second = rpassword::prompt_password("Again: ")?;
    if first != second {
        anyhow::bail!("the passwords do not match");
    }
    Ok(first)
}

/// Reads an existing secret (asked once): the first line of stdin, or a prompt without
/// echo.
pub fn read_secret(from_stdin: bool, prompt: &str) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    Ok(rpassword::prompt_password(prompt)?)
}
