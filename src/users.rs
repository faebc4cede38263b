//! `impmesh user …`: account administration straight on the store, so it works whether
//! or not the server runs (the server reads accounts from the store at each login).

use impmesh_store::{NewUser, Store, StoreError};

use crate::config::Config;

/// Checks and normalises a user name per RFC 7622 (localpart, nodeprep).
pub fn normalize(name: &str, domain: &str) -> anyhow::Result<String> {
    let bad = || anyhow::anyhow!("bad user name {name:?}: not a valid XMPP localpart (RFC 7622)");
    if name.is_empty() || name.contains(['@', '/']) {
        return Err(bad());
    }
    impmesh_router::c2s::normalize_username(name, domain).ok_or_else(bad)
}

pub async fn add(
    store: &Store,
    config: &Config,
    name: &str,
    password: &str,
) -> anyhow::Result<String> {
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
        .await
        .map_err(|e| match e {
            StoreError::UserExists(_) => anyhow::anyhow!("user {user} already exists"),
            other => other.into(),
        })?;
    Ok(user)
}

pub async fn delete(store: &Store, config: &Config, name: &str) -> anyhow::Result<String> {
    let user = normalize(name, &config.domain)?;
    store.delete_user(&user).await.map_err(not_found)?;
    Ok(user)
}

pub async fn passwd(
    store: &Store,
    config: &Config,
    name: &str,
    password: &str,
) -> anyhow::Result<String> {
    let user = normalize(name, &config.domain)?;
    check_password(password)?;
    store
        .set_password(&user, password)
        .await
        .map_err(not_found)?;
    Ok(user)
}

fn not_found(e: StoreError) -> anyhow::Error {
    match e {
        StoreError::UserNotFound(u) => anyhow::anyhow!("no such user: {u}"),
        other => other.into(),
    }
}

fn check_password(password: &str) -> anyhow::Result<()> {
    if password.is_empty() {
        anyhow::bail!("the password is empty");
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
