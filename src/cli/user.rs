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
    }
    Ok(())
}
