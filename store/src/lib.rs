//! The impmesh store: every table and every query of a node.
//!
//! One [`Store`] wraps an sqlx `Any` pool so that the same repository code runs on SQLite
//! (the embedded default, a file in the data directory, WAL journal) and on PostgreSQL
//! (selected by a `postgres://` URL, what a multi-node cluster uses). Queries use `$N`
//! placeholders, which both backends accept; the DDL differs only where it must, in one
//! migration folder per backend. Other crates call the typed functions here and never
//! write SQL of their own.

#![forbid(unsafe_code)]

pub mod alarms;
mod archive;
mod directory;
mod fast;
mod latency;
mod media;
mod muc;
mod names;
mod nodes;
mod offline;
mod outbox;
mod peer_nodes;
mod peers;
mod pep;
mod push;
mod room_directory;
mod roster;
pub mod scram;
mod storage;
mod trust;
mod uploads;
mod users;

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AnyPool, ConnectOptions as _};

pub use archive::{ArchiveFilter, ArchivePage, ArchiveResults, ArchiveRow, Archived};
pub use directory::{AxlUser, DirectoryEntry, DirectoryPage};
pub use fast::{FastCheck, FastToken, NewFastToken};
pub use latency::Latency;
pub use media::{RelayLoad, TurnSecret};
pub use muc::StoredRoom;
pub use names::{ClusterName, NodeName, UserName};
pub use nodes::NodeRecord;
pub use offline::{Offline, OfflineMessage, OfflineQuota};
pub use outbox::OutboxEntry;
pub use peer_nodes::PeerNode;
pub use peers::{Digest, DuplicateUser, Home, PeerRecord, PeerState, PeerSync, RemoteUser};
pub use pep::{PepItem, PepNode, PepQuota, Published};
pub use push::PushRegistration;
pub use room_directory::{LostRoom, RoomEntry, RoomHome};
pub use roster::{RosterItem, Subscription};
pub use trust::{TrustEntry, TrustKind};
pub use uploads::{Claim, Expiry, Reserved, SlotState, Upload};
pub use users::{NewUser, UserRecord};

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("user {0} already exists")]
    UserExists(String),
    #[error(
        "{user} is homed at the peer cluster {cluster}: a name lives in one cluster of the mesh (move the user as docs/peering.md says)"
    )]
    HomedAtPeer { user: String, cluster: String },
    #[error("no such user: {0}")]
    UserNotFound(String),
    #[error(transparent)]
    InvalidPassword(#[from] scram::InvalidPassword),
    #[error(
        "changes since USN {since} are no longer kept (tombstones below {pruned_below} were pruned): do a full sync"
    )]
    UsnTooOld { since: i64, pruned_below: i64 },
    /// A stored value that does not decode; the string names where (table, column or
    /// row), not a message.
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// The blocking task deriving a password's verifiers panicked or was cancelled
    /// (the runtime shutting down).
    #[error("the password derivation failed: {0}")]
    Derivation(#[source] tokio::task::JoinError),
    /// The derivation limiter is closed (never, while the process runs).
    #[error("password derivations are no longer accepted")]
    DerivationUnavailable,
    #[error("unsupported store URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which SQL dialect the pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A committed change to this cluster's own accounts (however it was made: admin API,
/// CLI, in-band registration or cancellation) or rooms: the one event peers are
/// notified by and sessions of a removed account are closed by (code review #5).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccountChange {
    Added(UserName),
    Removed(UserName),
    /// A bulk import created this many accounts.
    Imported(u64),
    /// A chat room of this cluster was claimed or released (the room directory).
    Room(String),
}

/// Account changes buffered for a slow listener; one that falls further behind gets
/// `Lagged` and must treat everything as changed.
const ACCOUNT_EVENTS: usize = 1024;

