//! Personal eventing (XEP-0163): each account's PEP nodes, their configuration, and the
//! items they keep. The router decides who may see what; this keeps the rows.

use sqlx::Row as _;

use crate::{Backend, Result, Store};

/// A PEP node's configuration as stored; the router gives the strings their meaning
/// (`access_model`: open, presence or whitelist; `send_last`: never, on_sub or
/// on_sub_and_presence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PepNode {
    pub node: String,
    pub access_model: String,
    pub persist_items: bool,
    pub max_items: u32,
    pub send_last: String,
    pub notify_retract: bool,
}

impl PepNode {
    /// Items the node keeps: `max_items`, or only the last one when it does not
    /// persist items (XEP-0060 leaves a transient node's storage to the service; the
    /// last item is what a contact coming online is sent).
    pub fn kept(&self) -> u32 {
        if self.persist_items {
            self.max_items.max(1)
        } else {
            1
        }
    }
}

/// One published item: its id and the payload, serialized XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PepItem {
    pub id: String,
    pub payload: String,
}

/// What became of a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Stored,
    /// The node did not exist and the owner already has `max_nodes` nodes.
    NodeLimit,
    /// The owner's items would hold more than their byte quota.
    QuotaFull,
}

/// An account's PEP quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PepQuota {
    pub nodes: usize,
    /// Bytes of payload over all its nodes.
    pub bytes: u64,
}

fn node_of(r: &sqlx::any::AnyRow) -> Result<PepNode> {
    Ok(PepNode {
        node: r.try_get("node")?,
        access_model: r.try_get("access_model")?,
        persist_items: r.try_get::<i64, _>("persist_items")? != 0,
        max_items: u32::try_from(r.try_get::<i64, _>("max_items")?).unwrap_or(1),
        send_last: r.try_get("send_last")?,
        notify_retract: r.try_get::<i64, _>("notify_retract")? != 0,
    })
}

const NODE_COLUMNS: &str =
    "node, access_model, persist_items, max_items, send_last, notify_retract";

