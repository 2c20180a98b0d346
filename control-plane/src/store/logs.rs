//! Build logs: chunks keyed by (build, seq). A box's chunk n of the current attempt is stored
//! at `log_base + n`, so a re-queued build's log continues after a system line. Holes a lost
//! attempt left stay holes: readers skip holes below the build's `log_base`.

use hive_proto::v1::{LogChunk, LogStream};
use sqlx::{Any, Transaction};

use super::boxes::set_acked_tx;
use super::{checked, now_ms, q, to_i64, Result, Store};

/// What became of a log chunk a box sent.
#[derive(Debug, Clone, PartialEq)]
pub enum LogStored {
    /// Stored now; the chunk as stored (its seq is the build's log seq, `log_base + n`).
    New(LogChunk),
    /// Stored before (a resend).
    Duplicate,
    /// The build is not on this box (a chunk from a stale attempt): dropped.
    NotThisBox,
    /// The chunk's seq is beyond [`MAX_CHUNK_SEQ`] (no box numbers that far): dropped.
    OutOfRange,
    /// The build's log already reached the log cap (and says so): dropped.
    OverCap,
}

/// The highest chunk seq a box may give one attempt's log (2^32 chunks: far beyond any log
/// cap, and `log_base + seq` can never overflow).
pub const MAX_CHUNK_SEQ: u64 = 1 << 32;

impl Store {
    /// Stores one log chunk of the box's current attempt (idempotent on (build, seq)), and
    /// raises the box's acked seq to `acked_seq` in the same transaction. Returns false when the
    /// build is not on this box (chunk from a stale attempt) or the seq is impossible: dropped.
    pub async fn store_log(
        &self,
        box_id: &str,
        chunk: &LogChunk,
        acked_seq: Option<u64>,
    ) -> Result<bool> {
        in_tx!(self, "commit log chunk", |tx| {
            let stored = matches!(
                store_log_tx(tx, box_id, chunk, self.log_cap).await?,
                LogStored::New(_) | LogStored::Duplicate
            );
            if let Some(acked) = acked_seq {
                set_acked_tx(tx, box_id, acked).await?;
            }
            Ok(stored)
        })
    }

