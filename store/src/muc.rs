//! Multi-user chat rooms (XEP-0045) kept across restarts: the persistent rooms of
//! this cluster, their configuration, subject and affiliations. The router decides
//! what a room is; this keeps it.

use sqlx::Row as _;

use crate::{Result, Store};

/// How long a destroyed room's tombstone is kept, in microseconds (a day): longer
/// than any write of the room can be in flight.
const TOMBSTONE_MICROS: i64 = 24 * 3600 * 1_000_000;

/// A persistent room as stored; the router gives the strings their meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRoom {
    /// The room's local part (`team` of `team@conference.example.com`).
    pub name: String,
    /// Orders writes: the router's clock when it changed, microseconds.
    pub version: i64,
    pub title: String,
    pub description: String,
    pub public: bool,
    pub members_only: bool,
    pub moderated: bool,
    pub password: Option<String>,
    pub max_users: u32,
    pub whois_anyone: bool,
    pub history_length: u32,
    /// `anyone`, `participants`, `moderators` or `none`.
    pub private_messages: String,
    pub subject_by_anyone: bool,
    /// The subject and the nick that set it ('' for the room).
    pub subject: Option<String>,
    pub subject_by: String,
    /// Bare JIDs and their affiliation (`owner`, `admin`, `member`, `outcast`).
    pub affiliations: Vec<(String, String)>,
    /// Its messages are archived (XEP-0313 on the room's address).
    pub archived: bool,
    /// Its vCard-temp (its avatar), serialized.
    pub vcard: Option<String>,
}

const COLUMNS: &str = "name, version, destroyed, title, description, public, members_only, \
     moderated, password, max_users, whois_anyone, history_length, private_messages, \
     subject_by_anyone, subject, subject_by, affiliations, archived, vcard";

