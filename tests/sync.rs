//! The intercluster sync agent between real nodes of different clusters (127.0.0.1,
//! port 0): peering with the channel-bound first contact, the pending peer on the other
//! side, full and incremental directory sync, notifyChange, and removal.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use impmesh_axl::NodeControl as _;
use support::{TestNode, eventually, start_node};

const AXL_USER: &str = "icsync";
const AXL_PW: &str = "intercluster-secret";

async fn cluster(name: &str, users: &[&str]) -> TestNode {
    let name = name.to_owned();
    let node = start_node(move |c| {
        c.node.name = Some(format!("node1.{name}"));
        c.node.cluster = Some(name);
        c.https.failure_delay_ms = 50;
        // Periodic pulls far apart: what arrives quickly came by notifyChange.
        c.sync.period = 3600;
        // Digests compared after every quiet sync, so that one nudge checks.
        c.sync.anti_entropy_interval = 0;
    })
    .await;
    impmesh_axl::set_axl_user(&node.node.server.store, AXL_USER, AXL_PW)
        .await
        .unwrap();
    // The test clusters' names are not in any real DNS.
    node.node.agent.set_resolver(support::test_dns());
    for user in users {
        node.add_user(user, "pw").await;
    }
    node
}

async fn has_alarm(node: &TestNode, name: &str, subject: &str) -> bool {
    node.node
        .server
        .store
        .active_alarms()
        .await
        .unwrap()
        .iter()
        .any(|a| a.name == name && a.subject == subject)
}

async fn remote(node: &TestNode, user: &str) -> Vec<impmesh_store::RemoteUser> {
    node.node.server.store.remote_user(user).await.unwrap()
}

