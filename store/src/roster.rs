//! Rosters (RFC 6121 §2) with a version per owner (XEP-0237), and the inbound
//! subscription requests that wait for the owner's answer (RFC 6121 §3.1.3).

use sqlx::Row as _;

use crate::{Result, Store, StoreError};

/// The `subscription` attribute of a roster item (RFC 6121 §2.1.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Subscription {
    #[default]
    None,
    To,
    From,
    Both,
}

impl Subscription {
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Subscription::None,
            "to" => Subscription::To,
            "from" => Subscription::From,
            "both" => Subscription::Both,
            _ => return None,
        })
    }

    /// The contact may see the owner's presence.
    pub fn has_from(self) -> bool {
        matches!(self, Subscription::From | Subscription::Both)
    }

    /// The owner sees the contact's presence.
    pub fn has_to(self) -> bool {
        matches!(self, Subscription::To | Subscription::Both)
    }

    /// This state with the "to" half set or cleared.
    pub fn with_to(self, to: bool) -> Self {
        Self::from_halves(to, self.has_from())
    }

    /// This state with the "from" half set or cleared.
    pub fn with_from(self, from: bool) -> Self {
        Self::from_halves(self.has_to(), from)
    }

    /// The state with these halves.
    pub fn from_halves(to: bool, from: bool) -> Self {
        match (to, from) {
            (false, false) => Subscription::None,
            (true, false) => Subscription::To,
            (false, true) => Subscription::From,
            (true, true) => Subscription::Both,
        }
    }
}

/// One roster item: a contact's bare JID and what the owner knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RosterItem {
    pub contact: String,
    pub name: Option<String>,
    pub subscription: Subscription,
    /// "Pending Out": the owner asked to subscribe and the contact has not answered.
    pub ask: bool,
    pub groups: Vec<String>,
}

fn item_from_row(row: &sqlx::any::AnyRow) -> Result<RosterItem> {
    let subscription: String = row.try_get("subscription")?;
    let groups: String = row.try_get("groups_json")?;
    let ask: i64 = row.try_get("ask")?;
    Ok(RosterItem {
        contact: row.try_get("contact")?,
        name: row.try_get("name")?,
        subscription: Subscription::parse(&subscription)
            .ok_or_else(|| StoreError::Corrupt(format!("subscription {subscription:?}")))?,
        ask: ask != 0,
        groups: serde_json::from_str(&groups)
            .map_err(|e| StoreError::Corrupt(format!("roster groups: {e}")))?,
    })
}

