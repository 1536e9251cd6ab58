//! `crier store copy`: moves a store (an embedded sled one, say) into PostgreSQL, so a user
//! who outgrows one machine keeps subscribers with their orders, incidents, updates with their
//! plans, and every delivery in its state with its counts. Disabled channels, the watchdog's
//! sent-alert marks and idempotency records stay behind.
//!
//! The source is read through the [`Store`] interface alone, page by page, so memory stays
//! flat. Each page is one transaction that inserts what the target does not hold yet: a copy
//! stopped half-way is run again, and records already there (by key) are kept as they are.
//! No node may use the database meanwhile: an update's counts go in after its deliveries, and
//! only if the database counts nothing for it yet.

use super::{
    CountMoves, PostgresStore, SubscriberWrite, add_to_counter, exec, insert_deliveries, run,
    write_counts, write_subscribers,
};
use crate::delivery::{Counts, DeliveryRecord, DeliveryState};
use crate::domain::{Audience, Subscriber};
use crate::store::{Cursor, DeliveryFilter, Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeSet;
use tokio_postgres::types::Json;

/// How many records one page (and one transaction) moves.
const PAGE: usize = 1_000;

/// What a copy moved, and what the target already held.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Copied {
    pub subscribers: u64,
    pub incidents: u64,
    pub updates: u64,
    pub deliveries: u64,
    /// Records the target already had (a copy run again): left as they were.
    pub already_there: u64,
    /// Deliveries a process held when the source was last used: queued again, since the
    /// process that leased them is gone.
    pub released: u64,
}

impl PostgresStore {
    /// Copies every record of `source` into this store; `progress` hears the running totals
    /// after each page.
    pub async fn copy_from(
        &self,
        source: &dyn Store,
        now: DateTime<Utc>,
        mut progress: impl FnMut(&Copied),
    ) -> Result<Copied, StoreError> {
        let mut copied = Copied::default();
        let mut after: Option<Cursor> = None;
        loop {
            let page = source
                .subscriber_page(&Audience::Everyone, after.as_ref(), PAGE)
                .await?;
            if page.items.is_empty() {
                break;
            }
            let inserted = self.restore_subscribers(&page.items).await?;
            copied.subscribers += inserted;
            copied.already_there += (page.items.len() as u64).saturating_sub(inserted);
            after = page.next;
            progress(&copied);
        }

        for incident in source.incidents().await? {
            let inserted = self
                .transaction(async |tx| {
                    exec(
                        tx,
                        "INSERT INTO incidents (id, updated_ns, record) VALUES ($1, $2, $3)
                         ON CONFLICT (id) DO NOTHING",
                        &[
                            &incident.id.to_string(),
                            &super::nanos(incident.updated_at),
                            &Json(&incident),
                        ],
                    )
                    .await
                })
                .await?;
            copied.incidents += inserted;
            copied.already_there += 1u64.saturating_sub(inserted);
        }
        progress(&copied);

        // Oldest first, so an update's deliveries follow the updates before it.
        let mut updates = source.recent_updates(usize::MAX).await?;
        updates.reverse();
        for update in updates {
            let plan = source.plan_state(update.id).await?;
            let id = update.id.to_string();
            let inserted = self
                .transaction(async |tx| {
                    let inserted = exec(
                        tx,
                        "INSERT INTO updates (id, created_ns, record) VALUES ($1, $2, $3)
                         ON CONFLICT (id) DO NOTHING",
                        &[&id, &super::nanos(update.created_at), &Json(&update)],
                    )
                    .await?;
                    exec(
                        tx,
                        "INSERT INTO plans (update_id, done, record) VALUES ($1, $2, $3)
                         ON CONFLICT (update_id) DO NOTHING",
                        &[&id, &plan.done, &Json(&plan)],
                    )
                    .await?;
                    Ok(inserted)
                })
                .await?;
            copied.updates += inserted;
            copied.already_there += 1u64.saturating_sub(inserted);
            self.copy_deliveries(source, update.id, now, &mut copied, &mut progress)
                .await?;
        }
        progress(&copied);
        Ok(copied)
    }