/// A handle on the node's store; cheap to clone (it is a pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    latency: std::sync::Arc<Latency>,
    /// Bumped after every committed change to who lives where (local users, peers'
    /// users): caches of directory lookups are valid while it stays the same.
    directory_gen: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The same for rooms only: a room made or ended here leaves the users' alone.
    room_gen: std::sync::Arc<std::sync::atomic::AtomicU64>,
    accounts: tokio::sync::broadcast::Sender<AccountChange>,
    /// PBKDF2 iterations for new SCRAM verifiers (existing ones keep theirs).
    scram_iterations: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long an SQLite connection beyond the first may stay idle before it closes.
const SQLITE_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// PostgreSQL connections of a node: a fixed pool, all opened at start (in the
/// background) and kept, as HikariCP advises and ejabberd does (`sql_pool_size`, 10).
/// A new PostgreSQL connection is slow to open on a busy node: sqlx computes the SCRAM
/// proof (4,096 PBKDF2 rounds) in steps that yield to the scheduler every 5 rounds,
/// about 800 yields, each a full turn of every runnable task. On a loaded test runtime
/// that took 10 s, the acquire timeout, while a session waited for it; even a floor of
/// 4 open connections with room to grow to 16 let 1 run in 16 hit it. Once a fixed
/// pool is full, a query waits for another query to finish, not for a connection to
/// open (ops/impmesh.toml.example, `[store]`).
const POSTGRES_CONNECTIONS: u32 = 8;

/// How long a query waits for a pooled connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an SQLite statement waits for another connection's write lock before it
/// fails with "database is locked": the bound on retrying a busy store. A directory
/// page of 5,000 users, the longest write, commits in well under a second.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Page cache per SQLite connection, in KiB (`PRAGMA cache_size`).
const SQLITE_CACHE_KIB: u32 = 1024;
/// Bytes of the database file SQLite reads through a memory mapping (address space,
/// not memory: the pages are the operating system's page cache, shared).
const SQLITE_MMAP_BYTES: u64 = 1 << 30;
/// Pages the write-ahead log grows to before SQLite copies them into the database
/// file (`PRAGMA wal_autocheckpoint`; SQLite's default is 1,000).
const SQLITE_CHECKPOINT_PAGES: u32 = 8192;
/// Dirty pages one transaction keeps in memory before it writes them to the log
/// (`PRAGMA cache_spill`, beyond `cache_size`): 32 MiB, held only while a large write
/// runs.
const SQLITE_SPILL_PAGES: u32 = 8192;

