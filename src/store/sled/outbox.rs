//! The sled outbox: planning records, the due-time ordered queue, leases with their owner,
//! outcomes and their side effects, dead letters, and the per-update counters.
//!
//! A queued delivery sits in `outbox` under (channel, due time, key); a leased one in `leases`
//! under (deadline, key) until its outcome is recorded; a dead one in `dead` under its key.
//! `counts` holds, per `{update}/{channel}`, how many deliveries are in each state, moved in
//! the same transaction as the delivery itself, so reading them never scans.

use super::{Trees, TxResult, abort, decode, encode, together_or_each};
use crate::clock;
use crate::delivery::{Counts, DeliveryKey, DeliveryRecord, DeliveryState, FailureKind, Outcome};
use crate::domain::{Incident, Subscriber, Update};
use crate::store::{Cursor, DeliveryFilter, Page, PlanState, Recorded, StoreError};
use ::sled::Transactional;
use ::sled::transaction::TransactionalTree;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use ulid::Ulid;

/// One worker's request for deliveries to lease.
#[derive(Debug, Clone)]
pub(super) struct LeaseRequest {
    pub channel: String,
    pub owner: String,
    pub max: usize,
    pub lease: Duration,
    pub now: DateTime<Utc>,
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

fn outbox_key(record: &DeliveryRecord) -> Vec<u8> {
    let mut key = outbox_prefix(&record.channel);
    key.extend_from_slice(&millis(record.due_at).to_be_bytes());
    key.extend_from_slice(record.key().as_str().as_bytes());
    key
}

fn lease_key(record: &DeliveryRecord) -> Option<Vec<u8>> {
    record.lease_until.map(|deadline| {
        let mut key = millis(deadline).to_be_bytes().to_vec();
        key.extend_from_slice(record.key().as_str().as_bytes());
        key
    })
}

/// The due time and delivery key an outbox key holds.
fn split_outbox_key<'k>(channel: &str, key: &'k [u8]) -> Option<(DateTime<Utc>, &'k [u8])> {
    let start = channel.len() + 1;
    let bytes: [u8; 8] = key.get(start..start + 8)?.try_into().ok()?;
    let due = Utc
        .timestamp_millis_opt(i64::try_from(u64::from_be_bytes(bytes)).ok()?)
        .single()?;
    Some((due, key.get(start + 8..)?))
}

/// The deadline and delivery key a lease key holds.
fn split_lease_key(key: &[u8]) -> Option<(u64, &[u8])> {
    let bytes: [u8; 8] = key.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(bytes), key.get(8..)?))
}

/// The key, in `meta`, of the last update whose settled deliveries were all forgotten.
const PRUNED_THROUGH: &[u8] = b"pruned_through";

fn counts_key(update: Ulid, channel: &str) -> String {
    format!("{update}/{channel}")
}

fn read_record(deliveries: &TransactionalTree, key: &[u8]) -> TxResult<Option<DeliveryRecord>> {
    deliveries
        .get(key)?
        .map(|bytes| decode(&bytes).map_err(abort))
        .transpose()
}

fn write_record(deliveries: &TransactionalTree, record: &DeliveryRecord) -> TxResult<()> {
    deliveries.insert(
        record.key().as_str().as_bytes(),
        encode(record).map_err(abort)?,
    )?;
    Ok(())
}

/// Moves one delivery of `record`'s update and channel from state `from` to `to`.
fn count_move(
    counts: &TransactionalTree,
    record: &DeliveryRecord,
    from: Option<DeliveryState>,
    to: DeliveryState,
) -> TxResult<()> {
    let key = counts_key(record.update, &record.channel);
    let mut current: Counts = match counts.get(key.as_bytes())? {
        Some(bytes) => decode(&bytes).map_err(abort)?,
        None => Counts::default(),
    };
    current.moved(from, to);
    counts.insert(key.as_bytes(), encode(&current).map_err(abort)?)?;
    Ok(())
}

/// Takes a record out of the queue or lease it sits in, whichever it is in.
fn unlink(
    outbox: &TransactionalTree,
    leases: &TransactionalTree,
    record: &DeliveryRecord,
) -> TxResult<()> {
    if let Some(lease_key) = lease_key(record) {
        leases.remove(lease_key)?;
    }
    if record.state.is_queued() {
        outbox.remove(outbox_key(record))?;
    }
    Ok(())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} is not in the expected form"))
}

