//! The delivery outbox: planning records, due-time ordered queue, leases, outcomes and dead
//! letters.
//!
//! A delivery is one (update, channel, recipient). Its key is deterministic, so planning it
//! twice is harmless and providers can use the key to drop duplicates. The queue is ordered per
//! channel by due time; a leased delivery sits in `leases` under its deadline until its outcome
//! is recorded, and a lease left by a dead process goes back to the queue.

use super::{Store, StoreError, TxResult, abort, decode, encode};
use crate::domain::OrderNumber;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::TransactionalTree;
use std::collections::BTreeMap;
use std::time::Duration;
use ulid::Ulid;

/// Where planning an update has got to; kept so a crash while planning resumes, not restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanState {
    /// The last subscriber (or order index) key planned.
    pub cursor: Option<Vec<u8>>,
    pub broadcast_planned: bool,
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeliveryState::Sent | DeliveryState::Dead | DeliveryState::Skipped
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub update: Ulid,
    pub channel: String,
    /// The contact, or `-` for a broadcast channel.
    pub recipient: String,
    /// For a targeted update: which of the recipient's orders it concerns.
    pub orders: Vec<OrderNumber>,
    pub state: DeliveryState,
    /// Attempts since it was last queued afresh (by planning or `crier retry`).
    pub attempts: u32,
    /// Leases ever granted; never reset, so it tells a superseded attempt from the latest.
    #[serde(default)]
    pub leases: u32,
    pub queued_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub lease_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub const BROADCAST_RECIPIENT: &str = "-";

impl DeliveryRecord {
    pub fn new(
        update: Ulid,
        channel: &str,
        recipient: &str,
        orders: Vec<OrderNumber>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            update,
            channel: channel.to_owned(),
            recipient: recipient.to_owned(),
            orders,
            state: DeliveryState::Queued,
            attempts: 0,
            leases: 0,
            queued_at: now,
            due_at: now,
            lease_until: None,
            last_error: None,
            finished_at: None,
        }
    }

    /// `{update}/{channel}/{recipient}`: deterministic, and what providers see as the
    /// idempotency key.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.update, self.channel, self.recipient)
    }

    fn outbox_key(&self) -> Vec<u8> {
        let mut key = outbox_prefix(&self.channel);
        key.extend_from_slice(&millis(self.due_at).to_be_bytes());
        key.extend_from_slice(self.key().as_bytes());
        key
    }

    fn lease_key(&self) -> Option<Vec<u8>> {
        self.lease_until.map(|deadline| {
            let mut key = millis(deadline).to_be_bytes().to_vec();
            key.extend_from_slice(self.key().as_bytes());
            key
        })
    }
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    Retry { at: DateTime<Utc>, error: String },
    Dead { error: String },
    Skipped { reason: String },
}

/// Deliveries per state, for one channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub queued: u64,
    pub in_flight: u64,
    pub sent: u64,
    pub retrying: u64,
    pub dead: u64,
    pub skipped: u64,
}

impl Counts {
    fn add(&mut self, state: DeliveryState) {
        let slot = match state {
            DeliveryState::Queued => &mut self.queued,
            DeliveryState::InFlight => &mut self.in_flight,
            DeliveryState::Sent => &mut self.sent,
            DeliveryState::Retrying => &mut self.retrying,
            DeliveryState::Dead => &mut self.dead,
            DeliveryState::Skipped => &mut self.skipped,
        };
        *slot += 1;
    }

    pub fn total(&self) -> u64 {
        self.queued + self.in_flight + self.sent + self.retrying + self.dead + self.skipped
    }