#[tokio::test]
async fn peers_sync_their_directories_and_follow_changes() {
    let a = cluster("cluster-a.example.com", &["alice", "amy"]).await;
    let b = cluster("cluster-b.example.com", &["bob", "bea", "ben"]).await;

    // A adds B: A syncs B's users at once; B holds A as pending and syncs nothing.
    let added = a
        .node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    assert_eq!(added.cluster, "cluster-b.example.com");
    let store_a = a.node.server.store.clone();
    eventually(10, "B's users in A's directory", || async {
        store_a
            .remote_user_count("cluster-b.example.com")
            .await
            .unwrap()
            == 3
    })
    .await;
    let bob = &remote(&a, "bob").await[0];
    assert_eq!(
        (bob.home_cluster.as_str(), bob.home_node.as_str()),
        ("cluster-b.example.com", "node1.cluster-b.example.com")
    );
    let peers_b = serde_json::to_value(b.node.control.peers().await.unwrap()).unwrap();
    assert_eq!(peers_b[0]["cluster"], "cluster-a.example.com");
    assert_eq!(peers_b[0]["state"], "pending");
    assert_eq!(peers_b[0]["added_here"], false);
    assert!(remote(&b, "alice").await.is_empty());
    // One-sided is never silent: B has an alarm until its admin decides.
    assert!(has_alarm(&b, "InterClusterPeerPending", "cluster-a.example.com").await);

    // B's admin accepts: B syncs A's users.
    b.node
        .control
        .peer_accept("cluster-a.example.com")
        .await
        .unwrap();
    let store_b = b.node.server.store.clone();
    eventually(10, "A's users in B's directory", || async {
        store_b
            .remote_user_count("cluster-a.example.com")
            .await
            .unwrap()
            == 2
    })
    .await;
    assert!(!has_alarm(&b, "InterClusterPeerPending", "cluster-a.example.com").await);

    // A change on B reaches A by notifyChange, long before the hour-long period.
    b.node.control.add_user("bill", "pw").await.unwrap();
    // The period is an hour: what arrives within seconds came by notifyChange (how fast
    // is measured by tests/mesh.rs and docs/benchmarks.md, not asserted here).
    eventually(10, "a new user of B seen by A", || async {
        !remote(&a, "bill").await.is_empty()
    })
    .await;
    b.node.control.delete_user("bea").await.unwrap();
    eventually(10, "a deleted user of B gone from A", || async {
        remote(&a, "bea").await.is_empty()
    })
    .await;

    // A name that a peer homes cannot be created here (two clusters creating one name
    // within the sync delay is tests/trust.rs's quarantine).
    let refused = a.node.control.add_user("ben", "pw").await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("homed at the peer cluster cluster-b.example.com"),
        "{refused}"
    );
    assert!(a.node.server.store.user("ben").await.unwrap().is_none());
    let checks = serde_json::to_value(a.node.control.troubleshoot().await.unwrap()).unwrap();
    assert!(
        checks.as_array().unwrap().iter().all(|c| c["ok"] == true),
        "{checks}"
    );

    // Peer status: in sync, associated users equal B's user count, certificates in sync.
    let status = serde_json::to_value(a.node.control.peers().await.unwrap()).unwrap();
    let s = &status[0];
    assert_eq!(s["state"], "active");
    assert_eq!(s["associated_users"], 3);
    assert_eq!(s["live"]["state"], "in-sync");
    assert_eq!(s["live"]["certificate_status"], "in-sync");
    assert_eq!(s["live"]["peer_usn"], s["sync"]["applied_usn"]);
    assert!(s["sync"]["last_full_at"].is_i64());
    assert!(s["sync"]["last_incr_at"].is_i64());

    // Removing the peer drops its users and pins at once.
    a.node
        .control
        .peer_delete("cluster-b.example.com")
        .await
        .unwrap();
    assert!(remote(&a, "bob").await.is_empty());
    assert!(
        a.node
            .server
            .store
            .trust_entries()
            .await
            .unwrap()
            .is_empty()
    );
    assert!(a.node.control.peers().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_peer_that_replaces_its_certificate_shows_and_is_repaired_by_a_force_sync() {
    let a = cluster("cluster-a.example.com", &["alice"]).await;
    let b = cluster("cluster-b.example.com", &["bob"]).await;
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    let store_a = a.node.server.store.clone();
    eventually(10, "first sync", || async {
        store_a
            .remote_user_count("cluster-b.example.com")
            .await
            .unwrap()
            == 1
    })
    .await;

    // B regenerates its certificate: A's next sync fails the TLS check, visibly.
    b.node.control.regenerate_certificate().await.unwrap();
    b.node.control.add_user("bill", "pw").await.unwrap();
    let control = a.node.control.clone();
    eventually(10, "certificate failure shown", || async {
        let s = serde_json::to_value(control.peers().await.unwrap()).unwrap();
        s[0]["live"]["certificate_status"] == "failed"
    })
    .await;
    assert!(
        remote(&a, "bill").await.is_empty(),
        "nothing from an unverified peer"
    );
    // The alarm follows the status (written to the store right after).
    eventually(10, "the certificate alarm", || async {
        has_alarm(
            &a,
            "InterClusterPeerCertificateOutOfSync",
            "cluster-b.example.com",
        )
        .await
    })
    .await;

    // Wrong credential: nothing changes. Right one: re-pinned and synced.
    let wrong = a
        .node
        .control
        .peer_sync(
            "cluster-b.example.com",
            Some((AXL_USER.into(), "wrong-password".into())),
        )
        .await;
    assert!(wrong.is_err());
    a.node
        .control
        .peer_sync(
            "cluster-b.example.com",
            Some((AXL_USER.into(), AXL_PW.into())),
        )
        .await
        .unwrap();
    eventually(10, "synced after the repair", || async {
        !remote(&a, "bill").await.is_empty()
    })
    .await;
    let s = serde_json::to_value(a.node.control.peers().await.unwrap()).unwrap();
    assert_eq!(s[0]["live"]["certificate_status"], "in-sync");
    assert!(
        !has_alarm(
            &a,
            "InterClusterPeerCertificateOutOfSync",
            "cluster-b.example.com"
        )
        .await
    );
    assert_eq!(s[0]["pinned"][0], b.node.identity().fingerprint());
}

/// A peer whose sync cannot complete: the stall alarm after the threshold, restarts
/// with auto-recovery (none without), and the alarm clears when a sync completes.
#[tokio::test]
async fn a_stalled_peer_sync_is_alarmed_restarted_and_cleared() {
    // (auto-recovery, a peer that accepts and then hangs instead of refusing)
    for (auto_recovery, hang) in [(true, false), (false, false), (true, true)] {
        let a = start_node(move |c| {
            c.node.name = Some("node1.cluster-a.example.com".into());
            c.node.cluster = Some("cluster-a.example.com".into());
            c.sync.period = 1;
            c.sync.stall_threshold = 2;
            c.sync.auto_recovery = auto_recovery;
        })
        .await;
        let b = cluster("cluster-b.example.com", &["bob"]).await;
        a.node
            .control
            .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
            .await
            .unwrap();
        let store = a.node.server.store.clone();
        eventually(10, "first sync", || async {
            store
                .remote_user_count("cluster-b.example.com")
                .await
                .unwrap()
                == 1
        })
        .await;

        // The peer's address now leads nowhere: refused, or accepted and never answered.
        let good = store.peer("cluster-b.example.com").await.unwrap().unwrap();
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        let black_hole = if hang {
            Some(tokio::spawn(async move {
                let mut held = vec![];
                while let Ok((sock, _)) = dead.accept().await {
                    held.push(sock);
                }
            }))
        } else {
            drop(dead);
            None
        };
        store
            .upsert_peer(&impmesh_store::PeerRecord {
                address: dead_addr.to_string(),
                ..good.clone()
            })
            .await
            .unwrap();
        let name = "InterClusterSyncAgentPeerPeriodicSyncingFailure";
        eventually(10, "the stall alarm", || async {
            store
                .active_alarms()
                .await
                .unwrap()
                .iter()
                .any(|a| a.name == name && a.subject == "cluster-b.example.com")
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let status = serde_json::to_value(a.node.control.peers().await.unwrap()).unwrap();
        let restarts = status[0]["stall_restarts"].as_u64().unwrap();
        if hang {
            // Stalled again right after its restart: the whole agent was restarted.
            eventually(10, "a second restart", || async {
                let s = serde_json::to_value(a.node.control.peers().await.unwrap()).unwrap();
                s[0]["stall_restarts"].as_u64().unwrap() >= 2
            })
            .await;
        } else if auto_recovery {
            assert!(restarts >= 1, "{status}");
        } else {
            assert_eq!(restarts, 0, "{status}");
        }
        if !hang {
            assert_eq!(status[0]["live"]["state"], "failed");
            eventually(10, "the unreachable alarm", || async {
                has_alarm(&a, "InterClusterPeerUnreachable", "cluster-b.example.com").await
            })
            .await;
        }

        // Reachable again: the next sync completes and clears the alarm.
        store.upsert_peer(&good).await.unwrap();
        eventually(10, "the alarm cleared", || async {
            !store
                .active_alarms()
                .await
                .unwrap()
                .iter()
                .any(|a| a.name == name)
        })
        .await;
        let history = store.alarm_history(10).await.unwrap();
        assert!(history.iter().any(|e| e.name == name && !e.raised));
        assert!(!has_alarm(&a, "InterClusterPeerUnreachable", "cluster-b.example.com").await);
        if let Some(task) = black_hole {
            task.abort();
        }
    }
}

/// Anti-entropy: a user lost from our copy of a peer's directory (a lost write: the USN
/// says we are up to date) is found by comparing digests, alarmed, and restored by a
/// resync of that peer.
#[tokio::test]
async fn a_lost_write_is_found_by_the_digest_and_repaired() {
    let a = cluster("cluster-a.example.com", &["alice"]).await;
    let b = cluster("cluster-b.example.com", &["bob", "bea"]).await;
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    let store = a.node.server.store.clone();
    eventually(10, "first sync", || async {
        store
            .remote_user_count("cluster-b.example.com")
            .await
            .unwrap()
            == 2
    })
    .await;
    let applied = store
        .peer_sync("cluster-b.example.com")
        .await
        .unwrap()
        .applied_usn;
    // Lose bob without moving the applied USN.
    let lost = impmesh_store::DirectoryEntry {
        username: "bob".into(),
        home_cluster: "cluster-b.example.com".into(),
        home_node: "node1.cluster-b.example.com".into(),
        usn: 0,
        deleted: true,
    };
    store
        .apply_changes("cluster-b.example.com", &[lost], &[], applied)
        .await
        .unwrap();
    assert!(remote(&a, "bob").await.is_empty());

    a.node.agent.nudge("cluster-b.example.com");
    eventually(10, "bob restored", || async {
        !remote(&a, "bob").await.is_empty()
    })
    .await;
    let name = "InterClusterDirectoryMismatch";
    eventually(10, "the mismatch alarm cleared", || async {
        !has_alarm(&a, name, "cluster-b.example.com").await
    })
    .await;
    let history = store.alarm_history(20).await.unwrap();
    let events: Vec<bool> = history
        .iter()
        .filter(|e| e.name == name)
        .map(|e| e.raised)
        .collect();
    assert_eq!(events, [false, true], "raised, then cleared");
}

/// A user homed on both sides before they peer is found by the full syncs (the check
/// scoped to the peer's slice), on both sides, and clears when one side deletes it.
#[tokio::test]
async fn a_duplicate_present_before_peering_is_found_by_the_full_sync() {
    let a = cluster("cluster-a.example.com", &["alice", "dora"]).await;
    let b = cluster("cluster-b.example.com", &["bob", "dora"]).await;
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    b.node
        .control
        .peer_accept("cluster-a.example.com")
        .await
        .unwrap();
    for node in [&a, &b] {
        eventually(10, "the duplicate alarm", || async {
            has_alarm(node, "InterClusterDuplicateUser", "dora").await
        })
        .await;
        assert!(!has_alarm(node, "InterClusterDuplicateUser", "alice").await);
        assert!(!has_alarm(node, "InterClusterDuplicateUser", "bob").await);
    }
    b.node.control.delete_user("dora").await.unwrap();
    for node in [&a, &b] {
        eventually(10, "the duplicate alarm cleared", || async {
            !has_alarm(node, "InterClusterDuplicateUser", "dora").await
        })
        .await;
    }
}

/// A peer added by name keeps syncing through a DNS outage on its last good addresses,
/// and every name that fails is reported with the name.
#[tokio::test]
async fn a_dns_outage_does_not_cut_a_known_peer() {
    let a = start_node(|c| {
        c.node.name = Some("node1.cluster-a.example.com".into());
        c.node.cluster = Some("cluster-a.example.com".into());
        c.sync.period = 3600;
        c.sync.dns_check_interval = 1;
    })
    .await;
    let b = cluster("cluster-b.example.com", &["bob"]).await;
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let dns = std::sync::Arc::new(support::MapDns {
        names: [
            "node1.cluster-b.example.com",
            "cluster-b.example.com",
            "localhost",
        ]
        .iter()
        .map(|n| (n.to_string(), vec![local]))
        .collect(),
        down: false.into(),
    });
    a.node.agent.set_resolver(dns.clone());
    let address = format!("node1.cluster-b.example.com:{}", b.node.https_addr.port());
    a.node
        .control
        .peer_add(&address, AXL_USER, AXL_PW)
        .await
        .unwrap();
    let store = a.node.server.store.clone();
    eventually(10, "first sync", || async {
        store
            .remote_user_count("cluster-b.example.com")
            .await
            .unwrap()
            == 1
    })
    .await;
    let control = a.node.control.clone();
    eventually(10, "every name resolved", || async {
        let s = serde_json::to_value(control.peers().await.unwrap()).unwrap();
        let names = s[0]["live"]["dns"].as_array().cloned().unwrap_or_default();
        names.len() == 3 && names.iter().all(|n| n["ok"] == true)
    })
    .await;

    // DNS goes down; B changes; A still pulls it, on the last good address.
    dns.down.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    b.node.control.add_user("bill", "pw").await.unwrap();
    eventually(10, "a change during the outage", || async {
        !remote(&a, "bill").await.is_empty()
    })
    .await;
    eventually(10, "the failing names reported", || async {
        let s = serde_json::to_value(control.peers().await.unwrap()).unwrap();
        let names = s[0]["live"]["dns"].as_array().cloned().unwrap_or_default();
        !names.is_empty()
            && names
                .iter()
                .all(|n| n["ok"] == false && n["addresses"][0] == "127.0.0.1")
    })
    .await;
    let checks = serde_json::to_value(a.node.control.troubleshoot().await.unwrap()).unwrap();
    let dns_check = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "every DNS name of every peer resolves")
        .unwrap();
    assert_eq!(dns_check["ok"], false);
    let detail = dns_check["detail"].as_str().unwrap();
    assert!(
        detail.contains("node1.cluster-b.example.com does not resolve"),
        "{detail}"
    );
    assert!(detail.contains("still using 127.0.0.1"), "{detail}");
}

/// Three clusters peer and converge; a user added, re-homed and deleted on one is seen
/// everywhere; a wrong intercluster password is alarmed and changes nothing.
#[tokio::test]
async fn three_clusters_converge_and_follow_every_kind_of_change() {
    let a = cluster("cluster-a.example.com", &["alice"]).await;
    let b = cluster("cluster-b.example.com", &["bob"]).await;
    let c = cluster("cluster-c.example.com", &["carol"]).await;

    // A wrong password first: alarmed on A, nothing recorded or pinned anywhere.
    let err = a
        .node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, "not-the-password")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("did not prove"), "{err}");
    assert!(
        has_alarm(
            &a,
            "InterClusterCertificateExchangeFailed",
            &b.node.https_addr.to_string()
        )
        .await
    );
    assert!(b.node.server.store.peers().await.unwrap().is_empty());
    assert!(
        a.node
            .server
            .store
            .trust_entries()
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        b.node
            .server
            .store
            .trust_entries()
            .await
            .unwrap()
            .is_empty()
    );

    for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
        x.node
            .control
            .peer_add(&y.node.https_addr.to_string(), AXL_USER, AXL_PW)
            .await
            .unwrap();
        y.node
            .control
            .peer_accept(&x.config.cluster_name())
            .await
            .unwrap();
    }
    assert!(
        !has_alarm(
            &a,
            "InterClusterCertificateExchangeFailed",
            &b.node.https_addr.to_string()
        )
        .await,
        "cleared by the successful exchange"
    );
    let all = [&a, &b, &c];
    let users = ["alice", "bob", "carol"];
    for (i, node) in all.iter().enumerate() {
        for (j, user) in users.iter().enumerate() {
            if i != j {
                eventually(10, "convergence", || async {
                    !remote(node, user).await.is_empty()
                })
                .await;
            }
        }
    }

    // A new user on B, then re-homed to another node of B, then deleted.
    b.node.control.add_user("bert", "pw").await.unwrap();
    for node in [&a, &c] {
        eventually(10, "bert everywhere", || async {
            !remote(node, "bert").await.is_empty()
        })
        .await;
    }
    let store_b = &b.node.server.store;
    // A second node of B (announced in its cluster info; a peer accepts users homed
    // only on nodes the peer announces).
    let node1 = store_b
        .cluster_nodes("cluster-b.example.com")
        .await
        .unwrap()
        .remove(0);
    store_b
        .publish_node(&impmesh_store::NodeRecord {
            name: "node2.cluster-b.example.com".into(),
            cert_pem: String::new(),
            fingerprint: String::new(),
            ..node1
        })
        .await
        .unwrap();
    store_b
        .set_home(
            "bert",
            "cluster-b.example.com",
            "node2.cluster-b.example.com",
        )
        .await
        .unwrap();
    b.node
        .agent
        .notify_peers(store_b.current_usn().await.unwrap());
    for node in [&a, &c] {
        eventually(10, "bert re-homed everywhere", || async {
            remote(node, "bert")
                .await
                .first()
                .is_some_and(|u| u.home_node == "node2.cluster-b.example.com")
        })
        .await;
    }
    b.node.control.delete_user("bert").await.unwrap();
    for node in [&a, &c] {
        eventually(10, "bert gone everywhere", || async {
            remote(node, "bert").await.is_empty()
        })
        .await;
    }
    // Every directory holds exactly the two other clusters' users.
    for node in all {
        let control = node.node.control.clone();
        eventually(10, "every peer in sync", || async {
            let peers = serde_json::to_value(control.peers().await.unwrap()).unwrap();
            peers
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["associated_users"] == 1 && p["live"]["state"] == "in-sync")
        })
        .await;
    }
}

