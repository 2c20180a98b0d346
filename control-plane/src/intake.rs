//! The webhook intake: a bounded queue between the webhook handlers and the one task that
//! commits their deliveries in groups (`domain::submit::commit_deliveries`). A handler hands
//! over a [`NewDelivery`] and waits for the answer, which comes only after the group holding it
//! committed (or failed); the queue holds at most its capacity, and a handler that finds it full
//! or closed (shutting down) is told at once, without waiting, so the sender can retry.
//!
//! This module only holds the queue; it depends on the store's types and nothing above them.

use tokio::sync::{mpsc, oneshot};

use crate::store::{Delivery, NewDelivery, StoreError};

/// Why a delivery was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("the webhook commit queue is full ({0} deliveries waiting)")]
    Full(usize),
    #[error("the control plane is shutting down")]
    Closed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One delivery waiting for its group commit, and where its answer goes.
#[derive(Debug)]
pub struct Job {
    pub delivery: NewDelivery,
    pub reply: oneshot::Sender<Result<Delivery, StoreError>>,
}

/// The handlers' end of the queue (in `state::Hive`).
#[derive(Debug)]
pub struct Intake {
    tx: mpsc::Sender<Job>,
    capacity: usize,
}

/// The committer's end of the queue.
pub type Queue = mpsc::Receiver<Job>;

impl Intake {
    /// A queue of at most `capacity` deliveries (at least 1).
    pub fn new(capacity: usize) -> (Intake, Queue) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        (Intake { tx, capacity }, rx)
    }

    /// Deliveries queued and not yet taken into a group.
    pub fn queued(&self) -> usize {
        self.capacity.saturating_sub(self.tx.capacity())
    }

    /// Queues `delivery` and waits until it is durable (or failed). Refuses at once when the
    /// queue is full or closed.
    pub async fn record(&self, delivery: NewDelivery) -> Result<Delivery, IntakeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Job { delivery, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => IntakeError::Full(self.capacity),
                mpsc::error::TrySendError::Closed(_) => IntakeError::Closed,
            })?;
        // The committer answers every job it took, also on shutdown; a dropped sender means it
        // ended without doing so (it panicked): nothing says the delivery is stored.
        Ok(answer.await.map_err(|_| IntakeError::Closed)??)
    }
}
