//! How fast one node's store takes in the directory of 29 peers (a full sync of each,
//! in `listUsers` pages of 2,000, each followed by the agent's check of what that
//! peer's users collide with), and what a duplicate check over the whole directory costs. Not run by
//! CI; run it on a release build (docs/benchmarks.md records the figures):
//!
//! ```sh
//! cargo test --release -p impmesh-store --test directory_bench -- --ignored --nocapture
//! IMPMESH_BENCH_USERS=2000 cargo test --release -p impmesh-store --test directory_bench -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use impmesh_store::{DirectoryEntry, PeerRecord, PeerState, Store};

const PEERS: usize = 29;
const PAGE: usize = 2000;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --ignored on a release build"]
async fn benchmark_full_syncs_of_twenty_nine_peers() {
    let users: usize = std::env::var("IMPMESH_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open("sqlite://bench.db", dir.path()).await.unwrap();
    let peers: Vec<String> = (0..PEERS).map(|p| format!("c{p:02}.example.com")).collect();
    for peer in &peers {
        store
            .upsert_peer(&PeerRecord {
                cluster: peer.as_str().into(),
                address: "127.0.0.1:8443".into(),
                server_name: "localhost".into(),
                state: PeerState::Active,
                added_here: true,
                our_token: Some("token".into()),
                their_token_hash: None,
                added_at: 1,
                accepted_at: None,
            })
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut claimed = std::time::Duration::ZERO;
    for (p, peer) in peers.iter().enumerate() {
        let entries: Vec<DirectoryEntry> = (0..users)
            .map(|u| DirectoryEntry {
                username: format!("c{p:02}u{u:05}").into(),
                home_cluster: peer.clone().into(),
                home_node: format!("node1.{peer}").into(),
                usn: u as i64 + 1,
                deleted: false,
            })
            .collect();
        let generation = store.begin_full_sync(peer, users as i64).await.unwrap();
        for page in entries.chunks(PAGE) {
            let after = page.last().unwrap().usn;
            store
                .apply_full_page(peer, generation, page, &[], after)
                .await
                .unwrap();
        }
        let count = store
            .finish_full_sync(peer, generation, users as i64, 0)
            .await
            .unwrap();
        assert_eq!(count, users as i64);
        let t = Instant::now();
        assert!(
            store
                .claimed_elsewhere(&peer.as_str().into())
                .await
                .unwrap()
                .is_empty()
        );
        claimed += t.elapsed();
    }
    let applied = started.elapsed();
    let rows = PEERS * users;

    let started = Instant::now();
    assert!(store.duplicate_users().await.unwrap().is_empty());
    let duplicates = started.elapsed();
    println!(
        "BENCH directory: {rows} remote users ({PEERS} peers x {users}) applied in {:.2} s \
         ({:.0} rows/s), of which the checks of each peer's users {:.2} s; duplicate check \
         over them all {:.0} ms",
        applied.as_secs_f64(),
        rows as f64 / applied.as_secs_f64(),
        claimed.as_secs_f64(),
        duplicates.as_secs_f64() * 1000.0
    );
}