impl Store {
    /// The directory generation: it changes after every change to where users live
    /// made through this store (other processes sharing a PostgreSQL store are not
    /// seen: pair it with a short time to live).
    pub fn directory_generation(&self) -> u64 {
        self.directory_gen
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// A change that may move users and rooms (a peer's directory synced, a user
    /// added or moved): both generations change.
    pub(crate) fn directory_changed(&self) {
        self.directory_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.rooms_changed();
    }

    /// The room directory's generation: it changes after every change to where rooms
    /// live made through this store (the same caveat as
    /// [`Store::directory_generation`]).
    pub fn room_generation(&self) -> u64 {
        self.room_gen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A room of this cluster made or ended: only the rooms' generation changes.
    pub(crate) fn rooms_changed(&self) {
        self.room_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Committed changes to local accounts from now on.
    pub fn account_changes(&self) -> tokio::sync::broadcast::Receiver<AccountChange> {
        self.accounts.subscribe()
    }

    pub(crate) fn account_changed(&self, change: AccountChange) {
        // No listener (a CLI command on the store): nothing to tell.
        let _ = self.accounts.send(change);
    }

    /// Sets the PBKDF2 iteration count of new verifiers (at least RFC 7677's 4096).
    pub fn set_scram_iterations(&self, iterations: u32) {
        self.scram_iterations.store(
            iterations.max(scram::MIN_ITERATIONS),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn scram_iterations(&self) -> u32 {
        self.scram_iterations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens the store named by `url` and runs pending migrations.
    ///
    /// `sqlite://PATH` (relative paths resolve against `base_dir`) creates the file when it
    /// is missing; `sqlite::memory:` is a database that lives as long as this store (for
    /// trials and tests); `postgres://…` expects the database to exist.
    pub async fn open(url: &str, base_dir: &Path) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, connect_url, max_connections, memory) = if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let (path, query) = path.split_once('?').unwrap_or((path, ""));
            let sep = if query.is_empty() { "" } else { "?" };
            if path == ":memory:" {
                // One connection, never closed: it is the database.
                let url = format!("sqlite::memory:{sep}{query}");
                (Backend::Sqlite, url, 1, true)
            } else {
                let full = base_dir.join(path).to_string_lossy().into_owned();
                // Build the options once to create the file and set the journal mode;
                // the `Any` pool then connects with the same URL.
                let opts = SqliteConnectOptions::from_str(&format!("sqlite://{full}"))?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(BUSY_TIMEOUT);
                opts.connect().await?;
                let sep = if query.is_empty() { "" } else { "&" };
                // SQLite is one writer at a time; a handful of connections serve readers.
                (
                    Backend::Sqlite,
                    format!("sqlite://{full}?{query}{sep}mode=rwc"),
                    4,
                    false,
                )
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (
                Backend::Postgres,
                url.to_owned(),
                POSTGRES_CONNECTIONS,
                false,
            )
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT);
        if backend == Backend::Postgres {
            options = options.min_connections(POSTGRES_CONNECTIONS);
        }
        if memory {
            // The only connection holds the data: it never idles out or ages out.
            options = options
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        } else if backend == Backend::Sqlite {
            // The connections a burst opened close once it is over: each holds its own
            // page cache and a thread, which otherwise stayed resident for good.
            options = options
                .min_connections(1)
                .idle_timeout(Some(SQLITE_IDLE_TIMEOUT));
        }
        let pool = options
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        sqlx::query("PRAGMA foreign_keys = ON")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "PRAGMA busy_timeout = {}",
                            BUSY_TIMEOUT.as_millis()
                        )))
                        .execute(&mut *conn)
                        .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        // Each connection's page cache: 1 MiB, not SQLite's 2 MB
                        // default. The operating system's page cache already holds the
                        // file once for all connections; four private copies of the
                        // hot pages kept 8 MiB resident after any burst of logins.
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "PRAGMA cache_size = -{}",
                            SQLITE_CACHE_KIB
                        )))
                        .execute(&mut *conn)
                        .await?;
                        // Pages read through a shared mapping of the file, not a
                        // read() into each connection's cache: the archive's index
                        // pages are read back for every batch of rows.
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "PRAGMA mmap_size = {SQLITE_MMAP_BYTES}"
                        )))
                        .execute(&mut *conn)
                        .await?;
                        // A batch of archived messages dirties a page of each
                        // index for most accounts in it. A log of a few batches lets
                        // one checkpoint copy a page written by several of them once,
                        // and a transaction keeps its dirty pages in memory up to
                        // SQLITE_SPILL_PAGES instead of writing them to the log
                        // halfway and again at commit.
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "PRAGMA wal_autocheckpoint = {SQLITE_CHECKPOINT_PAGES}"
                        )))
                        .execute(&mut *conn)
                        .await?;
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "PRAGMA cache_spill = {SQLITE_SPILL_PAGES}"
                        )))
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Store {
            pool,
            backend,
            latency: Default::default(),
            directory_gen: Default::default(),
            room_gen: Default::default(),
            accounts: tokio::sync::broadcast::channel(ACCOUNT_EVENTS).0,
            scram_iterations: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(
                scram::DEFAULT_ITERATIONS,
            )),
        })
    }

    /// Begins a transaction that writes. On SQLite it is `BEGIN IMMEDIATE`: the write
    /// lock is taken first, waiting up to [`BUSY_TIMEOUT`] for another writer. A
    /// deferred transaction that reads and then writes cannot wait: in WAL mode its
    /// snapshot is stale once another writer committed, and SQLite fails it at once
    /// with `SQLITE_BUSY_SNAPSHOT` (code 517, "database is locked") instead of
    /// calling the busy handler. PostgreSQL's row locks wait by themselves.
    pub(crate) async fn write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Begins a read-only transaction whose statements all see one snapshot (SQLite's
    /// deferred transaction does from its first read; PostgreSQL needs REPEATABLE READ,
    /// its READ COMMITTED takes a new snapshot per statement).
    pub(crate) async fn snapshot(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin().await?,
            Backend::Postgres => {
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?
            }
        })
    }

    /// Query latency by operation, for `/metrics`.
    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    /// The dialect behind this store.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Registers (or refreshes) this node's row.
    pub async fn register_node(&self, name: &str, cluster: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (name, cluster, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET cluster = excluded.cluster",
        )
        .bind(name)
        .bind(cluster)
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Waits for pending writes and closes every connection (for shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch (the unit of rooms' creation times and archive
/// times).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// The backends to run a store test against: SQLite always, PostgreSQL when
    /// `IMPMESH_TEST_POSTGRES` names a database (each test gets a fresh schema there).
    pub async fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Store::open("sqlite://test.db", dir.path()).await.unwrap();
        let mut out = vec![(sqlite, Some(dir))];
        if let Ok(url) = std::env::var("IMPMESH_TEST_POSTGRES") {
            out.push((fresh_postgres(&url).await, None));
        }
        out
    }

    /// Creates a throw-away schema on the test server and opens a store on it.
    async fn fresh_postgres(url: &str) -> Store {
        let url = fresh_postgres_schema(url).await;
        Store::open(&url, Path::new(".")).await.unwrap()
    }

    /// Creates a throw-away schema on the test server; the URL that works in it.
    pub async fn fresh_postgres_schema(url: &str) -> String {
        use rand::Rng as _;
        sqlx::any::install_default_drivers();
        let schema = format!("t{:016x}", rand::thread_rng().r#gen::<u64>());
        let admin = AnyPool::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-c%20search_path%3D{schema}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row as _;

    /// `sqlite::memory:` (and `sqlite://:memory:`) is a store that lives as long as the
    /// node: one connection that is never closed, so what was written stays readable.
    #[tokio::test]
    async fn an_in_memory_store_keeps_what_it_was_given() {
        for url in ["sqlite::memory:", "sqlite://:memory:"] {
            let store = Store::open(url, Path::new("/nonexistent")).await.unwrap();
            store
                .add_user(NewUser {
                    username: "alice",
                    password: "pw",
                    home_cluster: "c",
                    home_node: "n",
                })
                .await
                .unwrap();
            assert!(store.user_exists("alice").await.unwrap(), "{url}");
        }
    }

    /// Each SQLite connection of the pool keeps a bounded page cache (1 MiB), so a
    /// burst of logins leaves at most that much per connection resident.
    #[tokio::test]
    async fn sqlite_connections_have_a_bounded_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("sqlite://test.db", dir.path()).await.unwrap();
        let mut conns = vec![];
        for _ in 0..4 {
            conns.push(store.pool.acquire().await.unwrap());
        }
        for conn in &mut conns {
            let row = sqlx::query("PRAGMA cache_size")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            let size: i64 = row.try_get(0).unwrap();
            assert_eq!(size, -i64::from(SQLITE_CACHE_KIB));
        }
    }

    /// Directory applies, user changes and outbox writes at once, on both backends:
    /// none fails (on SQLite, a deferred transaction that read before another writer
    /// committed used to fail with SQLITE_BUSY_SNAPSHOT, "database is locked").
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_never_see_a_busy_store() {
        for (store, _dir) in test_support::stores().await {
            store
                .upsert_peer(&PeerRecord {
                    cluster: "b".into(),
                    address: "127.0.0.1:8443".into(),
                    server_name: "b".into(),
                    state: PeerState::Active,
                    added_here: true,
                    our_token: None,
                    their_token_hash: None,
                    added_at: 1,
                    accepted_at: Some(1),
                })
                .await
                .unwrap();
            store
                .add_user(NewUser {
                    username: "inbox",
                    password: "pw",
                    home_cluster: "a",
                    home_node: "a1",
                })
                .await
                .unwrap();
            let mut tasks = tokio::task::JoinSet::new();
            let s = store.clone();
            tasks.spawn(async move {
                for round in 0..40i64 {
                    let entries: Vec<DirectoryEntry> = (0..50)
                        .map(|i| DirectoryEntry {
                            username: format!("r{round}u{i}").into(),
                            home_cluster: "b".into(),
                            home_node: "b1".into(),
                            usn: round * 50 + i,
                            deleted: false,
                        })
                        .collect();
                    s.apply_changes("b", &entries, &[], (round + 1) * 50)
                        .await?;
                    let generation = s.begin_full_sync("b", round).await?;
                    s.apply_full_page("b", generation, &entries, &[], round)
                        .await?;
                }
                Ok::<_, StoreError>("directory")
            });
            let s = store.clone();
            tasks.spawn(async move {
                for i in 0..40 {
                    let name = format!("local{i}");
                    s.add_user(NewUser {
                        username: &name,
                        password: "pw",
                        home_cluster: "a",
                        home_node: "a1",
                    })
                    .await?;
                    s.set_home(&name, "a", "a2").await?;
                    if i % 2 == 0 {
                        s.delete_user(&name).await?;
                    }
                }
                Ok("users")
            });
            let s = store.clone();
            tasks.spawn(async move {
                for i in 0..60 {
                    s.outbox_push("b1", "b", &[(format!("<m{i}/>"), 0)]).await?;
                    let page = s.outbox_page("b1", 0, 5).await?;
                    let ids: Vec<i64> = page.iter().map(|e| e.id).collect();
                    s.outbox_delete(&ids).await?;
                    s.store_offline(
                        "inbox",
                        "a@d",
                        "<message/>",
                        OfflineQuota {
                            messages: 1000,
                            bytes: 1 << 20,
                            per_sender: 1000,
                        },
                    )
                    .await?;
                }
                Ok("outbox")
            });
            while let Some(done) = tasks.join_next().await {
                let what = done.unwrap();
                assert!(what.is_ok(), "{what:?}");
            }
        }
    }

    /// A store made before the directory of remote users became a WITHOUT ROWID table
    /// keeps every remote user through the migration that rebuilds it.
    #[tokio::test]
    async fn the_remote_users_rebuild_keeps_an_existing_directory() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("old.db").to_string_lossy()
        );
        let pool = AnyPool::connect(&url).await.unwrap();
        SQLITE_MIGRATIONS.run_to(9, &pool).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO peers (cluster, address, server_name, state, origin, added_at)
                 VALUES ('b.example.com', '127.0.0.1:8443', 'b.example.com', 'active', 'local', 1);
             INSERT INTO remote_users (peer, username, home_cluster, home_node, usn, full_gen)
                 VALUES ('b.example.com', 'alice', 'b.example.com', 'node1.b.example.com', 7, 2),
                        ('b.example.com', 'bob', 'b.example.com', 'node2.b.example.com', 9, 2);",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = Store::open("sqlite://old.db", dir.path()).await.unwrap();
        let schema: String = sqlx::query(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'remote_users'",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .try_get("sql")
        .unwrap();
        assert!(schema.contains("WITHOUT ROWID"), "{schema}");
        let bob = store.remote_user("bob").await.unwrap();
        assert_eq!(bob.len(), 1);
        assert_eq!(
            (bob[0].home_node.as_str(), bob[0].usn),
            ("node2.b.example.com", 9)
        );
        assert_eq!(store.remote_user_count("b.example.com").await.unwrap(), 2);
        // The peer's removal still takes its users with it (the foreign key survived).
        sqlx::query("DELETE FROM peers WHERE cluster = 'b.example.com'")
            .execute(&store.pool)
            .await
            .unwrap();
        assert!(store.remote_user("alice").await.unwrap().is_empty());
    }
}
