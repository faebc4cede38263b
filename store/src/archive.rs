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

/// Characters of an archive id that name its zone. Ids begin with the time in
/// microseconds in 14 hex digits, so the first five cover 2^36 µs (about 19 hours).
/// The history with one contact is found through the zones in which the two
/// exchanged messages (`archive_zones`, written once per account, contact and zone),
/// then each zone's ids by the account's blocks: an index by contact cost an entry in
/// a page of each account's own for every message archived.
const ZONE_CHARS: usize = 5;
/// How far a message's time (`ts`) may lie from the time its id was made (it is
/// read just after; a clock stepped back puts it before): a window by time looks this
/// much further into the zones on each side.
const ID_TO_TS_SLACK_MICROS: i64 = 60_000_000;
/// Hex digits of an archive id that hold the time its id was made, in microseconds.
const ID_TIME_CHARS: usize = 14;
/// A block holds messages whose ids were made within this span of its first one, so
/// a message is looked for in the blocks that begin at most this long before it. The
/// writer stores a batch every five seconds; a batch delayed longer is split.
const BLOCK_SPAN_MICROS: i64 = 10_000_000;
/// A block holds at most this many messages, and takes no more once it holds this
/// many bytes (its last message may take it beyond): a query decodes whole blocks.
const BLOCK_MESSAGES: usize = 64;
const BLOCK_BYTES: usize = 64 * 1024;
/// Blocks a query reads per statement.
const BLOCKS_PER_READ: i64 = 16;

/// The zone of an archive id.
fn zone(id: &str) -> &str {
    id.get(..ZONE_CHARS).unwrap_or(id)
}

/// The zone holding ids made at `micros`.
fn zone_at(micros: i64) -> String {
    id_floor(micros)[..ZONE_CHARS].to_owned()
}

/// The smallest string above every id of `zone`: ids are hex digits.
fn zone_end(zone: &str) -> String {
    format!("{zone}g")
}

/// The smallest string at or above every id made at `micros` or later (times
/// beyond 14 hex digits count as the last one).
fn id_floor(micros: i64) -> String {
    format!("{:014x}", micros.clamp(0, (1 << (4 * ID_TIME_CHARS)) - 1))
}

/// The time an id (or the prefix of one, a zone) was made, when it begins with hex
/// digits as the router's ids do (missing digits count as zeros).
fn id_time(id: &str) -> Option<i64> {
    let digits = id.get(..ID_TIME_CHARS.min(id.len()))?;
    if digits.is_empty()
        || !digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let value = i64::from_str_radix(digits, 16).ok()?;
    value.checked_shl(4 * (ID_TIME_CHARS - digits.len()) as u32)
}

/// The first block that can hold an id at or above `id`: blocks begin at most
/// BLOCK_SPAN_MICROS before their messages. `None`: no bound (an id not made by the
/// router is alone in its block, and found by its first id).
fn blocks_from(id: &str) -> Option<String> {
    id_time(id).map(|t| id_floor(t.saturating_sub(BLOCK_SPAN_MICROS)))
}

/// Above every id a block beginning with `first` holds.
fn block_end(first: &str) -> Option<String> {
    id_time(first).map(|t| id_floor(t.saturating_add(BLOCK_SPAN_MICROS)))
}

/// One archived message as its block holds it.
struct Entry<'a> {
    id: &'a str,
    peer: &'a str,
    resource: &'a str,
    ts: i64,
    outgoing: bool,
    stanza: &'a str,
}

/// Appends `r` to a block's text: each field as its length in bytes (eight hex
/// digits) and its bytes; the time as sixteen hex digits, the direction as one digit.
/// Migration 0023 writes the same from SQL.
fn encode(body: &mut String, r: &ArchiveRow) {
    use std::fmt::Write as _;
    for field in [r.id.as_str(), &r.peer, &r.resource] {
        let _ = write!(body, "{:08x}{field}", field.len());
    }
    let _ = write!(
        body,
        "{:016x}{}{:08x}{}",
        r.ts as u64,
        u8::from(r.outgoing),
        r.stanza.len(),
        r.stanza
    );
}

/// The messages of a block's text.
fn decode(body: &str) -> Result<Vec<Entry<'_>>> {
    struct Reader<'a>(&'a str);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a str> {
            let corrupt = || crate::StoreError::Corrupt("archive_blocks.body".into());
            let head = self.0.get(..n).ok_or_else(corrupt)?;
            self.0 = self.0.get(n..).ok_or_else(corrupt)?;
            Ok(head)
        }
        fn hex(&mut self, digits: usize) -> Result<u64> {
            let s = self.take(digits)?;
            u64::from_str_radix(s, 16)
                .map_err(|_| crate::StoreError::Corrupt("archive_blocks.body".into()))
        }
        fn field(&mut self) -> Result<&'a str> {
            let len = self.hex(8)?;
            self.take(usize::try_from(len).unwrap_or(usize::MAX))
        }
    }
    let mut r = Reader(body);
    let mut entries = Vec::new();
    while !r.0.is_empty() {
        let (id, peer, resource) = (r.field()?, r.field()?, r.field()?);
        let ts = r.hex(16)? as i64;
        let outgoing = r.take(1)? == "1";
        let stanza = r.field()?;
        entries.push(Entry {
            id,
            peer,
            resource,
            ts,
            outgoing,
            stanza,
        });
    }
    Ok(entries)
}