    pub fn finished(&self) -> u64 {
        self.sent + self.dead + self.skipped
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChannelState {
    disabled_at: DateTime<Utc>,
    reason: String,
}

fn outbox_prefix(channel: &str) -> Vec<u8> {
    let mut key = channel.as_bytes().to_vec();
    key.push(0);
    key
}

fn millis(time: DateTime<Utc>) -> u64 {
    time.timestamp_millis().max(0) as u64
}

fn due_of_outbox_key(channel: &str, key: &[u8]) -> Option<DateTime<Utc>> {
    let start = channel.len() + 1;
    let bytes: [u8; 8] = key.get(start..start + 8)?.try_into().ok()?;
    Utc.timestamp_millis_opt(u64::from_be_bytes(bytes) as i64)
        .single()
}

fn read_record(deliveries: &TransactionalTree, key: &[u8]) -> TxResult<Option<DeliveryRecord>> {
    deliveries
        .get(key)?
        .map(|bytes| decode(&bytes).map_err(abort))
        .transpose()
}

/// Takes a record out of the queue or lease it sits in, whichever it is in.
fn unlink(
    outbox: &TransactionalTree,
    leases: &TransactionalTree,
    record: &DeliveryRecord,
) -> TxResult<()> {
    if let Some(lease_key) = record.lease_key() {
        leases.remove(lease_key)?;
    }
    if matches!(
        record.state,
        DeliveryState::Queued | DeliveryState::Retrying
    ) {
        outbox.remove(record.outbox_key())?;
    }
    Ok(())
}

impl Store {
    pub fn plan_state(&self, update: Ulid) -> Result<PlanState, StoreError> {
        match self.plans.get(update.to_string())? {
            Some(bytes) => decode(&bytes),
            None => Err(StoreError::UnknownUpdate(update)),
        }
    }

    /// Updates whose planning has not finished, oldest first.
    pub fn unfinished_plans(&self) -> Result<Vec<Ulid>, StoreError> {
        let mut unfinished = Vec::new();
        for entry in self.plans.iter() {
            let (key, value) = entry?;
            let state: PlanState = decode(&value)?;
            if !state.done {
                let id = std::str::from_utf8(&key)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| StoreError::Corrupt("a plan key is not an update id".into()))?;
                unfinished.push(id);
            }
        }
        Ok(unfinished)
    }

    /// Queues every record not already planned and moves the plan's cursor, in one transaction.
    /// Returns how many records were new.
    pub fn enqueue_planned(
        &self,
        update: Ulid,
        records: &[DeliveryRecord],
        state: &PlanState,
    ) -> Result<usize, StoreError> {
        let added = (&self.deliveries, &self.outbox, &self.plans).transaction(
            |(deliveries, outbox, plans)| {
                let mut added = 0;
                for record in records {
                    let key = record.key();
                    if deliveries.get(key.as_bytes())?.is_none() {
                        deliveries.insert(key.as_bytes(), encode(record))?;
                        outbox.insert(record.outbox_key(), &[])?;
                        added += 1;
                    }
                }
                plans.insert(update.to_string().as_bytes(), encode(state))?;
                Ok(added)
            },
        )?;
        Ok(added)
    }

    /// When the earliest queued delivery of `channel` is due, if any is queued.
    pub fn next_due(&self, channel: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self.outbox.scan_prefix(outbox_prefix(channel)).next() {
            Some(entry) => Ok(due_of_outbox_key(channel, &entry?.0)),
            None => Ok(None),
        }
    }

    /// Leases the earliest due delivery of `channel`, if one is due at `now`.
    pub fn lease_next(
        &self,
        channel: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let Some(entry) = self.outbox.scan_prefix(outbox_prefix(channel)).next() else {
            return Ok(None);
        };
        let (outbox_key, _) = entry?;
        if due_of_outbox_key(channel, &outbox_key).is_none_or(|due| due > now) {
            return Ok(None);
        }
        let delivery_key = outbox_key[channel.len() + 1 + 8..].to_vec();
        let lease_until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let leased = (&self.outbox, &self.leases, &self.deliveries).transaction(
            |(outbox, leases, deliveries)| {
                if outbox.remove(&*outbox_key)?.is_none() {
                    return Ok(None);
                }
                let Some(mut record) = read_record(deliveries, &delivery_key)? else {
                    return Ok(None);
                };
                record.state = DeliveryState::InFlight;
                record.attempts += 1;
                record.leases += 1;
                record.lease_until = Some(lease_until);
                leases.insert(record.lease_key().expect("just leased"), &[])?;
                deliveries.insert(delivery_key.as_slice(), encode(&record))?;
                Ok(Some(record))
            },
        )?;
        Ok(leased)
    }

    /// Records the outcome of an attempt on a leased delivery. Returns the record and whether
    /// the outcome was applied: an attempt whose lease was taken over by a later one only gets
    /// its say if it succeeded, and nothing reopens a delivery that was sent.
    pub fn finish(
        &self,
        leased: &DeliveryRecord,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<(DeliveryRecord, bool), StoreError> {
        let key = leased.key();
        let finished = (&self.deliveries, &self.outbox, &self.leases, &self.dead).transaction(
            |(deliveries, outbox, leases, dead)| {
                // Read afresh: if the lease expired meanwhile, the record went back to the queue
                // (or to another attempt), and that must be undone on success, or it would be
                // sent again.
                let Some(mut record) = read_record(deliveries, key.as_bytes())? else {
                    return Err(abort(StoreError::Corrupt(format!(
                        "delivery {key} vanished"
                    ))));
                };
                let superseded = record.leases != leased.leases || record.state.is_final();
                let sent_already = record.state == DeliveryState::Sent;
                if sent_already || (superseded && *outcome != Outcome::Sent) {
                    return Ok((record, false));
                }
                unlink(outbox, leases, &record)?;
                if record.state == DeliveryState::Dead {
                    dead.remove(key.as_bytes())?;
                }
                record.lease_until = None;
                match outcome {
                    Outcome::Sent => {
                        record.state = DeliveryState::Sent;
                        record.finished_at = Some(now);
                        record.last_error = None;
                    }
                    Outcome::Skipped { reason } => {
                        record.state = DeliveryState::Skipped;
                        record.finished_at = Some(now);
                        record.last_error = Some(reason.clone());
                    }
                    Outcome::Retry { at, error } => {
                        record.state = DeliveryState::Retrying;
                        record.due_at = *at;
                        record.last_error = Some(error.clone());
                        outbox.insert(record.outbox_key(), &[])?;
                    }
                    Outcome::Dead { error } => {
                        record.state = DeliveryState::Dead;
                        record.finished_at = Some(now);
                        record.last_error = Some(error.clone());
                        dead.insert(key.as_bytes(), &[])?;
                    }
                }
                deliveries.insert(key.as_bytes(), encode(&record))?;
                Ok((record, true))
            },
        )?;
        Ok(finished)
    }

    /// Puts leases back in the queue: those expired by `now`, or all of them when `all` is set
    /// (at start-up, when no lease can belong to a live worker because sled locks the store).
    pub fn requeue_leases(&self, now: DateTime<Utc>, all: bool) -> Result<usize, StoreError> {
        let mut requeued = 0;
        for entry in self.leases.iter() {
            let (lease_key, _) = entry?;
            let deadline = u64::from_be_bytes(lease_key[..8].try_into().expect("8-byte deadline"));
            if !all && deadline > millis(now) {
                break;
            }
            let delivery_key = lease_key[8..].to_vec();
            let moved = (&self.leases, &self.outbox, &self.deliveries).transaction(
                |(leases, outbox, deliveries)| {
                    if leases.remove(&*lease_key)?.is_none() {
                        return Ok(false);
                    }
                    let Some(mut record) = read_record(deliveries, &delivery_key)? else {
                        return Ok(false);
                    };
                    record.state = DeliveryState::Queued;
                    record.lease_until = None;
                    record.due_at = now;
                    outbox.insert(record.outbox_key(), &[])?;
                    deliveries.insert(delivery_key.as_slice(), encode(&record))?;
                    Ok(true)
                },
            )?;
            requeued += usize::from(moved);
        }
        Ok(requeued)
    }

    /// Queues dead letters again (of one update, or all), with a fresh attempt budget.
    pub fn requeue_dead(
        &self,
        update: Option<Ulid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let prefix = update.map(|id| format!("{id}/")).unwrap_or_default();
        let mut requeued = Vec::new();
        for entry in self.dead.scan_prefix(prefix.as_bytes()) {
            let (dead_key, _) = entry?;
            let record = (&self.dead, &self.outbox, &self.deliveries).transaction(
                |(dead, outbox, deliveries)| {
                    if dead.remove(&*dead_key)?.is_none() {
                        return Ok(None);
                    }
                    let Some(mut record) = read_record(deliveries, &dead_key)? else {
                        return Ok(None);
                    };
                    record.state = DeliveryState::Queued;
                    record.attempts = 0;
                    record.queued_at = now;
                    record.due_at = now;
                    record.finished_at = None;
                    outbox.insert(record.outbox_key(), &[])?;
                    deliveries.insert(&*dead_key, encode(&record))?;
                    Ok(Some(record))
                },
            )?;
            requeued.extend(record);
        }
        Ok(requeued)
    }

    pub fn delivery(&self, key: &str) -> Result<Option<DeliveryRecord>, StoreError> {
        self.deliveries
            .get(key)?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// Every delivery of one update, or of all updates, in key order.
    pub fn deliveries(
        &self,
        update: Option<Ulid>,
    ) -> impl Iterator<Item = Result<DeliveryRecord, StoreError>> + '_ {
        let prefix = update.map(|id| format!("{id}/")).unwrap_or_default();
        self.deliveries
            .scan_prefix(prefix.as_bytes())
            .map(|entry| decode(&entry?.1))
    }

    /// Deliveries per state, per channel.
    pub fn counts(&self, update: Option<Ulid>) -> Result<BTreeMap<String, Counts>, StoreError> {
        let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
        for record in self.deliveries(update) {
            let record = record?;
            counts.entry(record.channel).or_default().add(record.state);
        }
        Ok(counts)
    }

    /// How many deliveries are queued or leased, across every channel.
    pub fn unfinished_deliveries(&self) -> usize {
        self.outbox.len() + self.leases.len()
    }

    /// Marks an endpoint as gone (a webhook answered 410); its deliveries go to dead letters.
    pub fn disable_channel(
        &self,
        channel: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let state = ChannelState {
            disabled_at: now,
            reason: reason.to_owned(),
        };
        self.channel_state.insert(channel, encode(&state))?;
        Ok(())
    }

    /// Why `channel` is disabled, if it is.
    pub fn channel_disabled(&self, channel: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .channel_state
            .get(channel)?
            .map(|bytes| decode::<ChannelState>(&bytes))
            .transpose()?
            .map(|state| {
                format!(
                    "disabled since {}: {}",
                    state.disabled_at.to_rfc3339(),
                    state.reason
                )
            }))
    }

    pub fn enable_channel(&self, channel: &str) -> Result<bool, StoreError> {
        Ok(self.channel_state.remove(channel)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreSettings;

    const LEASE: Duration = Duration::from_secs(60);

    fn store(dir: &std::path::Path) -> Store {
        Store::open(&StoreSettings {
            path: dir.join("store"),
            cache_capacity_bytes: 8 << 20,
        })
        .unwrap()
    }

    fn queue_one(store: &Store, now: DateTime<Utc>) -> DeliveryRecord {
        let update = Ulid::new();
        let record = DeliveryRecord::new(update, "partners", BROADCAST_RECIPIENT, vec![], now);
        store
            .enqueue_planned(update, std::slice::from_ref(&record), &PlanState::default())
            .unwrap();
        record
    }

    #[test]
    fn a_lease_left_by_a_dead_process_goes_back_to_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let now = Utc::now();
        let queued = queue_one(&store, now);
        let leased = store.lease_next("partners", now, LEASE).unwrap().unwrap();
        assert_eq!(leased.key(), queued.key());
        assert_eq!(leased.attempts, 1);
        assert!(
            store.lease_next("partners", now, LEASE).unwrap().is_none(),
            "leased once only"
        );

        assert_eq!(
            store.requeue_leases(now, false).unwrap(),
            0,
            "not expired yet"
        );
        assert_eq!(
            store.requeue_leases(now, true).unwrap(),
            1,
            "start-up takes every lease back"
        );
        let again = store.lease_next("partners", now, LEASE).unwrap().unwrap();
        assert_eq!(again.attempts, 2);
    }

    #[test]
    fn an_expired_lease_is_requeued_by_the_reaper() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let now = Utc::now();
        queue_one(&store, now);
        store.lease_next("partners", now, LEASE).unwrap().unwrap();
        let later = now + chrono::Duration::seconds(61);
        assert_eq!(store.requeue_leases(later, false).unwrap(), 1);
        assert_eq!(store.counts(None).unwrap()["partners"].queued, 1);
    }

    #[test]
    fn a_retry_waits_in_the_queue_until_it_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let now = Utc::now();
        queue_one(&store, now);
        let leased = store.lease_next("partners", now, LEASE).unwrap().unwrap();
        let at = now + chrono::Duration::seconds(30);
        let error = "503".to_owned();
        let (record, applied) = store
            .finish(&leased, &Outcome::Retry { at, error }, now)
            .unwrap();
        assert!(applied);
        assert_eq!(record.state, DeliveryState::Retrying);
        assert_eq!(
            store
                .next_due("partners")
                .unwrap()
                .map(|d| d.timestamp_millis()),
            Some(at.timestamp_millis())
        );
        assert!(store.lease_next("partners", now, LEASE).unwrap().is_none());
        assert!(store.lease_next("partners", at, LEASE).unwrap().is_some());
    }

