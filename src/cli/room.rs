//! `impmesh room`: the chat rooms (XEP-0045) of the running node. Rooms live in the
//! running node (persistent ones also in its store), so these commands need it.

use clap::Subcommand;
use impmesh::config::Config;
use impmesh_axl::api;
use impmesh_axl::client::{AxlClient, Method};

use super::{call, path_segment, print_json, running, send};

#[derive(Subcommand)]
pub enum RoomCommand {
    /// Lists the node's rooms: address, occupants, settings and name.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Shows a room: its settings, occupants and affiliations.
    Show {
        /// The room's name or address (team, or team@conference.example.com).
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Destroys a room as its owner would: its occupants are told, with where to go
    /// instead and why, and a persistent room leaves the store.
    Destroy {
        name: String,
        /// The room to send its occupants to instead (room@conference.DOMAIN).
        #[arg(long, value_name = "JID")]
        venue: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    cmd: RoomCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    let api = running(api, config, ": rooms live in the running node")?;
    match cmd {
        RoomCommand::List { json } => {
            let rooms: Vec<api::Room> = call(api, Method::GET, "/rooms").await?;
            if json {
                print_json(&rooms)?;
            } else if rooms.is_empty() {
                println!("no rooms");
            } else {
                println!("ROOM\tOCCUPANTS\tSETTINGS\tNAME");
                for r in &rooms {
                    println!(
                        "{}\t{}\t{}\t{}",
                        r.jid,
                        r.occupants.len(),
                        settings(r),
                        printable(&r.name)
                    );
                }
            }
        }
        RoomCommand::Show { name, json } => {
            let path = format!("/rooms/{}", path_segment(&name));
            let r: api::Room = call(api, Method::GET, &path).await?;
            if json {
                print_json(&r)?;
            } else {
                println!("room:         {}", r.jid);
                println!("name:         {}", printable(&r.name));
                println!("description:  {}", printable(&r.description));
                println!(
                    "subject:      {}",
                    r.subject.as_deref().map_or("-".into(), printable)
                );
                println!("settings:     {}", settings(&r));
                println!("max users:    {}", r.max_users);
                println!("history:      {} messages", r.history_length);
                println!("occupants:    {}", r.occupants.len());
                for o in &r.occupants {
                    println!(
                        "  {}\t{}\t{}\t{}\t{} session(s)",
                        printable(&o.nick),
                        o.jid,
                        o.role,
                        o.affiliation,
                        o.sessions
                    );
                }
                println!("affiliations: {}", r.affiliations.len());
                for a in &r.affiliations {
                    println!("  {}\t{}", a.jid, a.affiliation);
                }
            }
        }
        RoomCommand::Destroy {
            name,
            venue,
            reason,
            json,
        } => {
            let path = format!("/rooms/{}/destroy", path_segment(&name));
            let body = api::RoomDestroy { venue, reason };
            let r: api::RoomDestroyed = send(api, Method::POST, &path, &body).await?;
            if json {
                print_json(&r)?;
            } else {
                println!("destroyed {} ({} session(s) told)", r.jid, r.told);
            }
        }
    }
    Ok(())
}

/// Text a room's owner or occupants chose, on one line: control characters (a line
/// break or a tab that would forge a row) escaped.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A room's settings in one word each.
fn settings(r: &api::Room) -> String {
    let mut words = vec![if r.persistent {
        "persistent"
    } else {
        "temporary"
    }];
    words.push(if r.public { "public" } else { "hidden" });
    if r.members_only {
        words.push("members-only");
    }
    if r.moderated {
        words.push("moderated");
    }
    if r.password_protected {
        words.push("password");
    }
    if r.non_anonymous {
        words.push("non-anonymous");
    }
    if r.locked {
        words.push("locked");
    }
    words.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_rooms_say_stays_on_its_line() {
        assert_eq!(super::printable("Team\nfake\trow"), "Team\\nfake\\trow");
        assert_eq!(super::printable("Équipe"), "Équipe");
    }
}
