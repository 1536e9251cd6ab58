//! The in-memory store: subscribers and their order index, incidents, updates, plans and the
//! delivery outbox, in `BTreeMap`s behind one mutex, with the same semantics as the sled
//! backend. Nothing outlives the process, so a change is as durable as it will ever be the
//! moment it is made; the dispatcher tests use it.

use super::{
    Cursor, DeliveryFilter, FollowChange, Followed, FormRequest, IdempotentAnswer, Page, PlanState,
    Recorded, Store, StoreError, Subscribed, Subscription, apply_report, apply_subscription,
};
use crate::clock;
use crate::delivery::{
    Counts, DeliveryKey, DeliveryRecord, DeliveryState, FailureKind, Outcome, ProviderReport,
};
use crate::domain::{Audience, Contact, FollowVia, Incident, OrderNumber, Subscriber, Update};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use ulid::Ulid;

/// Every record in memory. Each method takes the lock once, does its work without awaiting and
/// lets go, so every change is atomic and none blocks a worker for long.
pub struct MemoryStore {
    state: Mutex<State>,
    queue_changes: watch::Sender<u64>,
    /// When set, reading an update or a subscriber fails as an unreachable database would.
    reads_fail: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            queue_changes: watch::Sender::new(0),
            reads_fail: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes reads of updates and subscribers fail from now on, so a test can show what a
    /// store failure does to the work in flight.
    pub fn fail_reads(&self) {
        self.reads_fail
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_reads(&self) -> Result<(), StoreError> {
        if self.reads_fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                place: "memory".into(),
                reason: "reads are failing (as asked by a test)".into(),
            });
        }
        Ok(())
    }

    /// Runs `change` under the lock, then ticks `queue_changes` if it queued anything.
    fn with<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let (result, queued) = {
            // Nothing in a critical section panics on input, so a poisoned lock still guards
            // consistent records.
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let result = change(&mut state);
            (result, std::mem::take(&mut state.queued))
        };
        if queued {
            self.queue_changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        result
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a channel is disabled.
#[derive(Debug, Clone)]
struct Disabled {
    since: DateTime<Utc>,
    reason: String,
}

#[derive(Default)]
struct State {
    /// By contact string.
    subscribers: BTreeMap<String, Subscriber>,
    /// (order, contact) for every order a subscriber follows.
    order_index: BTreeSet<(OrderNumber, String)>,
    subscriber_count: u64,
    incidents: BTreeMap<Ulid, Incident>,
    updates: BTreeMap<Ulid, Update>,
    plans: BTreeMap<Ulid, PlanState>,
    /// Every delivery, by its key.
    deliveries: BTreeMap<String, DeliveryRecord>,
    /// Per channel, the queued (and retrying) deliveries by (due time, key).
    queue: BTreeMap<String, BTreeSet<(DateTime<Utc>, String)>>,
    /// Deliveries in flight, by (lease deadline, key).
    leases: BTreeSet<(DateTime<Utc>, String)>,
    /// Keys of dead letters.
    dead: BTreeSet<String>,
    /// Deliveries per state, per (update, channel), moved with every change of state.
    counts: BTreeMap<(Ulid, String), Counts>,
    disabled: BTreeMap<String, Disabled>,
    idempotent_answers: BTreeMap<String, IdempotentAnswer>,
    alerts: BTreeMap<String, DateTime<Utc>>,
    /// Set when a delivery was queued during the current change.
    queued: bool,
}

/// Separates the order from the contact in a follower cursor; neither contains a NUL.
const CURSOR_SEPARATOR: u8 = 0;

fn foreign_cursor() -> StoreError {
    StoreError::Corrupt("a cursor this store did not make".into())
}

fn cursor_text(cursor: &Cursor) -> Result<&str, StoreError> {
    std::str::from_utf8(cursor.as_bytes()).map_err(|_| foreign_cursor())
}

fn follower_cursor(order: &OrderNumber, contact: &str) -> Cursor {
    let mut bytes = order.as_str().as_bytes().to_vec();
    bytes.push(CURSOR_SEPARATOR);
    bytes.extend_from_slice(contact.as_bytes());
    Cursor::from_bytes(bytes)
}

/// The (order, contact) a follower cursor stands for.
fn parse_follower_cursor(cursor: &Cursor) -> Result<(&str, &str), StoreError> {
    let bytes = cursor.as_bytes();
    let split = bytes
        .iter()
        .position(|&b| b == CURSOR_SEPARATOR)
        .ok_or_else(foreign_cursor)?;
    let order = std::str::from_utf8(&bytes[..split]).map_err(|_| foreign_cursor())?;
    let contact = std::str::from_utf8(&bytes[split + 1..]).map_err(|_| foreign_cursor())?;
    Ok((order, contact))
}

fn page_of<T>(items: Vec<(Cursor, T)>) -> Page<T> {
    let next = items.last().map(|(cursor, _)| cursor.clone());
    Page {
        items: items.into_iter().map(|(_, item)| item).collect(),
        next,
    }
}

impl State {
    // ---- subscribers --------------------------------------------------------------------------

    /// Stores `after` in place of the contact's record, keeping the order index and the
    /// count in step.
    fn write_subscriber(&mut self, after: Subscriber) {
        let key = after.contact.as_str().to_owned();
        let before = self.subscribers.get(&key);
        if before.is_none() {
            self.subscriber_count = self.subscriber_count.saturating_add(1);
        }
        let gone: Vec<OrderNumber> = before
            .map(|b| {
                b.follows
                    .keys()
                    .filter(|o| !after.follows.contains_key(*o))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for order in gone {
            self.order_index.remove(&(order, key.clone()));
        }
        for order in after.follows.keys() {
            self.order_index.insert((order.clone(), key.clone()));
        }
        self.subscribers.insert(key, after);
    }

    fn change_follows(
        &mut self,
        contact: &Contact,
        change: &FollowChange,
        now: DateTime<Utc>,
    ) -> Result<Followed, StoreError> {
        let existing = self.subscribers.get(contact.as_str()).cloned();
        let followed = change.apply(existing, contact, now)?;
        self.write_subscriber(followed.subscriber.clone());
        Ok(followed)
    }

    fn everyone_page(
        &self,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError> {
        let start = match after {
            Some(cursor) => Bound::Excluded(cursor_text(cursor)?),
            None => Bound::Unbounded,
        };
        let items = self
            .subscribers
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(contact, subscriber)| {
                let cursor = Cursor::from_bytes(contact.as_bytes().to_vec());
                (cursor, subscriber.clone())
            })
            .collect();
        Ok(page_of(items))
    }

    /// Walks the order index order by order, one entry per (order, follower).
    fn followers_page(
        &self,
        orders: &BTreeSet<OrderNumber>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError> {
        let after = after.map(parse_follower_cursor).transpose()?;
        let mut found = Vec::new();
        if limit == 0 {
            return Ok(page_of(found));
        }
        for order in orders {
            let start = match after {
                Some((last_order, contact)) if last_order == order.as_str() => {
                    Bound::Excluded((order.clone(), contact.to_owned()))
                }
                Some((last_order, _)) if last_order > order.as_str() => continue,
                _ => Bound::Included((order.clone(), String::new())),
            };
            for (followed, contact) in self.order_index.range((start, Bound::Unbounded)) {
                if followed != order {
                    break;
                }
                if let Some(subscriber) = self.subscribers.get(contact) {
                    found.push((follower_cursor(order, contact), subscriber.clone()));
                    if found.len() == limit {
                        return Ok(page_of(found));
                    }
                }
            }
        }
        Ok(page_of(found))
    }

    // ---- incidents and updates ----------------------------------------------------------------

    fn accept_update(
        &mut self,
        update: &Update,
        new_incident: Option<&Incident>,
    ) -> Result<Incident, StoreError> {
        let mut incident = match (self.incidents.get(&update.incident), new_incident) {
            (Some(existing), _) => existing.clone(),
            (None, Some(new)) => new.clone(),
            (None, None) => return Err(StoreError::UnknownIncident(update.incident)),
        };
        incident.state = update.state;
        incident.updated_at = update.created_at;
        incident.updates.push(update.id);
        self.incidents.insert(update.incident, incident.clone());
        self.updates.insert(update.id, update.clone());
        self.plans.insert(update.id, PlanState::default());
        Ok(incident)
    }

    // ---- the outbox ---------------------------------------------------------------------------

    /// Takes a record out of the queue, lease or dead letters it sits in, by its stored state.
    fn unlink(&mut self, record: &DeliveryRecord) {
        let key = record.key().as_str().to_owned();
        match record.state {
            DeliveryState::Queued | DeliveryState::Retrying => {
                if let Some(queue) = self.queue.get_mut(&record.channel) {
                    queue.remove(&(record.due_at, key));
                    if queue.is_empty() {
                        self.queue.remove(&record.channel);
                    }
                }
            }
            DeliveryState::InFlight => {
                if let Some(deadline) = record.lease_until {
                    self.leases.remove(&(deadline, key));
                }
            }
            DeliveryState::Dead => {
                self.dead.remove(&key);
            }
            DeliveryState::Sent | DeliveryState::Skipped => {}
        }
    }

    /// Stores a record, files it where its state says, and moves its count from `from`.
    fn put(&mut self, record: DeliveryRecord, from: Option<DeliveryState>) {
        let key = record.key().as_str().to_owned();
        match record.state {
            DeliveryState::Queued | DeliveryState::Retrying => {
                self.queue
                    .entry(record.channel.clone())
                    .or_default()
                    .insert((record.due_at, key.clone()));
                self.queued = true;
            }
            DeliveryState::InFlight => {
                if let Some(deadline) = record.lease_until {
                    self.leases.insert((deadline, key.clone()));
                }
            }
            DeliveryState::Dead => {
                self.dead.insert(key.clone());
            }
            DeliveryState::Sent | DeliveryState::Skipped => {}
        }
        self.counts
            .entry((record.update, record.channel.clone()))
            .or_default()
            .moved(from, record.state);
        self.deliveries.insert(key, record);
    }

    fn enqueue_planned(
        &mut self,
        update: Ulid,
        records: &[DeliveryRecord],
        state: &PlanState,
    ) -> usize {
        let mut added = 0;
        for record in records {
            if !self.deliveries.contains_key(record.key().as_str()) {
                self.put(record.clone(), None);
                added += 1;
            }
        }
        self.plans.insert(update, state.clone());
        added
    }

    fn lease_due(
        &mut self,
        channel: &str,
        owner: &str,
        max: usize,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Vec<DeliveryRecord> {
        let due: Vec<String> = self
            .queue
            .get(channel)
            .into_iter()
            .flatten()
            .take_while(|(due_at, _)| *due_at <= now)
            .take(max)
            .map(|(_, key)| key.clone())
            .collect();
        let lease_until = clock::after(now, lease);
        let mut leased = Vec::with_capacity(due.len());
        for key in due {
            let Some(mut record) = self.deliveries.get(&key).cloned() else {
                continue;
            };
            let from = record.state;
            self.unlink(&record);
            record.lease(owner, lease_until);
            self.put(record.clone(), Some(from));
            leased.push(record);
        }
        leased
    }

    fn record_outcome(
        &mut self,
        leased: &DeliveryRecord,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<Recorded, StoreError> {
        let key = leased.key();
        // Read afresh: if the lease expired meanwhile, the record went back to the queue (or to
        // another attempt), and that must be undone on success, or it would be sent again.
        let Some(mut record) = self.deliveries.get(key.as_str()).cloned() else {
            return Err(StoreError::Corrupt(format!("delivery {key} vanished")));
        };
        let superseded = record.leases != leased.leases || record.state.is_settled();
        let succeeded = matches!(outcome, Outcome::Sent { .. });
        if record.state == DeliveryState::Sent || (superseded && !succeeded) {
            return Ok(Recorded {
                record,
                applied: false,
            });
        }
        let from = record.state;
        self.unlink(&record);
        record.apply(outcome, now);
        self.put(record.clone(), Some(from));
        match outcome {
            Outcome::Sent { receipt } => {
                if let Some(thread) = &receipt.thread {
                    self.keep_thread(&record, thread.clone());
                }
            }
            Outcome::Dead { failure } => match failure.kind {
                FailureKind::RecipientGone => {
                    if let Some(subscriber) = record
                        .recipient
                        .contact()
                        .and_then(|contact| self.subscribers.get_mut(contact.as_str()))
                    {
                        subscriber.stopped_on.insert(record.channel.clone());
                        subscriber.updated_at = now;
                    }
                }
                FailureKind::EndpointGone => {
                    self.disabled.insert(
                        record.channel.clone(),
                        Disabled {
                            since: now,
                            reason: failure.reason.clone(),
                        },
                    );
                }
                FailureKind::Transient | FailureKind::Throttled | FailureKind::Permanent => {}
            },
            Outcome::Retry { .. } | Outcome::Skipped { .. } => {}
        }
        Ok(Recorded {
            record,
            applied: true,
        })
    }

    /// Stores the remote thread a receipt named on the incident of the record's update.
    fn keep_thread(&mut self, record: &DeliveryRecord, thread: serde_json::Value) {
        let incident = self
            .updates
            .get(&record.update)
            .and_then(|update| self.incidents.get_mut(&update.incident));
        match incident {
            Some(incident) => {
                incident
                    .remote_threads
                    .insert(record.channel.clone(), thread);
            }
            None => tracing::warn!(
                delivery = %record.key(),
                "the receipt names a thread, but the delivery's update has no incident to keep it on"
            ),
        }
    }

    /// Puts back in the queue, due at `now`, the leases expired by `now` and those `orphaned`
    /// says no live worker holds.
    fn requeue_leases(
        &mut self,
        now: DateTime<Utc>,
        orphaned: impl Fn(&DeliveryRecord) -> bool,
    ) -> usize {
        let taken: Vec<String> = self
            .leases
            .iter()
            .filter(|(deadline, key)| {
                *deadline <= now || self.deliveries.get(key).is_some_and(&orphaned)
            })
            .map(|(_, key)| key.clone())
            .collect();
        let mut requeued = 0;
        for key in taken {
            let Some(mut record) = self.deliveries.get(&key).cloned() else {
                continue;
            };
            let from = record.state;
            self.unlink(&record);
            record.release(now);
            self.put(record, Some(from));
            requeued += 1;
        }
        requeued
    }

    fn requeue_dead(&mut self, update: Option<Ulid>, now: DateTime<Utc>) -> Vec<DeliveryRecord> {
        let prefix = update.map(|id| format!("{id}/")).unwrap_or_default();
        let keys: Vec<String> = self
            .dead
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .take_while(|key| key.starts_with(&prefix))
            .cloned()
            .collect();
        let mut requeued = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(mut record) = self.deliveries.get(&key).cloned() else {
                continue;
            };
            let from = record.state;
            self.unlink(&record);
            record.revive(now);
            self.put(record.clone(), Some(from));
            requeued.push(record);
        }
        requeued
    }

    fn deliveries(
        &self,
        update: Ulid,
        filter: DeliveryFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<DeliveryRecord>, StoreError> {
        let prefix = format!("{update}/");
        let start = match after {
            Some(cursor) => {
                let last = cursor_text(cursor)?;
                if last < prefix.as_str() {
                    Bound::Included(prefix.as_str())
                } else {
                    Bound::Excluded(last)
                }
            }
            None => Bound::Included(prefix.as_str()),
        };
        let items = self
            .deliveries
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(&prefix))
            .filter(|(_, record)| match filter {
                DeliveryFilter::All => true,
                DeliveryFilter::Failed => {
                    matches!(record.state, DeliveryState::Dead | DeliveryState::Retrying)
                }
            })
            .take(limit)
            .map(|(key, record)| (Cursor::from_bytes(key.as_bytes().to_vec()), record.clone()))
            .collect();
        Ok(page_of(items))
    }

    fn counts(&self, update: Option<Ulid>) -> BTreeMap<String, Counts> {
        let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
        for ((of, channel), channel_counts) in &self.counts {
            if update.is_none_or(|id| id == *of) {
                counts
                    .entry(channel.clone())
                    .or_default()
                    .add(channel_counts);
            }
        }
        counts
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    // ---- subscribers ----------------------------------------------------------------------

    async fn subscriber(&self, contact: &Contact) -> Result<Option<Subscriber>, StoreError> {
        self.check_reads()?;
        Ok(self.with(|state| state.subscribers.get(contact.as_str()).cloned()))
    }

    async fn subscribers(
        &self,
        contacts: &[Contact],
    ) -> Result<Vec<Option<Subscriber>>, StoreError> {
        self.check_reads()?;
        Ok(self.with(|state| {
            contacts
                .iter()
                .map(|contact| state.subscribers.get(contact.as_str()).cloned())
                .collect()
        }))
    }

    async fn change_follows(
        &self,
        contact: &Contact,
        change: &FollowChange,
        now: DateTime<Utc>,
    ) -> Result<Followed, StoreError> {
        self.with(|state| state.change_follows(contact, change, now))
    }

    async fn request_subscription(
        &self,
        contact: &Contact,
        order: &OrderNumber,
        channel: &str,
        now: DateTime<Utc>,
    ) -> Result<FormRequest, StoreError> {
        self.with(|state| {
            let existing = state.subscribers.get(contact.as_str()).cloned();
            let (request, store) = FormRequest::decide(existing.as_ref(), order, channel);
            if store {
                let change = FollowChange::Follow {
                    order: order.clone(),
                    confirmed: false,
                    via: FollowVia::Form,
                };
                state.change_follows(contact, &change, now)?;
            }
            Ok(request)
        })
    }

    async fn subscribe_batch(
        &self,
        rows: &[Subscription],
        now: DateTime<Utc>,
    ) -> Result<Vec<Subscribed>, StoreError> {
        Ok(self.with(|state| {
            rows.iter()
                .map(|row| {
                    let existing = state.subscribers.get(row.contact.as_str()).cloned();
                    let (write, outcome) = apply_subscription(existing, row, now);
                    if let Some(subscriber) = write {
                        state.write_subscriber(subscriber);
                    }
                    outcome
                })
                .collect()
        }))
    }

    async fn subscriber_page(
        &self,
        audience: &Audience,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError> {
        self.with(|state| match audience {
            Audience::Everyone => state.everyone_page(after, limit),
            Audience::Orders(orders) => state.followers_page(orders, after, limit),
        })
    }

    async fn subscriber_count(&self) -> Result<u64, StoreError> {
        Ok(self.with(|state| state.subscriber_count))
    }

    // ---- incidents and updates ------------------------------------------------------------

    async fn incident(&self, id: Ulid) -> Result<Incident, StoreError> {
        self.with(|state| state.incidents.get(&id).cloned())
            .ok_or(StoreError::UnknownIncident(id))
    }

    async fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        let mut incidents: Vec<Incident> =
            self.with(|state| state.incidents.values().cloned().collect());
        incidents.sort_by_key(|incident| std::cmp::Reverse((incident.updated_at, incident.id)));
        Ok(incidents)
    }

    async fn update(&self, id: Ulid) -> Result<Update, StoreError> {
        self.check_reads()?;
        self.with(|state| state.updates.get(&id).cloned())
            .ok_or(StoreError::UnknownUpdate(id))
    }

    async fn recent_updates(&self, limit: usize) -> Result<Vec<Update>, StoreError> {
        Ok(self.with(|state| state.updates.values().rev().take(limit).cloned().collect()))
    }

    async fn accept_update(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
    ) -> Result<Incident, StoreError> {
        self.with(|state| state.accept_update(update, new_incident))
    }

    async fn accept_update_once(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
        answer: &IdempotentAnswer,
    ) -> Result<Option<IdempotentAnswer>, StoreError> {
        self.with(|state| {
            if let Some(earlier) = state.idempotent_answers.get(&answer.key) {
                return Ok(Some(earlier.clone()));
            }
            state.accept_update(update, new_incident)?;
            state
                .idempotent_answers
                .insert(answer.key.clone(), answer.clone());
            Ok(None)
        })
    }

    async fn idempotent_answer(&self, key: &str) -> Result<Option<IdempotentAnswer>, StoreError> {
        Ok(self.with(|state| state.idempotent_answers.get(key).cloned()))
    }

    // ---- planning -------------------------------------------------------------------------

    async fn plan_state(&self, update: Ulid) -> Result<PlanState, StoreError> {
        self.with(|state| state.plans.get(&update).cloned())
            .ok_or(StoreError::UnknownUpdate(update))
    }

    async fn unfinished_plans(&self) -> Result<Vec<Ulid>, StoreError> {
        Ok(self.with(|state| {
            state
                .plans
                .iter()
                .filter(|(_, plan)| !plan.done)
                .map(|(id, _)| *id)
                .collect()
        }))
    }

    async fn enqueue_planned(
        &self,
        update: Ulid,
        records: &[DeliveryRecord],
        plan: &PlanState,
    ) -> Result<usize, StoreError> {
        Ok(self.with(|state| state.enqueue_planned(update, records, plan)))
    }

    // ---- the outbox -----------------------------------------------------------------------

    async fn next_due(&self, channel: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.with(|state| {
            state
                .queue
                .get(channel)
                .and_then(|queue| queue.first())
                .map(|(due_at, _)| *due_at)
        }))
    }

    async fn lease_due(
        &self,
        channel: &str,
        owner: &str,
        max: usize,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        Ok(self.with(|state| state.lease_due(channel, owner, max, lease, now)))
    }

    async fn record_outcome(
        &self,
        leased: &DeliveryRecord,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<Recorded, StoreError> {
        self.with(|state| state.record_outcome(leased, outcome, now))
    }

    async fn give_back(
        &self,
        leased: &[DeliveryRecord],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        Ok(self.with(|state| {
            let mut given = 0;
            for lease in leased {
                let Some(mut record) = state.deliveries.get(lease.key().as_str()).cloned() else {
                    continue;
                };
                if record.state != DeliveryState::InFlight || record.leases != lease.leases {
                    continue;
                }
                let from = record.state;
                state.unlink(&record);
                record.give_back(now);
                state.put(record, Some(from));
                given += 1;
            }
            given
        }))
    }

    async fn prune_settled(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        Ok(self.with(|state| {
            let old: Vec<Ulid> = state
                .updates
                .values()
                .filter(|update| update.created_at < before)
                .map(|update| update.id)
                .collect();
            let mut forgotten = 0;
            for update in old {
                let prefix = format!("{update}/");
                let keys: Vec<String> = state
                    .deliveries
                    .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                    .take_while(|(key, _)| key.starts_with(&prefix))
                    .filter(|(_, record)| super::forgettable(record))
                    .map(|(key, _)| key.clone())
                    .take(limit - forgotten)
                    .collect();
                for key in keys {
                    state.deliveries.remove(&key);
                    forgotten += 1;
                }
                if forgotten >= limit {
                    break;
                }
            }
            forgotten
        }))
    }

    async fn requeue_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        Ok(self.with(|state| state.requeue_leases(now, |_| false)))
    }

    async fn recover_orphaned(&self, owner: &str, now: DateTime<Utc>) -> Result<usize, StoreError> {
        // One process holds a memory store, so a lease another owner holds is a dead worker's.
        Ok(self.with(|state| {
            state.requeue_leases(now, |record| record.owner.as_deref() != Some(owner))
        }))
    }

    async fn requeue_dead(
        &self,
        update: Option<Ulid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        Ok(self.with(|state| state.requeue_dead(update, now)))
    }

    async fn delivery(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        Ok(self.with(|state| state.deliveries.get(key.as_str()).cloned()))
    }

    async fn record_report(
        &self,
        key: &DeliveryKey,
        provider_id: Option<&str>,
        report: &ProviderReport,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        Ok(self.with(|state| {
            let mut record = state.deliveries.get(key.as_str())?.clone();
            let contact = record.recipient.contact().map(|c| c.as_str().to_owned());
            let mut subscriber = contact
                .as_ref()
                .and_then(|contact| state.subscribers.get(contact).cloned());
            if !apply_report(&mut record, subscriber.as_mut(), provider_id, report) {
                return None;
            }
            state
                .deliveries
                .insert(key.as_str().to_owned(), record.clone());
            if let (Some(contact), Some(subscriber)) = (contact, subscriber) {
                state.subscribers.insert(contact, subscriber);
            }
            Some(record)
        }))
    }

    async fn deliveries(
        &self,
        update: Ulid,
        filter: DeliveryFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<DeliveryRecord>, StoreError> {
        self.with(|state| state.deliveries(update, filter, after, limit))
    }

    async fn counts(&self, update: Option<Ulid>) -> Result<BTreeMap<String, Counts>, StoreError> {
        Ok(self.with(|state| state.counts(update)))
    }

    // ---- channels -------------------------------------------------------------------------

    async fn channel_disabled(&self, channel: &str) -> Result<Option<String>, StoreError> {
        Ok(self.with(|state| {
            state.disabled.get(channel).map(|disabled| {
                format!(
                    "disabled since {}: {}",
                    disabled.since.to_rfc3339(),
                    disabled.reason
                )
            })
        }))
    }

    async fn enable_channel(&self, channel: &str) -> Result<bool, StoreError> {
        Ok(self.with(|state| state.disabled.remove(channel).is_some()))
    }

    async fn alert_sent(&self, key: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.with(|state| state.alerts.get(key).copied()))
    }

    async fn record_alert(&self, key: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.with(|state| state.alerts.insert(key.to_owned(), at));
        Ok(())
    }

    fn queue_changes(&self) -> watch::Receiver<u64> {
        self.queue_changes.subscribe()
    }
}