impl Store {
    /// The owner's roster version (0 when it never changed).
    pub async fn roster_version(&self, owner: &str) -> Result<i64> {
        let row = sqlx::query("SELECT version FROM roster_versions WHERE owner = $1")
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => row.try_get("version")?,
            None => 0,
        })
    }

    /// The whole roster, ordered by contact, with its version.
    pub async fn roster(&self, owner: &str) -> Result<(i64, Vec<RosterItem>)> {
        let _timer = self.latency.start("roster");
        let rows = sqlx::query(
            "SELECT contact, name, subscription, ask, groups_json FROM roster_items
             WHERE owner = $1 ORDER BY contact",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(item_from_row).collect::<Result<_>>()?;
        Ok((self.roster_version(owner).await?, items))
    }

    /// One roster item, or `None`.
    pub async fn roster_item(&self, owner: &str, contact: &str) -> Result<Option<RosterItem>> {
        let _timer = self.latency.start("roster_item");
        let row = sqlx::query(
            "SELECT contact, name, subscription, ask, groups_json FROM roster_items
             WHERE owner = $1 AND contact = $2",
        )
        .bind(owner)
        .bind(contact)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(item_from_row).transpose()
    }

    /// Creates or replaces an item and bumps the roster version, in one transaction.
    /// Returns the new version.
    pub async fn put_roster_item(&self, owner: &str, item: &RosterItem) -> Result<i64> {
        let _timer = self.latency.start("put_roster_item");
        let groups = serde_json::to_string(&item.groups)
            .map_err(|e| StoreError::Corrupt(format!("roster groups: {e}")))?;
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO roster_items (owner, contact, name, subscription, ask, groups_json)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (owner, contact) DO UPDATE SET name = excluded.name,
               subscription = excluded.subscription, ask = excluded.ask,
               groups_json = excluded.groups_json",
        )
        .bind(owner)
        .bind(&item.contact)
        .bind(item.name.as_deref())
        .bind(item.subscription.as_str())
        .bind(i64::from(item.ask))
        .bind(groups)
        .execute(&mut *tx)
        .await?;
        let version = bump_version(&mut tx, owner).await?;
        tx.commit().await?;
        Ok(version)
    }

    /// Removes an item; returns the new version, or `None` if there was no such item.
    pub async fn remove_roster_item(&self, owner: &str, contact: &str) -> Result<Option<i64>> {
        let mut tx = self.write().await?;
        let result = sqlx::query("DELETE FROM roster_items WHERE owner = $1 AND contact = $2")
            .bind(owner)
            .bind(contact)
            .execute(&mut *tx)
            .await?;
        if result.rows_affected() == 0 {
            return Ok(None);
        }
        let version = bump_version(&mut tx, owner).await?;
        tx.commit().await?;
        Ok(Some(version))
    }

    /// Keeps an inbound subscription request until the owner answers it (one per
    /// contact), unless the owner already has `max_requests` waiting (false).
    pub async fn put_subscription_request(
        &self,
        owner: &str,
        contact: &str,
        stanza: &str,
        max_requests: usize,
    ) -> Result<bool> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO subscription_requests (owner, contact, stanza) VALUES ($1, $2, $3)
             ON CONFLICT (owner, contact) DO UPDATE SET stanza = excluded.stanza",
        )
        .bind(owner)
        .bind(contact)
        .bind(stanza)
        .execute(&mut *tx)
        .await?;
        if crate::storage::count(&mut tx, "subscription_requests", owner).await? > max_requests {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// How many items `owner`'s roster holds.
    pub async fn roster_len(&self, owner: &str) -> Result<usize> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM roster_items WHERE owner = $1")
            .bind(owner)
            .fetch_one(&self.pool)
            .await?;
        let n: i64 = row.try_get("n")?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Forgets a request; true if there was one.
    pub async fn remove_subscription_request(&self, owner: &str, contact: &str) -> Result<bool> {
        let result =
            sqlx::query("DELETE FROM subscription_requests WHERE owner = $1 AND contact = $2")
                .bind(owner)
                .bind(contact)
                .execute(&self.pool)
                .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Whether the contact has asked to subscribe to the owner ("Pending In").
    pub async fn has_subscription_request(&self, owner: &str, contact: &str) -> Result<bool> {
        let row =
            sqlx::query("SELECT 1 FROM subscription_requests WHERE owner = $1 AND contact = $2")
                .bind(owner)
                .bind(contact)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// Every waiting request, as `(contact, stanza)`, for delivery at login.
    pub async fn subscription_requests(&self, owner: &str) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT contact, stanza FROM subscription_requests WHERE owner = $1 ORDER BY contact",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("contact")?, r.try_get("stanza")?)))
            .collect()
    }
}

async fn bump_version(tx: &mut sqlx::Transaction<'_, sqlx::Any>, owner: &str) -> Result<i64> {
    sqlx::query(
        "INSERT INTO roster_versions (owner, version) VALUES ($1, 1)
         ON CONFLICT (owner) DO UPDATE SET version = roster_versions.version + 1",
    )
    .bind(owner)
    .execute(&mut **tx)
    .await?;
    let row = sqlx::query("SELECT version FROM roster_versions WHERE owner = $1")
        .bind(owner)
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get("version")?)
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    #[tokio::test]
    async fn roster_items_and_versions() {
        for (store, _dir) in stores().await {
            store
                .add_user(NewUser {
                    username: "alice",
                    password: "pw",
                    home_cluster: "c",
                    home_node: "n",
                })
                .await
                .unwrap();
            assert_eq!(store.roster("alice").await.unwrap(), (0, vec![]));
            let mut item = RosterItem {
                contact: "bob@localhost".into(),
                name: Some("Bob".into()),
                groups: vec!["Friends".into(), "Work \"quoted\"".into()],
                ..Default::default()
            };
            assert_eq!(store.put_roster_item("alice", &item).await.unwrap(), 1);
            item.subscription = Subscription::To;
            item.ask = true;
            assert_eq!(store.put_roster_item("alice", &item).await.unwrap(), 2);
            let (ver, items) = store.roster("alice").await.unwrap();
            assert_eq!((ver, items), (2, vec![item.clone()]));
            assert_eq!(
                store.roster_item("alice", "bob@localhost").await.unwrap(),
                Some(item)
            );
            assert_eq!(
                store
                    .remove_roster_item("alice", "bob@localhost")
                    .await
                    .unwrap(),
                Some(3)
            );
            assert_eq!(
                store
                    .remove_roster_item("alice", "bob@localhost")
                    .await
                    .unwrap(),
                None
            );

            store
                .put_subscription_request("alice", "carol@localhost", "<presence/>", 10)
                .await
                .unwrap();
            assert!(
                store
                    .has_subscription_request("alice", "carol@localhost")
                    .await
                    .unwrap()
            );
            assert_eq!(store.subscription_requests("alice").await.unwrap().len(), 1);
            // M9: requests per owner are capped; the one over is not kept.
            assert!(
                !store
                    .put_subscription_request("alice", "dave@localhost", "<presence/>", 1)
                    .await
                    .unwrap()
            );
            assert_eq!(store.subscription_requests("alice").await.unwrap().len(), 1);
            assert!(
                store
                    .remove_subscription_request("alice", "carol@localhost")
                    .await
                    .unwrap()
            );
            // Deleting the user removes everything it owned.
            store
                .put_roster_item(
                    "alice",
                    &RosterItem {
                        contact: "x@y".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            store.delete_user("alice").await.unwrap();
            assert_eq!(store.roster("alice").await.unwrap(), (0, vec![]));
        }
    }

    #[test]
    fn subscription_halves() {
        assert_eq!(Subscription::None.with_to(true), Subscription::To);
        assert_eq!(Subscription::To.with_from(true), Subscription::Both);
        assert_eq!(Subscription::Both.with_to(false), Subscription::From);
        assert_eq!(Subscription::From.with_from(false), Subscription::None);
    }
}
