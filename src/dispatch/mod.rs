//! Dispatch: one worker per channel leases due deliveries in batches, sends them within the
//! channel's concurrency and rate, and records each outcome durably before counting it as
//! done. The dispatcher owns each channel's policy and its throttle; adapters only send.

pub mod plan;
pub mod retry;
/// One log line per attempt's outcome. The contact is masked, and neither the message nor
/// the provider's words are logged (a provider may echo the number or the text back).
fn log_outcome(channel: &str, delivery: &DeliveryRecord, outcome: &Outcome, applied: bool) {
    let recipient = match &delivery.recipient {
        Recipient::Broadcast => "-".to_owned(),
        Recipient::Contact(contact) => contact.masked(),
    };
    let (update, attempt) = (delivery.update.to_string(), delivery.attempts);
    let name = match outcome {
        Outcome::Sent { .. } => "sent",
        Outcome::Retry { .. } => "retry",
        Outcome::Dead { .. } => "dead",
        Outcome::Skipped { .. } => "skipped",
    };
    metrics::counter!("crier_delivery_outcomes_total", "channel" => channel.to_owned(), "outcome" => name)
        .increment(1);
    if matches!(outcome, Outcome::Retry { .. }) {
        metrics::counter!("crier_delivery_retries_total", "channel" => channel.to_owned())
            .increment(1);
    }
    match outcome {
        Outcome::Sent { .. } => {
            tracing::info!(%update, channel, recipient, attempt, applied, outcome = "sent", "delivery")
        }
        Outcome::Retry { at, failure, .. } => tracing::info!(
            %update,
            channel,
            recipient,
            attempt,
            applied,
            outcome = "retry",
            failure = ?failure.kind,
            status = failure.status,
            retry_at = %at,
            "delivery"
        ),
        Outcome::Dead { failure } => tracing::warn!(
            %update,
            channel,
            recipient,
            attempt,
            applied,
            outcome = "dead",
            failure = ?failure.kind,
            status = failure.status,
            "delivery"
        ),
        Outcome::Skipped { .. } => {
            tracing::info!(%update, channel, recipient, attempt, applied, outcome = "skipped", "delivery")
        }
    }
}

#[cfg(test)]
mod tests;

use crate::channel::{Attempt, ConfiguredChannel};
use crate::clock::{self, Clock};
use crate::config::Rate;
use crate::delivery::{
    DeliveryError, DeliveryRecord, DeliveryState, FailureKind, Outcome, Recipient,
};
use crate::domain::{Contact, Subscriber};
use crate::render::{Composer, MessageContext, MessageSource};
use crate::store::{Recorded, Store, StoreError};
use chrono::{DateTime, Utc};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use ulid::Ulid;

/// A delivery that reached a settled state, reported to whoever watches progress.
#[derive(Debug, Clone)]
pub struct Settled {
    pub update: Ulid,
    pub channel: String,
    pub state: DeliveryState,
}

/// Whether workers stop once their queue is empty, or wait for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver what is queued and wait out retries due within `patience`, then return
    /// (`send`, `dispatch`). Later retries stay queued for the next `crier dispatch`, so a
    /// provider asking for an hour's pause does not hold the store for an hour.
    UntilDrained { patience: Duration },
    /// Keep serving until shutdown (`serve`).
    Forever,
}

/// How long a worker first pauses when a shared store cannot be reached, and at most.
const FIRST_OUTAGE_PAUSE: Duration = Duration::from_millis(250);
const LONGEST_OUTAGE_PAUSE: Duration = Duration::from_secs(5);
/// How soon an outcome the store could not take is offered again.
const RECORD_AGAIN_AFTER: Duration = Duration::from_millis(500);

/// How many updates the dispatcher keeps in memory; a long-running process sends many.
const CACHED_UPDATES: usize = 256;

pub struct Dispatcher {
    store: Arc<dyn Store>,
    channels: Vec<ConfiguredChannel>,
    composer: Composer,
    lease: Duration,
    /// Recorded on every lease this process takes.
    owner: String,
    clock: Clock,
    settled: Option<mpsc::UnboundedSender<Settled>>,
    /// Updates are read once per run, not once per delivery; bounded by `CACHED_UPDATES`.
    cache: Mutex<HashMap<Ulid, Arc<MessageSource>>>,
    /// Per channel, when a provider's rate limit lets it send again.
    throttled_until: Mutex<HashMap<String, DateTime<Utc>>>,
    /// True while planning still queues deliveries: a drained queue is not the end yet.
    planning: watch::Receiver<bool>,
    /// Per channel with a `rate`, its limiter: a permit per attempt, taken before the lease.
    limiters: HashMap<String, Arc<DefaultDirectRateLimiter>>,
    /// The rate-limited channels whose rate gives permits in bursts (thousands a second).
    bursts: std::collections::HashSet<String>,
}