/// Drops the oldest items of a node beyond what it keeps.
async fn trim(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    owner: &str,
    node: &str,
    kept: u32,
) -> Result<()> {
    sqlx::query(
        "DELETE FROM pep_items WHERE owner = $1 AND node = $2 AND item_id NOT IN
             (SELECT item_id FROM pep_items WHERE owner = $1 AND node = $2
              ORDER BY seq DESC LIMIT $3)",
    )
    .bind(owner)
    .bind(node)
    .bind(i64::from(kept))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Serializes the writes to one owner's PEP rows: PostgreSQL's READ COMMITTED
    /// would let two first publications race on the node, the count and the order
    /// (SQLite's write transactions are already one at a time). False when there is
    /// no such user.
    pub(crate) async fn lock_owner(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        owner: &str,
    ) -> Result<bool> {
        let lock = match self.backend {
            Backend::Sqlite => "SELECT 1 AS one FROM users WHERE username = $1",
            Backend::Postgres => "SELECT 1 AS one FROM users WHERE username = $1 FOR UPDATE",
        };
        Ok(sqlx::query(lock)
            .bind(owner)
            .fetch_optional(&mut **tx)
            .await?
            .is_some())
    }

    /// Every PEP node of `owner`, by name.
    pub async fn pep_nodes(&self, owner: &str) -> Result<Vec<PepNode>> {
        let _timer = self.latency.start("pep_nodes");
        let sql = format!("SELECT {NODE_COLUMNS} FROM pep_nodes WHERE owner = $1 ORDER BY node");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(node_of).collect()
    }

    /// One PEP node of `owner`, if it exists.
    pub async fn pep_node(&self, owner: &str, node: &str) -> Result<Option<PepNode>> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM pep_nodes WHERE owner = $1 AND node = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(node)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(node_of).transpose()
    }

    /// Publishes an item (replacing one with the same id), creating the node with
    /// `config` when it does not exist and the owner has fewer than `quota.nodes`;
    /// then drops the oldest items beyond what the node keeps. All or nothing, and
    /// nothing when the owner's items would hold more than `quota.bytes`.
    pub async fn pep_publish(
        &self,
        owner: &str,
        config: &PepNode,
        item: &PepItem,
        quota: PepQuota,
    ) -> Result<Published> {
        let _timer = self.latency.start("pep_publish");
        let mut tx = self.write().await?;
        if !self.lock_owner(&mut tx, owner).await? {
            return Err(crate::StoreError::UserNotFound(owner.to_owned()));
        }
        let sql = format!("SELECT {NODE_COLUMNS} FROM pep_nodes WHERE owner = $1 AND node = $2");
        let existing = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(&config.node)
            .fetch_optional(&mut *tx)
            .await?;
        let node = match existing {
            Some(row) => node_of(&row)?,
            None => {
                if crate::storage::count(&mut tx, "pep_nodes", owner).await? >= quota.nodes {
                    return Ok(Published::NodeLimit);
                }
                insert_node(&mut tx, owner, config).await?;
                config.clone()
            }
        };
        let row = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM pep_items WHERE owner = $1 AND node = $2",
        )
        .bind(owner)
        .bind(&node.node)
        .fetch_one(&mut *tx)
        .await?;
        let seq: i64 = row.try_get("seq")?;
        sqlx::query(
            "INSERT INTO pep_items (owner, node, item_id, payload, seq) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (owner, node, item_id) DO UPDATE SET payload = excluded.payload, seq = excluded.seq",
        )
        .bind(owner)
        .bind(&node.node)
        .bind(&item.id)
        .bind(&item.payload)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        trim(&mut tx, owner, &node.node, node.kept()).await?;
        let row = sqlx::query(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0) AS n FROM pep_items WHERE owner = $1",
        )
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        let bytes: i64 = row.try_get("n")?;
        if u64::try_from(bytes).unwrap_or(u64::MAX) > quota.bytes {
            // Dropped without commit: nothing was stored.
            return Ok(Published::QuotaFull);
        }
        tx.commit().await?;
        Ok(Published::Stored)
    }

    /// Creates an empty node; false when it exists or the owner has `max_nodes`.
    pub async fn pep_create(
        &self,
        owner: &str,
        config: &PepNode,
        max_nodes: usize,
    ) -> Result<bool> {
        let mut tx = self.write().await?;
        if !self.lock_owner(&mut tx, owner).await? {
            return Ok(false);
        }
        let exists = sqlx::query("SELECT 1 AS one FROM pep_nodes WHERE owner = $1 AND node = $2")
            .bind(owner)
            .bind(&config.node)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if exists || crate::storage::count(&mut tx, "pep_nodes", owner).await? >= max_nodes {
            return Ok(false);
        }
        insert_node(&mut tx, owner, config).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Replaces a node's configuration (and drops items beyond what it now keeps);
    /// false when there is no such node.
    pub async fn pep_configure(&self, owner: &str, config: &PepNode) -> Result<bool> {
        let mut tx = self.write().await?;
        if !self.lock_owner(&mut tx, owner).await? {
            return Ok(false);
        }
        let query = sqlx::query(
            "UPDATE pep_nodes SET access_model = $3, persist_items = $4, max_items = $5,
                 send_last = $6, notify_retract = $7
             WHERE owner = $1 AND node = $2",
        )
        .bind(owner);
        let changed = bind_config(query, config)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        trim(&mut tx, owner, &config.node, config.kept()).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The newest `max` items of a node, oldest first.
    pub async fn pep_items(&self, owner: &str, node: &str, max: usize) -> Result<Vec<PepItem>> {
        let _timer = self.latency.start("pep_items");
        let rows = sqlx::query(
            "SELECT item_id, payload FROM pep_items WHERE owner = $1 AND node = $2
             ORDER BY seq DESC LIMIT $3",
        )
        .bind(owner)
        .bind(node)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut items = rows
            .iter()
            .map(|r| {
                Ok(PepItem {
                    id: r.try_get("item_id")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        items.reverse();
        Ok(items)
    }

    /// The items of a node with these ids (those that exist), in the order asked.
    pub async fn pep_items_by_id(
        &self,
        owner: &str,
        node: &str,
        ids: &[String],
    ) -> Result<Vec<PepItem>> {
        let mut items = vec![];
        for id in ids {
            let row = sqlx::query(
                "SELECT payload FROM pep_items WHERE owner = $1 AND node = $2 AND item_id = $3",
            )
            .bind(owner)
            .bind(node)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row {
                items.push(PepItem {
                    id: id.clone(),
                    payload: row.try_get("payload")?,
                });
            }
        }
        Ok(items)
    }

    /// Removes one item; false when the node had no such item.
    pub async fn pep_retract(&self, owner: &str, node: &str, id: &str) -> Result<bool> {
        let gone =
            sqlx::query("DELETE FROM pep_items WHERE owner = $1 AND node = $2 AND item_id = $3")
                .bind(owner)
                .bind(node)
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(gone > 0)
    }

    /// Removes every item of a node; false when there is no such node.
    pub async fn pep_purge(&self, owner: &str, node: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let exists = sqlx::query("SELECT 1 AS one FROM pep_nodes WHERE owner = $1 AND node = $2")
            .bind(owner)
            .bind(node)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            return Ok(false);
        }
        sqlx::query("DELETE FROM pep_items WHERE owner = $1 AND node = $2")
            .bind(owner)
            .bind(node)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes a node and its items; false when there is no such node.
    pub async fn pep_delete_node(&self, owner: &str, node: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM pep_items WHERE owner = $1 AND node = $2")
            .bind(owner)
            .bind(node)
            .execute(&mut *tx)
            .await?;
        let gone = sqlx::query("DELETE FROM pep_nodes WHERE owner = $1 AND node = $2")
            .bind(owner)
            .bind(node)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(gone > 0)
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Binds a node's name and configuration, in the columns' order after the owner.
fn bind_config<'q>(query: AnyQuery<'q>, config: &'q PepNode) -> AnyQuery<'q> {
    query
        .bind(&config.node)
        .bind(&config.access_model)
        .bind(i64::from(config.persist_items))
        .bind(i64::from(config.max_items))
        .bind(&config.send_last)
        .bind(i64::from(config.notify_retract))
}

async fn insert_node(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    owner: &str,
    config: &PepNode,
) -> Result<()> {
    let query = sqlx::query(
        "INSERT INTO pep_nodes (owner, node, access_model, persist_items, max_items, send_last, notify_retract)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(owner);
    bind_config(query, config).execute(&mut **tx).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    fn node(name: &str, max_items: u32) -> PepNode {
        PepNode {
            node: name.into(),
            access_model: "presence".into(),
            persist_items: true,
            max_items,
            send_last: "on_sub_and_presence".into(),
            notify_retract: false,
        }
    }

    fn quota(nodes: usize) -> PepQuota {
        PepQuota {
            nodes,
            bytes: 10_000,
        }
    }

    fn item(id: &str) -> PepItem {
        PepItem {
            id: id.into(),
            payload: format!("<x xmlns='t' n='{id}'/>"),
        }
    }

    #[tokio::test]
    async fn pep_nodes_keep_their_newest_items_within_the_limits() {
        for (store, _dir) in stores().await {
            store
                .add_user(NewUser {
                    username: "dana",
                    password: "pw",
                    home_cluster: "c",
                    home_node: "n",
                })
                .await
                .unwrap();
            let n = node("urn:a", 2);
            for id in ["1", "2", "3"] {
                let r = store
                    .pep_publish("dana", &n, &item(id), quota(2))
                    .await
                    .unwrap();
                assert_eq!(r, Published::Stored);
            }
            let ids = |items: Vec<PepItem>| items.into_iter().map(|i| i.id).collect::<Vec<_>>();
            assert_eq!(
                ids(store.pep_items("dana", "urn:a", 10).await.unwrap()),
                ["2", "3"]
            );
            // Republishing an id makes it the newest.
            store
                .pep_publish("dana", &n, &item("2"), quota(2))
                .await
                .unwrap();
            assert_eq!(
                ids(store.pep_items("dana", "urn:a", 1).await.unwrap()),
                ["2"]
            );
            assert_eq!(
                ids(store
                    .pep_items_by_id("dana", "urn:a", &["3".into(), "9".into()])
                    .await
                    .unwrap()),
                ["3"]
            );
            // A second node fits, a third does not: nothing of it is stored.
            store
                .pep_publish("dana", &node("urn:b", 1), &item("1"), quota(2))
                .await
                .unwrap();
            let over = store
                .pep_publish("dana", &node("urn:c", 1), &item("1"), quota(2))
                .await
                .unwrap();
            assert_eq!(over, Published::NodeLimit);
            assert!(store.pep_node("dana", "urn:c").await.unwrap().is_none());
            assert!(
                !store
                    .pep_create("dana", &node("urn:c", 1), 2)
                    .await
                    .unwrap()
            );
            assert_eq!(store.pep_nodes("dana").await.unwrap().len(), 2);
            // Configuration shrinks the node; retract, purge and delete.
            assert!(
                store
                    .pep_configure("dana", &node("urn:a", 1))
                    .await
                    .unwrap()
            );
            assert_eq!(
                store
                    .pep_node("dana", "urn:a")
                    .await
                    .unwrap()
                    .unwrap()
                    .max_items,
                1
            );
            assert_eq!(
                ids(store.pep_items("dana", "urn:a", 10).await.unwrap()),
                ["2"]
            );
            assert!(store.pep_retract("dana", "urn:a", "2").await.unwrap());
            assert!(!store.pep_retract("dana", "urn:a", "2").await.unwrap());
            assert!(store.pep_purge("dana", "urn:b").await.unwrap());
            assert!(
                store
                    .pep_items("dana", "urn:b", 10)
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert!(store.pep_delete_node("dana", "urn:b").await.unwrap());
            assert!(!store.pep_delete_node("dana", "urn:b").await.unwrap());
            assert!(!store.pep_purge("dana", "urn:b").await.unwrap());
            // A node that does not persist keeps its last item only.
            let mut transient = node("urn:t", 5);
            transient.persist_items = false;
            store
                .pep_publish("dana", &transient, &item("1"), quota(3))
                .await
                .unwrap();
            store
                .pep_publish("dana", &transient, &item("2"), quota(3))
                .await
                .unwrap();
            assert_eq!(
                ids(store.pep_items("dana", "urn:t", 10).await.unwrap()),
                ["2"]
            );
            // Over the byte quota, nothing of the publication is stored.
            let big = PepItem {
                id: "big".into(),
                payload: "x".repeat(10_001),
            };
            let full = store
                .pep_publish("dana", &transient, &big, quota(3))
                .await
                .unwrap();
            assert_eq!(full, Published::QuotaFull);
            assert_eq!(
                ids(store.pep_items("dana", "urn:t", 10).await.unwrap()),
                ["2"]
            );
            // The account's deletion takes its nodes along.
            store.delete_user("dana").await.unwrap();
            assert!(store.pep_nodes("dana").await.unwrap().is_empty());
        }
    }
}
