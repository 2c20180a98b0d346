//! The outbox: every build update, log chunk and key exchange request the box sends waits here
//! with a per-box sequence number until the control plane acknowledges it (`Ack{seq}`, or
//! `Registered.acked_seq` after a reconnect), so nothing is lost or doubled across reconnects.
//!
//! Its memory is bounded ([`OUTBOX_CAP_BYTES`]): while the control plane is away and builds
//! keep writing, a log chunk that would pass the cap is queued as a short system line saying
//! how many bytes of output were dropped, in the same log position (the log has no hole, and
//! says what is missing). Build updates and key exchanges are never dropped: they are small
//! and a build's outcome must arrive.
use std::collections::BTreeMap;

use hive_proto::v1::{box_message, BoxMessage, LogStream};
use prost::Message;

/// Bytes of unacknowledged messages the outbox keeps before it drops log output.
pub const OUTBOX_CAP_BYTES: usize = 64 * 1024 * 1024;

/// Messages waiting for an acknowledgement.
#[derive(Debug, Default)]
pub struct Outbox {
    next_seq: u64,
    unacked: BTreeMap<u64, BoxMessage>,
    registered_once: bool,
    /// Encoded size of `unacked`.
    bytes: usize,
    cap: usize,
    /// Log output dropped at the cap since the box started.
    dropped_bytes: u64,
}

impl Outbox {
    pub fn new() -> Self {
        Self::with_cap(OUTBOX_CAP_BYTES)
    }

    /// An outbox that keeps at most about `cap` bytes (tests use small caps).
    pub fn with_cap(cap: usize) -> Self {
        Outbox {
            next_seq: 1,
            cap,
            ..Default::default()
        }
    }

    /// Queues a message; returns its sequence number. A log chunk that would take the outbox
    /// past its cap is queued as a line saying what was dropped.
    pub fn push(&mut self, mut msg: box_message::Msg) -> u64 {
        if let box_message::Msg::Log(chunk) = &mut msg {
            let len = chunk.data.len();
            if self.bytes + len > self.cap && len > 0 {
                let line = format!(
                    "hive: {len} bytes of output dropped here: the box held as much as it may \
                     while the control plane was unreachable\n"
                );
                if line.len() < len {
                    self.dropped_bytes += len as u64;
                    chunk.data = line.into_bytes();
                    chunk.stream = LogStream::System as i32;
                }
            }
        }
        let seq = self.next_seq;
        // saturating: only a control plane that claimed to have stored u64::MAX messages gets
        // here, and its numbers are no use any more; the box must not panic on them (each new
        // message then replaces the last, which the control plane would count as stored).
        if seq == u64::MAX && !self.unacked.contains_key(&seq) {
            tracing::error!("the control plane's sequence numbers are exhausted (it acknowledged u64::MAX); messages to it are lost until the box restarts with a new data dir");
        }
        self.next_seq = seq.saturating_add(1);
        let m = BoxMessage {
            seq,
            msg: Some(msg),
        };
        self.bytes += m.encoded_len();
        if let Some(old) = self.unacked.insert(seq, m) {
            self.bytes = self.bytes.saturating_sub(old.encoded_len());
        }
        seq
    }

    /// Everything up to and including `seq` is stored by the control plane.
    pub fn ack(&mut self, seq: u64) {
        // saturating: an ack of u64::MAX (a broken or hostile control plane) acks all but a
        // message numbered u64::MAX instead of overflowing.
        let kept = self.unacked.split_off(&seq.saturating_add(1));
        let gone: usize = self.unacked.values().map(Message::encoded_len).sum();
        self.bytes = self.bytes.saturating_sub(gone);
        self.unacked = kept;
    }

