//! The build's event log: log chunks and step events in one order, each with a dense `seq` from 0.
//!
//! The agent's `Events` rpc replays from any `from_seq` and then follows until BUILD_FINISHED; the
//! box may subscribe several times (reconnects), so everything is kept in memory up to a byte cap.
//! Past the cap, further output is dropped and one SYSTEM chunk says so (events still flow).

use hive_proto::v1::{BuildState, CellEvent, CellEventKind, LogStream};
use std::sync::Mutex;
use tokio::sync::watch;

/// The ordered, replayable event log of one build.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<Inner>,
    /// Carries the number of events appended so far; followers wait on it.
    len_tx: watch::Sender<u64>,
    max_log_bytes: u64,
    /// Masked in the lines Hive writes itself too (a step's command line may name one).
    secrets: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<CellEvent>,
    log_bytes: u64,
    truncated: bool,
    finished: bool,
}

impl EventLog {
    pub fn new(max_log_bytes: u64) -> Self {
        EventLog {
            inner: Mutex::new(Inner::default()),
            len_tx: watch::channel(0).0,
            max_log_bytes,
            secrets: Vec::new(),
        }
    }

    /// The build's secret values, masked in [`EventLog::system`] lines as in step output.
    pub fn with_secrets(mut self, secrets: Vec<String>) -> Self {
        self.secrets = secrets;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the Vec half-written; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event, giving it the next seq and a timestamp. Events after BUILD_FINISHED are
    /// dropped: the log is closed then. Returns the seq given, if appended.
    pub fn push(&self, mut ev: CellEvent) -> Option<u64> {
        let mut inner = self.lock();
        if inner.finished {
            return None;
        }
        let seq = inner.events.len() as u64;
        ev.seq = seq;
        if ev.at_ms == 0 {
            ev.at_ms = hive_sys::now_ms();
        }
        if ev.kind == CellEventKind::BuildFinished as i32 {
            inner.finished = true;
        }
        inner.events.push(ev);
        let len = inner.events.len() as u64;
        drop(inner);
        self.len_tx.send_replace(len);
        Some(seq)
    }

    /// Appends a LOG chunk, honouring the byte cap.
    pub fn log(&self, step: u32, stream: LogStream, data: Vec<u8>) -> Option<u64> {
        if data.is_empty() {
            return None;
        }
        {
            let mut inner = self.lock();
            if inner.truncated {
                return None;
            }
            if inner.log_bytes + data.len() as u64 > self.max_log_bytes {
                inner.truncated = true;
                drop(inner);
                let msg = format!(
                    "hive: build output exceeded {} bytes; further output is dropped\n",
                    self.max_log_bytes
                );
                return self.push(CellEvent {
                    kind: CellEventKind::Log as i32,
                    step,
                    stream: LogStream::System as i32,
                    data: msg.into_bytes(),
                    ..Default::default()
                });
            }
            inner.log_bytes += data.len() as u64;
        }
        self.push(CellEvent {
            kind: CellEventKind::Log as i32,
            step,
            stream: stream as i32,
            data,
            ..Default::default()
        })
    }

    /// A line written by Hive itself (SYSTEM stream); not counted against the cap.
    pub fn system(&self, step: u32, line: impl Into<String>) -> Option<u64> {
        let mut line = line.into();
        if !line.ends_with('\n') {
            line.push('\n');
        }
        let mut data = line.into_bytes();
        if !self.secrets.is_empty() {
            let mut m = crate::mask::Masker::new(&self.secrets);
            let mut out = m.feed(&data);
            out.extend(m.finish());
            data = out;
        }
        self.push(CellEvent {
            kind: CellEventKind::Log as i32,
            step,
            stream: LogStream::System as i32,
            data,
            ..Default::default()
        })
    }

    pub fn step_started(&self, step: u32, what: &str) -> Option<u64> {
        self.push(CellEvent {
            kind: CellEventKind::StepStarted as i32,
            step,
            message: what.to_string(),
            ..Default::default()
        })
    }

    pub fn step_finished(&self, step: u32, exit_code: i32, message: String) -> Option<u64> {
        self.push(CellEvent {
            kind: CellEventKind::StepFinished as i32,
            step,
            exit_code,
            message,
            ..Default::default()
        })
    }

    /// The terminal event; closes the log.
    pub fn finish(&self, state: BuildState, exit_code: i32, message: String) -> Option<u64> {
        self.finish_with(state, exit_code, message, Vec::new())
    }

    /// The terminal event with the artefacts collected; closes the log.
    pub fn finish_with(
        &self,
        state: BuildState,
        exit_code: i32,
        message: String,
        artifacts: Vec<hive_proto::v1::ArtifactFile>,
    ) -> Option<u64> {
        self.push(CellEvent {
            kind: CellEventKind::BuildFinished as i32,
            state: state as i32,
            exit_code,
            message,
            artifacts,
            ..Default::default()
        })
    }

    pub fn is_finished(&self) -> bool {
        self.lock().finished
    }

    /// The terminal event, once there is one.
    pub fn final_event(&self) -> Option<CellEvent> {
        let inner = self.lock();
        if inner.finished {
            inner.events.last().cloned()
        } else {
            None
        }
    }

    /// Up to `max` events starting at `from`, and whether the log is closed.
    pub fn read_from(&self, from: u64, max: usize) -> (Vec<CellEvent>, bool) {
        let inner = self.lock();
        let start = (from as usize).min(inner.events.len());
        let end = start.saturating_add(max).min(inner.events.len());
        (inner.events[start..end].to_vec(), inner.finished)
    }

    /// A receiver that changes whenever events are appended.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.len_tx.subscribe()
    }

