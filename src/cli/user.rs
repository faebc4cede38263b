//! `impmesh user`: accounts, through the running node or on the store.

use clap::Subcommand;
use impmesh::config::Config;
use impmesh_axl::api;
use impmesh_axl::client::{AxlClient, Method};

use super::{call, path_segment, print_json, send, with_store};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Creates an account.
    Add {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Deletes an account and everything stored for it.
    Del { name: String },
    /// Changes a password.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Lists accounts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Lists an account's FAST tokens (XEP-0484: one per client, and a newer one the
    /// client has not used yet), or revokes them.
    Tokens {
        name: String,
        /// Revoke the tokens of this client (its id, as listed).
        #[arg(long, value_name = "CLIENT")]
        revoke: Option<String>,
        /// Revoke the tokens of every client.
        #[arg(long, conflicts_with = "revoke")]
        revoke_all: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    cmd: UserCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    let domain = &config.domain;
    match cmd {
        UserCommand::Add {
            name,
            password_stdin,
        } => {
            let password = impmesh::users::read_password(password_stdin)?;
            let user = match api {
                Some(api) => {
                    let body = api::NewUser { name, password };
                    let r: api::Username = send(api, Method::POST, "/users", &body).await?;
                    r.username
                }
                None => {
                    with_store(config, async |store| {
                        Ok(impmesh::users::add(store, config, &name, &password).await?)
                    })
                    .await?
                }
            };
            println!("created {user}@{domain}");
        }
        UserCommand::Del { name } => {
            let user = match api {
                Some(api) => {
                    let path = format!("/users/{}", path_segment(&name));
                    let r: api::Username = call(api, Method::DELETE, &path).await?;
                    r.username
                }
                None => {
                    with_store(config, async |store| {
                        Ok(impmesh::users::delete(store, config, &name).await?)
                    })
                    .await?
                }
            };
            println!("deleted {user}@{domain}");
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let password = impmesh::users::read_password(password_stdin)?;
            let user = match api {
                Some(api) => {
                    let path = format!("/users/{}/password", path_segment(&name));
                    let body = api::Password { password };
                    let r: api::Username = send(api, Method::PUT, &path, &body).await?;
                    r.username
                }
                None => {
                    with_store(config, async |store| {
                        Ok(impmesh::users::passwd(store, config, &name, &password).await?)
                    })
                    .await?
                }
            };
            println!("changed the password of {user}@{domain}");
        }
        UserCommand::List { json } => {
            let users: Vec<api::User> = match api {
                Some(api) => call(api, Method::GET, "/users").await?,
                None => {
                    with_store(config, async |store| {
                        let users = store.list_users().await?;
                        Ok(users
                            .into_iter()
                            .map(|u| api::User::new(u, domain))
                            .collect())
                    })
                    .await?
                }
            };
            if json {
                print_json(&users)?;
            } else {
                for u in users {
                    println!("{}", u.jid);
                }
            }
        }
        UserCommand::Tokens {
            name,
            revoke,
            revoke_all,
            json,
        } if revoke.is_some() || revoke_all => {
            let client = revoke.as_deref();
            let r: api::TokensRevoked = match api {
                Some(api) => {
                    let mut path = format!("/users/{}/tokens", path_segment(&name));
                    if let Some(client) = client {
                        path.push('/');
                        path.push_str(&path_segment(client));
                    }
                    call(api, Method::DELETE, &path).await?
                }
                None => {
                    with_store(config, async |store| {
                        let (username, revoked) =
                            impmesh::users::revoke_tokens(store, config, &name, client).await?;
                        Ok(api::TokensRevoked { username, revoked })
                    })
                    .await?
                }
            };
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "revoked {} token(s) of {}@{domain}{}",
                    r.revoked,
                    r.username,
                    client.map(|c| format!(" (client {c})")).unwrap_or_default()
                );
            }
        }
        UserCommand::Tokens { name, json, .. } => {
            let t: api::Tokens = match api {
                Some(api) => {
                    let path = format!("/users/{}/tokens", path_segment(&name));
                    call(api, Method::GET, &path).await?
                }
                None => {
                    with_store(config, async |store| {
                        let (username, tokens) =
                            impmesh::users::tokens(store, config, &name).await?;
                        Ok(api::Tokens { username, tokens })
                    })
                    .await?
                }
            };
            if json {
                print_json(&t)?;
            } else if t.tokens.is_empty() {
                println!("{}@{domain} has no FAST tokens", t.username);
            } else {
                print_tokens(&t.tokens);
            }
        }
    }
    Ok(())
}

/// One line per token: client, software and device, state, and its times.
fn print_tokens(tokens: &[impmesh_store::FastToken]) {
    let time = impmesh_router::time::rfc3339;
    println!("CLIENT\tSOFTWARE\tDEVICE\tSTATE\tISSUED\tEXPIRES\tLAST USED");
    for t in tokens {
        let state = if t.pending { "newer, unused" } else { "in use" };
        println!(
            "{}\t{}\t{}\t{state}\t{}\t{}\t{}",
            t.client,
            or_dash(&t.software),
            or_dash(&t.device),
            time(t.issued),
            time(t.expires),
            t.last_used.map(time).unwrap_or_else(|| "-".into())
        );
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
