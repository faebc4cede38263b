//! FAST tokens (XEP-0484): what each client of an account may log in with instead of
//! its password.
//!
//! A client (an account and the `id` of the SASL2 user-agent it sent) has two slots:
//! the token it uses (0) and a newer one it was given but has not used yet (1). A
//! login with the newer token retires the older one; a login with the older one leaves
//! the newer waiting, in case the client never received it (XEP-0484 §4.2). Only
//! proofs are stored: the SHA-256 of the client's initiator proof and the server's
//! responder proof, never a token.

use sqlx::Row as _;
use subtle::ConstantTimeEq as _;

use crate::{Result, Store};

/// A token to store in a client's newer slot.
#[derive(Debug, Clone)]
pub struct NewFastToken<'a> {
    pub owner: &'a str,
    /// The SASL2 user-agent id of the client it was issued to.
    pub client: &'a str,
    pub mechanism: &'a str,
    /// Hex SHA-256 of the initiator proof the client will send.
    pub initiator: &'a str,
    /// The responder proof the server answers with (base64).
    pub responder: &'a str,
    pub software: &'a str,
    pub device: &'a str,
    pub issued: i64,
    pub expires: i64,
    /// The account's SCRAM-SHA-256 verifier (encoded) as read when the login began:
    /// the token is not stored if it changed since (a new password revokes every
    /// token, also one a login already under way would issue).
    pub credentials: &'a str,
}

/// A stored token, as `impmesh user tokens` lists it (no proof).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FastToken {
    pub client: String,
    /// Issued but not used yet: the client's newer token.
    pub pending: bool,
    pub mechanism: String,
    pub software: String,
    pub device: String,
    pub issued: i64,
    pub expires: i64,
    /// Unix seconds of the last login with it; `None` if never used.
    pub last_used: Option<i64>,
}

/// What a login with a token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FastCheck {
    /// The token is good; it is now the client's token in use.
    Valid {
        responder: String,
        issued: i64,
        expires: i64,
    },
    /// The token was good but has expired (now deleted).
    Expired,
    /// No such token for this client and mechanism.
    Unknown,
}