    /// Copies one update's deliveries page by page, then its counts: counts stay what the
    /// source counted (retention may have forgotten deliveries they include).
    async fn copy_deliveries(
        &self,
        source: &dyn Store,
        update: ulid::Ulid,
        now: DateTime<Utc>,
        copied: &mut Copied,
        progress: &mut impl FnMut(&Copied),
    ) -> Result<(), StoreError> {
        let mut after: Option<Cursor> = None;
        let mut released = BTreeSet::new();
        loop {
            let page = source
                .deliveries(update, DeliveryFilter::All, after.as_ref(), PAGE)
                .await?;
            if page.items.is_empty() {
                break;
            }
            let records: Vec<DeliveryRecord> = page
                .items
                .into_iter()
                .map(|mut record| {
                    if record.state == DeliveryState::InFlight {
                        record.release(now);
                        released.insert(record.key().as_str().to_owned());
                    }
                    record
                })
                .collect();
            let inserted: Vec<String> = self
                .transaction(async |tx| {
                    let inserted = insert_deliveries(tx, &records).await?;
                    Ok(inserted
                        .iter()
                        .map(|record| record.key().as_str().to_owned())
                        .collect())
                })
                .await?;
            copied.released += inserted
                .iter()
                .filter(|key| released.contains(*key))
                .count() as u64;
            let inserted = inserted.len() as u64;
            copied.deliveries += inserted;
            copied.already_there += (records.len() as u64).saturating_sub(inserted);
            after = page.next;
            progress(copied);
        }
        let mut counts = source.counts(Some(update)).await?;
        // The leases released above are counted queued.
        if !released.is_empty() {
            for channel_counts in counts.values_mut() {
                let moved = channel_counts.in_flight;
                channel_counts.queued += moved;
                channel_counts.in_flight = 0;
            }
        }
        let id = update.to_string();
        self.transaction(async |tx| {
            let known = run(
                tx,
                "SELECT 1 FROM delivery_counts WHERE update_id = $1 LIMIT 1",
                &[&id],
            )
            .await?;
            if known.is_empty() {
                let mut moves = CountMoves::default();
                for (channel, channel_counts) in &counts {
                    moves.add(&id, channel, channel_counts);
                }
                write_counts(tx, moves).await?;
            }
            Ok(())
        })
        .await
    }

    /// Inserts subscribers the target does not hold yet, with their orders and the counter;
    /// returns how many.
    async fn restore_subscribers(&self, subscribers: &[Subscriber]) -> Result<u64, StoreError> {
        self.transaction(async |tx| {
            let contacts: Vec<&str> = subscribers.iter().map(|s| s.contact.as_str()).collect();
            let bodies: Vec<Json<&Subscriber>> = subscribers.iter().map(Json).collect();
            let rows = run(
                tx,
                "INSERT INTO subscribers (contact, record)
                 SELECT * FROM unnest($1::text[], $2::jsonb[])
                 ON CONFLICT (contact) DO NOTHING
                 RETURNING contact",
                &[&contacts, &bodies],
            )
            .await?;
            let inserted: BTreeSet<String> = rows
                .iter()
                .map(|row| super::field(row, 0))
                .collect::<Result<_, _>>()?;
            add_to_counter(tx, "subscribers", inserted.len() as i64).await?;
            // The rows hold the records already; this adds their orders to the followers.
            let writes: Vec<SubscriberWrite> = subscribers
                .iter()
                .filter(|s| inserted.contains(s.contact.as_str()))
                .map(|s| SubscriberWrite {
                    before: BTreeSet::new(),
                    after: s.clone(),
                })
                .collect();
            write_subscribers(tx, &writes).await?;
            Ok(inserted.len() as u64)
        })
        .await
    }
}

impl CountMoves {
    /// Adds a whole channel's counts, as a copy brings them.
    fn add(&mut self, update: &str, channel: &str, counts: &Counts) {
        let slots = self
            .0
            .entry((update.to_owned(), channel.to_owned()))
            .or_default();
        let each = [
            counts.queued,
            counts.in_flight,
            counts.sent,
            counts.retrying,
            counts.dead,
            counts.skipped,
        ];
        for (slot, count) in slots.iter_mut().zip(each) {
            *slot += i64::try_from(count).unwrap_or(i64::MAX);
        }
    }
}
