//! Deliveries: one (update, channel, recipient) unit of work, its key, its states, the outcome
//! of an attempt and the receipt a provider gives back. Shared by the store, the channels and
//! the dispatcher, so none of them depends on another's types.

use crate::domain::{Contact, OrderNumber};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;
use ulid::Ulid;

/// Whom one delivery goes to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Recipient {
    /// The one post of a broadcast channel (status page, webhook, microblog, forum).
    Broadcast,
    Contact(Contact),
}

/// How a broadcast recipient is written in a delivery key: no contact can be `-`.
const BROADCAST: &str = "-";

impl Recipient {
    pub fn as_str(&self) -> &str {
        match self {
            Recipient::Broadcast => BROADCAST,
            Recipient::Contact(contact) => contact.as_str(),
        }
    }

    pub fn contact(&self) -> Option<&Contact> {
        match self {
            Recipient::Broadcast => None,
            Recipient::Contact(contact) => Some(contact),
        }
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Recipient {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Recipient {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        if raw == BROADCAST {
            return Ok(Recipient::Broadcast);
        }
        Contact::parse(&raw)
            .map(Recipient::Contact)
            .map_err(serde::de::Error::custom)
    }
}

/// `{update}/{channel}/{recipient}`: deterministic, so planning twice is harmless, and what
/// providers see as the idempotency key (the webhook's `webhook-id`, the seed of an email's
/// `Message-ID`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryKey(String);

impl DeliveryKey {
    pub fn new(update: Ulid, channel: &str, recipient: &Recipient) -> Self {
        Self(format!("{update}/{channel}/{recipient}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeliveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Queued,
    InFlight,
    Sent,
    /// Failed transiently; queued again for later.
    Retrying,
    /// Failed for good, or ran out of attempts or age.
    Dead,
    /// Not sent because it no longer applied (the subscriber left before it went out).
    Skipped,
}

impl DeliveryState {
    /// Sent, dead or skipped: nothing more happens to it unless `crier retry` requeues it.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            DeliveryState::Sent | DeliveryState::Dead | DeliveryState::Skipped
        )
    }

    /// Waiting in the queue for its due time.
    pub fn is_queued(self) -> bool {
        matches!(self, DeliveryState::Queued | DeliveryState::Retrying)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub update: Ulid,
    pub channel: String,
    pub recipient: Recipient,
    /// For a targeted update: which of the recipient's orders it concerns.
    pub orders: Vec<OrderNumber>,
    pub state: DeliveryState,
    /// Attempts since it was last queued afresh (by planning or `crier retry`).
    pub attempts: u32,
    /// Leases ever granted; never reset, so it tells a superseded attempt from the latest.
    #[serde(default)]
    pub leases: u32,
    /// The process holding the lease, while it is in flight.
    #[serde(default)]
    pub owner: Option<String>,
    pub queued_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub lease_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// The provider's HTTP status (or SMTP code) on the last failure, as data.
    #[serde(default)]
    pub last_status: Option<u16>,
    /// The provider's own error code on the last failure (Twilio's 21211, say).
    #[serde(default)]
    pub last_code: Option<String>,
    /// The provider's id for the message it accepted.
    #[serde(default)]
    pub provider_id: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
    /// What the provider reported later about the message it accepted (an SMS delivery
    /// report), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ProviderReport>,
}

/// A provider's later word on a message it accepted: Twilio's status callback, Kannel's
/// delivery report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderReport {
    pub outcome: ReportedOutcome,
    /// The provider's own word for it (Twilio's `MessageStatus`, Kannel's report type).
    pub status: String,
    /// The provider's error code, when it gave one.
    pub code: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedOutcome {
    /// On its way (queued, sent to the carrier): a final report follows.
    Pending,
    Delivered,
    /// The carrier could not deliver it (or the provider gave up).
    Undelivered,
}

impl ReportedOutcome {
    pub fn is_final(self) -> bool {
        !matches!(self, ReportedOutcome::Pending)
    }
}

impl DeliveryRecord {
    pub fn new(
        update: Ulid,
        channel: &str,
        recipient: Recipient,
        orders: Vec<OrderNumber>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            update,
            channel: channel.to_owned(),
            recipient,
            orders,
            state: DeliveryState::Queued,
            attempts: 0,
            leases: 0,
            owner: None,
            queued_at: now,
            due_at: now,
            lease_until: None,
            last_error: None,
            last_status: None,
            last_code: None,
            provider_id: None,
            finished_at: None,
            report: None,
        }
    }

    pub fn key(&self) -> DeliveryKey {
        DeliveryKey::new(self.update, &self.channel, &self.recipient)
    }

    /// Leases it to `owner` until `until`: one more attempt, and a new fencing token.
    pub fn lease(&mut self, owner: &str, until: DateTime<Utc>) {
        self.state = DeliveryState::InFlight;
        self.attempts = self.attempts.saturating_add(1);
        self.leases = self.leases.saturating_add(1);
        self.owner = Some(owner.to_owned());
        self.lease_until = Some(until);
    }

    /// Takes back a lease nobody will finish (it expired, or its process died): due now, the
    /// attempt it had counted stays counted.
    pub fn release(&mut self, now: DateTime<Utc>) {
        self.state = DeliveryState::Queued;
        self.lease_until = None;
        self.owner = None;
        self.due_at = now;
    }

    /// Returns a lease its holder never started an attempt under: queued again, due now, and
    /// the attempt the lease counted is not counted.
    pub fn give_back(&mut self, now: DateTime<Utc>) {
        self.release(now);
        self.attempts = self.attempts.saturating_sub(1);
    }

    /// Queues a dead letter again, as if newly planned: a fresh attempt budget and age.
    pub fn revive(&mut self, now: DateTime<Utc>) {
        self.state = DeliveryState::Queued;
        self.attempts = 0;
        self.queued_at = now;
        self.due_at = now;
        self.finished_at = None;
    }

    /// Applies an outcome to the record (the store decides whether it may).
    pub fn apply(&mut self, outcome: &Outcome, now: DateTime<Utc>) {
        self.lease_until = None;
        self.owner = None;
        match outcome {
            Outcome::Sent { receipt } => {
                self.state = DeliveryState::Sent;
                self.finished_at = Some(now);
                self.last_error = None;
                self.provider_id = receipt.provider_id.clone();
            }
            Outcome::Skipped { reason } => {
                self.state = DeliveryState::Skipped;
                self.finished_at = Some(now);
                self.last_error = Some(reason.clone());
            }
            Outcome::Retry {
                at,
                failure,
                counts_as_attempt,
            } => {
                self.state = DeliveryState::Retrying;
                self.due_at = *at;
                if !counts_as_attempt {
                    self.attempts = self.attempts.saturating_sub(1);
                }
                self.record_failure(failure);
            }
            Outcome::Dead { failure } => {
                self.state = DeliveryState::Dead;
                self.finished_at = Some(now);
                self.record_failure(failure);
            }
        }
    }

    fn record_failure(&mut self, failure: &DeliveryError) {
        self.last_error = Some(failure.reason.clone());
        self.last_status = failure.status;
        self.last_code = failure.code.clone();
    }
}

/// What a provider gave back for a message it accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The provider's id for the message (Twilio's `sid`, a Mastodon status id…).
    pub provider_id: Option<String>,
    /// Where the next update of the same incident on this channel should reply (a Mastodon
    /// status id, Bluesky's root and parent, a Discourse topic id). Stored on the incident.
    pub thread: Option<RemoteThread>,
}

impl Receipt {
    pub fn none() -> Self {
        Self::default()
    }
}

/// A channel's own reference to the remote thread of an incident; only that channel reads it.
pub type RemoteThread = serde_json::Value;

/// How an attempt failed, which decides what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Worth retrying this delivery later (a 5xx, a timeout, a refused connection).
    Transient,
    /// The provider asks the whole channel to slow down (a 429): every worker of the channel
    /// pauses, and the attempt does not count against the delivery's budget.
    Throttled,
    /// This message will never be accepted (a 400, an SMTP 550).
    Permanent,
    /// The recipient cannot be reached on this channel any more (an invalid number, an SMS
    /// STOP): it stops receiving on this channel.
    RecipientGone,
    /// The endpoint is gone for good (a webhook 410): the channel is disabled until
    /// `crier retry`.
    EndpointGone,
}

/// A failed attempt, classified by the channel, with the provider's answer kept as data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DeliveryError {
    pub kind: FailureKind,
    pub reason: String,
    /// How long the provider asked to wait before the next attempt.
    pub retry_after: Option<Duration>,
    /// The provider's HTTP status or SMTP reply code.
    pub status: Option<u16>,
    /// The provider's own error code.
    pub code: Option<String>,
}