/// A leased delivery, with what its batch read about it when it was leased: whether its
/// channel is disabled, and its subscriber (for a delivery to a contact).
struct Leased {
    record: DeliveryRecord,
    disabled: Option<String>,
    subscriber: Option<Subscriber>,
}

/// What to do with one leased delivery.
enum Prepared {
    Send {
        message: Box<MessageContext>,
        thread: Option<serde_json::Value>,
    },
    Settle(Outcome),
}

/// A limiter per rate-limited channel: one permit every `period / count`, without bursts
/// beyond a millisecond's worth. Providers count their limits in windows ("300 per 5
/// minutes"); evenly spaced attempts keep under the limit in every window, where a burst of
/// `count` and then the steady pace would nearly double it in one. A rate of thousands a
/// second may take a millisecond's permits at once (at most a thousandth of its window more):
/// with none, the worker would get about one permit per look and lease one delivery at a
/// time, a store round trip per message.
fn channels_limiters(rates: &[(String, Rate)]) -> HashMap<String, Arc<DefaultDirectRateLimiter>> {
    rates
        .iter()
        .filter_map(|(id, rate)| {
            NonZeroU32::new(rate.count)?;
            let quota = Quota::with_period(rate.period / rate.count)?.allow_burst(burst_of(rate));
            Some((id.clone(), Arc::new(RateLimiter::direct(quota))))
        })
        .collect()
}

