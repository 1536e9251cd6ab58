//! Planning: fanning one update out into deliveries, in batches, resumable from a cursor.

use crate::channel::{ConfiguredChannel, Reach};
use crate::delivery::{DeliveryRecord, Recipient};
use crate::domain::{Audience, OrderNumber, Subscriber, Update};
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

/// Plans `update` to completion, one durable store write per batch of subscribers, and returns
/// how many deliveries were added. Safe to call again after a crash: it resumes at the cursor,
/// and a delivery already planned is never planned twice.
pub async fn plan_update(
    store: &dyn Store,
    update: &Update,
    channels: &[ConfiguredChannel],
    batch: usize,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    plan_update_counting(store, update, channels, batch, now, &AtomicU64::new(0)).await
}

/// [`plan_update`], adding to `planned` after every batch, for a progress bar to follow.
pub async fn plan_update_counting(
    store: &dyn Store,
    update: &Update,
    channels: &[ConfiguredChannel],
    batch: usize,
    now: DateTime<Utc>,
    planned: &AtomicU64,
) -> Result<usize, StoreError> {
    let mut state = store.plan_state(update.id).await?;
    let selected: Vec<&ConfiguredChannel> = channels
        .iter()
        .filter(|c| update.channels.contains(&c.id))
        .collect();
    let mut added = 0;

    if !state.broadcast_planned {
        let orders: Vec<OrderNumber> = match &update.audience {
            Audience::Everyone => Vec::new(),
            Audience::Orders(orders) => orders.iter().cloned().collect(),
        };
        let broadcasts: Vec<DeliveryRecord> = selected
            .iter()
            .filter(|c| match c.reach() {
                Reach::Broadcast { accepts_targeted } => {
                    accepts_targeted || !update.audience.is_targeted()
                }
                Reach::Subscribers(_) => false,
            })
            .map(|c| {
                DeliveryRecord::new(update.id, &c.id, Recipient::Broadcast, orders.clone(), now)
            })
            .collect();
        state.broadcast_planned = true;
        added += store
            .enqueue_planned(update.id, &broadcasts, &state)
            .await?;
    }

    let targets = match &update.audience {
        Audience::Everyone => None,
        Audience::Orders(orders) => Some(orders),
    };
    while !state.done {
        let page = store
            .subscriber_page(&update.audience, state.cursor.as_ref(), batch)
            .await?;
        let mut records = Vec::new();
        for subscriber in &page.items {
            records.extend(deliveries_for(update, subscriber, &selected, targets, now));
        }
        state.done = page.items.len() < batch;
        state.cursor = page.next.or(state.cursor);
        let new = store.enqueue_planned(update.id, &records, &state).await?;
        planned.fetch_add(new as u64, Ordering::Relaxed);
        added += new;
    }
    Ok(added)
}

/// How many deliveries planning `update` would make on each of `channels` it goes through,
/// without storing anything: what the comms lead is shown before Send. The same walk and the
/// same rule as planning ([`deliveries_for`]), so the count is what planning will make.
pub async fn audience_counts(
    store: &dyn Store,
    update: &Update,
    channels: &[ConfiguredChannel],
) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
    const PAGE: usize = 1000;
    let selected: Vec<&ConfiguredChannel> = channels
        .iter()
        .filter(|c| update.channels.contains(&c.id))
        .collect();
    let mut counts: std::collections::BTreeMap<String, u64> =
        selected.iter().map(|c| (c.id.clone(), 0)).collect();
    for channel in &selected {
        if let Reach::Broadcast { accepts_targeted } = channel.reach()
            && (accepts_targeted || !update.audience.is_targeted())
        {
            counts.insert(channel.id.clone(), 1);
        }
    }
    let targets = match &update.audience {
        Audience::Everyone => None,
        Audience::Orders(orders) => Some(orders),
    };
    let mut cursor = None;
    loop {
        let page = store
            .subscriber_page(&update.audience, cursor.as_ref(), PAGE)
            .await?;
        for subscriber in &page.items {
            for delivery in
                deliveries_for(update, subscriber, &selected, targets, update.created_at)
            {
                *counts.entry(delivery.channel).or_default() += 1;
            }
        }
        if page.items.len() < PAGE || page.next.is_none() {
            break;
        }
        cursor = page.next;
    }
    Ok(counts)
}