/// A block of one account's messages, ready to store.
struct Block {
    owner: String,
    first_id: String,
    last_id: String,
    last_ts: i64,
    body: String,
}

/// `rows` as blocks: each account's messages in the order of their ids, a block per
/// run that fits BLOCK_SPAN_MICROS, BLOCK_MESSAGES and BLOCK_BYTES. An id the router
/// did not make (no time in its first digits) is in a block of its own.
fn blocks(rows: &[ArchiveRow]) -> Vec<Block> {
    let mut sorted: Vec<&ArchiveRow> = rows.iter().collect();
    sorted.sort_unstable_by(|a, b| (&a.owner, &a.id).cmp(&(&b.owner, &b.id)));
    let mut out: Vec<Block> = Vec::new();
    let mut open: Option<(usize, Option<String>)> = None;
    for r in sorted {
        let fits = match (out.last(), &open) {
            (Some(b), Some((n, Some(end)))) => {
                b.owner == r.owner
                    && id_time(&r.id).is_some()
                    && r.id < *end
                    && *n < BLOCK_MESSAGES
                    && b.body.len() < BLOCK_BYTES
            }
            _ => false,
        };
        if !fits {
            out.push(Block {
                owner: r.owner.clone(),
                first_id: r.id.clone(),
                last_id: r.id.clone(),
                last_ts: r.ts,
                body: String::new(),
            });
            open = Some((0, block_end(&r.id)));
        }
        let b = out.last_mut().expect("a block was opened");
        if let Some((n, _)) = &mut open {
            *n += 1;
        }
        b.last_id.clone_from(&r.id);
        b.last_ts = b.last_ts.max(r.ts);
        encode(&mut b.body, r);
    }
    out
}

/// Whether `e` is a transaction that lost a race with another and was rolled back:
/// PostgreSQL's serialization failure (40001) or deadlock (40P01), SQLite's busy or
/// locked database (5, 6 and their extended codes).
fn lost_a_race(e: &crate::StoreError) -> bool {
    let crate::StoreError::Database(sqlx::Error::Database(db)) = e else {
        return false;
    };
    let code = db.code().unwrap_or_default();
    matches!(code.as_ref(), "40001" | "40P01" | "5" | "6")
        || code
            .parse::<u32>()
            .is_ok_and(|c| c & 0xff == 5 || c & 0xff == 6)
}

/// Whether an archive's owner is a room (its bare JID) rather than an account (a
/// local part, which holds no '@').
fn is_room(owner: &str) -> bool {
    owner.contains('@')
}

/// Where a scan of blocks stands: the last block read, by first id and `seq`.
type Cursor = (String, i64);