impl Store {
    /// Stores `room` unless a newer version of it (or of its destruction) is there.
    pub async fn save_room(&self, room: &StoredRoom) -> Result<()> {
        let affiliations: String = room
            .affiliations
            .iter()
            .map(|(jid, a)| format!("{jid} {a}\n"))
            .collect();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO muc_rooms ({COLUMNS}) VALUES ($1, $2, 0, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, destroyed = 0,
                 title = excluded.title, description = excluded.description,
                 public = excluded.public, members_only = excluded.members_only,
                 moderated = excluded.moderated, password = excluded.password,
                 max_users = excluded.max_users, whois_anyone = excluded.whois_anyone,
                 history_length = excluded.history_length,
                 private_messages = excluded.private_messages,
                 subject_by_anyone = excluded.subject_by_anyone, subject = excluded.subject,
                 subject_by = excluded.subject_by, affiliations = excluded.affiliations,
                 archived = excluded.archived, vcard = excluded.vcard
             WHERE muc_rooms.version < excluded.version"
        )))
        .bind(&room.name)
        .bind(room.version)
        .bind(&room.title)
        .bind(&room.description)
        .bind(i64::from(room.public))
        .bind(i64::from(room.members_only))
        .bind(i64::from(room.moderated))
        .bind(room.password.as_deref())
        .bind(i64::from(room.max_users))
        .bind(i64::from(room.whois_anyone))
        .bind(i64::from(room.history_length))
        .bind(&room.private_messages)
        .bind(i64::from(room.subject_by_anyone))
        .bind(room.subject.as_deref())
        .bind(&room.subject_by)
        .bind(affiliations)
        .bind(i64::from(room.archived))
        .bind(room.vcard.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest version written, of a room or of a room's removal (0 when none).
    pub async fn newest_room_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT MAX(version) AS newest FROM muc_rooms")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("newest")?.unwrap_or(0))
    }

    /// Forgets the room `name` as of `version` (destroyed, or no longer persistent),
    /// unless a newer version of it is there; tombstones older than a day go.
    pub async fn forget_room(&self, name: &str, version: i64) -> Result<()> {
        sqlx::query("DELETE FROM muc_rooms WHERE destroyed = 1 AND version < $1")
            .bind(version.saturating_sub(TOMBSTONE_MICROS))
            .execute(&self.pool)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO muc_rooms ({COLUMNS})
                 VALUES ($1, $2, 1, '', '', 0, 0, 0, NULL, 0, 0, 0, '', 0, NULL, '', '', 0, NULL)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, destroyed = 1,
                 password = NULL, subject = NULL, affiliations = '', vcard = NULL
             WHERE muc_rooms.version < excluded.version"
        )))
        .bind(name)
        .bind(version)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The rooms kept, after dropping tombstones older than a day before `now`
    /// (microseconds).
    pub async fn rooms(&self, now: i64) -> Result<Vec<StoredRoom>> {
        sqlx::query("DELETE FROM muc_rooms WHERE destroyed = 1 AND version < $1")
            .bind(now.saturating_sub(TOMBSTONE_MICROS))
            .execute(&self.pool)
            .await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM muc_rooms WHERE destroyed = 0 ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?;
        let flag =
            |r: &sqlx::any::AnyRow, c: &str| -> Result<bool> { Ok(r.try_get::<i64, _>(c)? != 0) };
        let count = |r: &sqlx::any::AnyRow, c: &str| -> Result<u32> {
            Ok(u32::try_from(r.try_get::<i64, _>(c)?.max(0)).unwrap_or(u32::MAX))
        };
        rows.iter()
            .map(|r| {
                let affiliations: String = r.try_get("affiliations")?;
                Ok(StoredRoom {
                    name: r.try_get("name")?,
                    version: r.try_get("version")?,
                    title: r.try_get("title")?,
                    description: r.try_get("description")?,
                    public: flag(r, "public")?,
                    members_only: flag(r, "members_only")?,
                    moderated: flag(r, "moderated")?,
                    password: r.try_get("password")?,
                    max_users: count(r, "max_users")?,
                    whois_anyone: flag(r, "whois_anyone")?,
                    history_length: count(r, "history_length")?,
                    private_messages: r.try_get("private_messages")?,
                    subject_by_anyone: flag(r, "subject_by_anyone")?,
                    subject: r.try_get("subject")?,
                    subject_by: r.try_get("subject_by")?,
                    affiliations: affiliations
                        .lines()
                        .filter_map(|l| l.split_once(' '))
                        .map(|(j, a)| (j.to_owned(), a.to_owned()))
                        .collect(),
                    archived: flag(r, "archived")?,
                    vcard: r.try_get("vcard")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Row as _;

    use crate::test_support::stores;
    use crate::*;

    fn room(name: &str, version: i64) -> StoredRoom {
        StoredRoom {
            name: name.into(),
            version,
            title: "Team".into(),
            description: "line one\nline two".into(),
            public: true,
            members_only: true,
            moderated: false,
            password: Some("pw".into()),
            max_users: 50,
            whois_anyone: false,
            history_length: 20,
            private_messages: "moderators".into(),
            subject_by_anyone: true,
            subject: Some("today".into()),
            subject_by: "Alice".into(),
            affiliations: vec![
                ("alice@d".into(), "owner".into()),
                ("bob@d".into(), "outcast".into()),
            ],
            archived: false,
            vcard: Some("<vCard xmlns='vcard-temp'/>".into()),
        }
    }

    /// Rooms come back as saved; a write older than the one stored is ignored, so is
    /// a save older than the room's destruction; tombstones go after a day.
    #[tokio::test]
    async fn rooms_are_kept_in_version_order() {
        const DAY: i64 = 24 * 3600 * 1_000_000;
        for (store, _dir) in stores().await {
            store.save_room(&room("team", 10)).await.unwrap();
            store.save_room(&room("news", 10)).await.unwrap();
            assert_eq!(
                store.rooms(20).await.unwrap(),
                [room("news", 10), room("team", 10)]
            );
            let mut newer = room("team", 12);
            newer.members_only = false;
            newer.password = None;
            newer.subject = None;
            newer.affiliations.truncate(1);
            store.save_room(&newer).await.unwrap();
            store.save_room(&room("team", 11)).await.unwrap();
            assert_eq!(store.rooms(20).await.unwrap()[1], newer);
            // Destroyed: a late save of an older version does not bring it back, a
            // newer one (the name taken again) does.
            store.forget_room("team", 13).await.unwrap();
            store.save_room(&room("team", 12)).await.unwrap();
            assert_eq!(store.rooms(20).await.unwrap(), [room("news", 10)]);
            store.save_room(&room("team", 14)).await.unwrap();
            assert_eq!(store.rooms(20).await.unwrap().len(), 2);
            assert_eq!(store.newest_room_version().await.unwrap(), 14);
            store.forget_room("gone", 30).await.unwrap();
            assert_eq!(store.newest_room_version().await.unwrap(), 30);
            // A tombstone older than a day goes when rooms are read, or when another
            // room is forgotten.
            store.forget_room("old", 31 + DAY).await.unwrap();
            assert_eq!(store.newest_room_version().await.unwrap(), 31 + DAY);
            let tombstones: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM muc_rooms WHERE destroyed = 1")
                    .fetch_one(&store.pool)
                    .await
                    .unwrap()
                    .try_get("n")
                    .unwrap();
            assert_eq!(tombstones, 1);
            store.forget_room("news", 15).await.unwrap();
            store.rooms(15 + DAY + 1).await.unwrap();
            store.save_room(&room("news", 11)).await.unwrap();
            assert_eq!(store.rooms(20 + DAY).await.unwrap().len(), 2);
        }
    }
}
