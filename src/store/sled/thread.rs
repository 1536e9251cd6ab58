//! The sled store's own thread: every store call runs there, one after another, and the
//! writes among a run of calls share one flush (group commit).
//!
//! Why one thread rather than tokio's blocking pool: each hand-off to a pool thread and back
//! costs two context switches, a store call per delivery step made that the bottleneck of a
//! send, and writes from many pool threads to the same counters made sled's optimistic
//! transactions conflict and retry. Here the thread stays busy while calls keep coming, no two
//! transactions ever run at once, and one flush answers every write made since the last.

use super::{FormRequestJob, Trees};
use crate::delivery::{DeliveryRecord, Outcome};
use crate::store::{FormRequest, Recorded, StoreError};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use tokio::sync::oneshot;

/// What the thread does once a call has run.
pub(super) enum Done {
    /// Answer now: a read, a lease (no one is told it is durable), or a write that failed.
    Now(Box<dyn FnOnce() + Send>),
    /// Answer once the write is on disk, with the flush's result.
    AfterFlush(AfterFlush),
}

/// Answers a write with the result of the flush that made it durable.
type AfterFlush = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// An attempt's outcome, to record.
pub(super) struct OutcomeJob {
    pub leased: DeliveryRecord,
    pub outcome: Outcome,
    pub now: DateTime<Utc>,
    pub answer: oneshot::Sender<Result<Recorded, StoreError>>,
}

/// One store call.
pub(super) enum Job {
    Run(Box<dyn FnOnce(&Trees) -> Done + Send>),
    /// Outcomes that arrive together are recorded in one transaction: every sled transaction
    /// writes log buffers of its own, the dominant cost of a send.
    Outcome(Box<OutcomeJob>),
    /// Form requests that arrive together are decided and stored in one transaction, for the
    /// same reason: a surge of subscribe forms is many small writes.
    FormRequest(Box<(FormRequestJob, FormAnswer)>),
}

type FormAnswer = oneshot::Sender<Result<FormRequest, StoreError>>;

/// How many calls may run before a flush must answer the writes among them, so that a stream
/// of calls cannot hold a write's answer back for long.
const MOST_BEFORE_FLUSH: usize = 512;

pub(super) struct StoreThread {
    jobs: Option<std_mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreThread {
    pub(super) fn start(trees: Arc<Trees>) -> Result<Self, StoreError> {
        let (jobs, incoming) = std_mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("crier-store".into())
            .spawn(move || run(&trees, &incoming))
            .map_err(|e| StoreError::Unavailable {
                place: String::new(),
                reason: format!("cannot start the store's thread: {e}"),
            })?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    pub(super) fn submit(&self, job: Job) -> Result<(), StoreError> {
        let stopped = || StoreError::Unavailable {
            place: String::new(),
            reason: "the store is closing".into(),
        };
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())
    }
}

/// Runs calls until every sender is gone, that is until the store is dropped.
fn run(trees: &Trees, incoming: &std_mpsc::Receiver<Job>) {
    while let Ok(first) = incoming.recv() {
        let mut waiting: Vec<AfterFlush> = Vec::new();
        let mut outcomes = Vec::new();
        let mut answers = Vec::new();
        let mut form_requests = Vec::new();
        let mut form_answers = Vec::new();
        let mut perform = |job: Job| match job {
            Job::Run(work) => match work(trees) {
                Done::Now(answer) => answer(),
                Done::AfterFlush(answer) => waiting.push(answer),
            },
            Job::Outcome(job) => {
                let OutcomeJob {
                    leased,
                    outcome,
                    now,
                    answer,
                } = *job;
                outcomes.push((leased, outcome, now));
                answers.push(answer);
            }
            Job::FormRequest(job) => {
                let (request, answer) = *job;
                form_requests.push(request);
                form_answers.push(answer);
            }
        };
        // No commit delay: what arrives while a flush runs shares the next one, and waiting
        // for more before flushing only lengthened every answer. (A 500 µs delay for groups
        // with outcomes in them made email fan-out at concurrency 10 a fifth slower, and at
        // 50 no faster, measured side by side.)
        perform(first);
        for job in incoming.try_iter().take(MOST_BEFORE_FLUSH - 1) {
            perform(job);
        }
        let recorded = trees.record_outcomes(&outcomes);
        answer_after_flush(&mut waiting, answers, recorded);
        let decided = trees.request_subscriptions(&form_requests);
        answer_after_flush(&mut waiting, form_answers, decided);
        if waiting.is_empty() {
            continue;
        }
        // A flush's failure is kept as its I/O kind and text, so each writer gets its own
        // copy of it (a full disk still reads as a full disk).
        let flushed = trees.db.flush().map(|_| ()).map_err(|e| match e {
            ::sled::Error::Io(io) => (io.kind(), io.to_string()),
            other => (std::io::ErrorKind::Other, other.to_string()),
        });
        for answer in waiting {
            answer(
                flushed
                    .clone()
                    .map_err(|(kind, reason)| super::io_error(std::io::Error::new(kind, reason))),
            );
        }
    }
}

/// Answers each write that failed at once, and each that succeeded once the flush is done.
fn answer_after_flush<T: Send + 'static>(
    waiting: &mut Vec<AfterFlush>,
    answers: Vec<oneshot::Sender<Result<T, StoreError>>>,
    results: Vec<Result<T, StoreError>>,
) {
    for (answer, result) in answers.into_iter().zip(results) {
        match result {
            Ok(value) => waiting.push(Box::new(move |flushed| {
                let _ = answer.send(flushed.map(|()| value));
            })),
            Err(error) => {
                let _ = answer.send(Err(error));
            }
        }
    }
}

impl Drop for StoreThread {
    /// Stops the thread and waits for it, so its handle on the database is gone (and sled's
    /// lock on the folder released) by the time the store is dropped.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
