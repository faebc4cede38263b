//! `impmesh admin`: admin accounts of the admin API, on the store.

use clap::Subcommand;
use impmesh::config::Config;

use super::with_store;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Creates an admin account or changes its password.
    Add {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Deletes an admin account.
    Del { name: String },
    /// Lists admin accounts.
    List,
}

pub async fn run(cmd: AdminCommand, config: &Config) -> anyhow::Result<()> {
    with_store(config, async |store| match cmd {
        AdminCommand::Add {
            name,
            password_stdin,
        } => {
            if name.is_empty() || name.contains([':', ' ']) {
                anyhow::bail!("bad admin name {name:?}: no ':' or spaces");
            }
            let password = impmesh::users::read_password(password_stdin)?;
            if password.len() < 8 {
                anyhow::bail!("admin passwords need at least 8 characters");
            }
            store.set_admin_user(&name, &password).await?;
            println!("admin {name} set");
            Ok(())
        }
        AdminCommand::Del { name } => {
            if !store.delete_admin_user(&name).await? {
                anyhow::bail!("no admin {name}");
            }
            println!("deleted admin {name}");
            Ok(())
        }
        AdminCommand::List => {
            for name in store.admin_users().await? {
                println!("{name}");
            }
            Ok(())
        }
    })
    .await
}
