//! Dispatch: one worker per channel leases due deliveries, sends them within the channel's
//! concurrency, and records each outcome durably before counting it as done.

pub mod plan;
pub mod retry;

use crate::channel::{Channel, DeliveryError};
use crate::domain::{Contact, Incident, Update};
use crate::render::Composer;
use crate::store::{BROADCAST_RECIPIENT, DeliveryRecord, DeliveryState, Outcome, Store};
use chrono::Utc;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use ulid::Ulid;

/// A finished delivery, reported to whoever watches progress.
#[derive(Debug, Clone)]
pub struct Finished {
    pub update: Ulid,
    pub channel: String,
    pub state: DeliveryState,
}

/// Whether workers stop once their queue is empty, or wait for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver what is queued, wait out its retries, then return (`send`, `dispatch`).
    UntilDrained,
    /// Keep serving until shutdown (`serve`).
    Forever,
}

pub struct Dispatcher {
    store: Arc<Store>,
    channels: Vec<Arc<dyn Channel>>,
    composer: Composer,
    lease: Duration,
    finished: Option<mpsc::UnboundedSender<Finished>>,
    /// Updates and incidents are read once per run, not once per delivery.
    cache: Mutex<HashMap<Ulid, Arc<(Update, Incident)>>>,
}

/// How long an idle worker in `Forever` mode sleeps before looking at its queue again.
const IDLE_POLL: Duration = Duration::from_millis(500);

impl Dispatcher {
    pub fn new(
        store: Arc<Store>,
        channels: Vec<Arc<dyn Channel>>,
        composer: Composer,
        lease: Duration,
    ) -> Self {
        Self {
            store,
            channels,
            composer,
            lease,
            finished: None,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Reports every finished delivery on `sender`.
    pub fn report_to(mut self, sender: mpsc::UnboundedSender<Finished>) -> Self {
        self.finished = Some(sender);
        self
    }

    /// Runs every channel's worker until the queue drains (or forever) or `shutdown` turns true.
    /// In-flight deliveries always finish and are recorded before this returns.
    pub async fn run(
        self: Arc<Self>,
        mode: Mode,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut workers = JoinSet::new();
        for channel in self.channels.clone() {
            workers.spawn(self.clone().work(channel, mode, shutdown.clone()));
        }
        let reaper = tokio::spawn(self.clone().reap_expired_leases(shutdown.clone()));
        let mut first_error = None;
        while let Some(result) = workers.join_next().await {
            let outcome = result.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(error) = outcome {
                first_error.get_or_insert(error);
            }
        }
        reaper.abort();
        first_error.map_or(Ok(()), |error| Err(crate::InternalError(error).into()))
    }

    /// Puts deliveries whose lease ran out back in the queue, every quarter of a lease. Within
    /// one process an attempt ends long before its lease (the config enforces it), so this
    /// only catches a worker that is stuck beyond its own timeout.
    async fn reap_expired_leases(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = (self.lease / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            match self.store.requeue_leases(Utc::now(), false) {
                Ok(0) => {}
                Ok(requeued) => tracing::warn!(requeued, "expired leases went back to the queue"),
                Err(error) => tracing::error!(%error, "cannot requeue expired leases"),
            }
        }
    }

    async fn work(
        self: Arc<Self>,
        channel: Arc<dyn Channel>,
        mode: Mode,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut in_flight: JoinSet<anyhow::Result<()>> = JoinSet::new();
        let concurrency = channel.policy().concurrency;
        // The store failing stops the leasing, never the attempts already under way: they
        // finish and are recorded, or their leases come back at the next start.
        let mut failure: Option<anyhow::Error> = None;
        loop {
            let stopping = *shutdown.borrow() || failure.is_some();
            let mut next_due = None;
            if !stopping {
                if let Err(error) = self.fill(&channel, &mut in_flight, concurrency) {
                    failure = Some(error);
                    continue;
                }
                match self.store.next_due(channel.name()) {
                    Ok(due) => next_due = due,
                    Err(error) => {
                        failure = Some(error.into());
                        continue;
                    }
                }
            }
            if in_flight.is_empty()
                && (stopping || (next_due.is_none() && mode == Mode::UntilDrained))
            {
                return failure.map_or(Ok(()), Err);
            }
            // Wake when a slot frees up, when the next retry is due, or on shutdown. In
            // `Forever` mode new work may arrive at any time, so never sleep past IDLE_POLL.
            let wait = if stopping || in_flight.len() >= concurrency {
                None
            } else {
                let until_due = next_due.map(|due| (due - Utc::now()).to_std().unwrap_or_default());
                match (until_due, mode) {
                    (Some(wait), Mode::UntilDrained) => Some(wait),
                    (Some(wait), Mode::Forever) => Some(wait.min(IDLE_POLL)),
                    (None, _) => Some(IDLE_POLL),
                }
            };
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    let outcome = done.map_err(anyhow::Error::from).and_then(|result| result);
                    if let Err(error) = outcome {
                        failure.get_or_insert(error);
                    }
                }
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
                _ = shutdown.changed(), if !stopping => {}
            }
        }
    }

