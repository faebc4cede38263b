//! Small per-user documents: vCard-temp (XEP-0054), private XML storage (XEP-0049) and
//! the block list (XEP-0191).

use sqlx::Row as _;

use crate::{Result, Store};

impl Store {
    /// The user's vCard as serialized XML, if one was stored.
    pub async fn vcard(&self, owner: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT vcard FROM vcards WHERE owner = $1")
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("vcard")).transpose()?)
    }

    pub async fn set_vcard(&self, owner: &str, vcard: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO vcards (owner, vcard) VALUES ($1, $2)
             ON CONFLICT (owner) DO UPDATE SET vcard = excluded.vcard",
        )
        .bind(owner)
        .bind(vcard)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The private XML element stored under `ns`, if any.
    pub async fn private_xml(&self, owner: &str, ns: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT xml FROM private_storage WHERE owner = $1 AND ns = $2")
            .bind(owner)
            .bind(ns)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("xml")).transpose()?)
    }

    /// Stores several private elements at once: all or none, and none when the owner
    /// would then keep more than `max_items` namespaces (false).
    pub async fn set_private_xml(
        &self,
        owner: &str,
        items: &[(String, String)],
        max_items: usize,
    ) -> Result<bool> {
        let mut tx = self.write().await?;
        for (ns, xml) in items {
            sqlx::query(
                "INSERT INTO private_storage (owner, ns, xml) VALUES ($1, $2, $3)
                 ON CONFLICT (owner, ns) DO UPDATE SET xml = excluded.xml",
            )
            .bind(owner)
            .bind(ns)
            .bind(xml)
            .execute(&mut *tx)
            .await?;
        }
        if count(&mut tx, "private_storage", owner).await? > max_items {
            // Dropped without commit: nothing was stored.
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The blocked JIDs, ordered.
    pub async fn blocklist(&self, owner: &str) -> Result<Vec<String>> {
        let _timer = self.latency.start("blocklist");
        let rows = sqlx::query("SELECT jid FROM blocklist WHERE owner = $1 ORDER BY jid")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("jid")?)).collect()
    }

    /// Adds JIDs to the block list: all or none, and none when the list would then
    /// hold more than `max_items` (false).
    pub async fn block(&self, owner: &str, jids: &[String], max_items: usize) -> Result<bool> {
        let mut tx = self.write().await?;
        for jid in jids {
            sqlx::query(
                "INSERT INTO blocklist (owner, jid) VALUES ($1, $2) ON CONFLICT (owner, jid) DO NOTHING",
            )
            .bind(owner)
            .bind(jid)
            .execute(&mut *tx)
            .await?;
        }
        if count(&mut tx, "blocklist", owner).await? > max_items {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Removes JIDs from the block list; an empty slice clears it.
    pub async fn unblock(&self, owner: &str, jids: &[String]) -> Result<()> {
        let mut tx = self.write().await?;
        if jids.is_empty() {
            sqlx::query("DELETE FROM blocklist WHERE owner = $1")
                .bind(owner)
                .execute(&mut *tx)
                .await?;
        }
        for jid in jids {
            sqlx::query("DELETE FROM blocklist WHERE owner = $1 AND jid = $2")
                .bind(owner)
                .bind(jid)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Rows `owner` has in `table` (a constant name), inside a write transaction.
pub(crate) async fn count(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    table: &'static str,
    owner: &str,
) -> Result<usize> {
    let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE owner = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(owner)
        .fetch_one(&mut **tx)
        .await?;
    let n: i64 = row.try_get("n")?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    #[tokio::test]
    async fn vcard_private_blocklist() {
        for (store, _dir) in stores().await {
            store
                .add_user(NewUser {
                    username: "carol",
                    password: "pw",
                    home_cluster: "c",
                    home_node: "n",
                })
                .await
                .unwrap();
            assert_eq!(store.vcard("carol").await.unwrap(), None);
            store.set_vcard("carol", "<vCard/>").await.unwrap();
            store
                .set_vcard("carol", "<vCard><FN>C</FN></vCard>")
                .await
                .unwrap();
            assert_eq!(
                store.vcard("carol").await.unwrap().as_deref(),
                Some("<vCard><FN>C</FN></vCard>")
            );
            let item = |ns: &str| (ns.to_owned(), format!("<a xmlns='{ns}'/>"));
            assert!(
                store
                    .set_private_xml("carol", &[item("ns:a")], 2)
                    .await
                    .unwrap()
            );
            assert!(store.private_xml("carol", "ns:a").await.unwrap().is_some());
            assert!(store.private_xml("carol", "ns:b").await.unwrap().is_none());
            // M9: over the cap, nothing of the request is stored; replacing is fine.
            let over = [item("ns:b"), item("ns:c")];
            assert!(!store.set_private_xml("carol", &over, 2).await.unwrap());
            assert!(store.private_xml("carol", "ns:b").await.unwrap().is_none());
            assert!(
                store
                    .set_private_xml("carol", &[item("ns:a"), item("ns:b")], 2)
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .block("carol", &["x@y".into(), "z@y".into(), "x@y".into()], 2)
                    .await
                    .unwrap()
            );
            assert_eq!(store.blocklist("carol").await.unwrap(), ["x@y", "z@y"]);
            assert!(!store.block("carol", &["w@y".into()], 2).await.unwrap());
            assert_eq!(store.blocklist("carol").await.unwrap(), ["x@y", "z@y"]);
            store.unblock("carol", &["x@y".into()]).await.unwrap();
            assert_eq!(store.blocklist("carol").await.unwrap(), ["z@y"]);
            store.unblock("carol", &[]).await.unwrap();
            assert!(store.blocklist("carol").await.unwrap().is_empty());
        }
    }
}
