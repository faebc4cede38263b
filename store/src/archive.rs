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

/// Characters of an archive id that name its zone. Ids begin with the time in
/// microseconds in 14 hex digits, so the first five cover 2^36 µs (about 19 hours).
/// The history with one contact is found through the zones in which the two
/// exchanged messages (`archive_zones`, written once per account, contact and zone),
/// then each zone's ids by the account's index: an index by contact cost an entry in
/// a page of each account's own for every message archived.
const ZONE_CHARS: usize = 5;
/// How far a message's time (`ts`) may lie from the time its id was made (it is
/// read just after; a clock stepped back puts it before): a window by time looks this
/// much further into the zones on each side.
const ID_TO_TS_SLACK_MICROS: i64 = 60_000_000;

/// The zone of an archive id.
fn zone(id: &str) -> &str {
    id.get(..ZONE_CHARS).unwrap_or(id)
}

/// The zone holding ids made at `micros`.
fn zone_at(micros: i64) -> String {
    let hex = format!("{:014x}", micros.max(0));
    hex[..ZONE_CHARS.min(hex.len())].to_owned()
}

/// The smallest string above every id of `zone`: ids are hex digits.
fn zone_end(zone: &str) -> String {
    format!("{zone}g")
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
            Err(e) => {
                // Usually an owner deleted meanwhile; anything else fails again below.
                tracing::debug!(error = %e, "archive batch goes row by row");
                self.archive_append_checked(rows).await
            }
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
            let sql = self.insert_ignoring(
                "archive (owner, id, peer, resource, ts, outgoing, stanza)",
                chunk.len(),
                7,
            );
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
        let mut zones: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.owner.as_str(), r.peer.as_str(), zone(&r.id)))
            .collect();
        zones.sort_unstable();
        zones.dedup();
        const ZONES_PER_STATEMENT: usize = 128;
        for chunk in zones.chunks(ZONES_PER_STATEMENT) {
            let sql = self.insert_ignoring("archive_zones (owner, peer, zone)", chunk.len(), 3);
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (owner, peer, zone) in chunk {
                query = query.bind(*owner).bind(*peer).bind(*zone);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// An `INSERT` of `rows` rows of `cols` values each into `table (columns)`, that
    /// skips a row repeating one already there (by any unique key).
    fn insert_ignoring(&self, table: &str, rows: usize, cols: usize) -> String {
        let mut sql = match self.backend {
            Backend::Sqlite => format!("INSERT OR IGNORE INTO {table} VALUES "),
            Backend::Postgres => format!("INSERT INTO {table} VALUES "),
        };
        for row in 0..rows {
            if row > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for col in 0..cols {
                if col > 0 {
                    sql.push_str(", ");
                }
                match self.backend {
                    // Anonymous parameters: SQLite finds a named one's number by a
                    // linear search, which made 448 of them cost more than the rows.
                    Backend::Sqlite => sql.push('?'),
                    Backend::Postgres => sql.push_str(&format!("${}", row * cols + col + 1)),
                }
            }
            sql.push(')');
        }
        if self.backend == Backend::Postgres {
            sql.push_str(" ON CONFLICT DO NOTHING");
        }
        sql
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
            sqlx::query(
                "INSERT INTO archive_zones (owner, peer, zone)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM users WHERE username = $1)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&r.owner)
            .bind(&r.peer)
            .bind(zone(&r.id))
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
        // One more than a page: whether the results go on.
        let wanted = max.saturating_add(1);
        let mut tx = self.snapshot().await?;
        let mut messages = Vec::new();
        match filter.peer {
            None => {
                messages = Self::archive_select(&mut tx, &sql, &binds, None, order, wanted).await?;
            }
            Some(peer) => {
                // The zones in which `peer` and the owner exchanged messages, within
                // the query's bounds, in the order of the page; then the page's
                // messages zone by zone.
                let mut lo = [filter.after_id, paging.filter(|_| !backward).map(|p| p.0)]
                    .into_iter()
                    .flatten()
                    .map(|id| zone(id).to_owned())
                    .max();
                if let Some(start) = filter.start {
                    lo = lo.max(Some(zone_at(start.saturating_sub(ID_TO_TS_SLACK_MICROS))));
                }
                let mut hi = [filter.before_id, paging.filter(|_| backward).map(|p| p.0)]
                    .into_iter()
                    .flatten()
                    .map(|id| zone(id).to_owned())
                    .min();
                if let Some(end) = filter.end {
                    let at_end = zone_at(end.saturating_add(ID_TO_TS_SLACK_MICROS));
                    hi = Some(hi.map_or(at_end.clone(), |h| h.min(at_end)));
                }
                let zones = Self::archive_zones_of(
                    &mut tx,
                    owner,
                    peer,
                    lo.as_deref(),
                    hi.as_deref(),
                    order,
                )
                .await?;
                for z in &zones {
                    let left = wanted - messages.len();
                    let found =
                        Self::archive_select(&mut tx, &sql, &binds, Some(z), order, left).await?;
                    messages.extend(found);
                    if messages.len() >= wanted {
                        break;
                    }
                }
            }
        }
        tx.commit().await?;
        let complete = messages.len() <= max;
        messages.truncate(max);
        if backward {
            messages.reverse();
        }
        Ok(Some(ArchiveResults { messages, complete }))
    }

    /// The messages of one query (`sql` and its `binds`, without order and limit),
    /// within one zone when given, in `order`, at most `limit`.
    async fn archive_select(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        sql: &str,
        binds: &[Bind],
        zone: Option<&str>,
        order: &str,
        limit: usize,
    ) -> Result<Vec<Archived>> {
        let mut sql = sql.to_owned();
        let n = binds.len();
        if zone.is_some() {
            sql.push_str(&format!(" AND id >= ${} AND id < ${}", n + 1, n + 2));
        }
        let limit_at = if zone.is_some() { n + 3 } else { n + 1 };
        sql.push_str(&format!(" ORDER BY id {order} LIMIT ${limit_at}"));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            query = match b {
                Bind::Str(s) => query.bind(s.clone()),
                Bind::Int(i) => query.bind(*i),
            };
        }
        if let Some(zone) = zone {
            query = query.bind(zone.to_owned()).bind(zone_end(zone));
        }
        query = query.bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = query.fetch_all(&mut **tx).await?;
        rows.iter()
            .map(|r| {
                Ok(Archived {
                    id: r.try_get("id")?,
                    ts: r.try_get("ts")?,
                    stanza: r.try_get("stanza")?,
                })
            })
            .collect()
    }

    /// The zones in which `owner` and `peer` exchanged messages, from `lo` to `hi`
    /// (inclusive, when given), in `order`.
    async fn archive_zones_of(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        owner: &str,
        peer: &str,
        lo: Option<&str>,
        hi: Option<&str>,
        order: &str,
    ) -> Result<Vec<String>> {
        let mut sql = String::from("SELECT zone FROM archive_zones WHERE owner = $1 AND peer = $2");
        let mut n = 2;
        for (bound, op) in [(lo, ">="), (hi, "<=")] {
            if bound.is_some() {
                n += 1;
                sql.push_str(&format!(" AND zone {op} ${n}"));
            }
        }
        sql.push_str(&format!(" ORDER BY zone {order}"));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner).bind(peer);
        for bound in [lo, hi].into_iter().flatten() {
            query = query.bind(bound);
        }
        let rows = query.fetch_all(&mut **tx).await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("zone")?))
            .collect()
    }

    /// Forgets up to `batch` zones whose messages all lie before `before`
    /// (microseconds), after [`Store::archive_expire`] took those messages, and says
    /// how many went; the caller repeats while a whole batch went.
    pub async fn archive_expire_zones(&self, before: i64, batch: usize) -> Result<u64> {
        // A zone's ids were all made before the next zone begins, and its messages'
        // times are at most ID_TO_TS_SLACK_MICROS later.
        let first_kept = zone_at(before.saturating_sub(ID_TO_TS_SLACK_MICROS));
        Ok(sqlx::query(
            "DELETE FROM archive_zones WHERE (owner, peer, zone) IN
                 (SELECT owner, peer, zone FROM archive_zones WHERE zone < $1 LIMIT $2)",
        )
        .bind(first_kept)
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?
        .rows_affected())
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

    /// A page's ids and whether it is the last.
    async fn page(
        store: &Store,
        owner: &str,
        filter: &ArchiveFilter<'_>,
        page: ArchivePage<'_>,
        max: usize,
    ) -> (Vec<String>, bool) {
        let r = store
            .archive_query(owner, filter, page, max)
            .await
            .unwrap()
            .unwrap();
        (r.messages.into_iter().map(|m| m.id).collect(), r.complete)
    }

    /// The history with one contact is found through the zones of ids (about 19
    /// hours each) in which the two exchanged messages: pages that span zones, skip
    /// zones without the contact, stop at a page's end in either direction, and
    /// honour every bound; expiry forgets the zones it emptied.
    #[tokio::test]
    async fn history_with_a_contact_across_zones() {
        const ZONE: i64 = 1 << 36;
        let base = ((1_700_000_000_000_000_i64 >> 36) + 1) << 36;
        // Two messages per zone; the contact b@d in zones 0, 1, 3 and 4, not 2.
        let at = |k: i64| base + k * ZONE / 2;
        let id = |k: i64| format!("{:014x}{:016x}", at(k), 7 * k + 1);
        for (store, _dir) in stores().await {
            for name in ["erin", "frank"] {
                store
                    .add_user(NewUser {
                        username: name,
                        password: "pw",
                        home_cluster: "c",
                        home_node: "n",
                    })
                    .await
                    .unwrap();
            }
            let mut rows: Vec<ArchiveRow> = (0..10)
                .map(|k| {
                    let peer = if k % 3 == 0 { "b@d" } else { "a@d" };
                    let mut r = row("erin", &id(k), peer, at(k));
                    r.resource = if k == 3 { "phone".into() } else { "r".into() };
                    r
                })
                .collect();
            rows.push(row("frank", &id(20), "b@d", at(20)));
            let zones = |peer: &'static str| {
                let store = store.clone();
                async move {
                    sqlx::query(
                        "SELECT zone FROM archive_zones WHERE owner = 'erin' AND peer = $1 ORDER BY zone",
                    )
                    .bind(peer)
                    .fetch_all(&store.pool)
                    .await
                    .unwrap()
                    .len()
                }
            };
            // A batch whose owners all exist is stored many rows per statement, its
            // zones too.
            store.archive_append_fast(&rows).await.unwrap();
            assert_eq!((zones("b@d").await, zones("a@d").await), (4, 5));
            // An owner gone meanwhile: the batch is stored row by row, zones too. Its
            // message to b@d was stamped just before zone 5 began and stored just
            // after: a window from zone 5 on still finds it.
            let late = format!("{:014x}{:016x}", at(10) - 1, 99);
            let mut late_row = row("erin", &late, "b@d", at(10) + 30_000_000);
            late_row.resource = "r".into();
            store
                .archive_append(&[row("nobody", &id(21), "b@d", at(21)), late_row])
                .await
                .unwrap();
            let since_zone_5 = ArchiveFilter {
                peer: Some("b@d"),
                start: Some(at(10)),
                ..Default::default()
            };
            assert_eq!(
                page(
                    &store,
                    "erin",
                    &since_zone_5,
                    ArchivePage::Forward(None),
                    10
                )
                .await,
                (vec![late.clone()], true)
            );
            let with_b = ArchiveFilter {
                peer: Some("b@d"),
                ..Default::default()
            };
            assert_eq!(
                page(&store, "erin", &with_b, ArchivePage::Forward(None), 3).await,
                (vec![id(0), id(3), id(6)], false)
            );
            let after = id(6);
            assert_eq!(
                page(
                    &store,
                    "erin",
                    &with_b,
                    ArchivePage::Forward(Some(&after)),
                    3
                )
                .await,
                (vec![id(9), late.clone()], true)
            );
            assert_eq!(
                page(&store, "erin", &with_b, ArchivePage::Backward(None), 2).await,
                (vec![id(9), late.clone()], false)
            );
            // Ids asked for, with the contact.
            let wanted = [id(3), id(4), id(9)];
            let by_ids = ArchiveFilter {
                ids: &wanted,
                ..with_b.clone()
            };
            assert_eq!(
                page(&store, "erin", &by_ids, ArchivePage::Forward(None), 10).await,
                (vec![id(3), id(9)], true)
            );
            assert_eq!(
                page(
                    &store,
                    "erin",
                    &with_b,
                    ArchivePage::Backward(Some(&after)),
                    5
                )
                .await,
                (vec![id(0), id(3)], true)
            );
            let window = ArchiveFilter {
                start: Some(at(3)),
                end: Some(at(9) - 1),
                ..with_b.clone()
            };
            assert_eq!(
                page(&store, "erin", &window, ArchivePage::Forward(None), 10).await,
                (vec![id(3), id(6)], true)
            );
            let (lo, hi) = (id(0), id(9));
            let between = ArchiveFilter {
                after_id: Some(&lo),
                before_id: Some(&hi),
                ..with_b.clone()
            };
            assert_eq!(
                page(&store, "erin", &between, ArchivePage::Backward(None), 10).await,
                (vec![id(3), id(6)], true)
            );
            let phone = ArchiveFilter {
                resource: Some("phone"),
                ..with_b.clone()
            };
            assert_eq!(
                page(&store, "erin", &phone, ArchivePage::Forward(None), 10).await,
                (vec![id(3)], true)
            );
            // Another account's history with the same contact is its own.
            assert_eq!(
                page(&store, "frank", &with_b, ArchivePage::Forward(None), 10).await,
                (vec![id(20)], true)
            );
            // Expiry up to message 7 (zone 3) forgets zones 0 to 2 (in batches), keeps
            // zone 3 (it still holds message 7) and later ones.
            assert_eq!((zones("b@d").await, zones("a@d").await), (4, 5));
            assert_eq!(store.archive_expire(at(7), 100).await.unwrap(), 7);
            assert_eq!(store.archive_expire_zones(at(7), 3).await.unwrap(), 3);
            assert_eq!(store.archive_expire_zones(at(7), 3).await.unwrap(), 2);
            assert_eq!(store.archive_expire_zones(at(7), 3).await.unwrap(), 0);
            assert_eq!((zones("b@d").await, zones("a@d").await), (2, 2));
            assert_eq!(
                page(&store, "erin", &with_b, ArchivePage::Forward(None), 10).await,
                (vec![id(9), late.clone()], true)
            );
            // A deleted account's zones go with it.
            store.delete_user("erin").await.unwrap();
            assert_eq!(zones("b@d").await, 0);
        }
    }
}
