//! Group commit: many writers that each need their write on disk share one flush.

use std::sync::mpsc as std_mpsc;
use tokio::sync::oneshot;

/// A flush's failure, kept as its I/O kind and text so every waiter can rebuild it (a full
/// disk must still read as a full disk).
type FlushFailure = (std::io::ErrorKind, String);

type Waiter = oneshot::Sender<Result<(), FlushFailure>>;

/// Hands flush requests to one background thread, which answers every request that arrived
/// while the previous flush ran with the next single flush.
pub struct GroupCommit {
    requests: Option<std_mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GroupCommit {
    pub fn start(db: ::sled::Db) -> Result<Self, crate::store::StoreError> {
        let (requests, incoming) = std_mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name("crier-group-commit".into())
            .spawn(move || {
                // Ends when every sender is gone, that is when the store is dropped.
                while let Ok(first) = incoming.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(incoming.try_iter());
                    let outcome = db.flush().map(|_| ()).map_err(|e| match e {
                        ::sled::Error::Io(io) => (io.kind(), io.to_string()),
                        other => (std::io::ErrorKind::Other, other.to_string()),
                    });
                    for waiter in waiters {
                        let _ = waiter.send(outcome.clone());
                    }
                }
            })
            .map_err(|e| crate::store::StoreError::Unavailable {
                place: String::new(),
                reason: format!("cannot start the group-commit thread: {e}"),
            })?;
        Ok(Self {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Resolves once everything written before the call is on disk.
    pub async fn commit(&self) -> Result<(), ::sled::Error> {
        let (done, wait) = oneshot::channel();
        let failed =
            |(kind, reason): FlushFailure| ::sled::Error::Io(std::io::Error::new(kind, reason));
        let stopped = || {
            (
                std::io::ErrorKind::Other,
                "the group-commit thread has stopped".to_owned(),
            )
        };
        self.requests
            .as_ref()
            .ok_or_else(|| failed((std::io::ErrorKind::Other, "the store is closing".into())))?
            .send(done)
            .map_err(|_| failed(stopped()))?;
        wait.await.map_err(|_| failed(stopped()))?.map_err(failed)
    }
}

impl Drop for GroupCommit {
    /// Stops the thread and waits for it, so its handle on the database is gone (and sled's
    /// lock on the folder released) by the time the store is dropped.
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
