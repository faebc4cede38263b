//! Message archives (XEP-0313): archived messages and each account's preferences. The
//! router decides what is archived and writes in batches; this keeps the rows and
//! answers the queries, paged by archive order.

use sqlx::Row as _;

use crate::{Backend, Result, Store};

/// One message to archive for `owner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRow {
    pub owner: String,
    /// The stanza-id (XEP-0359) stamped for the owner. Ids grow with time (compared
    /// as strings): the archive is in their order.
    pub id: String,
    /// The other party's bare JID, and its resource ('' when none).
    pub peer: String,
    pub resource: String,
    /// Microseconds since the Unix epoch.
    pub ts: i64,
    pub outgoing: bool,
    /// The message as archived (without the owner's `<stanza-id/>`: a result
    /// carries the id). Shared: both parties of a chat on one node archive the same
    /// text, serialized once.
    pub stanza: std::sync::Arc<str>,
}

/// An archived message as a query returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    pub id: String,
    pub ts: i64,
    pub stanza: String,
}

/// What a query keeps: every given condition must hold.
#[derive(Debug, Clone, Default)]
pub struct ArchiveFilter<'a> {
    /// The other party's bare JID, and with it its resource.
    pub peer: Option<&'a str>,
    pub resource: Option<&'a str>,
    /// Inclusive bounds, microseconds.
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// Strictly after / before these archive ids.
    pub after_id: Option<&'a str>,
    pub before_id: Option<&'a str>,
    /// Only these ids (empty: no such condition).
    pub ids: &'a [String],
}

/// The page a query takes: the first `max` after an id (or from the start), or the
/// last `max` before an id (or up to the end).
#[derive(Debug, Clone, Copy)]
pub enum ArchivePage<'a> {
    Forward(Option<&'a str>),
    Backward(Option<&'a str>),
}

/// A page of results, in archive order, and whether it reached the end of the
/// results in its direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveResults {
    pub messages: Vec<Archived>,
    pub complete: bool,
}

enum Bind {
    Str(String),
    Int(i64),
}

