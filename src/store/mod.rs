//! The store interface: everything above this module reads and writes through [`Store`], and
//! no module outside it knows which backend it has (the embedded sled one, or the in-memory one
//! the dispatcher tests use).
//!
//! Two rules hold for every backend:
//!
//! - **Durability.** A method that changes state returns only once the change is durable: an
//!   id shown to a user, an outcome counted, a subscription confirmed survives `kill -9`. Callers
//!   never flush. The sled backend shares one flush among concurrent writers (group commit).
//! - **No blocking.** Store methods are `async` and never block a tokio worker thread: a backend
//!   whose calls block (sled's reads, transactions and fsync) runs them on the blocking pool.
//!
//! Cursors are opaque: callers keep them and hand them back, never look inside.

mod memory;
mod postgres;
mod sled;

#[cfg(test)]
mod conformance;

pub use memory::MemoryStore;
#[cfg(test)]
pub(crate) use postgres::test_server;
pub use postgres::{Copied, PostgresStore};
pub use sled::SledStore;

use crate::config::{Rate, StoreBackend, StoreSettings};
use crate::delivery::{
    Counts, DeliveryKey, DeliveryRecord, DeliveryState, Outcome, ProviderReport, ReportedOutcome,
};
use crate::domain::{
    Audience, Contact, FollowState, FollowVia, Incident, OrderNumber, Subscriber, Update,
};
use crate::error::ErrorKind;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use ulid::Ulid;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {} is held by another crier process: a crier serve already delivers what is queued and takes every other command through its admin API, so none needs to run beside it; another command holds it only until it finishes", .0.display())]
    Locked(PathBuf),
    /// The backend cannot read or write: a full disk, a permission, a broken connection.
    #[error("the store at {place} cannot be used: {reason}")]
    Unavailable { place: String, reason: String },
    /// The backend refused a change for a reason waiting will not cure (a value it cannot
    /// hold, a broken constraint): a bug, not an outage.
    #[error("the store at {place} refused a change: {reason}")]
    Refused { place: String, reason: String },
    #[error(
        "the store holds a record it cannot read ({0}); was it written by another version of crier?"
    )]
    Corrupt(String),
    #[error("no incident has the id {0}")]
    UnknownIncident(Ulid),
    #[error("no update has the id {0}")]
    UnknownUpdate(Ulid),
    #[error("no subscriber has the contact {0}")]
    UnknownSubscriber(String),
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Locked(_) => ErrorKind::Conflict,
            StoreError::Unavailable { .. } => ErrorKind::Unavailable,
            StoreError::Corrupt(_) | StoreError::Refused { .. } => ErrorKind::Internal,
            StoreError::UnknownIncident(_)
            | StoreError::UnknownUpdate(_)
            | StoreError::UnknownSubscriber(_) => ErrorKind::NotFound,
        }
    }
}

/// Where a walk over many records stopped; hand it back to continue after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(Vec<u8>);

impl Cursor {
    pub(crate) fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Some records, and the cursor of the last one (none when the page is empty).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

/// Where planning an update has got to; kept so a crash while planning resumes, not restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanState {
    /// The last subscriber planned.
    pub cursor: Option<Cursor>,
    pub broadcast_planned: bool,
    pub done: bool,
}

/// What the subscribe form's request for one contact came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormRequest {
    /// Stored as a pending follower (or, already confirmed, left as it is until the link is
    /// followed): send it a confirm link.
    AskToConfirm,
    /// It already follows the order, confirmed: nothing to send.
    AlreadyFollowing,
    /// A form anyone can fill in must not message it: a phone that unsubscribed (only a
    /// support link brings it back), or a contact stopped on the channel.
    MustNotMessage,
}

