//! The outbox: every build update, log chunk and key exchange request the box sends waits here
//! with a per-box sequence number until the control plane acknowledges it (`Ack{seq}`, or
//! `Registered.acked_seq` after a reconnect), so nothing is lost or doubled across reconnects.
use std::collections::BTreeMap;

use hive_proto::v1::{box_message, BoxMessage};

/// Messages waiting for an acknowledgement.
#[derive(Debug, Default)]
pub struct Outbox {
    next_seq: u64,
    unacked: BTreeMap<u64, BoxMessage>,
    registered_once: bool,
}

impl Outbox {
    pub fn new() -> Self {
        Outbox {
            next_seq: 1,
            ..Default::default()
        }
    }

    /// Queues a message; returns its sequence number.
    pub fn push(&mut self, msg: box_message::Msg) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.insert(
            seq,
            BoxMessage {
                seq,
                msg: Some(msg),
            },
        );
        seq
    }

    /// Everything up to and including `seq` is stored by the control plane.
    pub fn ack(&mut self, seq: u64) {
        self.unacked = self.unacked.split_off(&(seq + 1));
    }

    /// After Registered: drop what the control plane already has. On the first registration of
    /// this process, the control plane may know sequence numbers from a previous run of the box;
    /// nothing queued so far was ever sent, so it is renumbered after them instead of dropped.
    pub fn registered(&mut self, acked_seq: u64) {
        if !self.registered_once {
            self.registered_once = true;
            let msgs: Vec<BoxMessage> = std::mem::take(&mut self.unacked).into_values().collect();
            self.next_seq = acked_seq + 1;
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
