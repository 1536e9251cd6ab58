//! Planning: fanning one update out into deliveries, in batches, resumable from a cursor.

use crate::channel::{Channel, Reach};
use crate::domain::{Audience, OrderNumber, Subscriber, Update};
use crate::store::{DeliveryRecord, Store, StoreError};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
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

    let targets: Option<&BTreeSet<OrderNumber>> = match &update.audience {
        Audience::Everyone => None,
        Audience::Orders(orders) => Some(orders),
    };
    while !state.done {
        let page = match &targets {
            None => store.subscribers_after(state.cursor.as_deref(), batch)?,
            Some(orders) => store.followers_after(orders, state.cursor.as_deref(), batch)?,
        };
        let mut records = Vec::new();
        for (_, subscriber) in &page {
            records.extend(deliveries_for(update, subscriber, &selected, targets, now));
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
    targets: Option<&BTreeSet<OrderNumber>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{DeliveryError, RejectError, RenderedPart};
    use crate::config::{DeliveryPolicy, StoreSettings};
    use crate::domain::{
        Body, Contact, ContactKind, Headline, Incident, IncidentState, OrderPattern,
    };
    use crate::render::MessageContext;
    use crate::store::PlanState;
    use ulid::Ulid;

    /// A channel that only exists to be planned for.
    struct PlannedOnly(&'static str, Reach);

    #[async_trait::async_trait]
    impl Channel for PlannedOnly {
        fn name(&self) -> &str {
            self.0
        }
        fn reach(&self) -> Reach {
            self.1
        }
        fn policy(&self) -> &DeliveryPolicy {
            unreachable!("planning never asks")
        }
        fn render(&self, _: &MessageContext) -> Result<Vec<RenderedPart>, RejectError> {
            Ok(Vec::new())
        }
        async fn deliver(
            &self,
            _: &MessageContext,
            _: &DeliveryRecord,
        ) -> Result<(), DeliveryError> {
            Ok(())
        }
    }

    fn channels() -> Vec<Arc<dyn Channel>> {
        vec![
            Arc::new(PlannedOnly("email", Reach::Subscribers(ContactKind::Email))),
            Arc::new(PlannedOnly("sms", Reach::Subscribers(ContactKind::Phone))),
            Arc::new(PlannedOnly("status", Reach::Broadcast { targeted: false })),
            Arc::new(PlannedOnly("partners", Reach::Broadcast { targeted: true })),
        ]
    }

    fn store_with_subscribers(dir: &std::path::Path, count: usize) -> Store {
        let store = Store::open(&StoreSettings {
            path: dir.join("store"),
            cache_capacity_bytes: 8 << 20,
        })
        .unwrap();
        let pattern = OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap();
        for i in 0..count {
            let contact = Contact::parse(&format!("c{i:03}@example.com")).unwrap();
            let order = OrderNumber::parse(&format!("AB-{:04}", 1000 + i % 10), &pattern).unwrap();
            store.subscribe(&contact, &order, true, Utc::now()).unwrap();
        }
        store
    }

    async fn accepted(store: &Store, audience: Audience) -> Update {
        let now = Utc::now();
        let incident = Incident::open(
            "Activations delayed".into(),
            IncidentState::Investigating,
            now,
        );
        let update = Update {
            id: Ulid::new(),
            incident: incident.id,
            state: IncidentState::Investigating,
            headline: Headline::parse("Activations delayed").unwrap(),
            body: Body::parse("We're on it.").unwrap(),
            next_update_by: None,
            audience,
            author: "test".into(),
            created_at: now,
            channels: vec![
                "email".into(),
                "sms".into(),
                "status".into(),
                "partners".into(),
            ],
        };
        store.accept_update(&update, Some(&incident)).await.unwrap();
        update
    }

    fn planned_keys(store: &Store, update: &Update) -> BTreeSet<String> {
        store
            .deliveries(Some(update.id))
            .map(|r| r.unwrap().key())
            .collect()
    }

    #[tokio::test]
    async fn planning_interrupted_after_one_batch_resumes_at_its_cursor_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_subscribers(dir.path(), 25);
        let update = accepted(&store, Audience::Everyone).await;

        // A crash after the first batch leaves its deliveries and its cursor, and nothing else.
        let first_page = store.subscribers_after(None, 10).unwrap();
        let selected = channels();
        let selected: Vec<&Arc<dyn Channel>> = selected.iter().collect();
        let records: Vec<DeliveryRecord> = first_page
            .iter()
            .flat_map(|(_, s)| deliveries_for(&update, s, &selected, None, Utc::now()))
            .collect();
        let interrupted = PlanState {
            cursor: first_page.last().map(|(key, _)| key.clone()),
            broadcast_planned: true,
            done: false,
        };
        assert_eq!(
            store
                .enqueue_planned(update.id, &records, &interrupted)
                .unwrap(),
            10
        );
        assert_eq!(store.unfinished_plans().unwrap(), [update.id]);

        let added = plan_update(&store, &update, &channels(), 10, Utc::now()).unwrap();
        assert_eq!(
            added, 15,
            "only the subscribers after the cursor were planned"
        );
        assert_eq!(planned_keys(&store, &update).len(), 25);
        assert!(store.unfinished_plans().unwrap().is_empty());
        assert_eq!(
            plan_update(&store, &update, &channels(), 10, Utc::now()).unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn planning_everyone_gives_one_delivery_per_contact_and_one_per_broadcast_channel() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_subscribers(dir.path(), 12);
        let phone = Contact::parse("+447700900123").unwrap();
        let pattern = OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap();
        store
            .subscribe(
                &phone,
                &OrderNumber::parse("AB-1001", &pattern).unwrap(),
                true,
                Utc::now(),
            )
            .unwrap();
        let update = accepted(&store, Audience::Everyone).await;
        plan_update(&store, &update, &channels(), 5, Utc::now()).unwrap();

        let counts = store.counts(Some(update.id)).unwrap();
        assert_eq!(counts["email"].queued, 12);
        assert_eq!(counts["sms"].queued, 1);
        assert_eq!(counts["status"].queued, 1);
        assert_eq!(counts["partners"].queued, 1);
    }

    #[tokio::test]
    async fn a_targeted_plan_walks_the_order_index_and_names_each_contacts_orders() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_subscribers(dir.path(), 30);
        let pattern = OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap();
        let ann = Contact::parse("c000@example.com").unwrap();
        let second_order = OrderNumber::parse("AB-1001", &pattern).unwrap();
        store
            .subscribe(&ann, &second_order, true, Utc::now())
            .unwrap();
        let targets: BTreeSet<OrderNumber> = ["AB-1000", "AB-1001"]
            .iter()
            .map(|o| OrderNumber::parse(o, &pattern).unwrap())
            .collect();
        let update = accepted(&store, Audience::Orders(targets)).await;
        plan_update(&store, &update, &channels(), 2, Utc::now()).unwrap();

        let counts = store.counts(Some(update.id)).unwrap();
        // c000, c010, c020 follow AB-1000; c001, c011, c021 and c000 follow AB-1001.
        assert_eq!(counts["email"].queued, 6);
        assert!(
            !counts.contains_key("status"),
            "the status page never gets a targeted update"
        );
        assert_eq!(counts["partners"].queued, 1);
        let ann_delivery = store
            .delivery(&format!("{}/email/c000@example.com", update.id))
            .unwrap()
            .unwrap();
        let orders: Vec<&str> = ann_delivery.orders.iter().map(|o| o.as_str()).collect();
        assert_eq!(orders, ["AB-1000", "AB-1001"]);
    }
}