/// How many permits a rate gives at once: a millisecond's worth, at least one.
fn burst_of(rate: &Rate) -> NonZeroU32 {
    NonZeroU32::new(rate.burst()).unwrap_or(NonZeroU32::MIN)
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        channels: Vec<ConfiguredChannel>,
        composer: Composer,
        lease: Duration,
        owner: String,
    ) -> Self {
        let channels_rates: Vec<(String, Rate)> = channels
            .iter()
            .filter_map(|c| c.policy.rate.map(|rate| (c.id.clone(), rate)))
            .collect();
        Self {
            store,
            channels,
            composer,
            lease,
            owner,
            clock: Clock::System,
            settled: None,
            cache: Mutex::new(HashMap::new()),
            throttled_until: Mutex::new(HashMap::new()),
            planning: watch::channel(false).1,
            limiters: channels_limiters(&channels_rates),
            bursts: channels_rates
                .iter()
                .filter(|(_, rate)| burst_of(rate).get() > 1)
                .map(|(id, _)| id.clone())
                .collect(),
        }
    }

    /// Starts delivering while planning runs: until `planning` turns false, an empty queue
    /// means "wait for more", not "done".
    pub fn while_planning(mut self, planning: watch::Receiver<bool>) -> Self {
        self.planning = planning;
        self
    }

    /// Reads time from `clock` instead of the system's (tests drive it with tokio's time).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Reports every delivery that settles on `sender`.
    pub fn report_to(mut self, sender: mpsc::UnboundedSender<Settled>) -> Self {
        self.settled = Some(sender);
        self
    }

    /// Runs every channel's worker until the queue drains (or forever) or `shutdown` turns
    /// true. In-flight deliveries always finish and are recorded before this returns. Returns
    /// the earliest retry left queued for later, if any.
    pub async fn run(
        self: Arc<Self>,
        mode: Mode,
        shutdown: watch::Receiver<bool>,
    ) -> crate::Result<Option<DateTime<Utc>>> {
        let mut workers = JoinSet::new();
        for channel in self.channels.clone() {
            workers.spawn(self.clone().work(channel, mode, shutdown.clone()));
        }
        let reaper = tokio::spawn(self.clone().reap_expired_leases(shutdown.clone()));
        let mut first_error = None;
        let mut left_for_later: Option<DateTime<Utc>> = None;
        while let Some(result) = workers.join_next().await {
            match result.map_err(crate::Error::from).and_then(|r| r) {
                Ok(Some(due)) => {
                    left_for_later = Some(left_for_later.map_or(due, |d| d.min(due)));
                }
                Ok(None) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        reaper.abort();
        match first_error {
            Some(error) => Err(error),
            None => Ok(left_for_later),
        }
    }

    /// Puts deliveries whose lease ran out back in the queue, every quarter of a lease. Within
    /// one process an attempt ends long before its lease (the config enforces it), so this
    /// only catches a worker that is stuck beyond its own timeout, or a process that died.
    async fn reap_expired_leases(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = (self.lease / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            match self.store.requeue_expired(self.clock.now()).await {
                Ok(0) => {}
                Ok(requeued) => tracing::warn!(requeued, "expired leases went back to the queue"),
                Err(error) => tracing::error!(%error, "cannot requeue expired leases"),
            }
        }
    }

    fn throttled_until(&self, channel: &str) -> Option<DateTime<Utc>> {
        let throttles = self
            .throttled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        throttles.get(channel).copied()
    }

    fn throttle(&self, channel: &str, until: DateTime<Utc>) {
        let mut throttles = self
            .throttled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = throttles.entry(channel.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Whether a worker waits out this error instead of stopping on it: in `serve`, on a
    /// store other nodes share, a database that cannot be reached (restarting, failing over)
    /// pauses the work until it is back. The CLI stops at once and says why.
    fn rides_out(&self, mode: Mode, error: &crate::Error) -> bool {
        matches!(mode, Mode::Forever)
            && self.store.shared()
            && error.kind() == crate::error::ErrorKind::Unavailable
    }

    /// One channel's worker. Returns the due time of a retry it left queued for later.
    async fn work(
        self: Arc<Self>,
        channel: ConfiguredChannel,
        mode: Mode,
        mut shutdown: watch::Receiver<bool>,
    ) -> crate::Result<Option<DateTime<Utc>>> {
        let mut in_flight: JoinSet<crate::Result<()>> = JoinSet::new();
        // Leased ahead, waiting for a free slot (see `fill`).
        let mut ready: VecDeque<Leased> = VecDeque::new();
        let concurrency = channel.policy.concurrency;
        let mut queue_changes = self.store.queue_changes();
        let mut planning = self.planning.clone();
        // The store failing stops the leasing, never the attempts already under way: they
        // finish and are recorded, or their leases come back at the next start.
        let mut failure: Option<crate::Error> = None;
        // While a shared store is away (see `rides_out`), how long the worker last paused.
        let mut outage_pause: Option<Duration> = None;
        loop {
            let stopping = *shutdown.borrow() || failure.is_some();
            // Seen now, before looking at the queue: anything queued (or planning ending) from
            // here on wakes the wait below.
            queue_changes.borrow_and_update();
            // A planner that went away without saying it finished (it failed) plans no more.
            let still_planning = *planning.borrow_and_update() && planning.has_changed().is_ok();
            let now = self.clock.now();
            let throttled = self
                .throttled_until(&channel.id)
                .filter(|until| *until > now);
            let mut next_due = None;
            // Leases held ahead go back when the worker stops or the provider throttles: the
            // wait could outlast them.
            if (stopping || throttled.is_some())
                && !ready.is_empty()
                && let Err(error) = self.give_back(&mut ready, now).await
            {
                failure.get_or_insert(error);
            }
            if !stopping {
                let looked = match throttled {
                    None => {
                        self.fill(&channel, &mut in_flight, &mut ready, concurrency, now)
                            .await
                    }
                    Some(_) => Ok(()),
                };
                let looked = match looked {
                    // With every slot busy the worker waits for a slot, not for a due time:
                    // the answer would go unused, and asking cost a store call per attempt.
                    Ok(()) if in_flight.len() >= concurrency => Ok(None),
                    Ok(()) => self.store.next_due(&channel.id).await.map_err(Into::into),
                    Err(error) => Err(error),
                };
                match looked {
                    Ok(due) => {
                        next_due = due.map(|due| throttled.map_or(due, |t| due.max(t)));
                        outage_pause = None;
                    }
                    Err(error) if self.rides_out(mode, &error) => {
                        let pause = outage_pause.map_or(FIRST_OUTAGE_PAUSE, |p: Duration| {
                            (p * 2).min(LONGEST_OUTAGE_PAUSE)
                        });
                        outage_pause = Some(pause);
                        tracing::warn!(
                            channel = %channel.id,
                            %error,
                            "the store cannot be used; the worker pauses {} and tries again",
                            crate::render::duration_text(pause)
                        );
                        // What was leased ahead waits; `fill` leaves to expire any whose
                        // lease would run out before its attempt could end.
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                    Err(error) => {
                        failure = Some(error);
                        continue;
                    }
                }
            }
            let idle = in_flight.is_empty() && ready.is_empty();
            if idle && stopping {
                return failure.map_or(Ok(None), Err);
            }
            if idle
                && !still_planning
                && let Mode::UntilDrained { patience } = mode
            {
                match next_due {
                    None => return Ok(None),
                    Some(due) if clock::until(now, due) > patience => return Ok(Some(due)),
                    Some(_) => {}
                }
            }
            // Wake when a slot frees up, when the next delivery is due, when more is queued,
            // or on shutdown.
            let wait = if stopping || in_flight.len() >= concurrency {
                None
            } else {
                next_due.map(|due| clock::until(now, due))
            };
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    match done.map_err(crate::Error::from).and_then(|result| result) {
                        Ok(()) => {}
                        // The attempt could not record its outcome while the store was away:
                        // its lease expires and the delivery goes out again.
                        Err(error) if self.rides_out(mode, &error) => {}
                        Err(error) => {
                            failure.get_or_insert(error);
                        }
                    }
                }
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
                _ = queue_changes.changed(), if !stopping && in_flight.len() < concurrency => {}
                _ = planning.changed(), if !stopping && still_planning => {}
                _ = shutdown.changed(), if !stopping => {}
            }
        }
    }

    /// Starts attempts in the channel's free slots, from the deliveries leased ahead, leasing
    /// a new batch when none is left.
    ///
    /// Leasing is a store write: a batch of a whole concurrency's worth at a time, instead of
    /// one lease per freed slot, makes it one write per batch. Only when the lease outlasts two
    /// attempts back to back (a leased-ahead delivery waits for at most one attempt to end)
    /// does the worker lease ahead; otherwise it leases just what it can start.
    async fn fill(
        self: &Arc<Self>,
        channel: &ConfiguredChannel,
        in_flight: &mut JoinSet<crate::Result<()>>,
        ready: &mut VecDeque<Leased>,
        concurrency: usize,
        now: DateTime<Utc>,
    ) -> crate::Result<()> {
        let free = concurrency.saturating_sub(in_flight.len());
        if free == 0 {
            return Ok(());
        }
        let attempt_limit = channel.policy.timeout + Duration::from_secs(1);
        // A delivery leased ahead whose lease would run out before its attempt could end (the
        // worker waited out a store that was away, say) is left to expire: another worker
        // may hold it by then, and sending it here too would send it twice.
        let deadline = clock::after(now, attempt_limit);
        let (keep, stale): (Vec<Leased>, Vec<Leased>) =
            std::mem::take(ready).into_iter().partition(|leased| {
                leased
                    .record
                    .lease_until
                    .is_none_or(|until| until > deadline)
            });
        *ready = keep.into();
        if !stale.is_empty() {
            // Given back at once rather than left to expire (the lease counter fences it, should
            // another worker hold it already).
            let stale: Vec<DeliveryRecord> = stale.into_iter().map(|l| l.record).collect();
            if let Err(error) = self.store.give_back(&stale, now).await {
                tracing::warn!(channel = %channel.id, %error, "cannot give back stale leases; they expire");
            }
        }
        if ready.is_empty() {
            let mut batch = if self.lease >= attempt_limit * 2 {
                concurrency.max(free)
            } else {
                free
            };
            let shared_rate = channel.policy.rate.as_ref().filter(|_| self.store.shared());
            if shared_rate.is_some() {
                // Slots come from the store after the lease (below), for what was leased.
                if !self.bursts.contains(&channel.id) {
                    batch = batch.min(free);
                }
            } else if let Some(limiter) = self.limiters.get(&channel.id) {
                // A permit per delivery leased, taken before the lease, so no lease waits
                // for the rate. Permits left over when the queue runs dry are lost: the rate
                // is never exceeded, at worst underused once per drained queue. Only a rate
                // fast enough to give bursts (see `burst_of`) leases ahead of its free slots:
                // a slower one keeps its attempts evenly spaced.
                let ahead = if self.bursts.contains(&channel.id) {
                    batch
                } else {
                    batch.min(free)
                };
                let mut permits = 0;
                while permits < ahead {
                    match limiter.check() {
                        Ok(()) => permits += 1,
                        Err(not_until) => {
                            if permits == 0 {
                                let wait = not_until.wait_time_from(DefaultClock::default().now());
                                self.throttle(&channel.id, clock::after(now, wait));
                                return Ok(());
                            }
                            break;
                        }
                    }
                }
                batch = permits;
            }
            let mut leased = self
                .store
                .lease_due(&channel.id, &self.owner, batch, self.lease, now)
                .await?;
            if let Some(rate) = shared_rate
                && !leased.is_empty()
            {
                // Every node on a shared store takes its slots from the store, so the rate
                // holds for all of them together. Taken after leasing, so a worker that finds
                // nothing due (another node leased it) spends no slot; what the slots do not
                // cover goes back to the queue.
                let want = u32::try_from(leased.len()).unwrap_or(u32::MAX);
                let slots = self.store.take_slots(&channel.id, rate, want).await?;
                let granted = (slots.granted as usize).min(leased.len());
                if granted < leased.len() {
                    let extra = leased.split_off(granted);
                    self.store.give_back(&extra, now).await?;
                }
                if granted == 0 {
                    self.throttle(&channel.id, clock::after(now, slots.wait));
                    return Ok(());
                }
            }
            if !leased.is_empty() {
                ready.extend(self.read_for(channel, leased).await?);
            }
        }
        for _ in 0..free {
            let Some(delivery) = ready.pop_front() else {
                break;
            };
            in_flight.spawn(self.clone().attempt(channel.clone(), delivery));
        }
        Ok(())
    }

    /// Reads what a batch of leased deliveries needs from the store, in two calls for the
    /// whole batch rather than two per delivery.
    async fn read_for(
        &self,
        channel: &ConfiguredChannel,
        leased: Vec<DeliveryRecord>,
    ) -> Result<Vec<Leased>, StoreError> {
        let disabled = self.store.channel_disabled(&channel.id).await?;
        let contacts: Vec<Contact> = leased
            .iter()
            .filter_map(|record| record.recipient.contact().cloned())
            .collect();
        let mut subscribers = self.store.subscribers(&contacts).await?.into_iter();
        Ok(leased
            .into_iter()
            .map(|record| {
                let subscriber = match record.recipient {
                    Recipient::Broadcast => None,
                    Recipient::Contact(_) => subscribers.next().flatten(),
                };
                Leased {
                    record,
                    disabled: disabled.clone(),
                    subscriber,
                }
            })
            .collect())
    }

    /// Returns the deliveries leased ahead to the queue.
    async fn give_back(
        &self,
        ready: &mut VecDeque<Leased>,
        now: DateTime<Utc>,
    ) -> crate::Result<()> {
        let leased: Vec<DeliveryRecord> = ready.drain(..).map(|leased| leased.record).collect();
        self.store.give_back(&leased, now).await?;
        Ok(())
    }

    async fn source(&self, update: Ulid) -> Result<Arc<MessageSource>, StoreError> {
        if let Some(found) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&update)
        {
            return Ok(found.clone());
        }
        let record = self.store.update(update).await?;
        let incident = self.store.incident(record.incident).await?;
        let loaded = Arc::new(MessageSource {
            update: record,
            incident,
        });
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHED_UPDATES {
            // Reloading an update is one read: a simple bound is enough.
            cache.clear();
        }
        cache.insert(update, loaded.clone());
        Ok(loaded)
    }

    /// Records an attempt's outcome. On a shared store that cannot be reached just now, it
    /// tries again while the lease holds: the message went out, and recording it before the
    /// lease expires is what keeps another node from sending it again.
    async fn record_outcome(
        &self,
        delivery: &DeliveryRecord,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<Recorded, StoreError> {
        loop {
            match self.store.record_outcome(delivery, outcome, now).await {
                Err(error)
                    if error.kind() == crate::error::ErrorKind::Unavailable
                        && self.store.shared()
                        && delivery.lease_until.is_some_and(|until| {
                            clock::after(self.clock.now(), RECORD_AGAIN_AFTER) < until
                        }) =>
                {
                    tracing::warn!(delivery = %delivery.key(), %error, "cannot record the outcome yet; trying again");
                    tokio::time::sleep(RECORD_AGAIN_AFTER).await;
                }
                recorded => return recorded,
            }
        }
    }

    /// One attempt at one leased delivery, with its outcome on disk before it returns. Only
    /// the store failing is an error, and it leaves the delivery leased (it comes back to the
    /// queue when the lease is recovered): everything wrong with the delivery itself is an
    /// outcome.
    async fn attempt(
        self: Arc<Self>,
        channel: ConfiguredChannel,
        leased: Leased,
    ) -> crate::Result<()> {
        let delivery = &leased.record;
        let outcome = match self.prepare(&channel, &leased).await? {
            Prepared::Settle(outcome) => outcome,
            Prepared::Send { message, thread } => {
                self.send(&channel, delivery, &message, thread.as_ref())
                    .await
            }
        };
        // The attempt ends here: that is when it finished.
        let now = self.clock.now();
        let recorded = self.record_outcome(delivery, &outcome, now).await?;
        let record = &recorded.record;
        log_outcome(&channel.id, delivery, &outcome, recorded.applied);
        if recorded.applied
            && record.state.is_settled()
            && let Some(settled) = &self.settled
        {
            let _ = settled.send(Settled {
                update: record.update,
                channel: record.channel.clone(),
                state: record.state,
            });
        }
        Ok(())
    }

    /// Sends within the channel's timeout and decides what the result means.
    async fn send(
        &self,
        channel: &ConfiguredChannel,
        delivery: &DeliveryRecord,
        message: &MessageContext,
        thread: Option<&serde_json::Value>,
    ) -> Outcome {
        let key = delivery.key();
        let attempt = Attempt {
            key: &key,
            update: delivery.update,
            number: delivery.attempts,
            recipient: &delivery.recipient,
            thread,
        };
        let limit = channel.policy.timeout + Duration::from_secs(1);
        let started = std::time::Instant::now();
        let result =
            match tokio::time::timeout(limit, channel.adapter.deliver(message, &attempt)).await {
                Ok(result) => result,
                Err(_) => Err(DeliveryError::transient(format!(
                    "no answer within {}",
                    crate::render::duration_text(channel.policy.timeout)
                ))),
            };
        metrics::histogram!("crier_delivery_attempt_seconds", "channel" => channel.id.clone())
            .record(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(receipt) => return Outcome::Sent { receipt },
            Err(error) => error,
        };
        let now = self.clock.now();
        let outcome =
            retry::after_failure(&channel.policy, delivery, &error, now, &mut rand::rng());
        match (&error.kind, &outcome) {
            (FailureKind::Throttled, Outcome::Retry { at, .. }) => {
                tracing::warn!(channel = %channel.id, until = %at, "the provider throttles the channel; every worker waits");
                self.throttle(&channel.id, *at);
            }
            (FailureKind::EndpointGone, _) => {
                tracing::warn!(channel = %channel.id, reason = %error.reason, "endpoint is gone; disabling the channel");
            }
            _ => {}
        }
        outcome
    }

    /// Builds the message for one delivery, or says why it should not go out after all.
    async fn prepare(
        &self,
        channel: &ConfiguredChannel,
        leased: &Leased,
    ) -> Result<Prepared, StoreError> {
        let delivery = &leased.record;
        if let Some(reason) = &leased.disabled {
            return Ok(Prepared::Settle(Outcome::Dead {
                failure: DeliveryError::permanent(format!("channel {} is {reason}", channel.id)),
            }));
        }
        let source = self.source(delivery.update).await?;
        let now = self.clock.now();
        let contact = match &delivery.recipient {
            Recipient::Broadcast => {
                // Read afresh: an earlier delivery of this incident may just have started the
                // thread this one replies to.
                let incident = self.store.incident(source.update.incident).await?;
                let thread = incident.remote_threads.get(&channel.id).cloned();
                let message = Box::new(self.composer.message(&source, None, now));
                return Ok(Prepared::Send { message, thread });
            }
            Recipient::Contact(contact) => contact,
        };
        let Some(subscriber) = &leased.subscriber else {
            return Ok(Prepared::Settle(Outcome::Skipped {
                reason: "the subscriber no longer exists".into(),
            }));
        };
        if !subscriber.receives_on(&channel.id) {
            return Ok(Prepared::Settle(Outcome::Skipped {
                reason: "the subscriber stopped receiving these before it went out".into(),
            }));
        }
        // What it follows may have changed since planning: name only what it still receives.
        let orders: Vec<_> = if delivery.orders.is_empty() {
            subscriber.confirmed_orders().into_iter().collect()
        } else {
            let still: Vec<_> = delivery
                .orders
                .iter()
                .filter(|o| subscriber.receives(o))
                .cloned()
                .collect();
            if still.is_empty() {
                return Ok(Prepared::Settle(Outcome::Skipped {
                    reason: "the subscriber stopped following the order before it went out".into(),
                }));
            }
            still
        };
        let message = self
            .composer
            .message(&source, Some((contact, &orders)), now);
        Ok(Prepared::Send {
            message: Box::new(message),
            thread: None,
        })
    }
}