    /// A delivery whose first attempt outlived its lease, and the second lease that took over.
    fn superseded(store: &Store) -> (DeliveryRecord, DeliveryRecord, DateTime<Utc>) {
        let now = Utc::now();
        queue_one(store, now);
        let first = store.lease_next("partners", now, LEASE).unwrap().unwrap();
        let later = now + chrono::Duration::seconds(61);
        store.requeue_leases(later, false).unwrap();
        let second = store.lease_next("partners", later, LEASE).unwrap().unwrap();
        (first, second, later)
    }

    #[test]
    fn a_late_outcome_does_not_reopen_a_delivery_that_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (first, second, later) = superseded(&store);
        store.finish(&second, &Outcome::Sent, later).unwrap();

        let retry = Outcome::Retry {
            at: later,
            error: "timed out".into(),
        };
        let (record, applied) = store.finish(&first, &retry, later).unwrap();
        assert!(!applied, "a superseded failure changes nothing");
        assert_eq!(record.state, DeliveryState::Sent);
        assert!(
            store.next_due("partners").unwrap().is_none(),
            "nothing is queued again"
        );
        assert_eq!(store.unfinished_deliveries(), 0);
    }

    #[test]
    fn a_late_success_overrides_a_dead_letter_so_retry_does_not_send_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (first, second, later) = superseded(&store);
        let dead = Outcome::Dead {
            error: "400".into(),
        };
        store.finish(&second, &dead, later).unwrap();

        let (record, applied) = store.finish(&first, &Outcome::Sent, later).unwrap();
        assert!(applied);
        assert_eq!(record.state, DeliveryState::Sent);
        assert!(store.requeue_dead(None, later).unwrap().is_empty());
    }

    #[test]
    fn dead_letters_are_requeued_with_a_fresh_attempt_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let now = Utc::now();
        let queued = queue_one(&store, now);
        let leased = store.lease_next("partners", now, LEASE).unwrap().unwrap();
        let dead = Outcome::Dead {
            error: "400".into(),
        };
        store.finish(&leased, &dead, now).unwrap();
        assert_eq!(store.counts(None).unwrap()["partners"].dead, 1);

        let requeued = store.requeue_dead(Some(queued.update), now).unwrap();
        assert_eq!(requeued.len(), 1);
        assert_eq!(requeued[0].attempts, 0);
        assert!(
            store.requeue_dead(None, now).unwrap().is_empty(),
            "requeued once only"
        );
        assert!(store.lease_next("partners", now, LEASE).unwrap().is_some());
    }
}
