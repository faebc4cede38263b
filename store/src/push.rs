//! Push notifications (XEP-0357): the app servers each account registered.

use sqlx::Row as _;

use crate::{Result, Store, now_unix};

/// One app server registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRegistration {
    pub jid: String,
    pub node: String,
    /// The publish-options form (XML), '' without.
    pub options: String,
    pub include_body: bool,
    pub include_sender: bool,
}

impl Store {
    /// Registers (or updates) an app server of `owner`; false when `owner` already
    /// has `max` others.
    pub async fn push_enable(&self, owner: &str, r: &PushRegistration, max: usize) -> Result<bool> {
        let _timer = self.latency.start("push_enable");
        let mut tx = self.write().await?;
        if !self.lock_owner(&mut tx, owner).await? {
            return Ok(false);
        }
        let others: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM push_registrations WHERE owner = $1 AND NOT (jid = $2 AND node = $3)",
        )
        .bind(owner)
        .bind(&r.jid)
        .bind(&r.node)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if usize::try_from(others).unwrap_or(usize::MAX) >= max {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO push_registrations (owner, jid, node, options, include_body, created,
                 include_sender)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (owner, jid, node) DO UPDATE SET options = excluded.options,
                 include_body = excluded.include_body, include_sender = excluded.include_sender",
        )
        .bind(owner)
        .bind(&r.jid)
        .bind(&r.node)
        .bind(&r.options)
        .bind(i64::from(r.include_body))
        .bind(now_unix())
        .bind(i64::from(r.include_sender))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Removes `owner`'s registrations with app server `jid`: one node, or all.
    /// Returns how many went.
    pub async fn push_disable(&self, owner: &str, jid: &str, node: Option<&str>) -> Result<u64> {
        let _timer = self.latency.start("push_disable");
        let gone =
            match node {
                Some(node) => sqlx::query(
                    "DELETE FROM push_registrations WHERE owner = $1 AND jid = $2 AND node = $3",
                )
                .bind(owner)
                .bind(jid)
                .bind(node)
                .execute(&self.pool)
                .await?,
                None => {
                    sqlx::query("DELETE FROM push_registrations WHERE owner = $1 AND jid = $2")
                        .bind(owner)
                        .bind(jid)
                        .execute(&self.pool)
                        .await?
                }
            };
        Ok(gone.rows_affected())
    }

    /// `owner`'s registrations, oldest first.
    pub async fn push_registrations(&self, owner: &str) -> Result<Vec<PushRegistration>> {
        let _timer = self.latency.start("push_registrations");
        let rows = sqlx::query(
            "SELECT jid, node, options, include_body, include_sender FROM push_registrations
             WHERE owner = $1 ORDER BY created, jid, node",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PushRegistration {
                    jid: r.try_get("jid")?,
                    node: r.try_get("node")?,
                    options: r.try_get("options")?,
                    include_body: r.try_get::<i64, _>("include_body")? != 0,
                    include_sender: r.try_get::<i64, _>("include_sender")? != 0,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    fn reg(jid: &str, node: &str) -> PushRegistration {
        PushRegistration {
            jid: jid.into(),
            node: node.into(),
            options: String::new(),
            include_body: false,
            include_sender: false,
        }
    }

    #[tokio::test]
    async fn registrations_are_kept_per_account_and_capped() {
        for (store, _dir) in stores().await {
            store
                .add_user(NewUser {
                    username: "erin",
                    password: "pw",
                    home_cluster: "c",
                    home_node: "n",
                })
                .await
                .unwrap();
            assert!(
                store
                    .push_enable("erin", &reg("push.a", "1"), 2)
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .push_enable("erin", &reg("push.a", "2"), 2)
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .push_enable("erin", &reg("push.b", "1"), 2)
                    .await
                    .unwrap()
            );
            // Enabling one again updates it, within the cap.
            let mut again = reg("push.a", "1");
            again.include_body = true;
            again.include_sender = true;
            assert!(store.push_enable("erin", &again, 2).await.unwrap());
            let all = store.push_registrations("erin").await.unwrap();
            assert_eq!(all.len(), 2);
            assert!(
                all.iter()
                    .any(|r| r.node == "1" && r.include_body && r.include_sender)
            );
            assert!(
                !store
                    .push_enable("nobody", &reg("push.a", "1"), 2)
                    .await
                    .unwrap()
            );
            assert_eq!(
                store
                    .push_disable("erin", "push.a", Some("2"))
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(store.push_disable("erin", "push.a", None).await.unwrap(), 1);
            assert!(store.push_registrations("erin").await.unwrap().is_empty());
        }
    }
}