/// A sync cut in the middle of a full listing (the agent stopped after its first page)
/// resumes within the same snapshot when the agent comes back: only the remaining
/// pages are asked for, and the directory ends equal to the peer's, nothing lost or
/// doubled.
#[tokio::test]
async fn a_sync_cut_mid_listing_resumes_where_it_stopped() {
    let names = ["u1", "u2", "u3", "u4", "u5", "u6", "u7"];
    let a = start_node(|c| {
        c.node.name = Some("node1.cluster-a.example.com".into());
        c.node.cluster = Some("cluster-a.example.com".into());
        c.sync.period = 3600;
        c.sync.page_size = 2;
    })
    .await;
    let b = cluster("cluster-b.example.com", &names).await;
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    let store = a.node.server.store.clone();
    // The first full sync done, to its last write (not only its last page: a finish
    // still under way when the agent stops would land on the listing set up below).
    eventually(10, "first sync", || async {
        store
            .peer_sync("cluster-b.example.com")
            .await
            .unwrap()
            .last_full_users
            == Some(7)
    })
    .await;
    a.node.agent.shutdown().await;

    // What a crash after the first page of a new full listing leaves behind.
    let peer = "cluster-b.example.com";
    store.restart_full_sync(peer).await.unwrap();
    let snapshot = b.node.server.store.current_usn().await.unwrap();
    let generation = store.begin_full_sync(peer, snapshot).await.unwrap();
    let first_page: Vec<impmesh_store::DirectoryEntry> = b
        .node
        .server
        .store
        .directory_page(0, None, Some(snapshot), 2, false)
        .await
        .unwrap()
        .entries;
    let after = first_page.last().unwrap().usn;
    store
        .apply_full_page(peer, generation, &first_page, &[], after)
        .await
        .unwrap();

    let pages_before = list_users_served(&b);
    let agent = impmesh_sync_agent::Agent::start(
        store.clone(),
        a.config.sync_settings(),
        impmesh_sync_agent::Ours {
            cluster: "cluster-a.example.com".into(),
            domain: support::DOMAIN.into(),
            address: a.node.https_addr.to_string(),
            server_name: "localhost".into(),
        },
    )
    .await
    .unwrap();
    eventually(10, "the resumed sync done", || async {
        store
            .peer_sync(peer)
            .await
            .unwrap()
            .full_snapshot_usn
            .is_none()
    })
    .await;
    // 7 users, 2 a page, the first page already applied: 3 more pages.
    assert_eq!(list_users_served(&b) - pages_before, 3);
    assert_eq!(store.remote_user_count(peer).await.unwrap(), 7);
    let ours = store.peer_digest(peer, false).await.unwrap();
    let theirs = b.node.server.store.directory_digest(false).await.unwrap();
    assert_eq!((ours.count, &ours.sha256), (theirs.count, &theirs.sha256));
    agent.shutdown().await;
}

