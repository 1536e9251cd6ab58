//! Planning: fanning one update out into deliveries, in batches, resumable from a cursor.

use crate::channel::{Channel, Reach};
use crate::domain::{Audience, OrderNumber, Subscriber, Update};
use crate::store::{DeliveryRecord, Store, StoreError};
use chrono::{DateTime, Utc};
use std::sync::Arc;

/// Plans `update` to completion, one store transaction per batch of subscribers, and returns
/// how many deliveries were added. Safe to call again after a crash: it resumes at the cursor,
/// and a delivery already planned is never planned twice.
pub fn plan_update(
    store: &Store,
    update: &Update,
    channels: &[Arc<dyn Channel>],
    batch: usize,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let mut state = store.plan_state(update.id)?;
    let selected: Vec<&Arc<dyn Channel>> = channels
        .iter()
        .filter(|c| update.channels.iter().any(|name| name == c.name()))
        .collect();
    let mut added = 0;

    if !state.broadcast_planned {
        let broadcasts: Vec<DeliveryRecord> = selected
            .iter()
            .filter(|c| match c.reach() {
                Reach::Broadcast { targeted } => targeted || !update.audience.is_targeted(),
                Reach::Subscribers(_) => false,
            })
            .map(|c| {
                let orders = match &update.audience {
                    Audience::Everyone => Vec::new(),
                    Audience::Orders(orders) => orders.iter().cloned().collect(),
                };
                DeliveryRecord::new(
                    update.id,
                    c.name(),
                    crate::store::BROADCAST_RECIPIENT,
                    orders,
                    now,
                )
            })
            .collect();
        state.broadcast_planned = true;
        added += store.enqueue_planned(update.id, &broadcasts, &state)?;
    }

    let targets: Option<Vec<OrderNumber>> = match &update.audience {
        Audience::Everyone => None,
        Audience::Orders(orders) => Some(orders.iter().cloned().collect()),
    };
    while !state.done {
        let page = match &targets {
            None => store.subscribers_after(state.cursor.as_deref(), batch)?,
            Some(orders) => store.followers_after(orders, state.cursor.as_deref(), batch)?,
        };
        let mut records = Vec::new();
        for (_, subscriber) in &page {
            records.extend(deliveries_for(
                update,
                subscriber,
                &selected,
                targets.as_deref(),
                now,
            ));
        }
        state.cursor = page.last().map(|(key, _)| key.clone()).or(state.cursor);
        state.done = page.len() < batch;
        added += store.enqueue_planned(update.id, &records, &state)?;
    }
    Ok(added)
}

/// The deliveries one subscriber gets: one per per-subscriber channel that reaches its contact,
/// however many of the affected orders it follows.
fn deliveries_for(
    update: &Update,
    subscriber: &Subscriber,
    channels: &[&Arc<dyn Channel>],
    targets: Option<&[OrderNumber]>,
    now: DateTime<Utc>,
) -> Vec<DeliveryRecord> {
    if !subscriber.receives_updates() {
        return Vec::new();
    }
    let orders: Vec<OrderNumber> = match targets {
        Some(targets) => subscriber
            .orders
            .iter()
            .filter(|o| targets.contains(o))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    if targets.is_some() && orders.is_empty() {
        return Vec::new();
    }
    channels
        .iter()
        .filter(|c| c.reach() == Reach::Subscribers(subscriber.contact.kind()))
        .map(|c| {
            DeliveryRecord::new(
                update.id,
                c.name(),
                subscriber.contact.as_str(),
                orders.clone(),
                now,
            )
        })
        .collect()
}
