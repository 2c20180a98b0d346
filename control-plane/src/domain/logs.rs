//! Following a build's log: what `StreamLogs` (gRPC) and the dashboard's live log (`http::ui`)
//! send. Chunks go out in seq order from a given seq; while the build runs, a hole waits to be
//! filled; once it has ended (or below the current attempt's `log_base`), holes are skipped. The
//! chunks one box batch wrote come with its announcement, just before its commit and again
//! after it, and are sent on without reading them back; on a gap, a larger burst or a lagging
//! receiver the store is read.

use std::sync::Arc;
use std::time::Duration;

use hive_proto::v1::LogChunk;
use tokio::sync::{broadcast, mpsc};

use crate::events::Event;
use crate::state::Hive;
use crate::store::StoreError;

/// Log chunks read per query while following.
pub const LOG_PAGE: u32 = 500;

/// Why a follow ended early.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("build deleted")]
    Deleted,
    #[error("control plane shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sends `build_id`'s log chunks from `from_seq` on to `tx`, then (with `follow`) those stored
/// later, until the build has ended and every chunk is sent, `tx` is closed or the control plane
/// shuts down. `events` must be subscribed before the caller read the build, so no change falls
/// in between.
pub async fn follow(
    hive: Arc<Hive>,
    build_id: String,
    from_seq: u64,
    follow: bool,
    mut events: broadcast::Receiver<Event>,
    tx: mpsc::Sender<Result<LogChunk, FollowError>>,
) {
    let mut shutdown = hive.shutdown.clone();
    let mut next = from_seq;
    // Whether to re-read the build's state before the next read of chunks: at first, and on
    // news of the build itself. News of new chunks only needs the chunks read (the build's end
    // always comes as its own news, after its last chunk's).
    let mut check_state = true;
    let mut ended = false;
    // Where the current attempt's log starts: holes below it are what a lost attempt left,
    // and nothing will fill them.
    let mut log_base = 0;
    // The first chunk this follower sends ends the timing of the build's start (if it is
    // still being timed: a follower that comes later finds it ended).
    let mut timed = false;
    let began = std::time::Instant::now();
    loop {
        // Read the state before the chunks: if the build had ended by then, every chunk it
        // will ever have is visible to the read that follows.
        if check_state {
            ended = match hive.store.get_build(&build_id).await {
                Ok(Some(b)) => {
                    log_base = b.log_base;
                    b.state.is_terminal()
                }
                Ok(None) => {
                    let _ = tx.send(Err(FollowError::Deleted)).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
        }
        let chunks = match hive.store.logs_from(&build_id, next, LOG_PAGE).await {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let got = chunks.len();
        let mut hole = false;
        for chunk in chunks {
            if chunk.seq != next {
                // A hole: wait for it to fill while the build runs; once it has ended, or
                // when an earlier attempt left it, nothing will fill it, so go on.
                if !ended && next >= log_base {
                    hole = true;
                    break;
                }
                next = chunk.seq;
            }
            next += 1;
            if !send_chunk(&tx, &build_id, chunk).await {
                return;
            }
            if !timed {
                timed = true;
                hive.metrics.followed(&build_id, began);
            }
        }
        if got as u32 == LOG_PAGE && !hole {
            check_state = false;
            continue;
        }
        if !follow || ended {
            return;
        }
        // Wait for news of this build (or re-check now and then).
        check_state = true;
        loop {
            let heard = tokio::select! {
                e = events.recv() => e,
                _ = tokio::time::sleep(Duration::from_secs(5)) => break,
                _ = crate::events::stopped(&mut shutdown) => {
                    let _ = tx.send(Err(FollowError::ShuttingDown)).await;
                    return;
                }
                _ = tx.closed() => return,
            };
            match heard {
                Ok(Event::Build(b)) if b == build_id => break,
                Ok(Event::Log(b, carried)) if b == build_id => {
                    // The chunks one batch wrote, sent on as they are when they continue the
                    // stream; else (a gap, or not carried) read the store.
                    let Some(fresh) = continuing(&carried, next) else {
                        check_state = false;
                        break;
                    };
                    for chunk in fresh {
                        next = chunk.seq + 1;
                        if !send_chunk(&tx, &build_id, chunk.clone()).await {
                            return;
                        }
                        if !timed {
                            timed = true;
                            hive.metrics.followed(&build_id, began);
                        }
                    }
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// Sends one chunk to the follower's receiver; false once it is gone.
async fn send_chunk(
    tx: &mpsc::Sender<Result<LogChunk, FollowError>>,
    build_id: &str,
    chunk: LogChunk,
) -> bool {
    if chunk.at_ms > 0 {
        tracing::debug!(
            build_id,
            seq = chunk.seq,
            lag_ms = crate::store::now_ms() - chunk.at_ms,
            "log chunk delivered"
        );
    }
    tx.send(Ok(chunk)).await.is_ok()
}

/// The part of `carried` (stored chunks in seq order) a follower at `next` sends on: those from
/// `next` on, if they follow it without a gap (empty when it has them all already). None when
/// they do not continue the stream, or nothing was carried: then the store is read.
fn continuing(carried: &[LogChunk], next: u64) -> Option<&[LogChunk]> {
    if carried.is_empty() {
        return None;
    }
    let rest = &carried[carried.partition_point(|c| c.seq < next)..];
    rest.iter()
        .enumerate()
        .all(|(i, c)| c.seq == next + i as u64)
        .then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(seqs: &[u64]) -> Vec<LogChunk> {
        seqs.iter()
            .map(|&seq| LogChunk {
                seq,
                ..Default::default()
            })
            .collect()
    }

    fn seqs(c: Option<&[LogChunk]>) -> Option<Vec<u64>> {
        c.map(|c| c.iter().map(|c| c.seq).collect())
    }

    #[test]
    fn carried_chunks_are_sent_on_only_when_they_continue_the_stream() {
        assert_eq!(
            seqs(continuing(&chunks(&[5, 6, 7]), 5)),
            Some(vec![5, 6, 7])
        );
        // Some already sent (read from the store first): the rest.
        assert_eq!(seqs(continuing(&chunks(&[5, 6, 7]), 6)), Some(vec![6, 7]));
        // All already sent.
        assert_eq!(seqs(continuing(&chunks(&[5, 6]), 9)), Some(vec![]));
        // A gap before them or among them, or nothing carried: read the store.
        assert_eq!(seqs(continuing(&chunks(&[6, 7]), 5)), None);
        assert_eq!(seqs(continuing(&chunks(&[5, 7]), 5)), None);
        assert_eq!(seqs(continuing(&[], 5)), None);
    }
}
