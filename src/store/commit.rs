//! Group commit: many writers that each need their write on disk share one flush.

use std::sync::mpsc as std_mpsc;
use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Hands flush requests to one background thread, which answers every request that arrived
/// while the previous flush ran with the next single flush.
pub struct GroupCommit {
    requests: Option<std_mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GroupCommit {
    pub fn start(db: sled::Db) -> Self {
        let (requests, incoming) = std_mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
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
        Self {
            requests: Some(requests),
            thread: Some(thread),
        }
    }

    /// Resolves once everything written before the call is on disk.
    pub async fn commit(&self) -> Result<(), sled::Error> {
        let (done, wait) = oneshot::channel();
        let failed = |reason: String| sled::Error::Io(std::io::Error::other(reason));
        self.requests
            .as_ref()
            .ok_or_else(|| failed("the store is closing".into()))?
            .send(done)
            .map_err(|_| failed("the group-commit thread has stopped".into()))?;
        wait.await
            .map_err(|_| failed("the group-commit thread has stopped".into()))?
            .map_err(failed)
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