impl Store {
    /// Appends archived messages in one transaction: many rows per statement; should
    /// that fail (an owner deleted meanwhile breaks the foreign key), row by row,
    /// skipping owners that are gone.
    pub async fn archive_append(&self, rows: &[ArchiveRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let _timer = self.latency.start("archive_append");
        match self.archive_append_fast(rows).await {
            Ok(()) => Ok(()),
            Err(_) => self.archive_append_checked(rows).await,
        }
    }

    async fn archive_append_fast(&self, rows: &[ArchiveRow]) -> Result<()> {
        const PER_STATEMENT: usize = 64;
        let mut tx = self.write().await?;
        if self.backend == Backend::Sqlite {
            // No statement of this transaction can then fail halfway (a row that
            // repeats one is ignored; owners are checked at commit, and a failed commit
            // goes row by row below), so SQLite keeps no statement journal: copying
            // each page a statement first touched cost an eighth of storing the rows.
            sqlx::query("PRAGMA defer_foreign_keys = ON")
                .execute(&mut *tx)
                .await?;
        }
        for chunk in rows.chunks(PER_STATEMENT) {
            let mut sql = String::from(match self.backend {
                Backend::Sqlite => {
                    "INSERT OR IGNORE INTO archive (owner, id, peer, resource, ts, outgoing, stanza) VALUES "
                }
                Backend::Postgres => {
                    "INSERT INTO archive (owner, id, peer, resource, ts, outgoing, stanza) VALUES "
                }
            });
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                match self.backend {
                    // Anonymous parameters: SQLite finds a named one's number by a
                    // linear search, which made 448 of them cost more than the rows.
                    Backend::Sqlite => sql.push_str("(?, ?, ?, ?, ?, ?, ?)"),
                    Backend::Postgres => {
                        let b = i * 7;
                        sql.push_str(&format!(
                            "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5,
                            b + 6,
                            b + 7
                        ));
                    }
                }
            }
            if self.backend == Backend::Postgres {
                sql.push_str(" ON CONFLICT (owner, id) DO NOTHING");
            }
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                query = query
                    .bind(&r.owner)
                    .bind(&r.id)
                    .bind(&r.peer)
                    .bind(&r.resource)
                    .bind(r.ts)
                    .bind(i64::from(r.outgoing))
                    .bind(&*r.stanza);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn archive_append_checked(&self, rows: &[ArchiveRow]) -> Result<()> {
        let mut tx = self.write().await?;
        for r in rows {
            // An owner deleted meanwhile has no archive: the row is skipped, not an
            // error for the whole batch.
            sqlx::query(
                "INSERT INTO archive (owner, id, peer, resource, ts, outgoing, stanza)
                 SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM users WHERE username = $1)
                 ON CONFLICT (owner, id) DO NOTHING",
            )
            .bind(&r.owner)
            .bind(&r.id)
            .bind(&r.peer)
            .bind(&r.resource)
            .bind(r.ts)
            .bind(i64::from(r.outgoing))
            .bind(&*r.stanza)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Whether `owner`'s archive holds `id`.
    async fn archive_has(&self, owner: &str, id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 AS one FROM archive WHERE owner = $1 AND id = $2")
            .bind(owner)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Whether an optional bound is usable: absent, or an id in the archive.
    async fn archive_bound_known(&self, owner: &str, id: Option<&str>) -> Result<bool> {
        match id {
            None => Ok(true),
            Some(id) => self.archive_has(owner, id).await,
        }
    }

    /// A page of `owner`'s archive; `None` when an id the query names (a paging
    /// bound, `after_id`, `before_id`) is not in it.
    pub async fn archive_query(
        &self,
        owner: &str,
        filter: &ArchiveFilter<'_>,
        page: ArchivePage<'_>,
        max: usize,
    ) -> Result<Option<ArchiveResults>> {
        let _timer = self.latency.start("archive_query");
        let mut sql = String::from("SELECT id, ts, stanza FROM archive WHERE owner = $1");
        let mut binds = vec![Bind::Str(owner.to_owned())];
        let mut push = |sql: &mut String, clause: &str, b: Bind| {
            binds.push(b);
            sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
        };
        if let Some(peer) = filter.peer {
            push(&mut sql, " AND peer = ?", Bind::Str(peer.to_owned()));
        }
        if let Some(resource) = filter.resource {
            push(
                &mut sql,
                " AND resource = ?",
                Bind::Str(resource.to_owned()),
            );
        }
        if let Some(start) = filter.start {
            push(&mut sql, " AND ts >= ?", Bind::Int(start));
        }
        if let Some(end) = filter.end {
            push(&mut sql, " AND ts <= ?", Bind::Int(end));
        }
        // Ids grow with time: the archive's order is theirs.
        if !self.archive_bound_known(owner, filter.after_id).await?
            || !self.archive_bound_known(owner, filter.before_id).await?
        {
            return Ok(None);
        }
        if let Some(after) = filter.after_id {
            push(&mut sql, " AND id > ?", Bind::Str(after.to_owned()));
        }
        if let Some(before) = filter.before_id {
            push(&mut sql, " AND id < ?", Bind::Str(before.to_owned()));
        }
        if !filter.ids.is_empty() {
            // XEP-0313: an id that is not in the archive is item-not-found.
            for id in filter.ids {
                if !self.archive_has(owner, id).await? {
                    return Ok(None);
                }
            }
            sql.push_str(" AND id IN (");
            for (i, id) in filter.ids.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                push(&mut sql, "?", Bind::Str(id.clone()));
            }
            sql.push(')');
        }
        let (paging, backward) = match page {
            ArchivePage::Forward(after) => (after.map(|a| (a, " AND id > ?")), false),
            ArchivePage::Backward(before) => (before.map(|b| (b, " AND id < ?")), true),
        };
        if let Some((id, clause)) = paging {
            if !self.archive_has(owner, id).await? {
                return Ok(None);
            }
            push(&mut sql, clause, Bind::Str(id.to_owned()));
        }
        let order = if backward { "DESC" } else { "ASC" };
        let limit = i64::try_from(max.saturating_add(1)).unwrap_or(i64::MAX);
        push(
            &mut sql,
            &format!(" ORDER BY id {order} LIMIT ?"),
            Bind::Int(limit),
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            query = match b {
                Bind::Str(s) => query.bind(s),
                Bind::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut messages = rows
            .iter()
            .map(|r| {
                Ok(Archived {
                    id: r.try_get("id")?,
                    ts: r.try_get("ts")?,
                    stanza: r.try_get("stanza")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let complete = messages.len() <= max;
        messages.truncate(max);
        if backward {
            messages.reverse();
        }
        Ok(Some(ArchiveResults { messages, complete }))
    }

    /// The first and the last message of `owner`'s archive (XEP-0313 metadata).
    pub async fn archive_bounds(&self, owner: &str) -> Result<Option<(Archived, Archived)>> {
        let one = |order: &'static str| async move {
            let sql =
                format!("SELECT id, ts FROM archive WHERE owner = $1 ORDER BY id {order} LIMIT 1");
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(owner)
                .fetch_optional(&self.pool)
                .await?;
            row.map(|r| {
                Ok::<_, crate::StoreError>(Archived {
                    id: r.try_get("id")?,
                    ts: r.try_get("ts")?,
                    stanza: String::new(),
                })
            })
            .transpose()
        };
        Ok(match (one("ASC").await?, one("DESC").await?) {
            (Some(first), Some(last)) => Some((first, last)),
            _ => None,
        })
    }

    /// Deletes up to `batch` messages archived before `before` (microseconds) and says
    /// how many went; the caller repeats while a whole batch went.
    pub async fn archive_expire(&self, before: i64, batch: usize) -> Result<u64> {
        let _timer = self.latency.start("archive_expire");
        // No index by time (one fewer written per archived row): rows are stored in
        // the order they came, each batch within a few seconds, so the ones older
        // than `before` are the table's first rows by `seq`, up to a bound found by a
        // binary search. A row a few seconds out of order at the bound goes an hour
        // later.
        let Some(bound) = self.archive_seq_bound(before).await? else {
            return Ok(0);
        };
        let gone = sqlx::query(
            "DELETE FROM archive WHERE seq IN
                 (SELECT seq FROM archive WHERE seq < $1 AND ts < $2 ORDER BY seq LIMIT $3)",
        )
        .bind(bound)
        .bind(before)
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(gone)
    }

    /// The first `seq` from which the archive's rows are no older than `before`
    /// (by a binary search over `seq`, each step one lookup by the primary key);
    /// `None` for an empty archive.
    async fn archive_seq_bound(&self, before: i64) -> Result<Option<i64>> {
        let at_or_after = |seq: i64| async move {
            let row =
                sqlx::query("SELECT seq, ts FROM archive WHERE seq >= $1 ORDER BY seq LIMIT 1")
                    .bind(seq)
                    .fetch_optional(&self.pool)
                    .await?;
            row.map(|r| {
                Ok::<_, crate::StoreError>((
                    r.try_get::<i64, _>("seq")?,
                    r.try_get::<i64, _>("ts")?,
                ))
            })
            .transpose()
        };
        let Some((first, _)) = at_or_after(i64::MIN).await? else {
            return Ok(None);
        };
        let last: i64 = sqlx::query("SELECT MAX(seq) AS last FROM archive")
            .fetch_one(&self.pool)
            .await?
            .try_get("last")?;
        // The answer lies in first..=last + 1.
        let (mut lo, mut hi) = (first, last.saturating_add(1));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match at_or_after(mid).await? {
                Some((seq, ts)) if ts < before => lo = seq + 1,
                _ => hi = mid,
            }
        }
        Ok(Some(lo))
    }

    /// `owner`'s archiving preferences as stored: the default and the always and
    /// never lists; `None` when never set.
    pub async fn archive_prefs(
        &self,
        owner: &str,
    ) -> Result<Option<(String, Vec<String>, Vec<String>)>> {
        let row = sqlx::query(
            "SELECT default_mode, always_jids, never_jids FROM archive_prefs WHERE owner = $1",
        )
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        let split = |s: String| -> Vec<String> {
            s.lines()
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        };
        row.map(|r| {
            Ok((
                r.try_get("default_mode")?,
                split(r.try_get("always_jids")?),
                split(r.try_get("never_jids")?),
            ))
        })
        .transpose()
    }

    pub async fn set_archive_prefs(
        &self,
        owner: &str,
        default: &str,
        always: &[String],
        never: &[String],
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO archive_prefs (owner, default_mode, always_jids, never_jids) VALUES ($1, $2, $3, $4)
             ON CONFLICT (owner) DO UPDATE SET default_mode = excluded.default_mode,
                 always_jids = excluded.always_jids, never_jids = excluded.never_jids",
        )
        .bind(owner)
        .bind(default)
        .bind(always.join("\n"))
        .bind(never.join("\n"))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    fn row(owner: &str, id: &str, peer: &str, ts: i64) -> ArchiveRow {
        ArchiveRow {
            owner: owner.into(),
            id: id.into(),
            peer: peer.into(),
            resource: "r".into(),
            ts,
            outgoing: false,
            stanza: format!("<message id='{id}'/>").into(),
        }
    }

    #[tokio::test]
    async fn archives_page_filter_and_expire() {
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
            let rows: Vec<ArchiveRow> = (1..=5)
                .map(|i| {
                    let peer = if i % 2 == 0 { "b@d" } else { "a@d" };
                    row("erin", &format!("m{i}"), peer, i * 1_000_000)
                })
                .chain([row("nobody", "x", "a@d", 1)])
                .collect();
            store.archive_append(&rows).await.unwrap();
            // Appending again changes nothing.
            store.archive_append(&rows[..1]).await.unwrap();
            let ids = |r: Option<ArchiveResults>| {
                let r = r.unwrap();
                (
                    r.messages.into_iter().map(|m| m.id).collect::<Vec<_>>(),
                    r.complete,
                )
            };
            let all = ArchiveFilter::default();
            let first = store
                .archive_query("erin", &all, ArchivePage::Forward(None), 2)
                .await
                .unwrap();
            assert_eq!(ids(first), (vec!["m1".into(), "m2".into()], false));
            let next = store
                .archive_query("erin", &all, ArchivePage::Forward(Some("m4")), 2)
                .await
                .unwrap();
            assert_eq!(ids(next), (vec!["m5".into()], true));
            let last = store
                .archive_query("erin", &all, ArchivePage::Backward(None), 2)
                .await
                .unwrap();
            assert_eq!(ids(last), (vec!["m4".into(), "m5".into()], false));
            let before = store
                .archive_query("erin", &all, ArchivePage::Backward(Some("m3")), 5)
                .await
                .unwrap();
            assert_eq!(ids(before), (vec!["m1".into(), "m2".into()], true));
            let with_b = ArchiveFilter {
                peer: Some("b@d"),
                ..Default::default()
            };
            let b = store
                .archive_query("erin", &with_b, ArchivePage::Forward(None), 10)
                .await
                .unwrap();
            assert_eq!(ids(b), (vec!["m2".into(), "m4".into()], true));
            let window = ArchiveFilter {
                start: Some(2_000_000),
                end: Some(3_000_000),
                ..Default::default()
            };
            let w = store
                .archive_query("erin", &window, ArchivePage::Forward(None), 10)
                .await
                .unwrap();
            assert_eq!(ids(w), (vec!["m2".into(), "m3".into()], true));
            let wanted = ["m5".to_owned(), "m1".to_owned()];
            let unknown = ["m5".to_owned(), "zz".to_owned()];
            let bad = ArchiveFilter {
                ids: &unknown,
                ..Default::default()
            };
            assert!(
                store
                    .archive_query("erin", &bad, ArchivePage::Forward(None), 10)
                    .await
                    .unwrap()
                    .is_none()
            );
            let by_id = ArchiveFilter {
                ids: &wanted,
                after_id: Some("m1"),
                ..Default::default()
            };
            let i = store
                .archive_query("erin", &by_id, ArchivePage::Forward(None), 10)
                .await
                .unwrap();
            assert_eq!(ids(i), (vec!["m5".into()], true));
            // An unknown id is not an empty page.
            assert!(
                store
                    .archive_query("erin", &all, ArchivePage::Forward(Some("zz")), 2)
                    .await
                    .unwrap()
                    .is_none()
            );
            let (lo, hi) = store.archive_bounds("erin").await.unwrap().unwrap();
            assert_eq!((lo.id.as_str(), hi.id.as_str()), ("m1", "m5"));
            // Expiry in batches.
            assert_eq!(store.archive_expire(3_500_000, 2).await.unwrap(), 2);
            assert_eq!(store.archive_expire(3_500_000, 2).await.unwrap(), 1);
            assert_eq!(store.archive_expire(3_500_000, 2).await.unwrap(), 0);
            let rest = store
                .archive_query("erin", &all, ArchivePage::Forward(None), 10)
                .await
                .unwrap();
            assert_eq!(ids(rest), (vec!["m4".into(), "m5".into()], true));
            // The rest, and an empty archive.
            assert_eq!(store.archive_expire(i64::MAX, 10).await.unwrap(), 2);
            assert_eq!(store.archive_expire(i64::MAX, 10).await.unwrap(), 0);
            // Preferences.
            assert!(store.archive_prefs("erin").await.unwrap().is_none());
            store
                .set_archive_prefs("erin", "roster", &["a@d".into()], &[])
                .await
                .unwrap();
            assert_eq!(
                store.archive_prefs("erin").await.unwrap(),
                Some(("roster".into(), vec!["a@d".into()], vec![]))
            );
            store.delete_user("erin").await.unwrap();
            assert!(store.archive_bounds("erin").await.unwrap().is_none());
        }
    }
}
