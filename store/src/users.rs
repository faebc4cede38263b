//! Accounts: one row per user, with its home cluster/node and its SCRAM verifiers.

use sqlx::Row as _;

use crate::scram::{ScramHash, ScramVerifier};
use crate::{AccountChange, ClusterName, NodeName, Result, Store, StoreError, UserName, now_unix};

/// A user as the store knows it.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub username: UserName,
    pub home_cluster: ClusterName,
    pub home_node: NodeName,
    pub scram_sha1: ScramVerifier,
    pub scram_sha256: ScramVerifier,
    pub created_at: i64,
    /// The USN of the last directory change to this user.
    pub usn: i64,
}

/// What it takes to create a user.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub home_cluster: &'a str,
    pub home_node: &'a str,
}

/// PBKDF2 derivations running at once, at most: each takes a blocking thread for a few
/// milliseconds, and more of them than cores would only queue on the CPU (security
/// review H5: they ran on the async workers, so two sessions changing passwords in a
/// loop stalled every session of a 2-core node).
static DERIVATIONS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::sync::Semaphore::new(cores)
});

impl Store {
    /// Derives the SCRAM verifiers of a password on a blocking thread, at most one per
    /// core at a time, with this store's iteration count.
    pub async fn derive_verifiers(&self, password: &str) -> Result<(ScramVerifier, ScramVerifier)> {
        let iterations = self.scram_iterations();
        let password = password.to_owned();
        let _permit = DERIVATIONS
            .acquire()
            .await
            .map_err(|_| StoreError::DerivationUnavailable)?;
        tokio::task::spawn_blocking(move || {
            Ok((
                ScramVerifier::new(ScramHash::Sha1, &password, iterations)?,
                ScramVerifier::new(ScramHash::Sha256, &password, iterations)?,
            ))
        })
        .await
        .map_err(StoreError::Derivation)?
    }

    /// Checks a password against a verifier on a blocking thread, bounded like
    /// [`Self::derive_verifiers`]. Without a verifier (an unknown user) it derives
    /// anyway and answers false: the time taken does not tell whether the user exists.
    pub async fn check_password(&self, verifier: Option<ScramVerifier>, password: &str) -> bool {
        let iterations = self.scram_iterations();
        let password = password.to_owned();
        let Ok(_permit) = DERIVATIONS.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || match verifier {
            Some(v) => v.verify_password(&password),
            None => {
                let _ = ScramVerifier::new(ScramHash::Sha256, &password, iterations);
                false
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Creates a user; [`StoreError::UserExists`] if the name is taken.
    /// The username must already be a normalised localpart. The name is checked before
    /// the (costly) derivation, and again in the write transaction.
    pub async fn add_user(&self, user: NewUser<'_>) -> Result<()> {
        let _timer = self.latency.start("add_user");
        if self.user_exists(user.username).await? {
            return Err(StoreError::UserExists(user.username.to_owned()));
        }
        let (sha1, sha256) = self.derive_verifiers(user.password).await?;
        let mut tx = self.write().await?;
        // The USN first: it takes the write lock, so the check below cannot go stale.
        let usn = crate::directory::next_usn(&mut tx).await?;
        if sqlx::query("SELECT 1 FROM users WHERE username = $1")
            .bind(user.username)
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(StoreError::UserExists(user.username.to_owned()));
        }
        if let Some(row) = sqlx::query("SELECT home_cluster FROM remote_users WHERE username = $1")
            .bind(user.username)
            .fetch_optional(&mut *tx)
            .await?
        {
            return Err(StoreError::HomedAtPeer {
                user: user.username.to_owned(),
                cluster: row.try_get("home_cluster")?,
            });
        }
        let result = sqlx::query(
            "INSERT INTO users (username, home_cluster, home_node, scram_sha1, scram_sha256, created_at, usn)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (username) DO NOTHING",
        )
        .bind(user.username)
        .bind(user.home_cluster)
        .bind(user.home_node)
        .bind(sha1.encode())
        .bind(sha256.encode())
        .bind(now_unix())
        .bind(usn)
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::UserExists(user.username.to_owned()));
        }
        sqlx::query("DELETE FROM user_tombstones WHERE username = $1")
            .bind(user.username)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.directory_changed();
        self.account_changed(AccountChange::Added(UserName::new(user.username)));
        Ok(())
    }

