//! `impmesh alarms`: active alarms, or the latest raises and clears.

use impmesh::config::Config;
use impmesh_axl::api::{ActiveAlarm, AlarmEvent};
use impmesh_axl::client::{AxlClient, Method};

use super::{call, print_json, when, with_store};

pub async fn run(
    config: &Config,
    api: Option<&mut AxlClient>,
    json: bool,
    history: bool,
) -> anyhow::Result<()> {
    if history {
        let events: Vec<AlarmEvent> = match api {
            Some(api) => call(api, Method::GET, "/alarms/history").await?,
            None => with_store(config, async |store| Ok(store.alarm_history(200).await?)).await?,
        };
        if json {
            return print_json(&events);
        }
        for a in events {
            let what = if a.raised { "raised " } else { "cleared" };
            println!(
                "{}  {what}  {:8}  {}  {}  {}",
                when(Some(a.at)),
                a.severity,
                a.name,
                a.subject,
                a.message
            );
        }
        return Ok(());
    }
    let active: Vec<ActiveAlarm> = match api {
        Some(api) => call(api, Method::GET, "/alarms").await?,
        None => with_store(config, async |store| Ok(store.active_alarms().await?)).await?,
    };
    if json {
        return print_json(&active);
    }
    if active.is_empty() {
        println!("no active alarms");
    }
    for a in active {
        println!(
            "{:8}  {}  {}  {}  (since {})",
            a.severity,
            a.name,
            a.subject,
            a.message,
            when(Some(a.since))
        );
    }
    Ok(())
}