/// How many listUsers requests a node has answered.
fn list_users_served(node: &TestNode) -> u64 {
    node.node
        .https
        .stats
        .snapshot()
        .iter()
        .filter(|((op, status), _)| *op == "listUsers" && *status == 200)
        .map(|(_, n)| n)
        .sum()
}

/// A peer that forgets the peering (its admin removed us) refuses our credential: the
/// failure is a status, an alarm and a troubleshooter line on our side.
#[tokio::test]
async fn a_peer_that_dropped_us_is_an_authentication_alarm() {
    let a = cluster("cluster-a.example.com", &["alice"]).await;
    let b = cluster("cluster-b.example.com", &["bob"]).await;
    a.node
        .control
        .peer_add(&b.node.https_addr.to_string(), AXL_USER, AXL_PW)
        .await
        .unwrap();
    let store = a.node.server.store.clone();
    eventually(10, "first sync", || async {
        store
            .remote_user_count("cluster-b.example.com")
            .await
            .unwrap()
            == 1
    })
    .await;
    b.node
        .control
        .peer_delete("cluster-a.example.com")
        .await
        .unwrap();
    a.node.agent.nudge("cluster-b.example.com");
    eventually(10, "the authentication alarm", || async {
        has_alarm(
            &a,
            "InterClusterPeerAuthenticationFailed",
            "cluster-b.example.com",
        )
        .await
    })
    .await;
    // Between retries the peer shows as failed, with the peer's answer as the reason.
    let control = a.node.control.clone();
    eventually(10, "the failed status", || async {
        let s = serde_json::to_value(control.peers().await.unwrap()).unwrap();
        s[0]["live"]["state"] == "failed"
            && s[0]["live"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("401"))
    })
    .await;
    let checks = serde_json::to_value(a.node.control.troubleshoot().await.unwrap()).unwrap();
    let sync = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "every peer is in sync")
        .unwrap();
    assert_eq!(sync["ok"], false);
    assert!(
        sync["detail"]
            .as_str()
            .unwrap()
            .contains("cluster-b.example.com: failed")
    );

    // Peering again through the channel-bound exchange repairs it and clears the alarm.
    a.node
        .control
        .peer_sync(
            "cluster-b.example.com",
            Some((AXL_USER.into(), AXL_PW.into())),
        )
        .await
        .unwrap();
    eventually(10, "the alarm cleared", || async {
        !has_alarm(
            &a,
            "InterClusterPeerAuthenticationFailed",
            "cluster-b.example.com",
        )
        .await
    })
    .await;
}