/// The deliveries one subscriber gets: one per per-subscriber channel that reaches its contact,
/// however many of the affected orders it follows.
pub fn deliveries_for(
    update: &Update,
    subscriber: &Subscriber,
    channels: &[&ConfiguredChannel],
    targets: Option<&BTreeSet<OrderNumber>>,
    now: DateTime<Utc>,
) -> Vec<DeliveryRecord> {
    if !subscriber.receives_updates() {
        return Vec::new();
    }
    // Consent is per order: a targeted update reaches only the orders it confirmed.
    let orders: Vec<OrderNumber> = match targets {
        Some(targets) => subscriber
            .confirmed_orders()
            .into_iter()
            .filter(|o| targets.contains(o))
            .collect(),
        None => Vec::new(),
    };
    if targets.is_some() && orders.is_empty() {
        return Vec::new();
    }
    channels
        .iter()
        .filter(|c| c.reach() == Reach::Subscribers(subscriber.contact.kind()))
        .filter(|c| subscriber.receives_on(&c.id))
        .map(|c| {
            DeliveryRecord::new(
                update.id,
                &c.id,
                Recipient::Contact(subscriber.contact.clone()),
                orders.clone(),
                now,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{Attempt, Channel, Rejection, RenderedPart};
    use crate::config::DeliveryPolicy;
    use crate::delivery::{DeliveryError, DeliveryKey, Receipt};
    use crate::domain::{
        Body, Contact, ContactKind, FollowVia, Headline, Incident, IncidentState, OrderPattern,
    };
    use crate::render::MessageContext;
    use crate::store::{DeliveryFilter, MemoryStore, PlanState};
    use std::sync::Arc;
    use ulid::Ulid;

    /// A channel that only exists to be planned for.
    struct PlannedOnly(Reach);

    #[async_trait::async_trait]
    impl Channel for PlannedOnly {
        fn reach(&self) -> Reach {
            self.0
        }
        fn render(&self, _: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
            Ok(Vec::new())
        }
        async fn deliver(
            &self,
            _: &MessageContext,
            _: &Attempt<'_>,
        ) -> Result<Receipt, DeliveryError> {
            Ok(Receipt::none())
        }
    }

    fn channel(id: &str, reach: Reach) -> ConfiguredChannel {
        ConfiguredChannel {
            id: id.into(),
            kind: "test",
            policy: DeliveryPolicy::with_concurrency(1),
            adapter: Arc::new(PlannedOnly(reach)),
        }
    }

    fn channels() -> Vec<ConfiguredChannel> {
        vec![
            channel("email", Reach::Subscribers(ContactKind::Email)),
            channel("sms", Reach::Subscribers(ContactKind::Phone)),
            channel(
                "status",
                Reach::Broadcast {
                    accepts_targeted: false,
                },
            ),
            channel(
                "partners",
                Reach::Broadcast {
                    accepts_targeted: true,
                },
            ),
        ]
    }

    fn pattern() -> OrderPattern {
        OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap()
    }

    async fn store_with_subscribers(count: usize) -> MemoryStore {
        let store = MemoryStore::new();
        for i in 0..count {
            let contact = Contact::parse(&format!("c{i:03}@example.com")).unwrap();
            let order =
                OrderNumber::parse(&format!("AB-{:04}", 1000 + i % 10), &pattern()).unwrap();
            store
                .subscribe(&contact, &order, true, FollowVia::Operator, Utc::now())
                .await
                .unwrap();
        }
        store
    }

    async fn accepted(store: &MemoryStore, audience: Audience) -> Update {
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

    async fn planned_count(store: &MemoryStore, update: &Update) -> usize {
        store
            .deliveries(update.id, DeliveryFilter::All, None, usize::MAX)
            .await
            .unwrap()
            .items
            .len()
    }

    #[tokio::test]
    async fn planning_interrupted_after_one_batch_resumes_at_its_cursor_without_duplicates() {
        let store = store_with_subscribers(25).await;
        let update = accepted(&store, Audience::Everyone).await;

        // A crash after the first batch leaves its deliveries and its cursor, and nothing else.
        let first_page = store
            .subscriber_page(&Audience::Everyone, None, 10)
            .await
            .unwrap();
        let all = channels();
        let selected: Vec<&ConfiguredChannel> = all.iter().collect();
        let records: Vec<DeliveryRecord> = first_page
            .items
            .iter()
            .flat_map(|s| deliveries_for(&update, s, &selected, None, Utc::now()))
            .collect();
        let interrupted = PlanState {
            cursor: first_page.next.clone(),
            broadcast_planned: true,
            done: false,
        };
        assert_eq!(
            store
                .enqueue_planned(update.id, &records, &interrupted)
                .await
                .unwrap(),
            10
        );
        assert_eq!(store.unfinished_plans().await.unwrap(), [update.id]);

        let added = plan_update(&store, &update, &channels(), 10, Utc::now())
            .await
            .unwrap();
        assert_eq!(
            added, 15,
            "only the subscribers after the cursor were planned"
        );
        assert_eq!(planned_count(&store, &update).await, 25);
        assert!(store.unfinished_plans().await.unwrap().is_empty());
        assert_eq!(
            plan_update(&store, &update, &channels(), 10, Utc::now())
                .await
                .unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn planning_everyone_gives_one_delivery_per_contact_and_one_per_broadcast_channel() {
        let store = store_with_subscribers(12).await;
        let phone = Contact::parse("+447700900123").unwrap();
        let order = OrderNumber::parse("AB-1001", &pattern()).unwrap();
        store
            .subscribe(&phone, &order, true, FollowVia::Operator, Utc::now())
            .await
            .unwrap();
        let update = accepted(&store, Audience::Everyone).await;
        plan_update(&store, &update, &channels(), 5, Utc::now())
            .await
            .unwrap();

        let counts = store.counts(Some(update.id)).await.unwrap();
        assert_eq!(counts["email"].queued, 12);
        assert_eq!(counts["sms"].queued, 1);
        assert_eq!(counts["status"].queued, 1);
        assert_eq!(counts["partners"].queued, 1);
    }

    #[tokio::test]
    async fn a_targeted_plan_walks_the_order_index_and_names_each_contacts_orders() {
        let store = store_with_subscribers(30).await;
        let ann = Contact::parse("c000@example.com").unwrap();
        let second_order = OrderNumber::parse("AB-1001", &pattern()).unwrap();
        store
            .subscribe(&ann, &second_order, true, FollowVia::Operator, Utc::now())
            .await
            .unwrap();
        let targets: BTreeSet<OrderNumber> = ["AB-1000", "AB-1001"]
            .iter()
            .map(|o| OrderNumber::parse(o, &pattern()).unwrap())
            .collect();
        let update = accepted(&store, Audience::Orders(targets)).await;
        plan_update(&store, &update, &channels(), 2, Utc::now())
            .await
            .unwrap();

        let counts = store.counts(Some(update.id)).await.unwrap();
        // c000, c010, c020 follow AB-1000; c001, c011, c021 and c000 follow AB-1001.
        assert_eq!(counts["email"].queued, 6);
        assert!(
            !counts.contains_key("status"),
            "the status page never gets a targeted update"
        );
        assert_eq!(counts["partners"].queued, 1);
        let key = DeliveryKey::new(update.id, "email", &Recipient::Contact(ann));
        let ann_delivery = store.delivery(&key).await.unwrap().unwrap();
        let orders: Vec<&str> = ann_delivery.orders.iter().map(|o| o.as_str()).collect();
        assert_eq!(orders, ["AB-1000", "AB-1001"]);
    }

    #[tokio::test]
    async fn a_targeted_plan_reaches_a_contact_only_about_orders_it_confirmed() {
        let store = MemoryStore::new();
        let ann = Contact::parse("ann@example.com").unwrap();
        let order = |raw: &str| OrderNumber::parse(raw, &pattern()).unwrap();
        let now = Utc::now();
        store
            .subscribe(&ann, &order("AB-1000"), true, FollowVia::Operator, now)
            .await
            .unwrap();
        store
            .subscribe(&ann, &order("AB-1001"), false, FollowVia::Form, now)
            .await
            .unwrap();
        store
            .subscribe(&ann, &order("AB-1002"), true, FollowVia::Operator, now)
            .await
            .unwrap();
        store
            .unsubscribe(
                &ann,
                Some(&order("AB-1002")),
                FollowVia::UnsubscribeLink,
                now,
            )
            .await
            .unwrap();
        let emailed = |audience: &[&str]| {
            let store = &store;
            let targets: BTreeSet<OrderNumber> = audience.iter().map(|o| order(o)).collect();
            let ann = ann.clone();
            async move {
                let update = accepted(store, Audience::Orders(targets)).await;
                plan_update(store, &update, &channels(), 10, Utc::now())
                    .await
                    .unwrap();
                let key = DeliveryKey::new(update.id, "email", &Recipient::Contact(ann));
                store.delivery(&key).await.unwrap().map(|d| d.orders)
            }
        };
        assert_eq!(
            emailed(&["AB-1000", "AB-1001", "AB-1002"]).await,
            Some(vec![order("AB-1000")]),
            "one message, naming only the order she confirmed"
        );
        assert_eq!(
            emailed(&["AB-1001", "AB-1002"]).await,
            None,
            "a pending order and one she left reach her not at all"
        );
    }
}