impl FormRequest {
    /// How every backend decides a form's request: what it comes to, and whether the contact
    /// is stored as a pending follower of the order.
    pub fn decide(
        existing: Option<&Subscriber>,
        order: &OrderNumber,
        channel: &str,
    ) -> (Self, bool) {
        let Some(subscriber) = existing else {
            return (FormRequest::AskToConfirm, true);
        };
        let phone = matches!(subscriber.contact, Contact::Phone(_));
        if (phone && subscriber.opted_out()) || subscriber.stopped_on.contains(channel) {
            return (FormRequest::MustNotMessage, false);
        }
        match subscriber.follow_of(order).map(|f| f.state) {
            Some(FollowState::Confirmed) => (FormRequest::AlreadyFollowing, false),
            Some(FollowState::Pending) => (FormRequest::AskToConfirm, true),
            // A form anyone can fill in may not pile orders onto one contact: each waits for
            // its own confirmation, but each would be one more message to it.
            _ if subscriber.pending_count() >= FORM_PENDING_ORDERS => {
                (FormRequest::MustNotMessage, false)
            }
            _ => (FormRequest::AskToConfirm, true),
        }
    }
}

/// The most orders a pending contact may be given through the subscribe form.
pub const FORM_PENDING_ORDERS: usize = 5;

/// One row of a bulk import: follow `order` with `contact`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub contact: Contact,
    pub order: OrderNumber,
    /// The contact was verified elsewhere (the order system).
    pub confirmed: bool,
}

/// What one subscription of a batch changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    /// A new subscriber.
    Created,
    /// An existing subscriber now follows the order, or was confirmed.
    Updated,
    /// Nothing changed: it already followed the order in that state (a duplicate).
    Unchanged,
    /// The contact unsubscribed earlier: an import never subscribes it again, only the
    /// customer can.
    KeptUnsubscribed,
}

/// The first answer to a request that carried an `Idempotency-Key`: a retry with the same key
/// gets it again and creates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotentAnswer {
    /// The key as the client sent it, prefixed with who sent it: two clients never share one.
    pub key: String,
    /// A digest of the request, so the same key with another request is told apart.
    pub fingerprint: String,
    pub status: u16,
    pub body: String,
    pub created_at: DateTime<Utc>,
}

/// After this many messages in a row reported undelivered, a contact is stopped on the
/// channel, as a provider's "no such number" would: the number is dead or not a mobile.
pub const UNDELIVERED_IN_A_ROW: u32 = 3;

/// Applies a provider's report to the delivery it is about and to the contact's record: the
/// one rule both backends follow. Returns whether it applied. A report applies to a sent
/// delivery whose provider id (when both are known) is the one reported; a final report is
/// never replaced by a late pending one, and only the first final report counts.
pub fn apply_report(
    record: &mut DeliveryRecord,
    subscriber: Option<&mut Subscriber>,
    provider_id: Option<&str>,
    report: &ProviderReport,
) -> bool {
    if record.state != DeliveryState::Sent {
        return false;
    }
    if let (Some(reported), Some(ours)) = (provider_id, record.provider_id.as_deref())
        && reported != ours
    {
        return false;
    }
    let earlier = record.report.as_ref().map(|r| r.outcome);
    if earlier.is_some_and(ReportedOutcome::is_final) {
        return false;
    }
    record.report = Some(report.clone());
    if let Some(subscriber) = subscriber {
        match report.outcome {
            ReportedOutcome::Delivered => {
                subscriber.undelivered.remove(&record.channel);
            }
            ReportedOutcome::Undelivered => {
                let count = subscriber
                    .undelivered
                    .entry(record.channel.clone())
                    .or_default();
                *count += 1;
                if *count >= UNDELIVERED_IN_A_ROW {
                    subscriber.stopped_on.insert(record.channel.clone());
                }
                subscriber.updated_at = report.at;
            }
            ReportedOutcome::Pending => {}
        }
    }
    true
}

/// Applies one import row to the subscriber it concerns (if any): the record to write, if
/// anything changed, and what changed. The one rule every backend follows.
pub fn apply_subscription(
    existing: Option<Subscriber>,
    row: &Subscription,
    now: DateTime<Utc>,
) -> (Option<Subscriber>, Subscribed) {
    match existing {
        None => {
            let mut subscriber = Subscriber::new(row.contact.clone(), now);
            subscriber.follow(row.order.clone(), row.confirmed, FollowVia::Import, now);
            (Some(subscriber), Subscribed::Created)
        }
        // Only the customer brings back what the customer stopped: all of it, or this order.
        Some(subscriber)
            if subscriber.opted_out()
                || subscriber
                    .follow_of(&row.order)
                    .is_some_and(|f| f.state == FollowState::Left) =>
        {
            (None, Subscribed::KeptUnsubscribed)
        }
        Some(mut subscriber) => {
            if subscriber.follow(row.order.clone(), row.confirmed, FollowVia::Import, now) {
                (Some(subscriber), Subscribed::Updated)
            } else {
                (None, Subscribed::Unchanged)
            }
        }
    }
}

