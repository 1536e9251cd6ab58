//! Group commit: many writers that each need their write on disk share one flush.

use std::sync::mpsc as std_mpsc;
use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Hands flush requests to one background thread, which answers every request that arrived
/// while the previous flush ran with the next single flush.
#[derive(Clone)]
pub struct GroupCommit {
    requests: std_mpsc::Sender<Waiter>,
}

impl GroupCommit {
    pub fn start(db: sled::Db) -> Self {
        let (requests, incoming) = std_mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("crier-group-commit".into())
            .spawn(move || {
                // Ends when every sender is gone, that is when the store is dropped.
                while let Ok(first) = incoming.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(incoming.try_iter());
                    let outcome = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    for waiter in waiters {
                        let _ = waiter.send(outcome.clone());
                    }
                }
            })
            .expect("the group-commit thread starts");
        Self { requests }
    }

    /// Resolves once everything written before the call is on disk.
    pub async fn commit(&self) -> Result<(), sled::Error> {
        let (done, wait) = oneshot::channel();
        let failed = |reason: String| sled::Error::Io(std::io::Error::other(reason));
        self.requests
            .send(done)
            .map_err(|_| failed("the group-commit thread has stopped".into()))?;
        wait.await
            .map_err(|_| failed("the group-commit thread has stopped".into()))?
            .map_err(failed)
    }
}