    /// Sends events from `from` into `tx` until BUILD_FINISHED has been sent or the receiver
    /// goes away. Replay and follow are the same loop: read what is there, then wait for more.
    pub async fn follow<E>(&self, from: u64, tx: tokio::sync::mpsc::Sender<Result<CellEvent, E>>) {
        let mut next = from;
        let mut changed = self.subscribe();
        loop {
            // Mark the current length seen *before* reading, so an append after the read
            // wakes the wait below rather than being missed.
            changed.borrow_and_update();
            let (batch, finished) = self.read_from(next, 256);
            let got = batch.len() as u64;
            for ev in batch {
                let last = ev.kind == CellEventKind::BuildFinished as i32;
                if tx.send(Ok(ev)).await.is_err() || last {
                    return;
                }
            }
            next += got;
            if got == 0 {
                if finished {
                    // `from` was past the end of a closed log: nothing more will come.
                    return;
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_are_dense_and_log_closes_at_finish() {
        let log = EventLog::new(1 << 20);
        assert_eq!(log.system(0, "hello"), Some(0));
        let masked = EventLog::new(1 << 20).with_secrets(vec!["hunter22".into()]);
        masked.system(1, "$ curl -u me:hunter22 x");
        let (evs, _) = masked.read_from(0, 10);
        assert_eq!(evs[0].data, b"$ curl -u me:*** x\n");
        assert_eq!(log.log(1, LogStream::Stdout, b"a".to_vec()), Some(1));
        assert_eq!(log.log(1, LogStream::Stdout, Vec::new()), None);
        assert_eq!(log.step_finished(1, 0, String::new()), Some(2));
        assert_eq!(log.finish(BuildState::Succeeded, 0, "ok".into()), Some(3));
        assert_eq!(log.system(0, "late"), None);
        let (evs, fin) = log.read_from(1, 10);
        assert!(fin);
        assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(log.read_from(99, 10).0.len(), 0);
    }

    #[test]
    fn output_past_the_cap_is_dropped_with_one_notice() {
        let log = EventLog::new(10);
        log.log(1, LogStream::Stdout, vec![b'x'; 8]);
        log.log(1, LogStream::Stdout, vec![b'y'; 8]);
        log.log(1, LogStream::Stdout, vec![b'z'; 1]);
        let (evs, _) = log.read_from(0, 10);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[1].stream, LogStream::System as i32);
        assert!(String::from_utf8_lossy(&evs[1].data).contains("exceeded 10 bytes"));
    }

    #[tokio::test]
    async fn follow_replays_then_waits_for_more() {
        let log = std::sync::Arc::new(EventLog::new(1 << 20));
        for i in 0..5 {
            log.system(0, format!("line {i}"));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<CellEvent, ()>>(4);
        let l2 = log.clone();
        let follower = tokio::spawn(async move { l2.follow(3, tx).await });
        assert_eq!(rx.recv().await.unwrap().unwrap().seq, 3);
        assert_eq!(rx.recv().await.unwrap().unwrap().seq, 4);
        log.system(0, "later");
        assert_eq!(rx.recv().await.unwrap().unwrap().seq, 5);
        log.finish(BuildState::Failed, 3, "x".into());
        let last = rx.recv().await.unwrap().unwrap();
        assert_eq!((last.seq, last.exit_code), (6, 3));
        assert!(rx.recv().await.is_none());
        follower.await.unwrap();
    }
}