impl Store {
    /// Stores a new token in `t.client`'s newer slot (replacing one never used). A new
    /// client beyond `max_clients` for the account makes room by dropping the tokens
    /// of the client whose tokens expire first. False when the account does not exist
    /// or its password changed since `t.credentials` was read.
    pub async fn fast_issue(&self, t: &NewFastToken<'_>, max_clients: usize) -> Result<bool> {
        let _timer = self.latency.start("fast_issue");
        let mut tx = self.write().await?;
        if !self.lock_owner(&mut tx, t.owner).await? {
            return Ok(false);
        }
        let current: String = sqlx::query("SELECT scram_sha256 FROM users WHERE username = $1")
            .bind(t.owner)
            .fetch_one(&mut *tx)
            .await?
            .try_get("scram_sha256")?;
        if current != t.credentials {
            return Ok(false);
        }
        let clients = sqlx::query(
            "SELECT client, MAX(expires) AS last FROM fast_tokens WHERE owner = $1 AND client <> $2
             GROUP BY client ORDER BY last, client",
        )
        .bind(t.owner)
        .bind(t.client)
        .fetch_all(&mut *tx)
        .await?;
        let over = (clients.len() + 1).saturating_sub(max_clients.max(1));
        for row in clients.iter().take(over) {
            let client: String = row.try_get("client")?;
            sqlx::query("DELETE FROM fast_tokens WHERE owner = $1 AND client = $2")
                .bind(t.owner)
                .bind(client)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM fast_tokens WHERE owner = $1 AND client = $2 AND slot = 1")
            .bind(t.owner)
            .bind(t.client)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO fast_tokens (owner, client, slot, mechanism, initiator, responder,
                 software, device, issued, expires, last_used)
             VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, 0)",
        )
        .bind(t.owner)
        .bind(t.client)
        .bind(t.mechanism)
        .bind(t.initiator)
        .bind(t.responder)
        .bind(t.software)
        .bind(t.device)
        .bind(t.issued)
        .bind(t.expires)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A login by `owner`'s `client` with `mechanism` and a token whose initiator proof
    /// hashes to `initiator` (hex), at `now`. The proof is compared in constant time
    /// against the client's two slots, with a plain read: only a proof that matches
    /// leads to a write (a wrong guess takes no write lock).
    pub async fn fast_use(
        &self,
        owner: &str,
        client: &str,
        mechanism: &str,
        initiator: &str,
        now: i64,
    ) -> Result<FastCheck> {
        let _timer = self.latency.start("fast_use");
        let rows = sqlx::query(
            "SELECT slot, mechanism, initiator, responder, issued, expires FROM fast_tokens
             WHERE owner = $1 AND client = $2 ORDER BY slot DESC",
        )
        .bind(owner)
        .bind(client)
        .fetch_all(&self.pool)
        .await?;
        let mut found = None;
        for row in &rows {
            let stored: String = row.try_get("initiator")?;
            if bool::from(stored.as_bytes().ct_eq(initiator.as_bytes())) {
                found = Some(row);
            }
        }
        let Some(row) = found else {
            return Ok(FastCheck::Unknown);
        };
        let slot: i64 = row.try_get("slot")?;
        let stored_mechanism: String = row.try_get("mechanism")?;
        let expires: i64 = row.try_get("expires")?;
        if stored_mechanism != mechanism {
            return Ok(FastCheck::Unknown);
        }
        if expires <= now {
            sqlx::query(
                "DELETE FROM fast_tokens WHERE owner = $1 AND client = $2 AND initiator = $3",
            )
            .bind(owner)
            .bind(client)
            .bind(initiator)
            .execute(&self.pool)
            .await?;
            return Ok(FastCheck::Expired);
        }
        // Under the owner's lock, by the proof rather than the slot read above: a
        // concurrent login, issue or revocation may have moved things since.
        let mut tx = self.write().await?;
        if !self.lock_owner(&mut tx, owner).await? {
            return Ok(FastCheck::Unknown);
        }
        if slot == 1 {
            // The newer token is used: the older one is retired (XEP-0484 §4.4).
            sqlx::query(
                "DELETE FROM fast_tokens
                 WHERE owner = $1 AND client = $2 AND slot = 0 AND initiator <> $3",
            )
            .bind(owner)
            .bind(client)
            .bind(initiator)
            .execute(&mut *tx)
            .await?;
        }
        let updated = sqlx::query(
            "UPDATE fast_tokens SET slot = 0, last_used = $4
             WHERE owner = $1 AND client = $2 AND initiator = $3",
        )
        .bind(owner)
        .bind(client)
        .bind(initiator)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            // Revoked (or replaced) meanwhile.
            return Ok(FastCheck::Unknown);
        }
        tx.commit().await?;
        Ok(FastCheck::Valid {
            responder: row.try_get("responder")?,
            issued: row.try_get("issued")?,
            expires,
        })
    }

    /// Revokes `owner`'s tokens: one client's (both slots), or every client's.
    /// Returns how many tokens went.
    pub async fn fast_revoke(&self, owner: &str, client: Option<&str>) -> Result<u64> {
        let _timer = self.latency.start("fast_revoke");
        let done = match client {
            Some(client) => {
                sqlx::query("DELETE FROM fast_tokens WHERE owner = $1 AND client = $2")
                    .bind(owner)
                    .bind(client)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("DELETE FROM fast_tokens WHERE owner = $1")
                    .bind(owner)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    /// `owner`'s tokens, by client then slot (the one in use first).
    pub async fn fast_tokens(&self, owner: &str) -> Result<Vec<FastToken>> {
        let rows = sqlx::query(
            "SELECT client, slot, mechanism, software, device, issued, expires, last_used
             FROM fast_tokens WHERE owner = $1 ORDER BY client, slot",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let last_used: i64 = row.try_get("last_used")?;
                Ok(FastToken {
                    client: row.try_get("client")?,
                    pending: row.try_get::<i64, _>("slot")? == 1,
                    mechanism: row.try_get("mechanism")?,
                    software: row.try_get("software")?,
                    device: row.try_get("device")?,
                    issued: row.try_get("issued")?,
                    expires: row.try_get("expires")?,
                    last_used: (last_used > 0).then_some(last_used),
                })
            })
            .collect()
    }

    /// Deletes tokens expired at `now`; returns how many.
    pub async fn fast_expire(&self, now: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM fast_tokens WHERE expires <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    fn token<'a>(
        credentials: &'a str,
        client: &'a str,
        initiator: &'a str,
        expires: i64,
    ) -> NewFastToken<'a> {
        NewFastToken {
            credentials,
            owner: "erin",
            client,
            mechanism: "HT-SHA-256-NONE",
            initiator,
            responder: "resp",
            software: "app",
            device: "phone",
            issued: 100,
            expires,
        }
    }

    async fn credentials(store: &Store, user: &str) -> String {
        store
            .user(user)
            .await
            .unwrap()
            .unwrap()
            .scram_sha256
            .encode()
    }

    #[tokio::test]
    async fn tokens_rotate_through_two_slots_per_client() {
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
            let creds = credentials(&store, "erin").await;
            let mech = "HT-SHA-256-NONE";
            assert!(
                store
                    .fast_issue(&token(&creds, "c1", "a", 1000), 5)
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .fast_issue(
                        &NewFastToken {
                            owner: "nobody",
                            ..token(&creds, "c1", "a", 1000)
                        },
                        5
                    )
                    .await
                    .unwrap()
            );
            // Only the client it was issued to, with its mechanism and proof.
            assert_eq!(
                store.fast_use("erin", "c2", mech, "a", 200).await.unwrap(),
                FastCheck::Unknown
            );
            assert_eq!(
                store
                    .fast_use("erin", "c1", "HT-SHA-256-ENDP", "a", 200)
                    .await
                    .unwrap(),
                FastCheck::Unknown
            );
            assert_eq!(
                store.fast_use("erin", "c1", mech, "b", 200).await.unwrap(),
                FastCheck::Unknown
            );
            assert!(matches!(
                store.fast_use("erin", "c1", mech, "a", 200).await.unwrap(),
                FastCheck::Valid { expires: 1000, .. }
            ));
            // A newer token waits beside the one in use: both log in until the newer
            // one is used, which retires the older.
            assert!(
                store
                    .fast_issue(&token(&creds, "c1", "b", 2000), 5)
                    .await
                    .unwrap()
            );
            let listed = store.fast_tokens("erin").await.unwrap();
            assert_eq!(listed.len(), 2);
            assert!(!listed[0].pending && listed[0].last_used == Some(200));
            assert!(listed[1].pending && listed[1].last_used.is_none());
            assert!(matches!(
                store.fast_use("erin", "c1", mech, "a", 300).await.unwrap(),
                FastCheck::Valid { .. }
            ));
            assert!(matches!(
                store.fast_use("erin", "c1", mech, "b", 400).await.unwrap(),
                FastCheck::Valid { expires: 2000, .. }
            ));
            assert_eq!(
                store.fast_use("erin", "c1", mech, "a", 500).await.unwrap(),
                FastCheck::Unknown
            );
            // An expired token is refused as such, and goes.
            assert_eq!(
                store.fast_use("erin", "c1", mech, "b", 2000).await.unwrap(),
                FastCheck::Expired
            );
            assert!(store.fast_tokens("erin").await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn clients_are_capped_revoked_expired_and_go_with_the_password() {
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
            let creds = credentials(&store, "erin").await;
            assert!(
                store
                    .fast_issue(&token(&creds, "c1", "a", 1000), 2)
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .fast_issue(&token(&creds, "c2", "b", 3000), 2)
                    .await
                    .unwrap()
            );
            // A third client makes room by dropping the one expiring first.
            assert!(
                store
                    .fast_issue(&token(&creds, "c3", "c", 2000), 2)
                    .await
                    .unwrap()
            );
            let clients: Vec<String> = store
                .fast_tokens("erin")
                .await
                .unwrap()
                .into_iter()
                .map(|t| t.client)
                .collect();
            assert_eq!(clients, ["c2", "c3"]);
            assert_eq!(store.fast_revoke("erin", Some("c2")).await.unwrap(), 1);
            assert_eq!(store.fast_revoke("erin", Some("c2")).await.unwrap(), 0);
            assert!(
                store
                    .fast_issue(&token(&creds, "c1", "a", 1000), 5)
                    .await
                    .unwrap()
            );
            assert_eq!(store.fast_expire(1500).await.unwrap(), 1);
            assert_eq!(store.fast_tokens("erin").await.unwrap().len(), 1);
            // A new password revokes every token; so does deleting the account.
            store.set_password("erin", "new").await.unwrap();
            assert!(store.fast_tokens("erin").await.unwrap().is_empty());
            // A login that began before the change issues nothing.
            assert!(
                !store
                    .fast_issue(&token(&creds, "c1", "a", 1000), 5)
                    .await
                    .unwrap()
            );
            let creds = credentials(&store, "erin").await;
            assert!(
                store
                    .fast_issue(&token(&creds, "c1", "a", 1000), 5)
                    .await
                    .unwrap()
            );
            assert_eq!(store.fast_revoke("erin", None).await.unwrap(), 1);
            assert!(
                store
                    .fast_issue(&token(&creds, "c1", "a", 1000), 5)
                    .await
                    .unwrap()
            );
            store.delete_user("erin").await.unwrap();
            assert!(store.fast_tokens("erin").await.unwrap().is_empty());
        }
    }
}