    /// Creates many users in one transaction, all with the same verifiers (a bulk
    /// import from another server, or a benchmark): each gets its USN like any new user.
    /// Names already taken, here or by a peer, are skipped; returns how many were
    /// created.
    pub async fn import_users(
        &self,
        usernames: &[String],
        verifiers: (&ScramVerifier, &ScramVerifier),
        home_cluster: &str,
        home_node: &str,
    ) -> Result<u64> {
        let (sha1, sha256) = (verifiers.0.encode(), verifiers.1.encode());
        let now = now_unix();
        let mut tx = self.write().await?;
        let mut created = 0;
        for username in usernames {
            let usn = crate::directory::next_usn(&mut tx).await?;
            created += sqlx::query(
                "INSERT INTO users (username, home_cluster, home_node, scram_sha1, scram_sha256, created_at, usn)
                 SELECT $1, $2, $3, $4, $5, $6, $7
                 WHERE NOT EXISTS (SELECT 1 FROM remote_users WHERE username = $1)
                 ON CONFLICT (username) DO NOTHING",
            )
            .bind(username)
            .bind(home_cluster)
            .bind(home_node)
            .bind(&sha1)
            .bind(&sha256)
            .bind(now)
            .bind(usn)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        self.directory_changed();
        if created > 0 {
            self.account_changed(AccountChange::Imported(created));
        }
        Ok(created)
    }

    /// Moves a user to another home cluster/node; a directory change with a new USN.
    pub async fn set_home(
        &self,
        username: &str,
        home_cluster: &str,
        home_node: &str,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        let usn = crate::directory::next_usn(&mut tx).await?;
        let result = sqlx::query(
            "UPDATE users SET home_cluster = $1, home_node = $2, usn = $3 WHERE username = $4",
        )
        .bind(home_cluster)
        .bind(home_node)
        .bind(usn)
        .bind(username)
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::UserNotFound(username.to_owned()));
        }
        tx.commit().await?;
        self.directory_changed();
        Ok(())
    }

    /// Replaces a user's verifiers with ones derived from a new password, and revokes
    /// the account's FAST tokens: a new password logs every device out.
    pub async fn set_password(&self, username: &str, password: &str) -> Result<()> {
        if !self.user_exists(username).await? {
            return Err(StoreError::UserNotFound(username.to_owned()));
        }
        let (sha1, sha256) = self.derive_verifiers(password).await?;
        let mut tx = self.write().await?;
        let result =
            sqlx::query("UPDATE users SET scram_sha1 = $1, scram_sha256 = $2 WHERE username = $3")
                .bind(sha1.encode())
                .bind(sha256.encode())
                .bind(username)
                .execute(&mut *tx)
                .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::UserNotFound(username.to_owned()));
        }
        sqlx::query("DELETE FROM fast_tokens WHERE owner = $1")
            .bind(username)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes a user and, by cascade, everything the store keeps for them; leaves a
    /// tombstone with a new USN so peers learn of the deletion.
    pub async fn delete_user(&self, username: &str) -> Result<()> {
        let _timer = self.latency.start("delete_user");
        let mut tx = self.write().await?;
        let usn = crate::directory::next_usn(&mut tx).await?;
        let Some(row) =
            sqlx::query("SELECT home_cluster, home_node FROM users WHERE username = $1")
                .bind(username)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Err(StoreError::UserNotFound(username.to_owned()));
        };
        let (home_cluster, home_node): (String, String) =
            (row.try_get("home_cluster")?, row.try_get("home_node")?);
        sqlx::query("DELETE FROM users WHERE username = $1")
            .bind(username)
            .execute(&mut *tx)
            .await?;
        // The archive does not refer to accounts (rooms have archives too).
        for table in ["archive_blocks", "archive_zones"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE owner = $1"
            )))
            .bind(username)
            .execute(&mut *tx)
            .await?;
        }
        crate::directory::bury(
            &mut tx,
            crate::directory::Kind::User,
            username,
            &home_cluster,
            &home_node,
            usn,
        )
        .await?;
        tx.commit().await?;
        self.directory_changed();
        self.account_changed(AccountChange::Removed(UserName::new(username)));
        Ok(())
    }

    /// One user, or `None`.
    pub async fn user(&self, username: &str) -> Result<Option<UserRecord>> {
        let _timer = self.latency.start("user");
        let row = sqlx::query(
            "SELECT username, home_cluster, home_node, scram_sha1, scram_sha256, created_at, usn
             FROM users WHERE username = $1",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| user_from_row(&row)).transpose()
    }

    /// Whether the user exists (cheaper than [`Self::user`]).
    pub async fn user_exists(&self, username: &str) -> Result<bool> {
        let _timer = self.latency.start("user_exists");
        let row = sqlx::query("SELECT 1 FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Every user, ordered by name.
    pub async fn list_users(&self) -> Result<Vec<UserRecord>> {
        let rows = sqlx::query(
            "SELECT username, home_cluster, home_node, scram_sha1, scram_sha256, created_at, usn
             FROM users ORDER BY username",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_from_row).collect()
    }
}

fn user_from_row(row: &sqlx::any::AnyRow) -> Result<UserRecord> {
    let username: String = row.try_get("username")?;
    let decode = |hash, column: &str| -> Result<ScramVerifier> {
        let text: String = row.try_get(column)?;
        ScramVerifier::decode(hash, &text)
            .ok_or_else(|| StoreError::Corrupt(format!("{column} of user {username}")))
    };
    Ok(UserRecord {
        home_cluster: row.try_get("home_cluster")?,
        home_node: row.try_get("home_node")?,
        scram_sha1: decode(ScramHash::Sha1, "scram_sha1")?,
        scram_sha256: decode(ScramHash::Sha256, "scram_sha256")?,
        created_at: row.try_get("created_at")?,
        usn: row.try_get("usn")?,
        username: UserName::new(username),
    })
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    fn alice() -> NewUser<'static> {
        NewUser {
            username: "alice",
            password: "secret-pw",
            home_cluster: "cluster-a",
            home_node: "node1",
        }
    }

    /// H5: a taken name is refused before the (costly) derivation: a password PBKDF2
    /// would refuse (a control character fails SASLprep) is never looked at.
    #[tokio::test]
    async fn a_taken_name_is_refused_before_any_derivation() {
        for (store, _dir) in stores().await {
            store.add_user(alice()).await.unwrap();
            let bad = NewUser {
                password: "bad\u{7}",
                ..alice()
            };
            assert!(matches!(
                store.add_user(bad.clone()).await,
                Err(StoreError::UserExists(_))
            ));
            assert!(matches!(
                store.set_password("nobody", "bad\u{7}").await,
                Err(StoreError::UserNotFound(_))
            ));
            // The control: for a free name the derivation does run and refuses it.
            assert!(matches!(
                store
                    .add_user(NewUser {
                        username: "bob",
                        ..bad
                    })
                    .await,
                Err(StoreError::InvalidPassword(_))
            ));
        }
    }

    /// L13: new verifiers get the configured iteration count; existing ones keep
    /// theirs and still verify.
    #[tokio::test]
    async fn new_verifiers_use_the_configured_iterations() {
        for (store, _dir) in stores().await {
            store.set_scram_iterations(4096);
            store.add_user(alice()).await.unwrap();
            store.set_scram_iterations(12_000);
            store
                .add_user(NewUser {
                    username: "bob",
                    ..alice()
                })
                .await
                .unwrap();
            let old = store.user("alice").await.unwrap().unwrap();
            let new = store.user("bob").await.unwrap().unwrap();
            assert_eq!(old.scram_sha256.iterations, 4096);
            assert_eq!(new.scram_sha256.iterations, 12_000);
            assert_eq!(new.scram_sha1.iterations, 12_000);
            assert!(old.scram_sha256.verify_password("secret-pw"));
            // Never below RFC 7677's floor.
            store.set_scram_iterations(100);
            assert_eq!(store.scram_iterations(), 4096);
        }
    }

    #[tokio::test]
    async fn add_get_list_passwd_delete() {
        for (store, _dir) in stores().await {
            store.add_user(alice()).await.unwrap();
            assert!(matches!(
                store.add_user(alice()).await,
                Err(StoreError::UserExists(_))
            ));
            let rec = store.user("alice").await.unwrap().unwrap();
            assert_eq!(rec.home_cluster, "cluster-a");
            assert_eq!(rec.home_node, "node1");
            assert!(rec.scram_sha256.verify_password("secret-pw"));
            assert!(rec.scram_sha1.verify_password("secret-pw"));
            assert!(rec.scram_sha1.iterations >= 4096);
            store.set_password("alice", "other").await.unwrap();
            let rec = store.user("alice").await.unwrap().unwrap();
            assert!(rec.scram_sha256.verify_password("other"));
            assert!(!rec.scram_sha256.verify_password("secret-pw"));
            assert_eq!(store.list_users().await.unwrap().len(), 1);
            store.delete_user("alice").await.unwrap();
            assert!(store.user("alice").await.unwrap().is_none());
            assert!(matches!(
                store.delete_user("alice").await,
                Err(StoreError::UserNotFound(_))
            ));
            assert!(matches!(
                store.set_password("alice", "x").await,
                Err(StoreError::UserNotFound(_))
            ));
        }
    }

    #[tokio::test]
    async fn unsupported_url_is_refused() {
        let err = Store::open("mysql://x", std::path::Path::new("."))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::UnsupportedUrl(_)));
    }
}