    /// Encoded bytes waiting for an acknowledgement.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Log output dropped at the cap since the box started.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes
    }

    /// After Registered: drop what the control plane already has. On the first registration of
    /// this process, the control plane may know sequence numbers from a previous run of the box;
    /// nothing queued so far was ever sent, so it is renumbered after them instead of dropped.
    pub fn registered(&mut self, acked_seq: u64) {
        if !self.registered_once {
            self.registered_once = true;
            let msgs: Vec<BoxMessage> = std::mem::take(&mut self.unacked).into_values().collect();
            self.bytes = 0;
            self.next_seq = acked_seq.saturating_add(1);
            for m in msgs {
                if let Some(msg) = m.msg {
                    self.push(msg);
                }
            }
            return;
        }
        self.ack(acked_seq);
    }

    /// Messages with seq > `after`, in order.
    pub fn pending_after(&self, after: u64) -> Vec<BoxMessage> {
        self.unacked
            .range(after + 1..)
            .map(|(_, m)| m.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    /// Whether message `seq` still waits for its acknowledgement (it will be sent again).
    pub fn holds(&self, seq: u64) -> bool {
        self.unacked.contains_key(&seq)
    }

    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hive_proto::v1::{KeyExchangeRequest, LogChunk};

    fn log(n: u64) -> box_message::Msg {
        box_message::Msg::Log(LogChunk {
            build_id: "b".into(),
            seq: n,
            ..Default::default()
        })
    }

    #[test]
    fn outbox_acks_and_resends_in_order() {
        let mut ob = Outbox::new();
        ob.registered(0);
        for i in 0..5 {
            assert_eq!(ob.push(log(i)), i + 1);
        }
        ob.ack(2);
        let p: Vec<u64> = ob.pending_after(0).iter().map(|m| m.seq).collect();
        assert_eq!(p, vec![3, 4, 5]);
        // Reconnect: the control plane stored up to 4 but the ack was lost.
        ob.registered(4);
        let p: Vec<u64> = ob.pending_after(4).iter().map(|m| m.seq).collect();
        assert_eq!(p, vec![5]);
        assert_eq!(ob.len(), 1);
    }

    #[test]
    fn outbox_survives_absurd_acks() {
        let mut ob = Outbox::new();
        ob.registered(0);
        for i in 0..3 {
            ob.push(log(i));
        }
        ob.ack(u64::MAX);
        assert_eq!(ob.len(), 0);
        assert_eq!(ob.bytes(), 0);
        let mut fresh = Outbox::new();
        fresh.registered(u64::MAX);
        fresh.ack(u64::MAX);
        assert_eq!(fresh.len(), 0);
        // A first registration at u64::MAX: pushes after it do not overflow (a debug build
        // panicked), and the outbox stays one message, its bytes counted once.
        let mut spent = Outbox::new();
        spent.registered(u64::MAX);
        for i in 0..3 {
            assert_eq!(spent.push(log(i)), u64::MAX);
        }
        assert_eq!(spent.len(), 1);
        let one = BoxMessage {
            seq: u64::MAX,
            msg: Some(log(2)),
        }
        .encoded_len();
        assert_eq!(spent.bytes(), one);
    }

    #[test]
    fn outbox_holds_a_message_until_it_is_acked() {
        // A key exchange request the control plane acked is no longer held: after a reconnect
        // the agent queues it again itself (`resend_key_exchanges`); one still held is not.
        let mut ob = Outbox::new();
        ob.registered(0);
        let kx = ob.push(box_message::Msg::KeyExchange(KeyExchangeRequest::default()));
        let later = ob.push(log(1));
        assert!(ob.holds(kx) && ob.holds(later));
        ob.ack(kx);
        assert!(!ob.holds(kx) && ob.holds(later));
    }

    #[test]
    fn outbox_bounds_its_bytes_and_says_what_it_dropped() {
        let mut ob = Outbox::with_cap(4096);
        ob.registered(0);
        let chunk = |n: u64| {
            box_message::Msg::Log(LogChunk {
                build_id: "b".into(),
                seq: n,
                data: vec![b'x'; 1000],
                ..Default::default()
            })
        };
        for i in 0..20 {
            ob.push(chunk(i));
        }
        // A build's end always gets in.
        ob.push(box_message::Msg::Update(hive_proto::v1::BuildUpdate {
            build_id: "b".into(),
            message: "finished".into(),
            ..Default::default()
        }));
        assert!(ob.bytes() <= 4096 + 20 * 200, "{} bytes held", ob.bytes());
        let msgs = ob.pending_after(0);
        assert_eq!(msgs.len(), 21, "every log position is kept");
        let logs: Vec<&LogChunk> = msgs
            .iter()
            .filter_map(|m| match &m.msg {
                Some(box_message::Msg::Log(c)) => Some(c),
                _ => None,
            })
            .collect();
        let whole = logs.iter().filter(|c| c.data.len() == 1000).count();
        let notes: Vec<_> = logs
            .iter()
            .filter(|c| c.stream == LogStream::System as i32)
            .collect();
        assert!((3..=4).contains(&whole), "{whole} chunks kept whole");
        assert_eq!(whole + notes.len(), 20);
        assert!(String::from_utf8_lossy(&notes[0].data).contains("1000 bytes of output dropped"));
        assert_eq!(ob.dropped_bytes(), 1000 * notes.len() as u64);
        assert!(matches!(msgs[20].msg, Some(box_message::Msg::Update(_))));
        // Once acknowledged, the room is back.
        ob.ack(21);
        assert_eq!(ob.bytes(), 0);
        ob.push(chunk(20));
        match &ob.pending_after(21)[0].msg {
            Some(box_message::Msg::Log(c)) => assert_eq!(c.data.len(), 1000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn outbox_renumbers_after_a_previous_run() {
        let mut ob = Outbox::new();
        ob.push(log(0));
        ob.push(log(1));
        // The control plane knows 40 messages from the box's previous life.
        ob.registered(40);
        let p: Vec<u64> = ob.pending_after(40).iter().map(|m| m.seq).collect();
        assert_eq!(p, vec![41, 42]);
        assert_eq!(ob.push(log(2)), 43);
    }
}