impl Store {
    /// Appends archived messages in one transaction, as blocks of each owner's
    /// messages (one row and one index entry per owner and batch, not per message:
    /// the index by owner was most of the cost of archiving). Rows of an account that
    /// is gone (deleted meanwhile) are skipped; rooms' rows (their owner is the room's
    /// bare JID) are the router's to keep or forget.
    pub async fn archive_append(&self, rows: &[ArchiveRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let _timer = self.latency.start("archive_append");
        match self.archive_append_once(rows).await {
            // A transaction that lost a race (a deadlock or a serialization failure
            // on PostgreSQL, a busy database on SQLite) goes through the second time;
            // nothing was written, so nothing is written twice.
            Err(e) if lost_a_race(&e) => {
                tracing::warn!(error = %e, "archive batch lost a race; trying once more");
                self.archive_append_once(rows).await
            }
            other => other,
        }
    }

    async fn archive_append_once(&self, rows: &[ArchiveRow]) -> Result<()> {
        let mut tx = self.write().await?;
        let known = self.archive_accounts(&mut tx, rows).await?;
        let rows: std::borrow::Cow<'_, [ArchiveRow]> = if rows
            .iter()
            .all(|r| is_room(&r.owner) || known.contains(&r.owner))
        {
            rows.into()
        } else {
            rows.iter()
                .filter(|r| is_room(&r.owner) || known.contains(&r.owner))
                .cloned()
                .collect::<Vec<_>>()
                .into()
        };
        let blocks = blocks(&rows);
        const PER_STATEMENT: usize = 64;
        for chunk in blocks.chunks(PER_STATEMENT) {
            let sql = self.insert_ignoring(
                "archive_blocks (owner, first_id, last_id, last_ts, body)",
                chunk.len(),
                5,
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for b in chunk {
                query = query
                    .bind(&b.owner)
                    .bind(&b.first_id)
                    .bind(&b.last_id)
                    .bind(b.last_ts)
                    .bind(&b.body);
            }
            query.execute(&mut *tx).await?;
        }
        const ZONES_PER_STATEMENT: usize = 128;
        for chunk in Self::row_zones(&rows).chunks(ZONES_PER_STATEMENT) {
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

    /// The accounts among the owners of `rows` that exist, held (on PostgreSQL) until
    /// the transaction ends so that none is deleted before its rows are in: SQLite's
    /// writers take turns anyway.
    async fn archive_accounts(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        rows: &[ArchiveRow],
    ) -> Result<std::collections::HashSet<String>> {
        const PER_STATEMENT: usize = 500;
        let mut owners: Vec<&str> = rows
            .iter()
            .map(|r| r.owner.as_str())
            .filter(|o| !is_room(o))
            .collect();
        owners.sort_unstable();
        owners.dedup();
        let mut known = std::collections::HashSet::new();
        for chunk in owners.chunks(PER_STATEMENT) {
            let params: Vec<String> = (1..=chunk.len())
                .map(|i| match self.backend {
                    Backend::Sqlite => "?".to_owned(),
                    Backend::Postgres => format!("${i}"),
                })
                .collect();
            let lock = match self.backend {
                Backend::Sqlite => "",
                // What a foreign key's check takes: no delete meanwhile, updates of
                // other columns (a password change) not held up.
                Backend::Postgres => " FOR KEY SHARE",
            };
            let sql = format!(
                "SELECT username FROM users WHERE username IN ({}){lock}",
                params.join(", ")
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for owner in chunk {
                query = query.bind(*owner);
            }
            for row in query.fetch_all(&mut **tx).await? {
                known.insert(row.try_get::<String, _>("username")?);
            }
        }
        Ok(known)
    }

    /// The zones the rows fall in, once each.
    fn row_zones(rows: &[ArchiveRow]) -> Vec<(&str, &str, &str)> {
        let mut zones: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.owner.as_str(), r.peer.as_str(), zone(&r.id)))
            .collect();
        zones.sort_unstable();
        zones.dedup();
        zones
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

    /// Whether `owner`'s archive holds `id`.
    async fn archive_has(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        owner: &str,
        id: &str,
    ) -> Result<bool> {
        // The blocks that begin at most a span before `id`; an id the router did not
        // make is alone in a block that begins with it.
        let from = blocks_from(id).unwrap_or_else(|| id.to_owned());
        let rows = sqlx::query(
            "SELECT body FROM archive_blocks
             WHERE owner = $1 AND first_id >= $2 AND first_id <= $3 AND last_id >= $3",
        )
        .bind(owner)
        .bind(from)
        .bind(id)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            let body: String = row.try_get("body")?;
            if decode(&body).is_ok_and(|entries| entries.iter().any(|e| e.id == id)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Replaces the stanza of the message `id` in `owner`'s archive by what `replace`
    /// makes of it (a retracted message by its tombstone), and returns the message
    /// as it was; `None` when the archive does not hold it.
    pub async fn archive_replace(
        &self,
        owner: &str,
        id: &str,
        replace: impl FnOnce(&str) -> String,
    ) -> Result<Option<Archived>> {
        let mut tx = self.write().await?;
        let from = blocks_from(id).unwrap_or_else(|| id.to_owned());
        let rows = sqlx::query(
            "SELECT seq, body FROM archive_blocks
             WHERE owner = $1 AND first_id >= $2 AND first_id <= $3 AND last_id >= $3",
        )
        .bind(owner)
        .bind(from)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let (seq, body): (i64, String) = (row.try_get("seq")?, row.try_get("body")?);
            let entries = decode(&body)?;
            let Some(found) = entries.iter().find(|e| e.id == id) else {
                continue;
            };
            let was = Archived {
                id: id.to_owned(),
                ts: found.ts,
                stanza: found.stanza.to_owned(),
            };
            let new = replace(found.stanza);
            let mut rebuilt = String::with_capacity(body.len() + new.len());
            for e in &entries {
                let stanza = if e.id == id { new.as_str() } else { e.stanza };
                encode(
                    &mut rebuilt,
                    &ArchiveRow {
                        owner: String::new(),
                        id: e.id.to_owned(),
                        peer: e.peer.to_owned(),
                        resource: e.resource.to_owned(),
                        ts: e.ts,
                        outgoing: e.outgoing,
                        stanza: stanza.into(),
                    },
                );
            }
            sqlx::query("UPDATE archive_blocks SET body = $1 WHERE seq = $2")
                .bind(rebuilt)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(Some(was));
        }
        Ok(None)
    }

    /// A page of `owner`'s archive; `None` when an id the query names (a paging
    /// bound, `after_id`, `before_id`, one of `ids`) is not in it.
    pub async fn archive_query(
        &self,
        owner: &str,
        filter: &ArchiveFilter<'_>,
        page: ArchivePage<'_>,
        max: usize,
    ) -> Result<Option<ArchiveResults>> {
        let _timer = self.latency.start("archive_query");
        let (paging, backward) = match page {
            ArchivePage::Forward(after) => (after, false),
            ArchivePage::Backward(before) => (before, true),
        };
        let mut tx = self.snapshot().await?;
        // XEP-0313: an id the query names that is not in the archive is
        // item-not-found, not an empty page.
        let named = [filter.after_id, filter.before_id, paging]
            .into_iter()
            .flatten()
            .chain(filter.ids.iter().map(String::as_str));
        for id in named {
            if !Self::archive_has(&mut tx, owner, id).await? {
                return Ok(None);
            }
        }
        // Ids grow with time: the archive's order is theirs. The bounds on ids, the
        // lower one excluded and the upper one too.
        let after = [filter.after_id, paging.filter(|_| !backward)]
            .into_iter()
            .flatten()
            .max();
        let before = [filter.before_id, paging.filter(|_| backward)]
            .into_iter()
            .flatten()
            .min();
        // The ranges of ids to read, in the page's order: the ids asked for; else
        // the zones in which `peer` and the owner exchanged messages; else all,
        // within the bounds (a time bound widened by the slack between an id and
        // its message's time).
        let mut lo = after.map(str::to_owned);
        if let Some(start) = filter.start {
            lo = lo.max(Some(id_floor(start.saturating_sub(ID_TO_TS_SLACK_MICROS))));
        }
        let mut hi = before.map(str::to_owned);
        if let Some(end) = filter.end {
            let past_end = id_floor(end.saturating_add(ID_TO_TS_SLACK_MICROS).saturating_add(1));
            hi = Some(hi.map_or(past_end.clone(), |h| h.min(past_end)));
        }
        let mut ranges: Vec<(Option<String>, Option<String>)> = if !filter.ids.is_empty() {
            let mut ids: Vec<&String> = filter.ids.iter().collect();
            ids.sort_unstable();
            ids.dedup();
            // The smallest string above an id.
            ids.into_iter()
                .map(|id| (Some(id.clone()), Some(format!("{id}\u{1}"))))
                .collect()
        } else if let Some(peer) = filter.peer {
            let zones = Self::archive_zones_of(
                &mut tx,
                owner,
                peer,
                lo.as_deref().map(zone),
                hi.as_deref().map(zone),
            )
            .await?;
            zones
                .into_iter()
                .map(|z| {
                    let end = zone_end(&z);
                    (Some(z), Some(end))
                })
                .collect()
        } else {
            vec![(lo.clone(), hi.clone())]
        };
        if backward {
            ranges.reverse();
        }
        let keep = |e: &Entry<'_>| {
            filter.peer.is_none_or(|p| e.peer == p)
                && filter.resource.is_none_or(|r| e.resource == r)
                && filter.start.is_none_or(|s| e.ts >= s)
                && filter.end.is_none_or(|end| e.ts <= end)
                && after.is_none_or(|a| e.id > a)
                && before.is_none_or(|b| e.id < b)
                && (filter.ids.is_empty() || filter.ids.iter().any(|i| i == e.id))
        };
        // One more than a page: whether the results go on.
        let wanted = max.saturating_add(1);
        let mut messages = Vec::new();
        for (from, to) in &ranges {
            let from = from.clone().max(lo.clone());
            let to = match (to, &hi) {
                (Some(t), Some(h)) => Some(t.min(h).clone()),
                (t, h) => t.clone().or_else(|| h.clone()),
            };
            let found = Self::archive_scan(
                &mut tx,
                owner,
                (from.as_deref(), to.as_deref()),
                backward,
                &keep,
                wanted - messages.len(),
            )
            .await?;
            messages.extend(found);
            if messages.len() >= wanted {
                break;
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

    /// The first `wanted` messages `keep` keeps among `owner`'s with ids in
    /// `from..to`, in the order of the page (backward: the last ones, last first).
    async fn archive_scan(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        owner: &str,
        (from, to): (Option<&str>, Option<&str>),
        backward: bool,
        keep: &(dyn Fn(&Entry<'_>) -> bool + Sync),
        wanted: usize,
    ) -> Result<Vec<Archived>> {
        if from.zip(to).is_some_and(|(f, t)| f >= t) || wanted == 0 {
            return Ok(Vec::new());
        }
        let (cmp, order) = if backward {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        let first_block = from.map(|f| blocks_from(f).unwrap_or_default());
        let mut found: Vec<Archived> = Vec::new();
        let mut cursor: Option<Cursor> = None;
        loop {
            let mut sql =
                String::from("SELECT seq, first_id, body FROM archive_blocks WHERE owner = $1");
            let mut n = 1;
            let mut param = |sql: &mut String, clause: &str| {
                n += 1;
                sql.push_str(&clause.replace('?', &format!("${n}")));
            };
            if first_block.is_some() {
                param(&mut sql, " AND first_id >= ?");
            }
            if from.is_some() {
                param(&mut sql, " AND last_id >= ?");
            }
            if to.is_some() {
                param(&mut sql, " AND first_id < ?");
            }
            if cursor.is_some() {
                // From the cursor on: a range of the index, then past the blocks of
                // the same first id already read.
                n += 2;
                sql.push_str(&format!(
                    " AND first_id {cmp}= ${a} AND (first_id {cmp} ${a} OR seq {cmp} ${b})",
                    a = n - 1,
                    b = n
                ));
            }
            sql.push_str(&format!(
                " ORDER BY first_id {order}, seq {order} LIMIT {BLOCKS_PER_READ}"
            ));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner);
            for bound in [first_block.as_deref(), from, to].into_iter().flatten() {
                query = query.bind(bound);
            }
            if let Some((first, seq)) = &cursor {
                query = query.bind(first.as_str()).bind(*seq);
            }
            let rows = query.fetch_all(&mut **tx).await?;
            let read = rows.len();
            for row in &rows {
                let body: String = row.try_get("body")?;
                let seq: i64 = row.try_get("seq")?;
                // A damaged block is left out, not the end of every page that
                // reaches it.
                let entries = match decode(&body) {
                    Ok(entries) => entries,
                    Err(e) => {
                        tracing::error!(owner, seq, error = %e, "an archive block does not decode; left out");
                        Vec::new()
                    }
                };
                for e in entries {
                    if from.is_none_or(|f| e.id >= f) && to.is_none_or(|t| e.id < t) && keep(&e) {
                        found.push(Archived {
                            id: e.id.to_owned(),
                            ts: e.ts,
                            stanza: e.stanza.to_owned(),
                        });
                    }
                }
                cursor = Some((row.try_get("first_id")?, seq));
            }
            // Blocks may overlap a little (a batch stamped before the previous one was
            // stored): the page is in the order of ids, whatever the blocks'.
            found.sort_unstable_by(|a, b| a.id.cmp(&b.id));
            found.dedup_by(|a, b| a.id == b.id);
            if backward {
                found.reverse();
            }
            if read < BLOCKS_PER_READ as usize {
                break;
            }
            if found.len() >= wanted {
                found.truncate(wanted);
                // Done once no block still to read can hold an id that belongs in
                // the page: forward, blocks begin at or after the last one read;
                // backward, they end before the last one read does.
                let last = &found[wanted - 1].id;
                let (first, _) = cursor.as_ref().expect("a block was read");
                let done = if backward {
                    block_end(first).is_some_and(|end| end <= *last)
                } else {
                    first > last
                };
                if done {
                    break;
                }
            }
        }
        found.truncate(wanted);
        Ok(found)
    }

    /// The zones in which `owner` and `peer` exchanged messages, from `lo` to `hi`
    /// (inclusive, when given), in the order of ids.
    async fn archive_zones_of(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        owner: &str,
        peer: &str,
        lo: Option<&str>,
        hi: Option<&str>,
    ) -> Result<Vec<String>> {
        let mut sql = String::from("SELECT zone FROM archive_zones WHERE owner = $1 AND peer = $2");
        let mut n = 2;
        for (bound, op) in [(lo, ">="), (hi, "<=")] {
            if bound.is_some() {
                n += 1;
                sql.push_str(&format!(" AND zone {op} ${n}"));
            }
        }
        sql.push_str(" ORDER BY zone");
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

    /// Deletes `owner`'s archive (a room that ended) up to `before` (microseconds):
    /// the blocks begun before it, and the zones wholly before it. Messages archived
    /// later, for a room made again under the name, stay (a block begun before and
    /// still written after goes whole: what a new room said in its first seconds may
    /// go with the old room's, never the other way).
    pub async fn archive_forget(&self, owner: &str, before: i64) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM archive_blocks WHERE owner = $1 AND first_id < $2")
            .bind(owner)
            .bind(id_floor(before))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM archive_zones WHERE owner = $1 AND zone < $2")
            .bind(owner)
            .bind(zone_at(before))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The first and the last message of `owner`'s archive (XEP-0313 metadata).
    pub async fn archive_bounds(&self, owner: &str) -> Result<Option<(Archived, Archived)>> {
        let mut tx = self.snapshot().await?;
        let mut one = async |backward| {
            let found =
                Self::archive_scan(&mut tx, owner, (None, None), backward, &|_| true, 1).await?;
            Ok::<_, crate::StoreError>(found.into_iter().next().map(|mut m| {
                m.stanza.clear();
                m
            }))
        };
        let bounds = match (one(false).await?, one(true).await?) {
            (Some(first), Some(last)) => Some((first, last)),
            _ => None,
        };
        tx.commit().await?;
        Ok(bounds)
    }

    /// Deletes up to `batch` blocks of messages all archived before `before`
    /// (microseconds) and says how many went; the caller repeats while a whole batch
    /// went.
    pub async fn archive_expire(&self, before: i64, batch: usize) -> Result<u64> {
        let _timer = self.latency.start("archive_expire");
        // No index by time (one fewer written per block): blocks are stored in the
        // order they came, each batch within a few seconds, so the ones older than
        // `before` are the table's first blocks by `seq`, up to a bound found by a
        // binary search. A block a few seconds out of order at the bound goes an hour
        // later.
        let Some(bound) = self.archive_seq_bound(before).await? else {
            return Ok(0);
        };
        let gone = sqlx::query(
            "DELETE FROM archive_blocks WHERE seq IN
                 (SELECT seq FROM archive_blocks WHERE seq < $1 AND last_ts < $2 ORDER BY seq LIMIT $3)",
        )
        .bind(bound)
        .bind(before)
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(gone)
    }

    /// The first `seq` from which the archive's blocks are no older than `before`
    /// (by a binary search over `seq`, each step one lookup by the primary key);
    /// `None` for an empty archive.
    async fn archive_seq_bound(&self, before: i64) -> Result<Option<i64>> {
        let at_or_after = |seq: i64| async move {
            let row = sqlx::query(
                "SELECT seq, last_ts FROM archive_blocks WHERE seq >= $1 ORDER BY seq LIMIT 1",
            )
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| {
                Ok::<_, crate::StoreError>((
                    r.try_get::<i64, _>("seq")?,
                    r.try_get::<i64, _>("last_ts")?,
                ))
            })
            .transpose()
        };
        let Some((first, _)) = at_or_after(i64::MIN).await? else {
            return Ok(None);
        };
        let last: i64 = sqlx::query("SELECT MAX(seq) AS last FROM archive_blocks")
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
    use super::{blocks, decode};
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
        // Ids as the router makes them, message i at i seconds.
        let m = |i: i64| router_id(i * 1_000_000, i as u64);
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
                    row("erin", &m(i), peer, i * 1_000_000)
                })
                .chain([row("nobody", "x", "a@d", 1)])
                .collect();
            store.archive_append(&rows).await.unwrap();
            // A message stored twice is one result.
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
            assert_eq!(ids(first), (vec![m(1), m(2)], false));
            let next = store
                .archive_query("erin", &all, ArchivePage::Forward(Some(&m(4))), 2)
                .await
                .unwrap();
            assert_eq!(ids(next), (vec![m(5)], true));
            let last = store
                .archive_query("erin", &all, ArchivePage::Backward(None), 2)
                .await
                .unwrap();
            assert_eq!(ids(last), (vec![m(4), m(5)], false));
            let before = store
                .archive_query("erin", &all, ArchivePage::Backward(Some(&m(3))), 5)
                .await
                .unwrap();
            assert_eq!(ids(before), (vec![m(1), m(2)], true));
            let with_b = ArchiveFilter {
                peer: Some("b@d"),
                ..Default::default()
            };
            let b = store
                .archive_query("erin", &with_b, ArchivePage::Forward(None), 10)
                .await
                .unwrap();
            assert_eq!(ids(b), (vec![m(2), m(4)], true));
            let window = ArchiveFilter {
                start: Some(2_000_000),
                end: Some(3_000_000),
                ..Default::default()
            };
            let w = store
                .archive_query("erin", &window, ArchivePage::Forward(None), 10)
                .await
                .unwrap();
            assert_eq!(ids(w), (vec![m(2), m(3)], true));
            let wanted = [m(5), m(1)];
            let unknown = [m(5), "zz".to_owned()];
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
                after_id: Some(&m(1)),
                ..Default::default()
            };
            let i = store
                .archive_query("erin", &by_id, ArchivePage::Forward(None), 10)
                .await
                .unwrap();
            assert_eq!(ids(i), (vec![m(5)], true));
            // An unknown id is not an empty page.
            assert!(
                store
                    .archive_query("erin", &all, ArchivePage::Forward(Some("zz")), 2)
                    .await
                    .unwrap()
                    .is_none()
            );
            let (lo, hi) = store.archive_bounds("erin").await.unwrap().unwrap();
            assert_eq!((lo.id, hi.id), (m(1), m(5)));
            // Expiry goes by blocks, each when its last message is due: m1 to m5 are
            // one block (stored together, within seconds), the second m1 another.
            assert_eq!(store.archive_expire(3_500_000, 1).await.unwrap(), 1);
            assert_eq!(store.archive_expire(3_500_000, 1).await.unwrap(), 0);
            let rest = store
                .archive_query("erin", &all, ArchivePage::Forward(None), 10)
                .await
                .unwrap();
            assert_eq!(ids(rest).0.len(), 5);
            assert_eq!(store.archive_expire(5_000_001, 10).await.unwrap(), 1);
            assert_eq!(store.archive_expire(i64::MAX, 10).await.unwrap(), 0);
            assert!(store.archive_bounds("erin").await.unwrap().is_none());
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

    /// A room's archive is kept under its bare JID, no account of that name needed,
    /// and forgotten up to a time when the room ends; an account's goes with it.
    #[tokio::test]
    async fn rooms_have_archives_and_accounts_take_theirs_along() {
        use sqlx::Row as _;
        let at = |s: i64| s * 1_000_000;
        let id = |s: i64| router_id(at(s), 7);
        const ROOM: &str = "team@conference.d";
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
            let rows: Vec<ArchiveRow> = (1..=3)
                .map(|s| row(ROOM, &id(s), ROOM, at(s)))
                .chain([row("erin", &id(1), "a@d", at(1))])
                .collect();
            store.archive_append(&rows).await.unwrap();
            let all = |owner: &'static str| {
                let store = store.clone();
                async move {
                    store
                        .archive_query(
                            owner,
                            &ArchiveFilter::default(),
                            ArchivePage::Forward(None),
                            10,
                        )
                        .await
                        .unwrap()
                        .map(|r| r.messages.len())
                        .unwrap_or_default()
                }
            };
            assert_eq!((all(ROOM).await, all("erin").await), (3, 1));
            // A message moderated: its tombstone takes its place, the others stay.
            let was = store
                .archive_replace(ROOM, &id(2), |old| format!("<tomb of=\"{}\"/>", old.len()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(was.stanza, format!("<message id='{}'/>", id(2)));
            let now = store
                .archive_query(
                    ROOM,
                    &ArchiveFilter::default(),
                    ArchivePage::Forward(None),
                    10,
                )
                .await
                .unwrap()
                .unwrap()
                .messages;
            let stanzas: Vec<&str> = now.iter().map(|m| m.stanza.as_str()).collect();
            let tomb = format!("<tomb of=\"{}\"/>", was.stanza.len());
            assert_eq!(
                stanzas,
                [
                    format!("<message id='{}'/>", id(1)).as_str(),
                    tomb.as_str(),
                    format!("<message id='{}'/>", id(3)).as_str()
                ]
            );
            assert_eq!(now[1].ts, was.ts);
            assert!(
                store
                    .archive_replace(ROOM, &id(9), |_| String::new())
                    .await
                    .unwrap()
                    .is_none()
            );
            // The room ended at 4 s and was made again: the old room's messages (1
            // to 3, one block) go, the new room's message 4 stays.
            store
                .archive_append(&[row(ROOM, &id(4), ROOM, at(4))])
                .await
                .unwrap();
            store.archive_forget(ROOM, at(4)).await.unwrap();
            assert_eq!(all(ROOM).await, 1);
            store.delete_user("erin").await.unwrap();
            assert_eq!(all("erin").await, 0);
            let left: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM archive_zones WHERE owner = 'erin'")
                    .fetch_one(&store.pool)
                    .await
                    .unwrap()
                    .try_get::<i64, _>("n")
                    .unwrap();
            assert_eq!(left, 0);
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
            // A batch is stored many rows per statement, its zones too.
            store.archive_append(&rows).await.unwrap();
            assert_eq!((zones("b@d").await, zones("a@d").await), (4, 5));
            // An owner gone meanwhile is skipped, the others' rows and zones stored.
            // Erin's message to b@d was stamped just before zone 5 began and stored just
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

    /// Ids as the router makes them: the time in microseconds, then a random part.
    fn router_id(micros: i64, n: u64) -> String {
        format!("{micros:014x}{n:016x}")
    }

    #[test]
    fn blocks_group_an_accounts_messages_within_their_limits() {
        let t = 1_700_000_000_000_000_i64;
        let mut rows = Vec::new();
        // erin: 70 messages within a second (two blocks: 64 and 6), then one 11 s
        // later (a block of its own: beyond the span), then an id not the router's.
        for i in 0..70 {
            rows.push(row("erin", &router_id(t + i * 1000, 1), "a@d", t));
        }
        rows.push(row(
            "erin",
            &router_id(t + 11_000_000, 2),
            "a@d",
            t + 11_000_000,
        ));
        rows.push(row("erin", "zz", "a@d", t));
        // frank, given first: blocks are by account whatever the order given.
        rows.insert(0, row("frank", &router_id(t, 3), "é@d", -5));
        let made = blocks(&rows);
        let sizes: Vec<(&str, usize)> = made
            .iter()
            .map(|b| (b.owner.as_str(), decode(&b.body).unwrap().len()))
            .collect();
        assert_eq!(
            sizes,
            [
                ("erin", 64),
                ("erin", 6),
                ("erin", 1),
                ("erin", 1),
                ("frank", 1)
            ]
        );
        assert_eq!(made[0].first_id, router_id(t, 1));
        assert_eq!(made[0].last_id, router_id(t + 63_000, 1));
        // Every field comes back, multi-byte text and a negative time too.
        let frank = decode(&made[4].body).unwrap();
        assert_eq!(
            (
                frank[0].peer,
                frank[0].resource,
                frank[0].ts,
                frank[0].stanza
            ),
            ("é@d", "r", -5, &*rows[0].stanza)
        );
        // A damaged body is an error, not a panic.
        for damaged in ["0000000", "00000005ab", "zzzzzzzz", "00000001é"] {
            assert!(decode(damaged).is_err(), "{damaged}");
        }
    }

    /// Blocks stored out of order and overlapping (a batch stamped before the
    /// previous one was stored), many per account: pages in either direction, across
    /// the reads of several blocks, are in the order of ids, each message once.
    #[tokio::test]
    async fn pages_are_in_order_across_overlapping_blocks() {
        let t = 1_700_000_000_000_000_i64;
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
            // 40 batches of 10 messages 0.1 s apart: each batch's ids are interleaved
            // with the next one's, and every other batch is stored first.
            let id = |k: i64| router_id(t + k * 100_000, k as u64);
            let batch = |b: i64| -> Vec<ArchiveRow> {
                (0..10)
                    .map(|i| {
                        let k = b * 10 + i + if i % 2 == 1 && b < 39 { 10 } else { 0 };
                        row("erin", &id(k), "a@d", t + k * 100_000)
                    })
                    .collect()
            };
            for b in (0..40).step_by(2) {
                store.archive_append(&batch(b + 1)).await.unwrap();
                store.archive_append(&batch(b)).await.unwrap();
            }
            let mut all: Vec<String> = (0..40).flat_map(batch).map(|r| r.id).collect();
            all.sort();
            all.dedup();
            assert!(all.len() > 300, "{}", all.len());
            let every = ArchiveFilter::default();
            for max in [1, 7, 50] {
                // Forward, page by page.
                let mut seen = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let (ids, complete) = page(
                        &store,
                        "erin",
                        &every,
                        ArchivePage::Forward(after.as_deref()),
                        max,
                    )
                    .await;
                    seen.extend(ids.iter().cloned());
                    after = ids.last().cloned();
                    if complete {
                        break;
                    }
                }
                assert_eq!(seen, all, "forward by {max}");
                // Backward, page by page.
                let mut seen = Vec::new();
                let mut before: Option<String> = None;
                loop {
                    let (ids, complete) = page(
                        &store,
                        "erin",
                        &every,
                        ArchivePage::Backward(before.as_deref()),
                        max,
                    )
                    .await;
                    seen.splice(0..0, ids.iter().cloned());
                    before = ids.first().cloned();
                    if complete {
                        break;
                    }
                }
                assert_eq!(seen, all, "backward by {max}");
            }
            let (first, last) = store.archive_bounds("erin").await.unwrap().unwrap();
            assert_eq!((&first.id, &last.id), (&all[0], all.last().unwrap()));
            // A damaged block among them is left out; the rest still pages.
            sqlx::query(
                "INSERT INTO archive_blocks (owner, first_id, last_id, last_ts, body)
                 VALUES ('erin', $1, $1, $2, 'damaged')",
            )
            .bind(&all[100])
            .bind(t)
            .execute(&store.pool)
            .await
            .unwrap();
            let after = all[99].clone();
            assert_eq!(
                page(
                    &store,
                    "erin",
                    &every,
                    ArchivePage::Forward(Some(&after)),
                    2
                )
                .await,
                (vec![all[100].clone(), all[101].clone()], false)
            );
            // Ids asked for, among many blocks.
            let wanted = [all[5].clone(), all[200].clone()];
            let by_ids = ArchiveFilter {
                ids: &wanted,
                ..Default::default()
            };
            assert_eq!(
                page(&store, "erin", &by_ids, ArchivePage::Backward(None), 10).await,
                (wanted.to_vec(), true)
            );
        }
    }

    /// An archive stored one row per message (before migration 0023) keeps every
    /// message, found by each kind of query.
    #[tokio::test]
    async fn the_blocks_migration_keeps_every_message() {
        sqlx::any::install_default_drivers();
        let t = 1_700_000_000_000_000_i64;
        let dir = tempfile::tempdir().unwrap();
        let mut urls = vec![(
            format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("old.db").to_string_lossy()
            ),
            "sqlite://old.db".to_owned(),
        )];
        if let Ok(url) = std::env::var("IMPMESH_TEST_POSTGRES") {
            let url = crate::test_support::fresh_postgres_schema(&url).await;
            urls.push((url.clone(), url));
        }
        for (old, new) in urls {
            let pool = sqlx::AnyPool::connect(&old).await.unwrap();
            if old.starts_with("sqlite") {
                crate::SQLITE_MIGRATIONS.run_to(22, &pool).await.unwrap();
            } else {
                crate::POSTGRES_MIGRATIONS.run_to(22, &pool).await.unwrap();
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "INSERT INTO users (username, home_cluster, home_node, scram_sha1, scram_sha256, created_at, usn)
                     VALUES ('erin', 'c', 'n', '', '', 1, 1);
                 INSERT INTO archive (owner, id, peer, resource, ts, outgoing, stanza) VALUES
                     ('erin', '{a}', 'b@d', 'phone', {ta}, 1, '<message><body>héllo</body></message>'),
                     ('erin', '{b}', 'a@d', '', {tb}, 0, '<message/>'),
                     ('erin', 'm-old', 'a@d', 'r', 5, 0, '<message id=''old''/>');
                 INSERT INTO archive_zones (owner, peer, zone) VALUES
                     ('erin', 'b@d', '{za}'), ('erin', 'a@d', '{zb}'), ('erin', 'a@d', 'm-old');",
                a = router_id(t, 1),
                b = router_id(t + 1000, 2),
                ta = t,
                tb = t + 1000,
                za = &router_id(t, 1)[..5],
                zb = &router_id(t + 1000, 2)[..5],
            )))
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
            let store = Store::open(&new, dir.path()).await.unwrap();
            let r = store
                .archive_query(
                    "erin",
                    &ArchiveFilter::default(),
                    ArchivePage::Forward(None),
                    10,
                )
                .await
                .unwrap()
                .unwrap();
            let got: Vec<(&str, i64, &str)> = r
                .messages
                .iter()
                .map(|m| (m.id.as_str(), m.ts, m.stanza.as_str()))
                .collect();
            let (a, b) = (router_id(t, 1), router_id(t + 1000, 2));
            assert_eq!(
                got,
                [
                    (a.as_str(), t, "<message><body>héllo</body></message>"),
                    (b.as_str(), t + 1000, "<message/>"),
                    ("m-old", 5, "<message id='old'/>"),
                ],
                "{new}"
            );
            let phone = ArchiveFilter {
                peer: Some("b@d"),
                resource: Some("phone"),
                ..Default::default()
            };
            assert_eq!(
                page(&store, "erin", &phone, ArchivePage::Forward(None), 10).await,
                (vec![a.clone()], true)
            );
            let old = ["m-old".to_owned()];
            let by_id = ArchiveFilter {
                ids: &old,
                ..Default::default()
            };
            assert_eq!(
                page(&store, "erin", &by_id, ArchivePage::Forward(None), 10).await,
                (vec!["m-old".to_owned()], true)
            );
            // New messages go on after the old ones.
            store
                .archive_append(&[row("erin", &router_id(t + 2000, 3), "a@d", t + 2000)])
                .await
                .unwrap();
            let (_, last) = store.archive_bounds("erin").await.unwrap().unwrap();
            assert_eq!(last.id, "m-old");
            assert_eq!(store.archive_expire(t + 1500, 10).await.unwrap(), 3);
        }
    }
}