    /// Writes a Hive-authored line into a build's log at the next seq.
    pub async fn append_system_log(&self, build_id: &str, text: &str) -> Result<()> {
        in_tx!(self, "commit system log line", |tx| {
            let next: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(seq) + 1, 0) AS next FROM log_chunks WHERE build_id = $1",
            )
            .bind(build_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(q("select next log seq"))?;
            let line = text.as_bytes();
            insert_log_tx(tx, build_id, next, LogStream::System, 0, line, now_ms()).await
        })
    }

    /// Chunks with seq >= `from_seq`, in seq order.
    pub async fn logs_from(
        &self,
        build_id: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<LogChunk>> {
        let rows = sqlx::query_as::<_, LogRecord>(
            "SELECT seq, stream, step, data, at_ms FROM log_chunks \
             WHERE build_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(build_id)
        .bind(to_i64("seq", from_seq)?)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(q("select log chunks"))?;
        rows.into_iter().map(|r| r.chunk(build_id)).collect()
    }
}

/// Stores a chunk of `box_id`'s current attempt at `log_base + chunk.seq` (a duplicate is a
/// no-op), unless the build's log would pass `cap` bytes: then the first chunk over it is
/// replaced by one system line saying the log was cut, and the rest are dropped.
pub(crate) async fn store_log_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: &str,
    chunk: &LogChunk,
    cap: u64,
) -> Result<LogStored> {
    if chunk.seq > MAX_CHUNK_SEQ {
        return Ok(LogStored::OutOfRange);
    }
    let at_ms = if chunk.at_ms > 0 {
        chunk.at_ms
    } else {
        now_ms()
    };
    let len = to_i64("chunk length", chunk.data.len())?;
    let cap = i64::try_from(cap).unwrap_or(i64::MAX);
    let stored: Option<i64> = sqlx::query_scalar(
        "INSERT INTO log_chunks (build_id, seq, stream, step, data, at_ms) \
         SELECT id, log_base + $1, $2, $3, $4, $5 FROM builds WHERE id = $6 AND box_id = $7 \
         AND log_truncated = 0 AND log_bytes + $8 <= $9 \
         ON CONFLICT (build_id, seq) DO NOTHING RETURNING seq",
    )
    .bind(to_i64("seq", chunk.seq)?)
    .bind(i64::from(chunk.stream))
    .bind(i64::from(chunk.step))
    .bind(chunk.data.clone())
    .bind(at_ms)
    .bind(&chunk.build_id)
    .bind(box_id)
    .bind(len)
    .bind(cap)
    .fetch_optional(&mut **tx)
    .await
    .map_err(q("insert log chunk"))?;
    if let Some(seq) = stored {
        sqlx::query("UPDATE builds SET log_bytes = log_bytes + $1 WHERE id = $2")
            .bind(len)
            .bind(&chunk.build_id)
            .execute(&mut **tx)
            .await
            .map_err(q("count log bytes"))?;
        return Ok(LogStored::New(LogChunk {
            seq: checked("seq", seq)?,
            at_ms,
            ..chunk.clone()
        }));
    }
    // A duplicate (fine, already stored), not this box's build, or over the cap.
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT log_base, log_truncated FROM builds WHERE id = $1 AND box_id = $2")
            .bind(&chunk.build_id)
            .bind(box_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(q("select build of log chunk"))?;
    let Some((log_base, truncated)) = row else {
        return Ok(LogStored::NotThisBox);
    };
    let seq = log_base + to_i64("seq", chunk.seq)?;
    let exists = sqlx::query("SELECT seq FROM log_chunks WHERE build_id = $1 AND seq = $2")
        .bind(&chunk.build_id)
        .bind(seq)
        .fetch_optional(&mut **tx)
        .await
        .map_err(q("select log chunk"))?
        .is_some();
    if exists {
        return Ok(LogStored::Duplicate);
    }
    if truncated != 0 {
        return Ok(LogStored::OverCap);
    }
    // The first chunk past the cap: one line in its place says so; later ones are dropped.
    let line = format!(
        "hive: log cut at {cap} bytes (the control plane's --log-cap-mib); \
         the rest of this build's output is not kept\n"
    );
    sqlx::query("UPDATE builds SET log_truncated = 1 WHERE id = $1")
        .bind(&chunk.build_id)
        .execute(&mut **tx)
        .await
        .map_err(q("mark log truncated"))?;
    insert_log_tx(
        tx,
        &chunk.build_id,
        seq,
        LogStream::System,
        0,
        line.as_bytes(),
        at_ms,
    )
    .await?;
    Ok(LogStored::New(LogChunk {
        build_id: chunk.build_id.clone(),
        seq: checked("seq", seq)?,
        stream: LogStream::System as i32,
        step: 0,
        data: line.into_bytes(),
        at_ms,
    }))
}

pub(crate) async fn insert_log_tx(
    tx: &mut Transaction<'_, Any>,
    build_id: &str,
    seq: i64,
    stream: LogStream,
    step: u32,
    data: &[u8],
    at_ms: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO log_chunks (build_id, seq, stream, step, data, at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (build_id, seq) DO NOTHING",
    )
    .bind(build_id)
    .bind(seq)
    .bind(i64::from(stream as i32))
    .bind(i64::from(step))
    .bind(data.to_vec())
    .bind(at_ms)
    .execute(&mut **tx)
    .await
    .map_err(q("insert log chunk"))?;
    Ok(())
}

/// A `log_chunks` row as the database holds it.
#[derive(sqlx::FromRow)]
struct LogRecord {
    seq: i64,
    stream: i64,
    step: i64,
    data: Vec<u8>,
    at_ms: i64,
}

impl LogRecord {
    fn chunk(self, build_id: &str) -> Result<LogChunk> {
        Ok(LogChunk {
            build_id: build_id.to_string(),
            seq: checked("seq", self.seq)?,
            stream: checked("stream", self.stream)?,
            step: checked("step", self.step)?,
            data: self.data,
            at_ms: self.at_ms,
        })
    }
}
