//! `impmesh axl-user`: the intercluster application user that peers authenticate as.

use clap::Subcommand;
use impmesh::config::Config;
use impmesh_axl::api;
use impmesh_axl::client::{AxlClient, Method};

use super::{call, path_segment, print_json, send, with_store};

#[derive(Subcommand)]
pub enum AxlUserCommand {
    /// Creates the user or changes its password (asked for, or read from stdin).
    Set {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Lists the users.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Deletes a user.
    Del { name: String },
}

pub async fn run(
    cmd: AxlUserCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    match cmd {
        AxlUserCommand::Set {
            name,
            password_stdin,
        } => {
            let password = impmesh::users::read_password(password_stdin)?;
            match api {
                Some(api) => {
                    let path = format!("/axl-users/{}", path_segment(&name));
                    let body = api::Password { password };
                    let _: api::Username = send(api, Method::PUT, &path, &body).await?;
                }
                None => {
                    with_store(config, async |store| {
                        Ok(impmesh_axl::set_axl_user(store, &name, &password).await?)
                    })
                    .await?
                }
            }
            println!(
                "AXL user {name} set; peers authenticate as it on https://{}/axl/",
                config.listen.https
            );
            Ok(())
        }
        AxlUserCommand::List { json } => {
            let users: Vec<api::AxlUser> = match api {
                Some(api) => call(api, Method::GET, "/axl-users").await?,
                None => {
                    with_store(config, async |store| {
                        let users = store.axl_users().await?;
                        Ok(users.into_iter().map(api::AxlUser::from).collect())
                    })
                    .await?
                }
            };
            if json {
                print_json(&users)?;
            } else {
                for u in users {
                    println!("{}", u.username);
                }
            }
            Ok(())
        }
        AxlUserCommand::Del { name } => {
            match api {
                Some(api) => {
                    let path = format!("/axl-users/{}", path_segment(&name));
                    let _: api::Username = call(api, Method::DELETE, &path).await?;
                }
                None => {
                    if !with_store(config, async |store| {
                        Ok(store.delete_axl_user(&name).await?)
                    })
                    .await?
                    {
                        anyhow::bail!("no AXL user {name}");
                    }
                }
            }
            println!("deleted AXL user {name}");
            Ok(())
        }
    }
}
