//! The cluster's TURN secrets: relays check credentials with them, XEP-0215 mints
//! credentials with them. One secret per rotation period, made by whichever node asks
//! first in that period (nodes sharing a store agree on it); the previous period's
//! stays valid through the current one, so a credential made just before a rotation
//! lives out its lifetime.

use sqlx::Row as _;

use crate::{Result, Store};

/// A secret and when it was made (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnSecret {
    pub secret: Vec<u8>,
    pub created: i64,
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    s.len()
        .is_multiple_of(2)
        .then(|| {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten()
}

impl Store {
    /// The secrets in use at `now`, newest first: this period's (made now if it is
    /// not there yet) and the previous one's, if any. Older ones are deleted.
    pub async fn turn_secrets(&self, now: i64, period_secs: i64) -> Result<Vec<TurnSecret>> {
        let period = period_secs.max(1);
        let generation = now.div_euclid(period);
        let mut fresh = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut fresh);
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO turn_secrets (generation, secret, created) VALUES ($1, $2, $3)
             ON CONFLICT (generation) DO NOTHING",
        )
        .bind(generation)
        .bind(hex(&fresh))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM turn_secrets WHERE generation < $1")
            .bind(generation - 1)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT secret, created FROM turn_secrets WHERE generation <= $1 ORDER BY generation DESC",
        )
        .bind(generation)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut secrets = Vec::with_capacity(rows.len());
        for r in &rows {
            let text: String = r.try_get("secret")?;
            // A secret that does not decode is skipped: never an empty HMAC key.
            match unhex(&text).filter(|s| !s.is_empty()) {
                Some(secret) => secrets.push(TurnSecret {
                    secret,
                    created: r.try_get("created")?,
                }),
                None => tracing::error!("a stored TURN secret does not decode; it is not used"),
            }
        }
        Ok(secrets)
    }
}

/// A relay of the cluster as its node last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLoad {
    pub node: String,
    /// Where clients reach it (UDP and TCP), `IP:PORT`.
    pub address: String,
    pub allocations: i64,
    pub capacity: i64,
    /// Unix seconds.
    pub heartbeat: i64,
}

impl Store {
    /// Publishes this node's relay: its address, load and a heartbeat.
    pub async fn publish_relay(&self, relay: &RelayLoad) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO relays (node, address, allocations, capacity, heartbeat)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (node) DO UPDATE SET address = excluded.address,
               allocations = excluded.allocations, capacity = excluded.capacity,
               heartbeat = excluded.heartbeat",
        )
        .bind(&relay.node)
        .bind(&relay.address)
        .bind(relay.allocations)
        .bind(relay.capacity)
        .bind(relay.heartbeat)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The relays whose heartbeat is at `since` or later, by node name.
    pub async fn relays(&self, since: i64) -> Result<Vec<RelayLoad>> {
        let rows = sqlx::query(
            "SELECT node, address, allocations, capacity, heartbeat FROM relays
             WHERE heartbeat >= $1 ORDER BY node",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RelayLoad {
                    node: r.try_get("node")?,
                    address: r.try_get("address")?,
                    allocations: r.try_get("allocations")?,
                    capacity: r.try_get("capacity")?,
                    heartbeat: r.try_get("heartbeat")?,
                })
            })
            .collect()
    }

    /// Takes this node's relay out of the registry (a clean stop: no relay sends
    /// clients to it meanwhile).
    pub async fn remove_relay(&self, node: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM relays WHERE node = $1")
            .bind(node)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::RelayLoad;
    use crate::test_support::stores;

    #[tokio::test]
    async fn relays_publish_their_load_and_stale_ones_are_left_out() {
        for (store, _dir) in stores().await {
            let relay = |node: &str, allocations, heartbeat| RelayLoad {
                node: node.into(),
                address: format!("192.0.2.{}:3478", node.len()),
                allocations,
                capacity: 100,
                heartbeat,
            };
            store.publish_relay(&relay("a", 5, 1000)).await.unwrap();
            store.publish_relay(&relay("bb", 7, 1000)).await.unwrap();
            // A later heartbeat replaces the row.
            store.publish_relay(&relay("a", 9, 1010)).await.unwrap();
            assert_eq!(
                store.relays(1000).await.unwrap(),
                vec![relay("a", 9, 1010), relay("bb", 7, 1000)]
            );
            assert_eq!(store.relays(1005).await.unwrap(), vec![relay("a", 9, 1010)]);
            store.remove_relay("a").await.unwrap();
            assert_eq!(store.relays(0).await.unwrap(), vec![relay("bb", 7, 1000)]);
        }
    }

    #[tokio::test]
    async fn secrets_rotate_by_period_and_keep_the_previous() {
        for (store, _dir) in stores().await {
            let day = 86_400;
            let first = store.turn_secrets(10 * day + 5, day).await.unwrap();
            assert_eq!(first.len(), 1);
            assert_eq!(first[0].secret.len(), 32);
            // Asked again in the same period (by this node or another): the same.
            let again = store.turn_secrets(10 * day + 500, day).await.unwrap();
            assert_eq!(again, first);
            // The next period: a new one, the previous kept second.
            let next = store.turn_secrets(11 * day + 1, day).await.unwrap();
            assert_eq!(next.len(), 2);
            assert_ne!(next[0].secret, first[0].secret);
            assert_eq!(next[1], first[0]);
            // Two periods on, the first is gone.
            let later = store.turn_secrets(12 * day, day).await.unwrap();
            assert_eq!(later.len(), 2);
            assert_eq!(later[1], next[0]);
            assert!(!later.contains(&first[0]));
        }
    }
}