impl DeliveryError {
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
            retry_after: None,
            status: None,
            code: None,
        }
    }

    pub fn transient(reason: impl Into<String>) -> Self {
        Self::new(FailureKind::Transient, reason)
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::new(FailureKind::Permanent, reason)
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn with_retry_after(mut self, wait: Option<Duration>) -> Self {
        self.retry_after = wait;
        self
    }

    /// The same failure with another reason (the retry policy adds why it gave up).
    pub fn with_reason(mut self, reason: String) -> Self {
        self.reason = reason;
        self
    }
}

/// What became of one attempt, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent {
        receipt: Receipt,
    },
    Retry {
        at: DateTime<Utc>,
        failure: DeliveryError,
        /// False when the provider throttled the channel: waiting is not the message's fault.
        counts_as_attempt: bool,
    },
    /// Permanent, or out of attempts or age. A `RecipientGone` failure also stops the contact
    /// on this channel, and an `EndpointGone` one disables the channel, in the same write.
    Dead {
        failure: DeliveryError,
    },
    Skipped {
        reason: String,
    },
}

/// Deliveries per state, for one channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Counts {
    pub queued: u64,
    pub in_flight: u64,
    pub sent: u64,
    pub retrying: u64,
    pub dead: u64,
    pub skipped: u64,
}

impl Counts {
    fn slot(&mut self, state: DeliveryState) -> &mut u64 {
        match state {
            DeliveryState::Queued => &mut self.queued,
            DeliveryState::InFlight => &mut self.in_flight,
            DeliveryState::Sent => &mut self.sent,
            DeliveryState::Retrying => &mut self.retrying,
            DeliveryState::Dead => &mut self.dead,
            DeliveryState::Skipped => &mut self.skipped,
        }
    }

    /// Moves one delivery from `from` (or from nowhere, when it is new) to `to`.
    pub fn moved(&mut self, from: Option<DeliveryState>, to: DeliveryState) {
        if let Some(from) = from {
            let slot = self.slot(from);
            *slot = slot.saturating_sub(1);
        }
        *self.slot(to) += 1;
    }

    pub fn add(&mut self, other: &Counts) {
        self.queued += other.queued;
        self.in_flight += other.in_flight;
        self.sent += other.sent;
        self.retrying += other.retrying;
        self.dead += other.dead;
        self.skipped += other.skipped;
    }

    pub fn total(&self) -> u64 {
        self.queued + self.in_flight + self.sent + self.retrying + self.dead + self.skipped
    }

    /// Sent, dead or skipped.
    pub fn settled(&self) -> u64 {
        self.sent + self.dead + self.skipped
    }

    /// Queued, in flight or waiting to retry.
    pub fn unsettled(&self) -> u64 {
        self.queued + self.in_flight + self.retrying
    }
}