/// How long a confirmation's link and its text's question last: a follow asked for through
/// the form and not confirmed by then is forgotten.
pub const CONFIRM_TTL: Duration = Duration::from_secs(2 * 24 * 3600);

/// A change to one contact's follows. Every backend reads the contact, applies the change
/// with [`FollowChange::apply`] and writes what it returns, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowChange {
    /// Follow `order`: confirmed (`via` vouches for the contact) or pending. Creates the
    /// subscriber if needed.
    Follow {
        order: OrderNumber,
        confirmed: bool,
        via: FollowVia,
    },
    /// A link the customer followed (a confirm link, a support link) confirms `order`, unless
    /// the contact opted out, or left the order, after the link was `issued`: then nothing
    /// changes. Creates the subscriber if needed.
    FollowByLink {
        order: OrderNumber,
        via: FollowVia,
        issued: DateTime<Utc>,
    },
    /// Stop following one order, or every order.
    Leave {
        order: Option<OrderNumber>,
        via: FollowVia,
    },
    /// The contact texted STOP: leave every order, and let a START reply bring back exactly
    /// the orders it had confirmed.
    StopByText,
    /// A text asked the contact to reply YES about `orders` (a confirmation went out), until
    /// `until`.
    AskedByText {
        orders: std::collections::BTreeSet<OrderNumber>,
        until: DateTime<Utc>,
    },
    /// The contact replied YES or START, naming an order or not: confirm exactly what the
    /// text it answers asked about ([`Subscriber::answer_by_text`]).
    AnsweredByText { order: Option<OrderNumber> },
}

/// What a [`FollowChange`] did: the subscriber as it now is, and the orders it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    pub subscriber: Subscriber,
    pub orders: Vec<OrderNumber>,
    /// The subscriber did not exist before.
    pub created: bool,
}

impl FollowChange {
    /// Whether it creates the subscriber when the contact is not known yet.
    pub fn creates(&self) -> bool {
        matches!(
            self,
            FollowChange::Follow { .. } | FollowChange::FollowByLink { .. }
        )
    }

    /// Applies the change to the contact's record (`None`: not known). Only following creates
    /// one; the others refuse an unknown contact. Pending form requests whose link expired are
    /// forgotten on the way, so a record a flood made shrinks the next time it is touched.
    pub fn apply(
        &self,
        existing: Option<Subscriber>,
        contact: &Contact,
        now: DateTime<Utc>,
    ) -> Result<Followed, StoreError> {
        let created = existing.is_none();
        let mut subscriber = match existing {
            Some(subscriber) => subscriber,
            None if self.creates() => Subscriber::new(contact.clone(), now),
            None => return Err(StoreError::UnknownSubscriber(contact.to_string())),
        };
        subscriber.forget_unconfirmed(crate::clock::before(now, CONFIRM_TTL));
        let orders = match self {
            FollowChange::Follow {
                order,
                confirmed,
                via,
            } => {
                let changed = subscriber.follow(order.clone(), *confirmed, *via, now);
                if changed {
                    vec![order.clone()]
                } else {
                    Vec::new()
                }
            }
            FollowChange::FollowByLink { order, via, issued } => {
                if !subscriber.honours_link(order, *issued) {
                    Vec::new()
                } else if subscriber.follow(order.clone(), true, *via, now) {
                    vec![order.clone()]
                } else {
                    Vec::new()
                }
            }
            FollowChange::Leave { order, via } => subscriber.leave(order.as_ref(), *via, now),
            FollowChange::StopByText => {
                let confirmed = subscriber.confirmed_orders();
                let left = subscriber.leave(None, FollowVia::Text, now);
                let again = left
                    .iter()
                    .filter(|o| confirmed.contains(*o))
                    .cloned()
                    .collect();
                subscriber.ask_by_text(again, None, now);
                left
            }
            FollowChange::AskedByText { orders, until } => {
                let pending: std::collections::BTreeSet<OrderNumber> = orders
                    .iter()
                    .filter(|o| {
                        subscriber
                            .follow_of(o)
                            .is_some_and(|f| f.state == FollowState::Pending)
                    })
                    .cloned()
                    .collect();
                let asked = pending.iter().cloned().collect();
                subscriber.ask_by_text(pending, Some(*until), now);
                asked
            }
            FollowChange::AnsweredByText { order } => {
                subscriber.answer_by_text(order.as_ref(), now)
            }
        };
        Ok(Followed {
            subscriber,
            orders,
            created,
        })
    }
}