impl Trees {
    pub(super) fn plan_state(&self, update: Ulid) -> Result<PlanState, StoreError> {
        match self.plans.get(update.to_string())? {
            Some(bytes) => decode(&bytes),
            None => Err(StoreError::UnknownUpdate(update)),
        }
    }

    pub(super) fn unfinished_plans(&self) -> Result<Vec<Ulid>, StoreError> {
        let mut unfinished = Vec::new();
        for entry in self.plans.iter() {
            let (key, value) = entry?;
            let state: PlanState = decode(&value)?;
            if !state.done {
                let id = std::str::from_utf8(&key)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| corrupt("a plan key"))?;
                unfinished.push(id);
            }
        }
        Ok(unfinished)
    }

    pub(super) fn enqueue_planned(
        &self,
        update: Ulid,
        records: &[DeliveryRecord],
        state: &PlanState,
    ) -> Result<usize, StoreError> {
        let added = (&self.deliveries, &self.outbox, &self.plans, &self.counts).transaction(
            |(deliveries, outbox, plans, counts)| {
                let mut added = 0;
                for record in records {
                    if deliveries.get(record.key().as_str().as_bytes())?.is_none() {
                        write_record(deliveries, record)?;
                        outbox.insert(outbox_key(record), &[])?;
                        count_move(counts, record, None, record.state)?;
                        added += 1;
                    }
                }
                plans.insert(update.to_string().as_bytes(), encode(state).map_err(abort)?)?;
                Ok(added)
            },
        )?;
        Ok(added)
    }

    pub(super) fn next_due(&self, channel: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self.outbox.scan_prefix(outbox_prefix(channel)).next() {
            Some(entry) => {
                let (key, _) = entry?;
                let (due, _) =
                    split_outbox_key(channel, &key).ok_or_else(|| corrupt("an outbox key"))?;
                Ok(Some(due))
            }
            None => Ok(None),
        }
    }

    /// Leases for many requests at once, in one transaction: each request gets up to its
    /// `max` deliveries of its channel due at its `now`, earliest first, never one another
    /// request of the batch got. Only the store's thread writes, so the scan is current.
    pub(super) fn lease_many(
        &self,
        requests: &[LeaseRequest],
    ) -> Result<Vec<Vec<DeliveryRecord>>, StoreError> {
        let mut claimed: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        let mut plans = Vec::with_capacity(requests.len());
        for request in requests {
            let mut keys = Vec::new();
            for entry in self.outbox.scan_prefix(outbox_prefix(&request.channel)) {
                if keys.len() >= request.max {
                    break;
                }
                let (queue_key, _) = entry?;
                let (due, _) = split_outbox_key(&request.channel, &queue_key)
                    .ok_or_else(|| corrupt("an outbox key"))?;
                if due > request.now {
                    break;
                }
                if claimed.insert(queue_key.to_vec()) {
                    keys.push(queue_key.to_vec());
                }
            }
            plans.push(keys);
        }
        if plans.iter().all(Vec::is_empty) {
            return Ok(plans.into_iter().map(|_| Vec::new()).collect());
        }
        // One transaction for all of them: each sled transaction writes log buffers of its
        // own, so a transaction per delivery cost two disk writes per delivery.
        let leased = (&self.outbox, &self.leases, &self.deliveries, &self.counts).transaction(
            |(outbox, leases, deliveries, counts)| {
                let mut all = Vec::with_capacity(requests.len());
                for (request, keys) in requests.iter().zip(&plans) {
                    let lease_until = clock::after(request.now, request.lease);
                    let mut leased = Vec::with_capacity(keys.len());
                    for queue_key in keys {
                        if outbox.remove(queue_key.as_slice())?.is_none() {
                            continue;
                        }
                        let Some((_, delivery_key)) = split_outbox_key(&request.channel, queue_key)
                        else {
                            continue;
                        };
                        let Some(mut record) = read_record(deliveries, delivery_key)? else {
                            continue;
                        };
                        let was = record.state;
                        record.lease(&request.owner, lease_until);
                        if let Some(key) = lease_key(&record) {
                            leases.insert(key, &[])?;
                        }
                        write_record(deliveries, &record)?;
                        count_move(counts, &record, Some(was), DeliveryState::InFlight)?;
                        leased.push(record);
                    }
                    all.push(leased);
                }
                Ok(all)
            },
        )?;
        Ok(leased)
    }

    pub(super) fn give_back(
        &self,
        leased: &[DeliveryRecord],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let given = (&self.outbox, &self.leases, &self.deliveries, &self.counts).transaction(
            |(outbox, leases, deliveries, counts)| {
                let mut given = 0;
                for lease in leased {
                    let key = lease.key();
                    let Some(mut record) = read_record(deliveries, key.as_str().as_bytes())? else {
                        continue;
                    };
                    if record.state != DeliveryState::InFlight || record.leases != lease.leases {
                        continue;
                    }
                    unlink(outbox, leases, &record)?;
                    let was = record.state;
                    record.give_back(now);
                    outbox.insert(outbox_key(&record), &[])?;
                    write_record(deliveries, &record)?;
                    count_move(counts, &record, Some(was), record.state)?;
                    given += 1;
                }
                Ok(given)
            },
        )?;
        Ok(given)
    }

    /// Records many outcomes in one transaction (one transaction's log writes instead of one
    /// each). If any of them cannot be recorded, each is recorded on its own instead, so one
    /// bad record never fails the others.
    pub(super) fn record_outcomes(
        &self,
        batch: &[(DeliveryRecord, Outcome, DateTime<Utc>)],
    ) -> Vec<Result<Recorded, StoreError>> {
        together_or_each(batch, |some| self.outcome_transaction(some))
    }

    fn outcome_transaction(
        &self,
        batch: &[(DeliveryRecord, Outcome, DateTime<Utc>)],
    ) -> Result<Vec<Recorded>, StoreError> {
        let trees = (
            &self.deliveries,
            &self.outbox,
            &self.leases,
            &self.dead,
            &self.counts,
            &self.updates,
            &self.incidents,
            &self.subscribers,
            &self.channel_state,
        );
        let recorded = trees.transaction(
            |(
                deliveries,
                outbox,
                leases,
                dead,
                counts,
                updates,
                incidents,
                subscribers,
                channel_state,
            )| {
                let mut all = Vec::with_capacity(batch.len());
                for (leased, outcome, now) in batch {
                    let now = *now;
                    let key = leased.key();
                    // Read afresh: if the lease expired meanwhile, the record went back to the
                    // queue (or to another attempt), and that must be undone on success, or it
                    // would be sent again.
                    let Some(mut record) = read_record(deliveries, key.as_str().as_bytes())? else {
                        return Err(abort(StoreError::Corrupt(format!(
                            "delivery {key} vanished"
                        ))));
                    };
                    let superseded = record.leases != leased.leases || record.state.is_settled();
                    let sent = matches!(outcome, Outcome::Sent { .. });
                    if record.state == DeliveryState::Sent || (superseded && !sent) {
                        all.push(Recorded {
                            record,
                            applied: false,
                        });
                        continue;
                    }
                    unlink(outbox, leases, &record)?;
                    if record.state == DeliveryState::Dead {
                        dead.remove(key.as_str().as_bytes())?;
                    }
                    let was = record.state;
                    record.apply(outcome, now);
                    match outcome {
                        Outcome::Retry { .. } => {
                            outbox.insert(outbox_key(&record), &[])?;
                        }
                        Outcome::Dead { failure } => {
                            dead.insert(key.as_str().as_bytes(), &[])?;
                            match failure.kind {
                                FailureKind::EndpointGone => {
                                    let state = ChannelState {
                                        disabled_at: now,
                                        reason: failure.reason.clone(),
                                    };
                                    channel_state.insert(
                                        record.channel.as_bytes(),
                                        encode(&state).map_err(abort)?,
                                    )?;
                                }
                                FailureKind::RecipientGone => {
                                    if let Some(contact) = record.recipient.contact()
                                        && let Some(bytes) = subscribers.get(contact.as_str())?
                                    {
                                        let mut subscriber: Subscriber =
                                            decode(&bytes).map_err(abort)?;
                                        subscriber.stopped_on.insert(record.channel.clone());
                                        subscriber.updated_at = now;
                                        subscribers.insert(
                                            contact.as_str(),
                                            encode(&subscriber).map_err(abort)?,
                                        )?;
                                    }
                                }
                                _ => {}
                            }
                        }
                        Outcome::Sent { receipt } => {
                            // A thread whose update is gone (removed by hand?) is lost, never
                            // the outcome: refusing the outcome would send the message again.
                            let update = match &receipt.thread {
                                Some(_) => updates.get(record.update.to_string().as_bytes())?,
                                None => None,
                            };
                            if let (Some(thread), Some(update_bytes)) = (&receipt.thread, update) {
                                let update: Update = decode(&update_bytes).map_err(abort)?;
                                let incident_key = update.incident.to_string();
                                if let Some(bytes) = incidents.get(incident_key.as_bytes())? {
                                    let mut incident: Incident = decode(&bytes).map_err(abort)?;
                                    incident
                                        .remote_threads
                                        .insert(record.channel.clone(), thread.clone());
                                    incidents.insert(
                                        incident_key.as_bytes(),
                                        encode(&incident).map_err(abort)?,
                                    )?;
                                }
                            }
                        }
                        Outcome::Skipped { .. } => {}
                    }
                    write_record(deliveries, &record)?;
                    count_move(counts, &record, Some(was), record.state)?;
                    all.push(Recorded {
                        record,
                        applied: true,
                    });
                }
                Ok(all)
            },
        )?;
        Ok(recorded)
    }

    /// Puts leases back in the queue: those expired by `now`, and, with `owner`, also every
    /// lease another owner holds. Returns how many moved.
    pub(super) fn requeue_leases(
        &self,
        now: DateTime<Utc>,
        owner: Option<&str>,
    ) -> Result<usize, StoreError> {
        let mut requeued = 0;
        for entry in self.leases.iter() {
            let (lease_key, _) = entry?;
            let (deadline, delivery_key) =
                split_lease_key(&lease_key).ok_or_else(|| corrupt("a lease key"))?;
            let expired = deadline <= millis(now);
            if !expired && owner.is_none() {
                // Leases sort by deadline: none after this one has expired either.
                break;
            }
            let moved = (&self.leases, &self.outbox, &self.deliveries, &self.counts).transaction(
                |(leases, outbox, deliveries, counts)| {
                    let Some(mut record) = read_record(deliveries, delivery_key)? else {
                        leases.remove(&*lease_key)?;
                        return Ok(false);
                    };
                    let orphaned = owner.is_some_and(|me| record.owner.as_deref() != Some(me));
                    if !expired && !orphaned {
                        return Ok(false);
                    }
                    if leases.remove(&*lease_key)?.is_none() {
                        return Ok(false);
                    }
                    let was = record.state;
                    record.release(now);
                    outbox.insert(outbox_key(&record), &[])?;
                    write_record(deliveries, &record)?;
                    count_move(counts, &record, Some(was), DeliveryState::Queued)?;
                    Ok(true)
                },
            )?;
            requeued += usize::from(moved);
        }
        Ok(requeued)
    }

    pub(super) fn requeue_dead(
        &self,
        update: Option<Ulid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let prefix = update.map(|id| format!("{id}/")).unwrap_or_default();
        let mut requeued = Vec::new();
        for entry in self.dead.scan_prefix(prefix.as_bytes()) {
            let (dead_key, _) = entry?;
            let record = (&self.dead, &self.outbox, &self.deliveries, &self.counts).transaction(
                |(dead, outbox, deliveries, counts)| {
                    if dead.remove(&*dead_key)?.is_none() {
                        return Ok(None);
                    }
                    let Some(mut record) = read_record(deliveries, &dead_key)? else {
                        return Ok(None);
                    };
                    let was = record.state;
                    record.revive(now);
                    outbox.insert(outbox_key(&record), &[])?;
                    write_record(deliveries, &record)?;
                    count_move(counts, &record, Some(was), DeliveryState::Queued)?;
                    Ok(Some(record))
                },
            )?;
            requeued.extend(record);
        }
        Ok(requeued)
    }

    pub(super) fn record_report(
        &self,
        key: &DeliveryKey,
        provider_id: Option<&str>,
        report: &crate::delivery::ProviderReport,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let applied =
            (&self.deliveries, &self.subscribers).transaction(|(deliveries, subscribers)| {
                let Some(mut record) = read_record(deliveries, key.as_str().as_bytes())? else {
                    return Ok(None);
                };
                let contact = record.recipient.contact().cloned();
                let mut subscriber: Option<Subscriber> = match &contact {
                    Some(contact) => match subscribers.get(contact.as_str())? {
                        Some(bytes) => Some(decode(&bytes).map_err(abort)?),
                        None => None,
                    },
                    None => None,
                };
                if !crate::store::apply_report(
                    &mut record,
                    subscriber.as_mut(),
                    provider_id,
                    report,
                ) {
                    return Ok(None);
                }
                write_record(deliveries, &record)?;
                if let (Some(contact), Some(subscriber)) = (&contact, &subscriber) {
                    subscribers.insert(contact.as_str(), encode(subscriber).map_err(abort)?)?;
                }
                Ok(Some(record))
            })?;
        Ok(applied)
    }

    pub(super) fn delivery(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        self.deliveries
            .get(key.as_str())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    pub(super) fn deliveries(
        &self,
        update: Ulid,
        filter: DeliveryFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<DeliveryRecord>, StoreError> {
        use std::ops::Bound::{Excluded, Included};
        let prefix = format!("{update}/");
        // Every key of the update sorts before the prefix with its last byte bumped.
        let end = format!("{update}0");
        let start = match after {
            Some(cursor) => Excluded(cursor.as_bytes().to_vec()),
            None => Included(prefix.into_bytes()),
        };
        let mut items = Vec::new();
        let mut next = None;
        if limit == 0 {
            return Ok(Page { items, next });
        }
        for entry in self
            .deliveries
            .range::<Vec<u8>, _>((start, Excluded(end.into_bytes())))
        {
            let (key, value) = entry?;
            let record: DeliveryRecord = decode(&value)?;
            let wanted = match filter {
                DeliveryFilter::All => true,
                DeliveryFilter::Failed => {
                    matches!(record.state, DeliveryState::Dead | DeliveryState::Retrying)
                }
            };
            if wanted {
                items.push(record);
                next = Some(Cursor::from_bytes(key.to_vec()));
                if items.len() >= limit {
                    break;
                }
            }
        }
        Ok(Page { items, next })
    }

    /// See [`crate::store::Store::prune_settled`]. Walks updates oldest first (their ids are
    /// ULIDs), from the last one it had pruned whole, and deletes in one batch per update.
    pub(super) fn prune_settled(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let start = match self.meta.get(PRUNED_THROUGH)? {
            Some(last) => Excluded(last.to_vec()),
            None => Unbounded,
        };
        let mut forgotten = 0;
        // Updates pruned whole so far in this call, in order: the marker may move past them.
        let mut contiguous = true;
        for entry in self.updates.range::<Vec<u8>, _>((start, Unbounded)) {
            if forgotten >= limit {
                break;
            }
            let (key, value) = entry?;
            let update: crate::domain::Update = decode(&value)?;
            if update.created_at >= before {
                break;
            }
            let prefix = format!("{}/", update.id);
            let mut batch = ::sled::Batch::default();
            let mut unsettled = false;
            let mut taken = 0;
            for entry in self.deliveries.scan_prefix(prefix.as_bytes()) {
                let (delivery_key, value) = entry?;
                let record: DeliveryRecord = decode(&value)?;
                if crate::store::forgettable(&record) {
                    if forgotten + taken >= limit {
                        unsettled = true;
                        break;
                    }
                    batch.remove(delivery_key);
                    taken += 1;
                } else if !record.state.is_settled() {
                    unsettled = true;
                }
            }
            if !self.plan_state(update.id)?.done {
                unsettled = true;
            }
            self.deliveries.apply_batch(batch)?;
            forgotten += taken;
            contiguous &= !unsettled;
            if contiguous {
                self.meta.insert(PRUNED_THROUGH, key)?;
            }
        }
        Ok(forgotten)
    }

    pub(super) fn counts(
        &self,
        update: Option<Ulid>,
    ) -> Result<BTreeMap<String, Counts>, StoreError> {
        let prefix = update.map(|id| format!("{id}/")).unwrap_or_default();
        let mut all: BTreeMap<String, Counts> = BTreeMap::new();
        for entry in self.counts.scan_prefix(prefix.as_bytes()) {
            let (key, value) = entry?;
            let key = std::str::from_utf8(&key).map_err(|_| corrupt("a counter key"))?;
            let (_, channel) = key
                .split_once('/')
                .ok_or_else(|| corrupt("a counter key"))?;
            let counts: Counts = decode(&value)?;
            all.entry(channel.to_owned()).or_default().add(&counts);
        }
        Ok(all)
    }

    pub(super) fn channel_disabled(&self, channel: &str) -> Result<Option<String>, StoreError> {
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

    pub(super) fn enable_channel(&self, channel: &str) -> Result<bool, StoreError> {
        Ok(self.channel_state.remove(channel)?.is_some())
    }
}