    /// Leases due deliveries until the channel's concurrency is used up or none is due.
    ///
    /// sled serves these reads and transactions from its page cache in microseconds, so they
    /// run on the worker's own thread; the one blocking call, the flush, runs on the
    /// group-commit thread.
    fn fill(
        self: &Arc<Self>,
        channel: &Arc<dyn Channel>,
        in_flight: &mut JoinSet<anyhow::Result<()>>,
        concurrency: usize,
    ) -> anyhow::Result<()> {
        while in_flight.len() < concurrency {
            let Some(delivery) = self
                .store
                .lease_next(channel.name(), Utc::now(), self.lease)?
            else {
                break;
            };
            in_flight.spawn(self.clone().attempt(channel.clone(), delivery));
        }
        Ok(())
    }

    fn load(&self, update: Ulid) -> anyhow::Result<Arc<(Update, Incident)>> {
        if let Some(found) = self.cache.lock().expect("cache lock").get(&update) {
            return Ok(found.clone());
        }
        let record = self.store.update(update)?;
        let incident = self.store.incident(record.incident)?;
        let loaded = Arc::new((record, incident));
        self.cache
            .lock()
            .expect("cache lock")
            .insert(update, loaded.clone());
        Ok(loaded)
    }

    /// One attempt at one leased delivery, with its outcome on disk before it returns. Only
    /// the store failing is an error; everything wrong with the delivery itself is an outcome.
    async fn attempt(
        self: Arc<Self>,
        channel: Arc<dyn Channel>,
        delivery: DeliveryRecord,
    ) -> anyhow::Result<()> {
        let now = Utc::now();
        let outcome = match self.prepare(channel.as_ref(), &delivery) {
            Err(error) => {
                tracing::error!(delivery = %delivery.key(), %error, "cannot prepare the message");
                Outcome::Dead {
                    error: format!("cannot prepare the message: {error:#}"),
                }
            }
            Ok(Err(skip)) => skip,
            Ok(Ok(message)) => self.send(channel.as_ref(), &delivery, &message).await?,
        };
        let (record, applied) = self.store.finish(&delivery, &outcome, now)?;
        // The outcome must be on disk before anyone counts it: a crash after this point cannot
        // cause this delivery to be sent again.
        self.store.commit().await?;
        if applied && record.state.is_final() {
            if let Some(finished) = &self.finished {
                let _ = finished.send(Finished {
                    update: record.update,
                    channel: record.channel.clone(),
                    state: record.state,
                });
            }
        }
        Ok(())
    }

    /// Sends within the channel's timeout and decides what the result means.
    async fn send(
        &self,
        channel: &dyn Channel,
        delivery: &DeliveryRecord,
        message: &crate::render::MessageContext,
    ) -> anyhow::Result<Outcome> {
        let limit = channel.policy().timeout + Duration::from_secs(1);
        let result = match tokio::time::timeout(limit, channel.deliver(message, delivery)).await {
            Ok(result) => result,
            Err(_) => Err(DeliveryError::transient(format!(
                "no answer within {}",
                humantime::format_duration(channel.policy().timeout)
            ))),
        };
        let Err(error) = result else {
            return Ok(Outcome::Sent);
        };
        if let DeliveryError::Gone { reason } = &error {
            tracing::warn!(channel = channel.name(), %reason, "endpoint is gone; disabling the channel");
            self.store
                .disable_channel(channel.name(), reason, Utc::now())?;
        }
        let outcome = retry::after_failure(
            channel.policy(),
            delivery,
            &error,
            Utc::now(),
            &mut rand::rng(),
        );
        tracing::debug!(delivery = %delivery.key(), %error, ?outcome, "attempt failed");
        Ok(outcome)
    }

    /// Builds the message for one delivery, or says why it should not go out after all.
    fn prepare(
        &self,
        channel: &dyn Channel,
        delivery: &DeliveryRecord,
    ) -> anyhow::Result<Result<crate::render::MessageContext, Outcome>> {
        if let Some(reason) = self.store.channel_disabled(channel.name())? {
            return Ok(Err(Outcome::Dead {
                error: format!("channel {} is {reason}", channel.name()),
            }));
        }
        let loaded = self.load(delivery.update)?;
        let (update, incident) = (&loaded.0, &loaded.1);
        if delivery.recipient == BROADCAST_RECIPIENT {
            return Ok(Ok(self.composer.message(
                update,
                incident,
                None,
                Utc::now(),
            )));
        }
        let contact = Contact::parse(&delivery.recipient)?;
        let Some(subscriber) = self.store.subscriber(&contact)? else {
            return Ok(Err(Outcome::Skipped {
                reason: "the subscriber no longer exists".into(),
            }));
        };
        if !subscriber.receives_updates() {
            return Ok(Err(Outcome::Skipped {
                reason: "the subscriber unsubscribed before it went out".into(),
            }));
        }
        let orders: Vec<_> = if delivery.orders.is_empty() {
            subscriber.orders.iter().cloned().collect()
        } else {
            delivery.orders.clone()
        };
        Ok(Ok(self.composer.message(
            update,
            incident,
            Some((&contact, &orders)),
            Utc::now(),
        )))
    }
}