/// Which deliveries of an update to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryFilter {
    All,
    /// Dead letters and those waiting to retry.
    Failed,
}

/// Whether an outcome was recorded, and the record as it now stands.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub record: DeliveryRecord,
    /// False when a later lease superseded the attempt (only its success counts then), or the
    /// delivery was already sent.
    pub applied: bool,
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- subscribers ----------------------------------------------------------------------

    async fn subscriber(&self, contact: &Contact) -> Result<Option<Subscriber>, StoreError>;

    /// Many subscribers in one call, in the order of `contacts`.
    async fn subscribers(
        &self,
        contacts: &[Contact],
    ) -> Result<Vec<Option<Subscriber>>, StoreError>;

    /// Applies `change` to the contact's follows ([`FollowChange::apply`]) and writes it, in
    /// one durable step.
    async fn change_follows(
        &self,
        contact: &Contact,
        change: &FollowChange,
        now: DateTime<Utc>,
    ) -> Result<Followed, StoreError>;

    /// Has `contact` follow `order`, creating the subscriber if needed: confirmed when `via`
    /// vouches for the contact, pending otherwise.
    async fn subscribe(
        &self,
        contact: &Contact,
        order: &OrderNumber,
        confirmed: bool,
        via: FollowVia,
        now: DateTime<Utc>,
    ) -> Result<Subscriber, StoreError> {
        let change = FollowChange::Follow {
            order: order.clone(),
            confirmed,
            via,
        };
        Ok(self.change_follows(contact, &change, now).await?.subscriber)
    }

    /// The subscribe form's request that `contact` follow `order`, decided by
    /// [`FormRequest::decide`] (`channel` is the one its confirmation goes through) and stored
    /// in one step. Durable on return whatever it decided, so the answer to the form comes
    /// after the pending subscriber is safe, and how long it takes tells nothing about what the
    /// store holds.
    async fn request_subscription(
        &self,
        contact: &Contact,
        order: &OrderNumber,
        channel: &str,
        now: DateTime<Utc>,
    ) -> Result<FormRequest, StoreError>;

    /// Applies many subscriptions at once, in order, with one durable commit: what a bulk
    /// import writes. Returns what each row changed.
    async fn subscribe_batch(
        &self,
        rows: &[Subscription],
        now: DateTime<Utc>,
    ) -> Result<Vec<Subscribed>, StoreError>;

    /// Stops updates for one order, or for everything when `order` is `None`.
    async fn unsubscribe(
        &self,
        contact: &Contact,
        order: Option<&OrderNumber>,
        via: FollowVia,
        now: DateTime<Utc>,
    ) -> Result<Subscriber, StoreError> {
        let change = FollowChange::Leave {
            order: order.cloned(),
            via,
        };
        Ok(self.change_follows(contact, &change, now).await?.subscriber)
    }

    /// Up to `limit` subscribers the audience reaches, after `after`: every subscriber for
    /// everyone, everyone who follows or followed the orders (one entry per order) for a
    /// targeted update. Pending and left follows are included; planning skips them, support's
    /// history shows them.
    async fn subscriber_page(
        &self,
        audience: &Audience,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError>;

    /// How many subscribers exist, from a counter (never a scan).
    async fn subscriber_count(&self) -> Result<u64, StoreError>;

    // ---- incidents and updates ------------------------------------------------------------

    async fn incident(&self, id: Ulid) -> Result<Incident, StoreError>;

    /// Every incident, most recently updated first.
    async fn incidents(&self) -> Result<Vec<Incident>, StoreError>;

    async fn update(&self, id: Ulid) -> Result<Update, StoreError>;

    /// The most recent updates, newest first.
    async fn recent_updates(&self, limit: usize) -> Result<Vec<Update>, StoreError>;

    /// Stores the update, opens or bumps its incident and starts its plan, all at once: the
    /// update id returned to the user is a promise.
    async fn accept_update(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
    ) -> Result<Incident, StoreError>;

    /// [`Store::accept_update`], remembering `answer` in the same write, unless an answer is
    /// already remembered under its key: then nothing is accepted and that answer is returned.
    /// Two requests racing with one key accept one update.
    async fn accept_update_once(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
        answer: &IdempotentAnswer,
    ) -> Result<Option<IdempotentAnswer>, StoreError>;

    /// The answer remembered under an idempotency key, if any.
    async fn idempotent_answer(&self, key: &str) -> Result<Option<IdempotentAnswer>, StoreError>;

    // ---- planning -------------------------------------------------------------------------

    async fn plan_state(&self, update: Ulid) -> Result<PlanState, StoreError>;

    /// Updates whose planning has not finished, oldest first.
    async fn unfinished_plans(&self) -> Result<Vec<Ulid>, StoreError>;

    /// Queues every record not already planned and moves the plan's cursor, at once. Returns
    /// how many records were new.
    async fn enqueue_planned(
        &self,
        update: Ulid,
        records: &[DeliveryRecord],
        state: &PlanState,
    ) -> Result<usize, StoreError>;

    // ---- the outbox -----------------------------------------------------------------------

    /// When the earliest queued delivery of `channel` is due, if any is queued.
    async fn next_due(&self, channel: &str) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Leases up to `max` deliveries of `channel` due at `now`, earliest first, for `owner`.
    async fn lease_due(
        &self,
        channel: &str,
        owner: &str,
        max: usize,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;

    /// Records the outcome of an attempt on a leased delivery, fenced by its lease: an attempt
    /// whose lease was taken over only gets its say if it succeeded, and nothing reopens a
    /// delivery that was sent. A receipt's thread is stored on the incident, a `RecipientGone`
    /// failure stops the contact on the channel, and an `EndpointGone` one disables the
    /// channel, all in the same write.
    async fn record_outcome(
        &self,
        leased: &DeliveryRecord,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<Recorded, StoreError>;

    /// Returns leases their holder never used (it leased ahead, then stopped or was
    /// throttled): queued again at once, without the attempt counted. A lease that was taken
    /// over meanwhile is left alone. Returns how many went back.
    async fn give_back(
        &self,
        leased: &[DeliveryRecord],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError>;

    /// Puts deliveries whose lease expired by `now` back in the queue.
    async fn requeue_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError>;

    /// At start-up: puts back in the queue the leases no live process holds. Expired leases
    /// always; a backend that one process alone can open (sled locks its folder) also knows
    /// that every lease not held by `owner` belongs to a process that died.
    async fn recover_orphaned(&self, owner: &str, now: DateTime<Utc>) -> Result<usize, StoreError>;

    /// Queues dead letters again (of one update, or all), with a fresh attempt budget.
    async fn requeue_dead(
        &self,
        update: Option<Ulid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;

    async fn delivery(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError>;

    /// Records a provider's later report on a sent delivery ([`apply_report`]'s rule), with
    /// what it means for the contact, in one write. Returns the record when it applied.
    async fn record_report(
        &self,
        key: &DeliveryKey,
        provider_id: Option<&str>,
        report: &ProviderReport,
    ) -> Result<Option<DeliveryRecord>, StoreError>;

    /// Up to `limit` deliveries of one update after `after`, in key order.
    async fn deliveries(
        &self,
        update: Ulid,
        filter: DeliveryFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<DeliveryRecord>, StoreError>;

    /// Retention: forgets up to `limit` sent and skipped deliveries of updates accepted before
    /// `before`, oldest update first. The counts stay (they are counters) and so do dead
    /// letters and anything not settled. Returns how many deliveries were forgotten.
    async fn prune_settled(&self, before: DateTime<Utc>, limit: usize)
    -> Result<usize, StoreError>;

    /// Deliveries per state, per channel, of one update or of all, from counters.
    async fn counts(&self, update: Option<Ulid>) -> Result<BTreeMap<String, Counts>, StoreError>;

    // ---- channels -------------------------------------------------------------------------

    /// Why `channel` is disabled, if it is.
    async fn channel_disabled(&self, channel: &str) -> Result<Option<String>, StoreError>;

    /// Enables a channel an `EndpointGone` failure disabled. Returns whether it was disabled.
    async fn enable_channel(&self, channel: &str) -> Result<bool, StoreError>;

    // ---- the watchdog ---------------------------------------------------------------------

    /// When the watchdog's alert named `key` was sent, if it was.
    async fn alert_sent(&self, key: &str) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Records, durably, that the alert named `key` was sent at `at`, so a restart does not
    /// send it again.
    async fn record_alert(&self, key: &str, at: DateTime<Utc>) -> Result<(), StoreError>;

    /// Ticks whenever deliveries become due-able (planned, retried, requeued), so idle workers
    /// wake at once instead of polling.
    fn queue_changes(&self) -> watch::Receiver<u64>;

    /// Whether other processes use this store at the same time (several `crier serve` nodes
    /// on one database). Then a lease another owner holds may be live, and updates may be
    /// accepted elsewhere.
    fn shared(&self) -> bool {
        false
    }

    /// Takes up to `want` of `channel`'s sending slots under `rate`, for every process on
    /// the store together: a provider's limit is per account, not per process. Returns how
    /// many were granted and, when none was, how long until the next one frees. A store one
    /// process owns grants them all: that process's own limiter keeps the rate.
    async fn take_slots(&self, channel: &str, rate: &Rate, want: u32) -> Result<Slots, StoreError> {
        let _ = (channel, rate);
        Ok(Slots {
            granted: want,
            wait: Duration::ZERO,
        })
    }

    /// Claims the planning of `update` for this process, unless another process holds it: on
    /// a shared store one node plans an update at a time, and when that node dies its claim
    /// ends with its connection, so another can take over at once. A store one process owns
    /// always grants it. Planning stops being this process's when the claim is dropped.
    async fn claim_plan(&self, update: Ulid) -> Result<Option<PlanClaim>, StoreError> {
        let _ = update;
        Ok(Some(PlanClaim::unshared()))
    }

    /// On a shared store, ticks whenever any process accepts an update, so every node's status
    /// page follows at once. A store one process owns has none: that process knows.
    fn update_changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// The right to plan one update, held until dropped (see [`Store::claim_plan`]).
pub struct PlanClaim {
    _held: Option<Box<dyn Send + Sync>>,
}

impl PlanClaim {
    /// A claim no other process could contest.
    pub fn unshared() -> Self {
        Self { _held: None }
    }

    /// A claim that lasts as long as `held` lives (a database session holding a lock, say).
    pub fn holding(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Some(Box::new(held)),
        }
    }
}

/// Sending slots a shared rate granted (see [`Store::take_slots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub granted: u32,
    /// With none granted, how long until the next slot frees.
    pub wait: Duration,
}

/// Whether retention forgets this delivery: sent or skipped; a dead letter stays for `retry`.
pub(crate) fn forgettable(record: &DeliveryRecord) -> bool {
    matches!(
        record.state,
        crate::delivery::DeliveryState::Sent | crate::delivery::DeliveryState::Skipped
    )
}

/// Opens the configured backend.
pub async fn open(settings: &StoreSettings) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &settings.backend {
        StoreBackend::Sled => Arc::new(SledStore::open(settings).await?),
        StoreBackend::Postgres(postgres) => Arc::new(PostgresStore::open(postgres).await?),
    })
}
