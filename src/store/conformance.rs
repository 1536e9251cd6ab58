//! The conformance suite: what every [`Store`] backend must do, written against the trait
//! alone and run once per backend (memory, sled, and PostgreSQL on a real server the suite
//! starts), so no backend drifts from the others.
//!
//! Each test body is an `async fn` taking `&dyn Store`; the `conformance!` macro turns every
//! body into one `#[tokio::test]` per backend. A new test is a new body plus its name in the
//! macro's list.

use super::test_server::PostgresServer;
use super::{
    Cursor, DeliveryFilter, IdempotentAnswer, MemoryStore, PlanState, PostgresStore, Recorded,
    SledStore, Store, StoreError, Subscribed, Subscription,
};
use crate::config::{PostgresSettings, StoreSettings};
use crate::delivery::{
    Counts, DeliveryError, DeliveryKey, DeliveryRecord, DeliveryState, FailureKind, Outcome,
    ProviderReport, Receipt, Recipient, ReportedOutcome,
};
use crate::domain::{
    Audience, Body, Contact, FollowState, FollowVia, Headline, Incident, IncidentState,
    OrderNumber, OrderPattern, SubscriberState, Update,
};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use ulid::Ulid;

// ---- backends ---------------------------------------------------------------------------------

/// A store under test, and what must outlive it (the sled store's folder). Fields drop in
/// order: the store closes before its folder goes.
struct Backend {
    store: Box<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

async fn memory() -> Backend {
    Backend {
        store: Box::new(MemoryStore::new()),
        _dir: None,
    }
}

async fn sled() -> Backend {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let settings = StoreSettings::sled(dir.path().join("store"), 8 << 20);
    let store = SledStore::open(&settings)
        .await
        .expect("the sled store opens");
    Backend {
        store: Box::new(store),
        _dir: Some(dir),
    }
}

/// A fresh database on the test process's PostgreSQL server (started on first use).
async fn postgres() -> Backend {
    let server = tokio::task::spawn_blocking(PostgresServer::shared)
        .await
        .expect("the PostgreSQL server starts");
    let url = tokio::task::spawn_blocking(|| server.database())
        .await
        .expect("a database is created");
    let settings = PostgresSettings {
        url: url.into(),
        variable: "CRIER_DATABASE_URL".into(),
        pool_size: 4,
    };
    let store = PostgresStore::open(&settings)
        .await
        .expect("the PostgreSQL store opens");
    Backend {
        store: Box::new(store),
        _dir: None,
    }
}

/// `conformance!(module, backend())` generates, in `module`, one test per body below, each
/// run against a fresh store from `backend()`.
macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        conformance!(
            @tests $backend, $open;
            subscribing_creates_a_subscriber_once_and_counts_it,
            unsubscribing_from_one_order_keeps_the_others_until_the_last_one_goes,
            unsubscribing_from_everything_leaves_every_order,
            unsubscribing_an_unknown_contact_is_refused,
            subscribing_again_after_unsubscribing_is_pending_unless_confirmed,
            the_followers_of_targeted_orders_are_paged_once_per_followed_order,
            paging_over_everyone_resumes_after_the_cursor_without_repeats,
            an_update_opens_or_bumps_its_incident_and_starts_its_plan,
            an_update_for_an_unknown_incident_is_refused,
            plan_state_follows_enqueue_planned_and_finished_plans_are_left_out,
            enqueue_planned_inserts_only_what_is_not_planned_yet,
            lease_due_leases_at_most_max_due_deliveries_earliest_first_for_the_owner,
            nothing_is_leased_before_it_is_due,
            a_retry_waits_in_the_queue_until_it_is_due,
            a_late_failure_changes_nothing_after_a_success,
            a_late_success_overrides_a_dead_letter_so_requeue_dead_finds_nothing,
            a_superseded_failure_leaves_the_lease_that_took_over_alone,
            requeue_expired_takes_only_expired_leases,
            recover_orphaned_takes_expired_and_foreign_leases_but_not_our_live_ones,
            dead_letters_are_requeued_with_a_fresh_attempt_budget_once_only,
            an_endpoint_gone_failure_disables_the_channel_until_it_is_enabled,
            a_recipient_gone_failure_stops_the_contact_on_that_channel_only,
            a_receipt_thread_is_kept_on_the_incident,
            counts_equal_a_recount_of_the_deliveries_after_a_mixed_sequence,
            the_failed_filter_lists_dead_letters_and_retries_in_key_order,
            queue_changes_tick_whenever_deliveries_are_queued,
            a_throttled_retry_does_not_use_up_the_attempt_budget,
            an_absurdly_long_lease_saturates_instead_of_panicking,
            a_page_of_deliveries_that_finds_nothing_has_no_cursor,
            a_page_of_zero_holds_nothing,
            a_batch_of_subscriptions_reports_what_each_row_changed,
            a_batch_never_subscribes_a_contact_that_left_again,
            a_lease_given_back_is_queued_again_without_its_attempt,
            many_subscribers_are_read_at_once_in_order,
            retention_forgets_only_settled_deliveries_of_old_updates_and_keeps_the_counts,
            an_idempotent_accept_remembers_its_answer_and_a_second_one_accepts_nothing,
            provider_reports_are_kept_and_undelivered_ones_in_a_row_stop_the_contact,
            a_sent_alert_is_remembered_by_its_key,
            a_form_request_stores_a_pending_follower_and_never_changes_a_confirmed_or_stopped_one,
            form_requests_arriving_together_are_each_decided_as_alone_and_all_stored,
            a_shared_store_lets_one_holder_at_a_time_claim_an_updates_planning,
            a_delivery_twice_in_one_planning_write_is_stored_and_counted_once,
            a_confirmation_confirms_exactly_its_follows_and_a_strangers_stay_pending,
            an_opt_out_voids_every_link_issued_before_it,
            start_after_stop_brings_back_exactly_what_was_confirmed,
            a_form_request_forgotten_after_its_link_expired_is_not_kept,
            an_import_never_brings_back_an_order_the_contact_left,
        );
    };
    (@tests $backend:ident, $open:expr; $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = $open.await;
                    super::$test(&*backend.store).await;
                }
            )*
        }
    };
}

conformance!(memory, super::memory());
conformance!(sled, super::sled());
conformance!(postgres, super::postgres());

// ---- fixtures ---------------------------------------------------------------------------------

const CHANNEL: &str = "partners";
const LEASE: Duration = Duration::from_secs(60);

/// `seconds` after a fixed instant, whole seconds so every backend stores it exactly.
fn at(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap() + TimeDelta::seconds(seconds)
}

fn contact(raw: &str) -> Contact {
    Contact::parse(raw).unwrap()
}

fn order(raw: &str) -> OrderNumber {
    OrderNumber::parse(raw, &OrderPattern::new(r"[A-Z]{2}-\d{4}").unwrap()).unwrap()
}

fn to(raw: &str) -> Recipient {
    Recipient::Contact(contact(raw))
}

/// An update id from `time`, so ids sort as the updates were made.
fn ulid_at(time: DateTime<Utc>) -> Ulid {
    Ulid::from_parts(time.timestamp_millis() as u64, rand::random())
}

fn record(update: Ulid, channel: &str, recipient: Recipient, due: DateTime<Utc>) -> DeliveryRecord {
    DeliveryRecord::new(update, channel, recipient, vec![], due)
}

fn key(update: Ulid, channel: &str, recipient: &Recipient) -> DeliveryKey {
    DeliveryKey::new(update, channel, recipient)
}

async fn enqueue(store: &dyn Store, update: Ulid, records: &[DeliveryRecord]) -> usize {
    store
        .enqueue_planned(update, records, &PlanState::default())
        .await
        .unwrap()
}

/// Queues one broadcast delivery on [`CHANNEL`], due at `now`.
async fn queue_one(store: &dyn Store, now: DateTime<Utc>) -> DeliveryRecord {
    let update = Ulid::new();
    let queued = record(update, CHANNEL, Recipient::Broadcast, now);
    assert_eq!(
        enqueue(store, update, std::slice::from_ref(&queued)).await,
        1
    );
    queued
}

/// Leases the one delivery of [`CHANNEL`] due at `now`.
async fn lease_one(store: &dyn Store, owner: &str, now: DateTime<Utc>) -> DeliveryRecord {
    let mut leased = store
        .lease_due(CHANNEL, owner, 1, LEASE, now)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1, "one delivery is due at {now}");
    leased.remove(0)
}

async fn outcome(
    store: &dyn Store,
    leased: &DeliveryRecord,
    outcome: Outcome,
    now: DateTime<Utc>,
) -> Recorded {
    store.record_outcome(leased, &outcome, now).await.unwrap()
}

async fn stored(store: &dyn Store, record: &DeliveryRecord) -> DeliveryRecord {
    store
        .delivery(&record.key())
        .await
        .unwrap()
        .expect("the delivery is stored")
}

fn sent() -> Outcome {
    Outcome::Sent {
        receipt: Receipt::none(),
    }
}

fn retry(at: DateTime<Utc>) -> Outcome {
    Outcome::Retry {
        at,
        failure: DeliveryError::transient("503 Service Unavailable").with_status(503),
        counts_as_attempt: true,
    }
}

fn throttled(at: DateTime<Utc>) -> Outcome {
    Outcome::Retry {
        at,
        failure: DeliveryError::new(FailureKind::Throttled, "429 Too Many Requests")
            .with_status(429),
        counts_as_attempt: false,
    }
}

fn dead(kind: FailureKind, reason: &str) -> Outcome {
    Outcome::Dead {
        failure: DeliveryError::new(kind, reason),
    }
}

fn new_incident(title: &str, now: DateTime<Utc>) -> Incident {
    Incident::open(title.to_owned(), IncidentState::Investigating, now)
}

fn update_of(incident: &Incident, state: IncidentState, now: DateTime<Utc>) -> Update {
    Update {
        id: ulid_at(now),
        incident: incident.id,
        state,
        headline: Headline::parse("Activations are delayed").unwrap(),
        body: Body::parse("We are looking into it.").unwrap(),
        next_update_by: None,
        audience: Audience::Everyone,
        author: "comms@example.com".to_owned(),
        created_at: now,
        channels: vec![CHANNEL.to_owned()],
    }
}

/// Every subscriber the audience reaches, `limit` at a time, as contact strings.
async fn walk(store: &dyn Store, audience: &Audience, limit: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut after: Option<Cursor> = None;
    for _ in 0..1_000 {
        let page = store
            .subscriber_page(audience, after.as_ref(), limit)
            .await
            .unwrap();
        assert!(page.items.len() <= limit, "a page holds at most {limit}");
        if page.items.is_empty() {
            assert!(page.next.is_none(), "an empty page has no cursor");
            return seen;
        }
        assert!(page.next.is_some(), "a page with items has a cursor");
        seen.extend(page.items.iter().map(|s| s.contact.to_string()));
        after = page.next;
    }
    panic!("the walk over {audience:?} never ended");
}

/// Every delivery of `update` the filter lets through, `limit` at a time.
async fn list(
    store: &dyn Store,
    update: Ulid,
    filter: DeliveryFilter,
    limit: usize,
) -> Vec<DeliveryRecord> {
    let mut seen = Vec::new();
    let mut after: Option<Cursor> = None;
    for _ in 0..1_000 {
        let page = store
            .deliveries(update, filter, after.as_ref(), limit)
            .await
            .unwrap();
        assert!(page.items.len() <= limit, "a page holds at most {limit}");
        if page.items.is_empty() {
            return seen;
        }
        seen.extend(page.items);
        after = page.next;
        if after.is_none() {
            return seen;
        }
    }
    panic!("the listing of {update} never ended");
}

/// Deliveries per state per channel, counted one by one.
async fn recount(store: &dyn Store, update: Ulid) -> BTreeMap<String, Counts> {
    let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
    for record in list(store, update, DeliveryFilter::All, 2).await {
        counts
            .entry(record.channel)
            .or_default()
            .moved(None, record.state);
    }
    counts
}

fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items
}

// ---- subscribers ------------------------------------------------------------------------------

async fn subscribing_creates_a_subscriber_once_and_counts_it(store: &dyn Store) {
    assert_eq!(store.subscriber_count().await.unwrap(), 0);
    let ann = contact("ann@example.com");

    let pending = store
        .subscribe(&ann, &order("AB-1001"), false, FollowVia::Operator, at(0))
        .await
        .unwrap();
    assert_eq!(pending.state(), SubscriberState::Pending);
    assert_eq!(pending.orders(), BTreeSet::from([order("AB-1001")]));
    assert!(pending.stopped_on.is_empty());

    let confirmed = store
        .subscribe(&ann, &order("AB-1002"), true, FollowVia::Operator, at(1))
        .await
        .unwrap();
    assert_eq!(confirmed.state(), SubscriberState::Confirmed);
    assert_eq!(
        confirmed.orders(),
        BTreeSet::from([order("AB-1001"), order("AB-1002")])
    );
    assert_eq!(confirmed.created_at, at(0));
    assert_eq!(confirmed.updated_at, at(1));
    assert_eq!(store.subscriber(&ann).await.unwrap(), Some(confirmed));
    assert_eq!(store.subscriber_count().await.unwrap(), 1, "counted once");

    store
        .subscribe(
            &contact("+447700900123"),
            &order("AB-1001"),
            true,
            FollowVia::Operator,
            at(2),
        )
        .await
        .unwrap();
    assert_eq!(store.subscriber_count().await.unwrap(), 2);
    assert_eq!(
        store.subscriber(&contact("bob@example.com")).await.unwrap(),
        None
    );
}

async fn unsubscribing_from_one_order_keeps_the_others_until_the_last_one_goes(store: &dyn Store) {
    let ann = contact("ann@example.com");
    store
        .subscribe(&ann, &order("AB-1001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    store
        .subscribe(&ann, &order("AB-1002"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();

    let one_left = store
        .unsubscribe(&ann, Some(&order("AB-1001")), FollowVia::Operator, at(1))
        .await
        .unwrap();
    assert_eq!(one_left.orders(), BTreeSet::from([order("AB-1002")]));
    assert_eq!(one_left.state(), SubscriberState::Confirmed);
    assert_eq!(one_left.updated_at, at(1));
    // The order still lists her, as having left it: support sees who followed, planning skips
    // her.
    let followers = Audience::Orders(BTreeSet::from([order("AB-1001")]));
    let listed = store
        .subscriber_page(&followers, None, 10)
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), 1);
    let follow = listed[0].follow_of(&order("AB-1001")).unwrap();
    assert_eq!(
        (follow.state, follow.since, follow.via),
        (FollowState::Left, at(1), FollowVia::Operator)
    );
    assert!(!listed[0].receives(&order("AB-1001")));
    assert!(listed[0].receives(&order("AB-1002")));

    let none_left = store
        .unsubscribe(&ann, Some(&order("AB-1002")), FollowVia::Operator, at(2))
        .await
        .unwrap();
    assert!(none_left.orders().is_empty());
    assert_eq!(none_left.state(), SubscriberState::Unsubscribed);
    assert_eq!(store.subscriber(&ann).await.unwrap(), Some(none_left));
    assert_eq!(
        store.subscriber_count().await.unwrap(),
        1,
        "an unsubscribed contact is still a subscriber record"
    );
}

async fn unsubscribing_from_everything_leaves_every_order(store: &dyn Store) {
    let ann = contact("ann@example.com");
    for number in ["AB-1001", "AB-1002", "AB-1003"] {
        store
            .subscribe(&ann, &order(number), true, FollowVia::Operator, at(0))
            .await
            .unwrap();
    }

    let gone = store
        .unsubscribe(&ann, None, FollowVia::Operator, at(1))
        .await
        .unwrap();
    assert!(gone.orders().is_empty());
    assert_eq!(gone.state(), SubscriberState::Unsubscribed);
    assert!(!gone.receives_on(CHANNEL));

    let all_three = Audience::Orders(
        ["AB-1001", "AB-1002", "AB-1003"]
            .into_iter()
            .map(order)
            .collect(),
    );
    let listed = store
        .subscriber_page(&all_three, None, 10)
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), 3, "each order lists her once, as having left");
    for subscriber in listed {
        assert!(
            subscriber
                .follows
                .values()
                .all(|f| f.state == FollowState::Left)
        );
        assert_eq!(subscriber.opted_out_at, Some(at(1)));
    }
}

async fn unsubscribing_an_unknown_contact_is_refused(store: &dyn Store) {
    let nobody = contact("nobody@example.com");
    for which in [Some(order("AB-1001")), None] {
        let refused = store
            .unsubscribe(&nobody, which.as_ref(), FollowVia::Operator, at(0))
            .await;
        assert!(
            matches!(refused, Err(StoreError::UnknownSubscriber(_))),
            "{refused:?}"
        );
    }
    assert_eq!(store.subscriber(&nobody).await.unwrap(), None);
    assert_eq!(store.subscriber_count().await.unwrap(), 0);
}

async fn subscribing_again_after_unsubscribing_is_pending_unless_confirmed(store: &dyn Store) {
    let ann = contact("ann@example.com");
    store
        .subscribe(&ann, &order("AB-1001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    store
        .unsubscribe(&ann, None, FollowVia::Operator, at(1))
        .await
        .unwrap();

    let again = store
        .subscribe(&ann, &order("AB-1002"), false, FollowVia::Operator, at(2))
        .await
        .unwrap();
    assert_eq!(again.state(), SubscriberState::Pending);
    assert_eq!(
        again.orders(),
        BTreeSet::from([order("AB-1002")]),
        "the orders left before do not come back"
    );

    let vouched = store
        .subscribe(&ann, &order("AB-1002"), true, FollowVia::Operator, at(3))
        .await
        .unwrap();
    assert_eq!(vouched.state(), SubscriberState::Confirmed);
    assert_eq!(store.subscriber_count().await.unwrap(), 1);
}

async fn the_followers_of_targeted_orders_are_paged_once_per_followed_order(store: &dyn Store) {
    let follows: [(&str, &[&str]); 8] = [
        ("ann@example.com", &["AB-1001", "AB-1002"]),
        ("bob@example.com", &["AB-1001"]),
        ("cat@example.com", &["AB-1002"]),
        ("dan@example.com", &["AB-1003"]),
        ("eve@example.com", &["AB-1001", "AB-1003"]),
        ("fay@example.com", &["AB-1001", "AB-1002"]),
        ("gus@example.com", &["AB-1002"]),
        ("+447700900123", &["AB-1001"]),
    ];
    for (raw, orders) in follows {
        // cat stays pending: pending followers are listed too, planning skips them.
        let confirmed = raw != "cat@example.com";
        for number in orders {
            store
                .subscribe(
                    &contact(raw),
                    &order(number),
                    confirmed,
                    FollowVia::Operator,
                    at(0),
                )
                .await
                .unwrap();
        }
    }
    store
        .unsubscribe(
            &contact("fay@example.com"),
            Some(&order("AB-1001")),
            FollowVia::Operator,
            at(1),
        )
        .await
        .unwrap();
    store
        .unsubscribe(
            &contact("gus@example.com"),
            None,
            FollowVia::Operator,
            at(1),
        )
        .await
        .unwrap();

    // AB-1004 has no followers; AB-1003's are not targeted.
    let targeted = Audience::Orders(
        ["AB-1001", "AB-1002", "AB-1004"]
            .into_iter()
            .map(order)
            .collect(),
    );
    let expected = sorted(
        [
            // AB-1001 (fay left it, and stays listed as having left)
            "+447700900123",
            "ann@example.com",
            "bob@example.com",
            "eve@example.com",
            "fay@example.com",
            // AB-1002 (gus left everything)
            "ann@example.com",
            "cat@example.com",
            "fay@example.com",
            "gus@example.com",
        ]
        .map(String::from)
        .to_vec(),
    );
    for limit in [1, 2, 3, 4, 7, 100] {
        assert_eq!(
            sorted(walk(store, &targeted, limit).await),
            expected,
            "pages of {limit}"
        );
    }

    let nobody_follows = Audience::Orders(BTreeSet::from([order("AB-1004")]));
    let page = store
        .subscriber_page(&nobody_follows, None, 10)
        .await
        .unwrap();
    assert!(page.items.is_empty());
    assert!(page.next.is_none());
}

async fn paging_over_everyone_resumes_after_the_cursor_without_repeats(store: &dyn Store) {
    let everyone = [
        "ann@example.com",
        "bob@example.com",
        "cat@example.com",
        "dan@example.com",
        "+447700900123",
    ];
    for (i, raw) in everyone.iter().enumerate() {
        let number = format!("AB-100{}", i % 2);
        store
            .subscribe(
                &contact(raw),
                &order(&number),
                i != 2,
                FollowVia::Operator,
                at(0),
            )
            .await
            .unwrap();
    }
    store
        .unsubscribe(
            &contact("dan@example.com"),
            None,
            FollowVia::Operator,
            at(1),
        )
        .await
        .unwrap();

    let expected = sorted(everyone.map(String::from).to_vec());
    for limit in [1, 2, 3, 5, 100] {
        let seen = walk(store, &Audience::Everyone, limit).await;
        assert_eq!(sorted(seen), expected, "pages of {limit}");
    }

    let first = store
        .subscriber_page(&Audience::Everyone, None, 2)
        .await
        .unwrap();
    let rest = store
        .subscriber_page(&Audience::Everyone, first.next.as_ref(), 100)
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(rest.items.len(), 3, "the rest, after the cursor");
    for subscriber in &rest.items {
        assert!(
            !first.items.iter().any(|s| s.contact == subscriber.contact),
            "{} came twice",
            subscriber.contact
        );
    }
}

// ---- incidents and updates --------------------------------------------------------------------

async fn an_update_opens_or_bumps_its_incident_and_starts_its_plan(store: &dyn Store) {
    let delays = new_incident("Activations are delayed", at(0));
    let first = update_of(&delays, IncidentState::Investigating, at(0));
    let opened = store.accept_update(&first, Some(&delays)).await.unwrap();
    assert_eq!(opened.id, delays.id);
    assert_eq!(opened.updates, vec![first.id]);
    assert_eq!(opened.state, IncidentState::Investigating);
    assert_eq!(store.incident(delays.id).await.unwrap(), opened);
    assert_eq!(store.update(first.id).await.unwrap(), first);
    assert_eq!(
        store.plan_state(first.id).await.unwrap(),
        PlanState::default()
    );

    let outage = new_incident("The portal is down", at(10));
    let second = update_of(&outage, IncidentState::Identified, at(10));
    store.accept_update(&second, Some(&outage)).await.unwrap();

    let third = update_of(&delays, IncidentState::Resolved, at(20));
    let bumped = store.accept_update(&third, None).await.unwrap();
    assert_eq!(bumped.title, "Activations are delayed");
    assert_eq!(bumped.state, IncidentState::Resolved);
    assert_eq!(bumped.created_at, at(0));
    assert_eq!(bumped.updated_at, at(20));
    assert_eq!(bumped.updates, vec![first.id, third.id]);
    assert_eq!(store.incident(delays.id).await.unwrap(), bumped);

    let incidents: Vec<Ulid> = store
        .incidents()
        .await
        .unwrap()
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(
        incidents,
        vec![delays.id, outage.id],
        "most recently updated first"
    );

    let ids = |updates: Vec<Update>| updates.iter().map(|u| u.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.recent_updates(2).await.unwrap()),
        vec![third.id, second.id]
    );
    assert_eq!(
        ids(store.recent_updates(10).await.unwrap()),
        vec![third.id, second.id, first.id]
    );
    assert_eq!(
        store.unfinished_plans().await.unwrap(),
        vec![first.id, second.id, third.id]
    );
}

async fn an_update_for_an_unknown_incident_is_refused(store: &dyn Store) {
    let never_opened = new_incident("Never opened", at(0));
    let orphan = update_of(&never_opened, IncidentState::Investigating, at(0));
    let refused = store.accept_update(&orphan, None).await;
    assert!(
        matches!(refused, Err(StoreError::UnknownIncident(id)) if id == never_opened.id),
        "{refused:?}"
    );
    assert!(matches!(
        store.update(orphan.id).await,
        Err(StoreError::UnknownUpdate(_))
    ));
    assert!(matches!(
        store.plan_state(orphan.id).await,
        Err(StoreError::UnknownUpdate(_))
    ));
    assert!(matches!(
        store.incident(never_opened.id).await,
        Err(StoreError::UnknownIncident(_))
    ));
    assert!(store.incidents().await.unwrap().is_empty());
    assert!(store.recent_updates(10).await.unwrap().is_empty());
    assert!(store.unfinished_plans().await.unwrap().is_empty());
}

// ---- planning ---------------------------------------------------------------------------------

async fn plan_state_follows_enqueue_planned_and_finished_plans_are_left_out(store: &dyn Store) {
    let incident = new_incident("Activations are delayed", at(0));
    let older = update_of(&incident, IncidentState::Investigating, at(0));
    let newer = update_of(&incident, IncidentState::Identified, at(1));
    store.accept_update(&older, Some(&incident)).await.unwrap();
    store.accept_update(&newer, None).await.unwrap();
    assert_eq!(
        store.unfinished_plans().await.unwrap(),
        vec![older.id, newer.id],
        "oldest first"
    );

    let planning = PlanState {
        cursor: Some(Cursor::from_bytes(b"ann@example.com".to_vec())),
        broadcast_planned: true,
        done: false,
    };
    let broadcast = record(older.id, CHANNEL, Recipient::Broadcast, at(0));
    let added = store
        .enqueue_planned(older.id, std::slice::from_ref(&broadcast), &planning)
        .await
        .unwrap();
    assert_eq!(added, 1);
    assert_eq!(store.plan_state(older.id).await.unwrap(), planning);

    let done = PlanState {
        done: true,
        ..planning
    };
    assert_eq!(
        store.enqueue_planned(older.id, &[], &done).await.unwrap(),
        0
    );
    assert_eq!(store.plan_state(older.id).await.unwrap(), done);
    assert_eq!(store.unfinished_plans().await.unwrap(), vec![newer.id]);
}

async fn enqueue_planned_inserts_only_what_is_not_planned_yet(store: &dyn Store) {
    let update = Ulid::new();
    let ann = record(update, "email", to("ann@example.com"), at(0));
    let bob = record(update, "email", to("bob@example.com"), at(0));
    assert_eq!(enqueue(store, update, &[ann.clone(), bob.clone()]).await, 2);

    let ann_again = record(update, "email", to("ann@example.com"), at(50));
    let cat = record(update, "email", to("cat@example.com"), at(0));
    assert_eq!(enqueue(store, update, &[ann_again, cat.clone()]).await, 1);
    assert_eq!(
        stored(store, &ann).await,
        ann,
        "the first planning of a delivery stands"
    );
    assert_eq!(stored(store, &cat).await, cat);
    assert_eq!(
        store
            .delivery(&key(update, "sms", &to("ann@example.com")))
            .await
            .unwrap(),
        None
    );

    let counts = store.counts(Some(update)).await.unwrap();
    assert_eq!(counts["email"].queued, 3);
    assert_eq!(counts["email"].total(), 3);
    assert_eq!(store.next_due("email").await.unwrap(), Some(at(0)));
}

// ---- leases -----------------------------------------------------------------------------------

async fn lease_due_leases_at_most_max_due_deliveries_earliest_first_for_the_owner(
    store: &dyn Store,
) {
    let update = Ulid::new();
    // Planned out of due order, on purpose.
    let dues = [
        ("dan@example.com", 4),
        ("bob@example.com", 2),
        ("ann@example.com", 1),
        ("cat@example.com", 3),
    ];
    let records: Vec<DeliveryRecord> = dues
        .iter()
        .map(|(raw, due)| record(update, CHANNEL, to(raw), at(*due)))
        .collect();
    let elsewhere = record(update, "email", to("ann@example.com"), at(0));
    enqueue(store, update, &records).await;
    enqueue(store, update, std::slice::from_ref(&elsewhere)).await;

    let now = at(10);
    let first = store
        .lease_due(CHANNEL, "worker-1", 2, LEASE, now)
        .await
        .unwrap();
    let recipients = |leased: &[DeliveryRecord]| {
        leased
            .iter()
            .map(|r| r.recipient.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        recipients(&first),
        ["ann@example.com", "bob@example.com"],
        "the two earliest"
    );
    for leased in &first {
        assert_eq!(leased.state, DeliveryState::InFlight);
        assert_eq!(leased.attempts, 1);
        assert_eq!(leased.leases, 1);
        assert_eq!(leased.owner.as_deref(), Some("worker-1"));
        assert_eq!(leased.lease_until, Some(now + TimeDelta::seconds(60)));
        assert_eq!(&stored(store, leased).await, leased);
    }

    let second = store
        .lease_due(CHANNEL, "worker-2", 5, LEASE, now)
        .await
        .unwrap();
    assert_eq!(recipients(&second), ["cat@example.com", "dan@example.com"]);
    assert!(
        second
            .iter()
            .all(|r| r.owner.as_deref() == Some("worker-2"))
    );
    assert!(
        store
            .lease_due(CHANNEL, "worker-1", 5, LEASE, now)
            .await
            .unwrap()
            .is_empty(),
        "each delivery is leased once"
    );
    assert_eq!(store.next_due(CHANNEL).await.unwrap(), None);

    assert_eq!(
        stored(store, &elsewhere).await.state,
        DeliveryState::Queued,
        "another channel's queue is untouched"
    );
    assert_eq!(store.next_due("email").await.unwrap(), Some(at(0)));
    let counts = store.counts(Some(update)).await.unwrap();
    assert_eq!(counts[CHANNEL].in_flight, 4);
    assert_eq!(counts["email"].queued, 1);
}

async fn nothing_is_leased_before_it_is_due(store: &dyn Store) {
    let update = Ulid::new();
    let later = record(update, CHANNEL, Recipient::Broadcast, at(30));
    enqueue(store, update, std::slice::from_ref(&later)).await;

    assert_eq!(store.next_due(CHANNEL).await.unwrap(), Some(at(30)));
    assert!(
        store
            .lease_due(CHANNEL, "worker", 10, LEASE, at(29))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(stored(store, &later).await.state, DeliveryState::Queued);
    let leased = store
        .lease_due(CHANNEL, "worker", 10, LEASE, at(30))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1, "due at its due time exactly");
    assert_eq!(store.next_due("email").await.unwrap(), None);
}

async fn a_retry_waits_in_the_queue_until_it_is_due(store: &dyn Store) {
    queue_one(store, at(0)).await;
    let leased = lease_one(store, "worker", at(0)).await;

    let recorded = outcome(store, &leased, retry(at(30)), at(1)).await;
    assert!(recorded.applied);
    assert_eq!(recorded.record.state, DeliveryState::Retrying);
    assert_eq!(recorded.record.due_at, at(30));
    assert_eq!(recorded.record.owner, None);
    assert_eq!(recorded.record.lease_until, None);
    assert_eq!(
        recorded.record.last_error.as_deref(),
        Some("503 Service Unavailable")
    );
    assert_eq!(recorded.record.last_status, Some(503));
    assert_eq!(stored(store, &leased).await, recorded.record);

    assert_eq!(store.next_due(CHANNEL).await.unwrap(), Some(at(30)));
    assert!(
        store
            .lease_due(CHANNEL, "worker", 1, LEASE, at(29))
            .await
            .unwrap()
            .is_empty()
    );
    let again = lease_one(store, "worker", at(30)).await;
    assert_eq!(again.attempts, 2);
    assert_eq!(again.leases, 2);
}

/// A delivery whose first attempt outlived its lease, and the second lease that took over.
async fn superseded(store: &dyn Store) -> (DeliveryRecord, DeliveryRecord, DateTime<Utc>) {
    queue_one(store, at(0)).await;
    let first = lease_one(store, "worker-1", at(0)).await;
    let later = at(61);
    assert_eq!(store.requeue_expired(later).await.unwrap(), 1);
    let second = lease_one(store, "worker-2", later).await;
    assert_eq!(second.leases, first.leases + 1);
    (first, second, later)
}

async fn a_late_failure_changes_nothing_after_a_success(store: &dyn Store) {
    let (first, second, later) = superseded(store).await;
    let success = outcome(store, &second, sent(), later).await;
    assert!(success.applied);
    assert_eq!(success.record.state, DeliveryState::Sent);
    assert_eq!(success.record.finished_at, Some(later));

    for late in [
        retry(later),
        dead(FailureKind::Permanent, "400 Bad Request"),
    ] {
        let recorded = outcome(store, &first, late, later).await;
        assert!(!recorded.applied, "a superseded failure changes nothing");
        assert_eq!(recorded.record.state, DeliveryState::Sent);
    }
    let twice = outcome(store, &second, sent(), later).await;
    assert!(!twice.applied, "a sent delivery is not sent again");

    assert_eq!(stored(store, &first).await, success.record);
    assert_eq!(
        store.next_due(CHANNEL).await.unwrap(),
        None,
        "nothing queued"
    );
    assert!(store.requeue_dead(None, later).await.unwrap().is_empty());
    let counts = store.counts(None).await.unwrap();
    assert_eq!(
        counts[CHANNEL],
        Counts {
            sent: 1,
            ..Counts::default()
        }
    );
}

async fn a_late_success_overrides_a_dead_letter_so_requeue_dead_finds_nothing(store: &dyn Store) {
    let (first, second, later) = superseded(store).await;
    let died = outcome(
        store,
        &second,
        dead(FailureKind::Permanent, "400 Bad Request"),
        later,
    )
    .await;
    assert!(died.applied);
    assert_eq!(died.record.state, DeliveryState::Dead);

    let late = outcome(store, &first, sent(), at(70)).await;
    assert!(late.applied, "a success always gets its say");
    assert_eq!(late.record.state, DeliveryState::Sent);
    assert_eq!(late.record.last_error, None);
    assert_eq!(stored(store, &first).await, late.record);
    assert!(store.requeue_dead(None, at(71)).await.unwrap().is_empty());
    assert_eq!(
        store.counts(None).await.unwrap()[CHANNEL],
        Counts {
            sent: 1,
            ..Counts::default()
        }
    );
}

async fn a_superseded_failure_leaves_the_lease_that_took_over_alone(store: &dyn Store) {
    let (first, second, later) = superseded(store).await;
    let late = outcome(
        store,
        &first,
        dead(FailureKind::Permanent, "400 Bad Request"),
        later,
    )
    .await;
    assert!(!late.applied);
    assert_eq!(late.record, second, "the second lease's record, untouched");
    assert_eq!(stored(store, &second).await, second);
    assert!(store.requeue_dead(None, later).await.unwrap().is_empty());

    let current = outcome(store, &second, retry(at(90)), later).await;
    assert!(current.applied, "the lease that took over still decides");
    assert_eq!(current.record.state, DeliveryState::Retrying);
    assert_eq!(store.next_due(CHANNEL).await.unwrap(), Some(at(90)));
}

async fn requeue_expired_takes_only_expired_leases(store: &dyn Store) {
    let update = Ulid::new();
    let records = [
        record(update, CHANNEL, to("ann@example.com"), at(0)),
        record(update, CHANNEL, to("bob@example.com"), at(0)),
    ];
    enqueue(store, update, &records).await;
    let short = store
        .lease_due(CHANNEL, "worker", 1, Duration::from_secs(10), at(0))
        .await
        .unwrap()
        .remove(0);
    let long = lease_one(store, "worker", at(0)).await;
    assert_ne!(short.key(), long.key());

    assert_eq!(store.requeue_expired(at(9)).await.unwrap(), 0);
    assert_eq!(
        store.requeue_expired(at(10)).await.unwrap(),
        1,
        "a lease expires at its deadline"
    );
    let requeued = stored(store, &short).await;
    assert_eq!(requeued.state, DeliveryState::Queued);
    assert_eq!(requeued.due_at, at(10));
    assert_eq!(requeued.owner, None);
    assert_eq!(requeued.lease_until, None);
    assert_eq!(requeued.attempts, 1, "the attempt it made still counts");
    assert_eq!(requeued.leases, 1);
    assert_eq!(stored(store, &long).await, long, "the live lease stays");
    assert_eq!(store.next_due(CHANNEL).await.unwrap(), Some(at(10)));
    assert_eq!(
        store.requeue_expired(at(10)).await.unwrap(),
        0,
        "requeued once"
    );

    let counts = store.counts(Some(update)).await.unwrap();
    assert_eq!((counts[CHANNEL].queued, counts[CHANNEL].in_flight), (1, 1));
}

async fn recover_orphaned_takes_expired_and_foreign_leases_but_not_our_live_ones(
    store: &dyn Store,
) {
    let update = Ulid::new();
    let records = [
        record(update, CHANNEL, to("ann@example.com"), at(0)),
        record(update, CHANNEL, to("bob@example.com"), at(0)),
        record(update, CHANNEL, to("cat@example.com"), at(0)),
    ];
    enqueue(store, update, &records).await;
    let foreign = lease_one(store, "dead-process", at(0)).await;
    let ours = lease_one(store, "me", at(0)).await;
    let expired = store
        .lease_due(CHANNEL, "me", 1, Duration::from_secs(5), at(0))
        .await
        .unwrap()
        .remove(0);

    // On a store other nodes share, a foreign lease may be a live node's: only its expiry
    // tells it was orphaned.
    let (taken, left): (Vec<&DeliveryRecord>, Vec<&DeliveryRecord>) = if store.shared() {
        (vec![&expired], vec![&foreign, &ours])
    } else {
        (vec![&foreign, &expired], vec![&ours])
    };
    assert_eq!(
        store.recover_orphaned("me", at(10)).await.unwrap(),
        taken.len()
    );
    for taken in &taken {
        let record = stored(store, taken).await;
        assert_eq!(record.state, DeliveryState::Queued, "{}", taken.key());
        assert_eq!(record.owner, None);
        assert_eq!(record.due_at, at(10));
    }
    for live in &left {
        assert_eq!(&stored(store, live).await, *live, "a live lease stays");
    }
    assert_eq!(store.recover_orphaned("me", at(10)).await.unwrap(), 0);

    let counts = store.counts(Some(update)).await.unwrap();
    assert_eq!(
        (counts[CHANNEL].queued, counts[CHANNEL].in_flight),
        (taken.len() as u64, left.len() as u64)
    );
}

// ---- outcomes and their side effects ----------------------------------------------------------

async fn dead_letters_are_requeued_with_a_fresh_attempt_budget_once_only(store: &dyn Store) {
    let queued = queue_one(store, at(0)).await;
    let leased = lease_one(store, "worker", at(0)).await;
    let died = outcome(
        store,
        &leased,
        dead(FailureKind::Permanent, "400 Bad Request"),
        at(1),
    )
    .await;
    assert!(died.applied);
    assert_eq!(died.record.finished_at, Some(at(1)));
    assert_eq!(store.counts(None).await.unwrap()[CHANNEL].dead, 1);

    // Another update's dead letter stays put when one update is retried.
    let other = Ulid::new();
    enqueue(
        store,
        other,
        &[record(other, "email", Recipient::Broadcast, at(0))],
    )
    .await;
    let other_leased = store
        .lease_due("email", "worker", 1, LEASE, at(0))
        .await
        .unwrap()
        .remove(0);
    outcome(
        store,
        &other_leased,
        dead(FailureKind::Permanent, "550 No such user"),
        at(1),
    )
    .await;

    let requeued = store
        .requeue_dead(Some(queued.update), at(5))
        .await
        .unwrap();
    assert_eq!(requeued.len(), 1);
    let fresh = &requeued[0];
    assert_eq!(fresh.key(), queued.key());
    assert_eq!(fresh.state, DeliveryState::Queued);
    assert_eq!(fresh.attempts, 0);
    assert_eq!(fresh.queued_at, at(5));
    assert_eq!(fresh.due_at, at(5));
    assert_eq!(fresh.finished_at, None);
    assert_eq!(&stored(store, &queued).await, fresh);
    assert!(
        store
            .requeue_dead(Some(queued.update), at(6))
            .await
            .unwrap()
            .is_empty(),
        "requeued once only"
    );
    assert_eq!(
        stored(store, &other_leased).await.state,
        DeliveryState::Dead
    );

    let again = lease_one(store, "worker", at(5)).await;
    assert_eq!(again.attempts, 1);
    let everything = store.requeue_dead(None, at(7)).await.unwrap();
    assert_eq!(everything.len(), 1, "the other update's, now");
    assert_eq!(everything[0].key(), other_leased.key());
}

async fn an_endpoint_gone_failure_disables_the_channel_until_it_is_enabled(store: &dyn Store) {
    assert_eq!(store.channel_disabled(CHANNEL).await.unwrap(), None);
    queue_one(store, at(0)).await;
    let leased = lease_one(store, "worker", at(0)).await;
    let gone = outcome(
        store,
        &leased,
        dead(
            FailureKind::EndpointGone,
            "410 Gone: the endpoint was removed",
        ),
        at(5),
    )
    .await;
    assert!(gone.applied);
    assert_eq!(gone.record.state, DeliveryState::Dead);

    let why = store
        .channel_disabled(CHANNEL)
        .await
        .unwrap()
        .expect("the channel is disabled");
    assert!(why.contains("410 Gone: the endpoint was removed"), "{why}");
    assert_eq!(store.channel_disabled("email").await.unwrap(), None);

    assert!(store.enable_channel(CHANNEL).await.unwrap());
    assert_eq!(store.channel_disabled(CHANNEL).await.unwrap(), None);
    assert!(
        !store.enable_channel(CHANNEL).await.unwrap(),
        "it was not disabled any more"
    );
}

async fn a_recipient_gone_failure_stops_the_contact_on_that_channel_only(store: &dyn Store) {
    let ann = contact("ann@example.com");
    store
        .subscribe(&ann, &order("AB-1001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    let update = Ulid::new();
    enqueue(
        store,
        update,
        &[record(
            update,
            "sms",
            Recipient::Contact(ann.clone()),
            at(0),
        )],
    )
    .await;
    let leased = store
        .lease_due("sms", "worker", 1, LEASE, at(0))
        .await
        .unwrap()
        .remove(0);
    let gone = outcome(
        store,
        &leased,
        dead(
            FailureKind::RecipientGone,
            "21610: the recipient replied STOP",
        ),
        at(1),
    )
    .await;
    assert!(gone.applied);

    let stopped = store.subscriber(&ann).await.unwrap().unwrap();
    assert_eq!(stopped.stopped_on, BTreeSet::from(["sms".to_owned()]));
    assert!(!stopped.receives_on("sms"));
    assert!(stopped.receives_on("email"));
    assert_eq!(stopped.state(), SubscriberState::Confirmed);
    assert_eq!(stopped.orders(), BTreeSet::from([order("AB-1001")]));
    assert_eq!(store.channel_disabled("sms").await.unwrap(), None);
}

async fn a_receipt_thread_is_kept_on_the_incident(store: &dyn Store) {
    let incident = new_incident("Activations are delayed", at(0));
    let update = update_of(&incident, IncidentState::Investigating, at(0));
    store.accept_update(&update, Some(&incident)).await.unwrap();
    enqueue(
        store,
        update.id,
        &[record(update.id, "mastodon", Recipient::Broadcast, at(0))],
    )
    .await;
    let leased = store
        .lease_due("mastodon", "worker", 1, LEASE, at(0))
        .await
        .unwrap()
        .remove(0);

    let thread = serde_json::json!({ "status": "109372" });
    let receipt = Receipt {
        provider_id: Some("109372".to_owned()),
        thread: Some(thread.clone()),
    };
    let recorded = outcome(store, &leased, Outcome::Sent { receipt }, at(1)).await;
    assert!(recorded.applied);
    assert_eq!(recorded.record.provider_id.as_deref(), Some("109372"));

    let kept = store.incident(incident.id).await.unwrap();
    assert_eq!(
        kept.remote_threads,
        BTreeMap::from([("mastodon".to_owned(), thread)])
    );
    assert_eq!(kept.updates, vec![update.id]);
}

// ---- counts and listings ----------------------------------------------------------------------

async fn counts_equal_a_recount_of_the_deliveries_after_a_mixed_sequence(store: &dyn Store) {
    let (one, two) = (Ulid::new(), Ulid::new());
    let people = [
        "ann@example.com",
        "bob@example.com",
        "cat@example.com",
        "dan@example.com",
    ];
    let mut first: Vec<DeliveryRecord> = people
        .iter()
        .map(|raw| record(one, "email", to(raw), at(0)))
        .collect();
    first.push(record(one, CHANNEL, Recipient::Broadcast, at(0)));
    let second = [
        record(two, "email", to("ann@example.com"), at(0)),
        record(two, CHANNEL, Recipient::Broadcast, at(0)),
    ];
    enqueue(store, one, &first).await;
    enqueue(store, two, &second).await;

    let emails: BTreeMap<DeliveryKey, DeliveryRecord> = store
        .lease_due("email", "worker", 10, LEASE, at(0))
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.key(), r))
        .collect();
    assert_eq!(emails.len(), 5);
    let email = |update: Ulid, raw: &str| emails[&key(update, "email", &to(raw))].clone();
    outcome(store, &email(one, "ann@example.com"), sent(), at(1)).await;
    outcome(store, &email(one, "bob@example.com"), retry(at(30)), at(1)).await;
    outcome(
        store,
        &email(one, "cat@example.com"),
        dead(FailureKind::Permanent, "550 No such user"),
        at(1),
    )
    .await;
    let skip = Outcome::Skipped {
        reason: "unsubscribed".to_owned(),
    };
    outcome(store, &email(one, "dan@example.com"), skip, at(1)).await;
    // A late failure after the success changes nothing, counts included.
    let late = outcome(store, &email(one, "ann@example.com"), retry(at(9)), at(2)).await;
    assert!(!late.applied);

    let broadcasts = store
        .lease_due(CHANNEL, "worker", 10, Duration::from_secs(5), at(0))
        .await
        .unwrap();
    assert_eq!(broadcasts.len(), 2);
    let broadcast_of = |update: Ulid| {
        broadcasts
            .iter()
            .find(|r| r.update == update)
            .cloned()
            .unwrap()
    };
    outcome(
        store,
        &broadcast_of(one),
        dead(FailureKind::Permanent, "400 Bad Request"),
        at(1),
    )
    .await;
    assert_eq!(store.requeue_dead(Some(one), at(2)).await.unwrap().len(), 2);
    assert_eq!(
        store.requeue_expired(at(5)).await.unwrap(),
        1,
        "the second update's broadcast lease expired"
    );

    let retried = store
        .lease_due("email", "worker", 10, LEASE, at(30))
        .await
        .unwrap();
    assert_eq!(retried.len(), 2, "cat requeued at 2, bob due at 30");
    for leased in &retried {
        let next = if leased.recipient == to("cat@example.com") {
            sent()
        } else {
            throttled(at(60))
        };
        assert!(outcome(store, leased, next, at(31)).await.applied);
    }

    let counts_one = store.counts(Some(one)).await.unwrap();
    let counts_two = store.counts(Some(two)).await.unwrap();
    assert_eq!(counts_one, recount(store, one).await);
    assert_eq!(counts_two, recount(store, two).await);
    assert_eq!(
        counts_one["email"],
        Counts {
            sent: 2,
            retrying: 1,
            skipped: 1,
            ..Counts::default()
        }
    );
    assert_eq!(
        counts_one[CHANNEL],
        Counts {
            queued: 1,
            ..Counts::default()
        }
    );
    assert_eq!(
        counts_two["email"],
        Counts {
            in_flight: 1,
            ..Counts::default()
        }
    );
    assert_eq!(
        counts_two[CHANNEL],
        Counts {
            queued: 1,
            ..Counts::default()
        }
    );

    let mut all = counts_one;
    for (channel, counts) in &counts_two {
        all.entry(channel.clone()).or_default().add(counts);
    }
    assert_eq!(store.counts(None).await.unwrap(), all);
}

async fn the_failed_filter_lists_dead_letters_and_retries_in_key_order(store: &dyn Store) {
    let (update, other) = (Ulid::new(), Ulid::new());
    let people = [
        "dan@example.com",
        "ann@example.com",
        "cat@example.com",
        "bob@example.com",
    ];
    let mut records: Vec<DeliveryRecord> = people
        .iter()
        .map(|raw| record(update, "email", to(raw), at(0)))
        .collect();
    records.push(record(update, CHANNEL, Recipient::Broadcast, at(0)));
    enqueue(store, update, &records).await;
    enqueue(
        store,
        other,
        &[record(other, "email", to("ann@example.com"), at(5))],
    )
    .await;

    let leased = store
        .lease_due("email", "worker", 4, LEASE, at(0))
        .await
        .unwrap();
    assert_eq!(leased.len(), 4);
    for record in &leased {
        let next = match record.recipient.to_string().as_str() {
            "ann@example.com" | "dan@example.com" => {
                dead(FailureKind::Permanent, "550 No such user")
            }
            "bob@example.com" => retry(at(30)),
            _ => sent(),
        };
        outcome(store, record, next, at(1)).await;
    }
    // The other update's delivery fails too, and must not show up.
    let other_leased = store
        .lease_due("email", "worker", 1, LEASE, at(5))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(other_leased.update, other);
    outcome(
        store,
        &other_leased,
        dead(FailureKind::Permanent, "550"),
        at(6),
    )
    .await;

    let keys = |records: Vec<DeliveryRecord>| {
        records
            .iter()
            .map(|r| r.key().to_string())
            .collect::<Vec<_>>()
    };
    let failed = sorted(
        ["ann@example.com", "bob@example.com", "dan@example.com"]
            .iter()
            .map(|raw| key(update, "email", &to(raw)).to_string())
            .collect(),
    );
    for limit in [1, 2, 10] {
        assert_eq!(
            keys(list(store, update, DeliveryFilter::Failed, limit).await),
            failed,
            "pages of {limit}"
        );
    }
    let everything = sorted(records.iter().map(|r| r.key().to_string()).collect());
    for limit in [1, 3, 10] {
        assert_eq!(
            keys(list(store, update, DeliveryFilter::All, limit).await),
            everything,
            "pages of {limit}"
        );
    }
    let empty = store
        .deliveries(Ulid::new(), DeliveryFilter::All, None, 10)
        .await
        .unwrap();
    assert!(empty.items.is_empty());
    assert!(empty.next.is_none());
}

async fn queue_changes_tick_whenever_deliveries_are_queued(store: &dyn Store) {
    let mut changes = store.queue_changes();
    let mut seen = *changes.borrow_and_update();
    let mut ticked = |changes: &mut tokio::sync::watch::Receiver<u64>, what: &str| {
        assert!(changes.has_changed().unwrap(), "{what} ticks");
        let now = *changes.borrow_and_update();
        assert!(now > seen, "{what} moves the counter on");
        seen = now;
    };

    queue_one(store, at(0)).await;
    ticked(&mut changes, "planning");

    let leased = lease_one(store, "worker", at(0)).await;
    outcome(store, &leased, retry(at(30)), at(1)).await;
    ticked(&mut changes, "a retry");

    lease_one(store, "worker", at(30)).await;
    assert_eq!(store.requeue_expired(at(90)).await.unwrap(), 1);
    ticked(&mut changes, "requeueing an expired lease");

    lease_one(store, "worker", at(90)).await;
    // A store other nodes share knows a lease is orphaned only once it has expired.
    let later = if store.shared() {
        91 + LEASE.as_secs() as i64
    } else {
        91
    };
    assert_eq!(store.recover_orphaned("me", at(later)).await.unwrap(), 1);
    ticked(&mut changes, "recovering an orphaned lease");

    let leased = lease_one(store, "worker", at(later)).await;
    outcome(
        store,
        &leased,
        dead(FailureKind::Permanent, "400 Bad Request"),
        at(later + 1),
    )
    .await;
    assert_eq!(
        store.requeue_dead(None, at(later + 2)).await.unwrap().len(),
        1
    );
    ticked(&mut changes, "requeueing a dead letter");
}

async fn a_throttled_retry_does_not_use_up_the_attempt_budget(store: &dyn Store) {
    queue_one(store, at(0)).await;
    let first = lease_one(store, "worker", at(0)).await;
    assert_eq!(first.attempts, 1);

    let slowed = outcome(store, &first, throttled(at(10)), at(1)).await;
    assert!(slowed.applied);
    assert_eq!(slowed.record.state, DeliveryState::Retrying);
    assert_eq!(slowed.record.attempts, 0, "waiting was not its fault");
    assert_eq!(slowed.record.last_status, Some(429));

    let second = lease_one(store, "worker", at(10)).await;
    assert_eq!(second.attempts, 1);
    let failed = outcome(store, &second, retry(at(20)), at(11)).await;
    assert_eq!(failed.record.attempts, 1, "a real failure counts");

    let third = lease_one(store, "worker", at(20)).await;
    assert_eq!(third.attempts, 2);
    assert_eq!(third.leases, 3, "every lease is counted for fencing");
}

async fn an_absurdly_long_lease_saturates_instead_of_panicking(store: &dyn Store) {
    let queued = queue_one(store, at(0)).await;
    let leased = store
        .lease_due(CHANNEL, "worker", 1, Duration::MAX, at(0))
        .await
        .unwrap()
        .remove(0);
    let deadline = leased
        .lease_until
        .expect("a leased delivery has a deadline");
    assert!(deadline > at(0) + TimeDelta::days(365 * 1_000));
    assert_eq!(stored(store, &queued).await, leased);
    assert_eq!(store.requeue_expired(at(1_000_000)).await.unwrap(), 0);

    let recorded = outcome(store, &leased, sent(), at(1)).await;
    assert!(recorded.applied);
    assert_eq!(recorded.record.lease_until, None);
}

async fn a_page_of_deliveries_that_finds_nothing_has_no_cursor(store: &dyn Store) {
    let update = Ulid::new();
    let records = [
        record(update, "email", to("ann@example.com"), at(0)),
        record(update, "email", to("bob@example.com"), at(0)),
    ];
    enqueue(store, update, &records).await;
    let leased = store
        .lease_due("email", "worker", 1, LEASE, at(0))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(leased.recipient, to("ann@example.com"));
    outcome(
        store,
        &leased,
        dead(FailureKind::Permanent, "550 No such user"),
        at(1),
    )
    .await;

    // ann is the only failure; bob, still queued, comes after her in key order.
    let failed = store
        .deliveries(update, DeliveryFilter::Failed, None, 1)
        .await
        .unwrap();
    assert_eq!(failed.items.len(), 1);
    assert!(failed.next.is_some());
    let after = store
        .deliveries(update, DeliveryFilter::Failed, failed.next.as_ref(), 1)
        .await
        .unwrap();
    assert!(after.items.is_empty());
    assert!(
        after.next.is_none(),
        "a page without records has no cursor, whatever was skipped to find out"
    );
}

async fn a_page_of_zero_holds_nothing(store: &dyn Store) {
    let ann = contact("ann@example.com");
    store
        .subscribe(&ann, &order("AB-1001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    let update = Ulid::new();
    enqueue(
        store,
        update,
        &[record(update, "email", Recipient::Contact(ann), at(0))],
    )
    .await;

    let followers = Audience::Orders(BTreeSet::from([order("AB-1001")]));
    for audience in [Audience::Everyone, followers] {
        let page = store.subscriber_page(&audience, None, 0).await.unwrap();
        assert!(page.items.is_empty(), "{audience:?}: {:?}", page.items);
        assert!(page.next.is_none(), "{audience:?}");
    }
    let page = store
        .deliveries(update, DeliveryFilter::All, None, 0)
        .await
        .unwrap();
    assert!(page.items.is_empty(), "{:?}", page.items);
    assert!(page.next.is_none());
    assert!(
        store
            .lease_due("email", "worker", 0, LEASE, at(0))
            .await
            .unwrap()
            .is_empty()
    );
}

// ---- bulk subscriptions -------------------------------------------------------------------------

fn row(raw_contact: &str, raw_order: &str, confirmed: bool) -> Subscription {
    Subscription {
        contact: contact(raw_contact),
        order: order(raw_order),
        confirmed,
    }
}

async fn a_batch_of_subscriptions_reports_what_each_row_changed(store: &dyn Store) {
    store
        .subscribe(
            &contact("old@example.com"),
            &order("AB-0001"),
            false,
            FollowVia::Operator,
            at(0),
        )
        .await
        .unwrap();
    let rows = [
        row("new@example.com", "AB-0001", true),
        // The same row twice in one batch: the second is a duplicate.
        row("new@example.com", "AB-0001", true),
        row("new@example.com", "AB-0002", true),
        // Confirming a pending subscriber changes it.
        row("old@example.com", "AB-0001", true),
        row("old@example.com", "AB-0001", false),
        row("+447700900123", "AB-0003", false),
    ];
    let outcomes = store.subscribe_batch(&rows, at(1)).await.unwrap();
    assert_eq!(
        outcomes,
        [
            Subscribed::Created,
            Subscribed::Unchanged,
            Subscribed::Updated,
            Subscribed::Updated,
            Subscribed::Unchanged,
            Subscribed::Created,
        ]
    );
    assert_eq!(store.subscriber_count().await.unwrap(), 3);
    let new = store
        .subscriber(&contact("new@example.com"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(new.state(), SubscriberState::Confirmed);
    assert_eq!(new.orders().len(), 2);
    let old = store
        .subscriber(&contact("old@example.com"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.state(), SubscriberState::Confirmed);
    // The order index knows the new followers.
    let followers = store
        .subscriber_page(
            &Audience::Orders(BTreeSet::from([order("AB-0002")])),
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(followers.items.len(), 1);
    // Importing the same rows again changes nothing.
    let again = store.subscribe_batch(&rows, at(2)).await.unwrap();
    assert!(
        again.iter().all(|o| *o == Subscribed::Unchanged),
        "{again:?}"
    );
    assert_eq!(store.subscriber_count().await.unwrap(), 3);
}

async fn a_batch_never_subscribes_a_contact_that_left_again(store: &dyn Store) {
    let ann = contact("ann@example.com");
    store
        .subscribe(&ann, &order("AB-0001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    store
        .unsubscribe(&ann, None, FollowVia::Operator, at(1))
        .await
        .unwrap();
    let outcomes = store
        .subscribe_batch(&[row("ann@example.com", "AB-0002", true)], at(2))
        .await
        .unwrap();
    assert_eq!(outcomes, [Subscribed::KeptUnsubscribed]);
    let ann = store.subscriber(&ann).await.unwrap().unwrap();
    assert_eq!(ann.state(), SubscriberState::Unsubscribed);
    assert!(ann.orders().is_empty());
}

async fn a_lease_given_back_is_queued_again_without_its_attempt(store: &dyn Store) {
    let queued = queue_one(store, at(0)).await;
    let leased = lease_one(store, "me", at(0)).await;
    assert_eq!(leased.attempts, 1);
    assert_eq!(
        store
            .give_back(std::slice::from_ref(&leased), at(1))
            .await
            .unwrap(),
        1
    );
    let back = stored(store, &queued).await;
    assert_eq!(back.state, DeliveryState::Queued);
    assert_eq!(back.attempts, 0, "the attempt never happened");
    assert_eq!(back.owner, None);
    assert_eq!(store.counts(None).await.unwrap()[CHANNEL].queued, 1);
    assert_eq!(store.counts(None).await.unwrap()[CHANNEL].in_flight, 0);
    // Giving it back twice, or after another lease took it, changes nothing.
    assert_eq!(
        store
            .give_back(std::slice::from_ref(&leased), at(1))
            .await
            .unwrap(),
        0
    );
    let again = lease_one(store, "me", at(1)).await;
    assert_eq!(store.give_back(&[leased], at(2)).await.unwrap(), 0);
    assert_eq!(stored(store, &again).await.state, DeliveryState::InFlight);
}

async fn many_subscribers_are_read_at_once_in_order(store: &dyn Store) {
    for raw in ["a@example.com", "b@example.com"] {
        store
            .subscribe(
                &contact(raw),
                &order("AB-0001"),
                true,
                FollowVia::Operator,
                at(0),
            )
            .await
            .unwrap();
    }
    let found = store
        .subscribers(&[
            contact("b@example.com"),
            contact("nobody@example.com"),
            contact("a@example.com"),
        ])
        .await
        .unwrap();
    let found: Vec<Option<String>> = found
        .iter()
        .map(|s| s.as_ref().map(|s| s.contact.to_string()))
        .collect();
    assert_eq!(
        found,
        [
            Some("b@example.com".to_owned()),
            None,
            Some("a@example.com".to_owned())
        ]
    );
}

// ---- retention ----------------------------------------------------------------------------------

async fn retention_forgets_only_settled_deliveries_of_old_updates_and_keeps_the_counts(
    store: &dyn Store,
) {
    let incident = new_incident("Activations are delayed", at(0));
    let old = update_of(&incident, IncidentState::Investigating, at(0));
    store.accept_update(&old, Some(&incident)).await.unwrap();
    let done = PlanState {
        done: true,
        ..PlanState::default()
    };
    let records: Vec<DeliveryRecord> = ["a@example.com", "b@example.com", "c@example.com"]
        .iter()
        .map(|raw| record(old.id, CHANNEL, to(raw), at(0)))
        .collect();
    store
        .enqueue_planned(old.id, &records, &done)
        .await
        .unwrap();
    // a@ is sent, b@ dead, c@ still queued.
    let leased = store
        .lease_due(CHANNEL, "me", 2, LEASE, at(1))
        .await
        .unwrap();
    outcome(store, &leased[0], sent(), at(2)).await;
    outcome(
        store,
        &leased[1],
        dead(FailureKind::Permanent, "550"),
        at(2),
    )
    .await;
    let newer = update_of(&incident, IncidentState::Identified, at(100));
    store.accept_update(&newer, None).await.unwrap();
    // On another channel, so c@'s queued delivery above is not the one leased.
    let fresh = record(newer.id, "sms", to("a@example.com"), at(100));
    store
        .enqueue_planned(newer.id, std::slice::from_ref(&fresh), &done)
        .await
        .unwrap();
    let leased = store
        .lease_due("sms", "me", 1, LEASE, at(101))
        .await
        .unwrap();
    outcome(store, &leased[0], sent(), at(102)).await;
    let counts_before = store.counts(None).await.unwrap();

    assert_eq!(
        store.prune_settled(at(50), 0).await.unwrap(),
        0,
        "a limit of none"
    );
    assert_eq!(store.prune_settled(at(50), 100).await.unwrap(), 1);
    assert_eq!(
        store.delivery(&records[0].key()).await.unwrap(),
        None,
        "sent: forgotten"
    );
    assert_eq!(
        stored(store, &records[1]).await.state,
        DeliveryState::Dead,
        "a dead letter stays for retry"
    );
    assert!(
        store.delivery(&records[2].key()).await.unwrap().is_some(),
        "unsettled: kept"
    );
    assert!(
        store.delivery(&fresh.key()).await.unwrap().is_some(),
        "a newer update: kept"
    );
    assert_eq!(
        store.counts(None).await.unwrap(),
        counts_before,
        "counts stay"
    );
    assert_eq!(
        store.prune_settled(at(50), 100).await.unwrap(),
        0,
        "nothing twice"
    );
    assert_eq!(
        store
            .requeue_dead(Some(old.id), at(60))
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn an_idempotent_accept_remembers_its_answer_and_a_second_one_accepts_nothing(
    store: &dyn Store,
) {
    let answer = |body: &str| IdempotentAnswer {
        key: "lead:send-1".into(),
        fingerprint: format!("digest of {body}"),
        status: 202,
        body: body.into(),
        created_at: at(0),
    };
    assert_eq!(store.idempotent_answer("lead:send-1").await.unwrap(), None);
    let delays = new_incident("Activations are delayed", at(0));
    let first = update_of(&delays, IncidentState::Investigating, at(0));
    let earlier = store
        .accept_update_once(&first, Some(&delays), &answer("first"))
        .await
        .unwrap();
    assert_eq!(earlier, None, "a new key accepts the update");
    assert_eq!(store.update(first.id).await.unwrap(), first);
    assert_eq!(
        store.idempotent_answer("lead:send-1").await.unwrap(),
        Some(answer("first"))
    );

    let again = update_of(&delays, IncidentState::Investigating, at(5));
    let earlier = store
        .accept_update_once(&again, None, &answer("second"))
        .await
        .unwrap();
    assert_eq!(
        earlier,
        Some(answer("first")),
        "the first answer comes back"
    );
    assert!(
        matches!(
            store.update(again.id).await,
            Err(StoreError::UnknownUpdate(_))
        ),
        "nothing was accepted the second time"
    );
    assert_eq!(
        store.incident(delays.id).await.unwrap().updates,
        vec![first.id]
    );
    assert_eq!(
        store.idempotent_answer("other:send-1").await.unwrap(),
        None,
        "another client's key is another key"
    );
}

async fn provider_reports_are_kept_and_undelivered_ones_in_a_row_stop_the_contact(
    store: &dyn Store,
) {
    use ReportedOutcome::{Delivered, Pending, Undelivered};
    let phone = contact("+447700900123");
    store
        .subscribe(&phone, &order("AB-1234"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    let report = |outcome: ReportedOutcome, status: &str| ProviderReport {
        outcome,
        status: status.into(),
        code: (outcome == Undelivered).then(|| "30003".to_owned()),
        at: at(9),
    };
    let reports = [
        Undelivered,
        Undelivered,
        Delivered,
        Undelivered,
        Undelivered,
        Undelivered,
    ];
    let expected_counts = [Some(1), Some(2), None, Some(1), Some(2), Some(3)];
    for (n, (outcome, expected)) in reports.into_iter().zip(expected_counts).enumerate() {
        let update = Ulid::new();
        let queued = record(update, "sms", Recipient::Contact(phone.clone()), at(0));
        enqueue(store, update, std::slice::from_ref(&queued)).await;
        let key = queued.key();
        assert!(
            store
                .record_report(&key, None, &report(outcome, "early"))
                .await
                .unwrap()
                .is_none(),
            "a report on a delivery not sent yet does not apply"
        );
        let leased = store
            .lease_due("sms", "me", 1, LEASE, at(1))
            .await
            .unwrap()
            .remove(0);
        let sid = format!("SM{n}");
        let sent = Outcome::Sent {
            receipt: Receipt {
                provider_id: Some(sid.clone()),
                thread: None,
            },
        };
        store.record_outcome(&leased, &sent, at(2)).await.unwrap();
        assert!(
            store
                .record_report(&key, Some("SMother"), &report(outcome, "x"))
                .await
                .unwrap()
                .is_none(),
            "another message's report does not apply"
        );
        let pending = store
            .record_report(&key, Some(&sid), &report(Pending, "sent"))
            .await
            .unwrap()
            .expect("a pending report applies");
        assert_eq!(pending.report.unwrap().status, "sent");
        let kept = store
            .record_report(&key, Some(&sid), &report(outcome, "final"))
            .await
            .unwrap()
            .expect("the final report applies");
        assert_eq!(kept.state, DeliveryState::Sent, "a report never resends");
        assert_eq!(kept.report.as_ref().unwrap().outcome, outcome);
        assert!(
            store
                .record_report(&key, Some(&sid), &report(Pending, "late"))
                .await
                .unwrap()
                .is_none(),
            "nothing replaces a final report, and it counts once"
        );
        assert_eq!(stored(store, &queued).await.report, kept.report);
        let subscriber = store.subscriber(&phone).await.unwrap().unwrap();
        assert_eq!(
            subscriber.undelivered.get("sms").copied(),
            expected,
            "report {n}"
        );
        assert_eq!(
            subscriber.stopped_on.contains("sms"),
            n == reports.len() - 1,
            "stopped after three undelivered in a row, report {n}"
        );
    }
}

async fn a_sent_alert_is_remembered_by_its_key(store: &dyn Store) {
    let key = "01JTESTUPDATE:overdue";
    assert_eq!(store.alert_sent(key).await.unwrap(), None);
    store.record_alert(key, at(5)).await.unwrap();
    assert_eq!(store.alert_sent(key).await.unwrap(), Some(at(5)));
    assert_eq!(
        store.alert_sent("01JTESTUPDATE:due_soon").await.unwrap(),
        None,
        "each stage on its own"
    );
}

async fn a_form_request_stores_a_pending_follower_and_never_changes_a_confirmed_or_stopped_one(
    store: &dyn Store,
) {
    use crate::domain::SubscriberState;
    use crate::store::FormRequest;
    let ann = contact("ann@example.com");
    let asked = store
        .request_subscription(&ann, &order("AB-1001"), "email", at(0))
        .await
        .unwrap();
    assert_eq!(asked, FormRequest::AskToConfirm);
    let stored = store
        .subscriber(&ann)
        .await
        .unwrap()
        .expect("stored at once");
    assert_eq!(stored.state(), SubscriberState::Pending);
    assert!(stored.orders().contains(&order("AB-1001")));
    assert_eq!(store.subscriber_count().await.unwrap(), 1);

    // Confirmed: the same order again sends nothing; another waits for its link.
    store
        .subscribe(&ann, &order("AB-1001"), true, FollowVia::Operator, at(1))
        .await
        .unwrap();
    assert_eq!(
        store
            .request_subscription(&ann, &order("AB-1001"), "email", at(2))
            .await
            .unwrap(),
        FormRequest::AlreadyFollowing
    );
    assert_eq!(
        store
            .request_subscription(&ann, &order("AB-1002"), "email", at(3))
            .await
            .unwrap(),
        FormRequest::AskToConfirm
    );
    let ann_now = store.subscriber(&ann).await.unwrap().unwrap();
    assert_eq!(ann_now.state(), SubscriberState::Confirmed);
    assert!(
        !ann_now.receives(&order("AB-1002")),
        "a form does not change what a confirmed contact receives"
    );
    assert_eq!(
        ann_now
            .follow_of(&order("AB-1002"))
            .map(|f| (f.state, f.via)),
        Some((FollowState::Pending, FollowVia::Form)),
        "it waits for its own link"
    );

    // A phone that unsubscribed is never texted from a form, and stays unsubscribed.
    let phone = contact("+447700900123");
    store
        .subscribe(&phone, &order("AB-1001"), true, FollowVia::Operator, at(4))
        .await
        .unwrap();
    store
        .unsubscribe(&phone, None, FollowVia::Operator, at(5))
        .await
        .unwrap();
    assert_eq!(
        store
            .request_subscription(&phone, &order("AB-1001"), "sms", at(6))
            .await
            .unwrap(),
        FormRequest::MustNotMessage
    );
    assert_eq!(
        store.subscriber(&phone).await.unwrap().unwrap().state(),
        SubscriberState::Unsubscribed
    );
    assert_eq!(store.subscriber_count().await.unwrap(), 2);

    // A pending contact takes only so many orders from the form.
    let bob = contact("bob@example.com");
    for n in 0..crate::store::FORM_PENDING_ORDERS {
        let asked = store
            .request_subscription(&bob, &order(&format!("CD-{:04}", n)), "email", at(7))
            .await
            .unwrap();
        assert_eq!(asked, FormRequest::AskToConfirm);
    }
    let one_more = store
        .request_subscription(&bob, &order("CD-9999"), "email", at(8))
        .await
        .unwrap();
    assert_eq!(one_more, FormRequest::MustNotMessage);
    let again = store
        .request_subscription(&bob, &order("CD-0000"), "email", at(9))
        .await
        .unwrap();
    assert_eq!(
        again,
        FormRequest::AskToConfirm,
        "one it follows may be asked again"
    );
    let bob_now = store.subscriber(&bob).await.unwrap().unwrap();
    assert_eq!(bob_now.orders().len(), crate::store::FORM_PENDING_ORDERS);
}

async fn form_requests_arriving_together_are_each_decided_as_alone_and_all_stored(
    store: &dyn Store,
) {
    use crate::domain::SubscriberState;
    use crate::store::FormRequest;
    let (ann, bob, erin) = (
        contact("ann@example.com"),
        contact("bob@example.com"),
        contact("erin@example.com"),
    );
    let phone = contact("+447700900123");
    store
        .subscribe(&erin, &order("AB-1001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    store
        .subscribe(&phone, &order("AB-1001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    store
        .unsubscribe(&phone, None, FollowVia::Operator, at(1))
        .await
        .unwrap();

    // All of them in flight at once: the sled store's thread decides the ones that reach it
    // together in one transaction. Two requests of one contact may be decided in either order
    // on a shared store; each answer here is the same whichever goes first.
    let ask = |who: &Contact, number: &str, channel: &'static str| {
        let (who, number) = (who.clone(), order(number));
        async move {
            store
                .request_subscription(&who, &number, channel, at(2))
                .await
                .unwrap()
        }
    };
    let answers = tokio::join!(
        ask(&ann, "AB-1001", "email"),
        ask(&ann, "AB-1002", "email"),
        ask(&bob, "AB-1001", "email"),
        ask(&bob, "AB-1001", "email"),
        ask(&erin, "AB-1001", "email"),
        ask(&erin, "AB-1003", "email"),
        ask(&phone, "AB-1001", "sms"),
    );
    assert_eq!(
        answers,
        (
            FormRequest::AskToConfirm,
            FormRequest::AskToConfirm,
            FormRequest::AskToConfirm,
            FormRequest::AskToConfirm,
            FormRequest::AlreadyFollowing,
            FormRequest::AskToConfirm,
            FormRequest::MustNotMessage,
        )
    );
    let ann_now = store
        .subscriber(&ann)
        .await
        .unwrap()
        .expect("ann is stored");
    assert_eq!(ann_now.state(), SubscriberState::Pending);
    assert_eq!(
        ann_now
            .orders()
            .iter()
            .map(|o| o.as_str())
            .collect::<Vec<_>>(),
        ["AB-1001", "AB-1002"],
        "both of ann's requests are kept"
    );
    let bob_now = store
        .subscriber(&bob)
        .await
        .unwrap()
        .expect("bob is stored");
    assert_eq!(bob_now.state(), SubscriberState::Pending);
    assert_eq!(
        bob_now.orders().len(),
        1,
        "the same order twice is followed once"
    );
    let erin_now = store.subscriber(&erin).await.unwrap().unwrap();
    assert_eq!(erin_now.state(), SubscriberState::Confirmed);
    assert!(
        !erin_now.receives(&order("AB-1003")),
        "a form does not change what a confirmed contact receives"
    );
    assert_eq!(
        store.subscriber(&phone).await.unwrap().unwrap().state(),
        SubscriberState::Unsubscribed
    );
    assert_eq!(
        store.subscriber_count().await.unwrap(),
        4,
        "erin and the phone, then ann and bob, each counted once"
    );
    let followers = store
        .subscriber_page(&Audience::Orders([order("AB-1001")].into()), None, 10)
        .await
        .unwrap();
    let following: BTreeSet<String> = followers
        .items
        .iter()
        .filter(|s| !s.opted_out())
        .map(|s| s.contact.as_str().to_owned())
        .collect();
    assert_eq!(
        following,
        [&ann, &bob, &erin].map(|c| c.as_str().to_owned()).into(),
        "the order index finds the new followers beside erin; the phone left and stays so"
    );
}

async fn a_shared_store_lets_one_holder_at_a_time_claim_an_updates_planning(store: &dyn Store) {
    let update = Ulid::new();
    let first = store.claim_plan(update).await.unwrap();
    assert!(first.is_some(), "the first claim is granted");
    let second = store.claim_plan(update).await.unwrap();
    assert_eq!(
        second.is_some(),
        !store.shared(),
        "a shared store refuses a second holder; one process's store has no other"
    );
    let other = store.claim_plan(Ulid::new()).await.unwrap();
    assert!(
        other.is_some(),
        "another update's planning is claimed apart"
    );
    drop((first, second, other));

    // The claim ends with its holder (on PostgreSQL, once the server sees its session close).
    let mut again = None;
    for _ in 0..100 {
        again = store.claim_plan(update).await.unwrap();
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "a dropped claim lets another take over");
}

async fn a_delivery_twice_in_one_planning_write_is_stored_and_counted_once(store: &dyn Store) {
    // A subscriber following two of a targeted update's orders comes up once per order.
    let update = Ulid::new();
    let ann = record(update, CHANNEL, to("ann@example.com"), at(0));
    let bob = record(update, CHANNEL, to("bob@example.com"), at(0));
    let added = enqueue(store, update, &[ann.clone(), ann.clone(), bob]).await;
    assert_eq!(added, 2);
    let counts = store.counts(Some(update)).await.unwrap();
    assert_eq!(counts[CHANNEL].queued, 2);
    assert_eq!(counts, recount(store, update).await);
}

// ---- consent per order ------------------------------------------------------------------------

async fn a_confirmation_confirms_exactly_its_follows_and_a_strangers_stay_pending(
    store: &dyn Store,
) {
    use crate::store::{FollowChange, FormRequest};
    let phone = contact("+447700900123");
    // The owner asks for AB-1001; the confirmation text goes out and asks for a YES.
    let asked = store
        .request_subscription(&phone, &order("AB-1001"), "sms", at(0))
        .await
        .unwrap();
    assert_eq!(asked, FormRequest::AskToConfirm);
    let text = FollowChange::AskedByText {
        orders: [order("AB-1001")].into(),
        until: at(3600),
    };
    let sent = store.change_follows(&phone, &text, at(1)).await.unwrap();
    assert_eq!(sent.orders, [order("AB-1001")]);
    // A stranger adds two more orders for the same number; no text asks about them.
    for number in ["AB-1002", "AB-1003"] {
        store
            .request_subscription(&phone, &order(number), "sms", at(2))
            .await
            .unwrap();
    }
    let yes = store
        .change_follows(
            &phone,
            &FollowChange::AnsweredByText { order: None },
            at(10),
        )
        .await
        .unwrap();
    assert_eq!(
        yes.orders,
        [order("AB-1001")],
        "the YES confirms what it was asked"
    );
    let now = store.subscriber(&phone).await.unwrap().unwrap();
    assert!(now.receives(&order("AB-1001")));
    for number in ["AB-1002", "AB-1003"] {
        let follow = now.follow_of(&order(number)).unwrap();
        assert_eq!(
            (follow.state, follow.via),
            (FollowState::Pending, FollowVia::Form)
        );
    }
    assert_eq!(
        now.follow_of(&order("AB-1001")).unwrap().via,
        FollowVia::Text
    );
    let again = store
        .change_follows(
            &phone,
            &FollowChange::AnsweredByText { order: None },
            at(11),
        )
        .await
        .unwrap();
    assert!(
        again.orders.is_empty(),
        "a second YES has nothing left to confirm"
    );

    // A link confirms its own order and no other.
    let link = FollowChange::FollowByLink {
        order: order("AB-1002"),
        via: FollowVia::ConfirmLink,
        issued: at(2),
    };
    let confirmed = store.change_follows(&phone, &link, at(12)).await.unwrap();
    assert_eq!(confirmed.orders, [order("AB-1002")]);
    let now = store.subscriber(&phone).await.unwrap().unwrap();
    assert!(now.receives(&order("AB-1002")));
    assert!(!now.receives(&order("AB-1003")));

    // An update for AB-1003 does not reach the phone; one for AB-1001 does.
    let pages = |number: &str| Audience::Orders([order(number)].into());
    let stranger = store
        .subscriber_page(&pages("AB-1003"), None, 10)
        .await
        .unwrap();
    assert!(
        stranger
            .items
            .iter()
            .all(|s| !s.receives(&order("AB-1003")))
    );
    let owner = store
        .subscriber_page(&pages("AB-1001"), None, 10)
        .await
        .unwrap();
    assert!(owner.items.iter().any(|s| s.receives(&order("AB-1001"))));
}

async fn an_opt_out_voids_every_link_issued_before_it(store: &dyn Store) {
    use crate::store::FollowChange;
    let ann = contact("ann@example.com");
    store
        .subscribe(&ann, &order("AB-1001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    store
        .subscribe(&ann, &order("AB-1002"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    let link = |number: &str, issued: i64| FollowChange::FollowByLink {
        order: order(number),
        via: FollowVia::SupportLink,
        issued: at(issued),
    };
    // Leaving one order voids the links for it made before.
    store
        .unsubscribe(
            &ann,
            Some(&order("AB-1001")),
            FollowVia::UnsubscribeLink,
            at(10),
        )
        .await
        .unwrap();
    let old = store
        .change_follows(&ann, &link("AB-1001", 5), at(11))
        .await
        .unwrap();
    assert!(old.orders.is_empty());
    assert!(!old.subscriber.receives(&order("AB-1001")));
    // Leaving everything voids every older link.
    store
        .unsubscribe(&ann, None, FollowVia::UnsubscribeLink, at(20))
        .await
        .unwrap();
    for number in ["AB-1001", "AB-1002"] {
        let old = store
            .change_follows(&ann, &link(number, 15), at(21))
            .await
            .unwrap();
        assert!(old.orders.is_empty(), "{number}");
    }
    let stored = store.subscriber(&ann).await.unwrap().unwrap();
    assert_eq!(stored.state(), SubscriberState::Unsubscribed);
    assert_eq!(stored.opted_out_at, Some(at(20)));
    // A link made after the opt-out is a new request: it brings back its order alone.
    let new = store
        .change_follows(&ann, &link("AB-1002", 25), at(26))
        .await
        .unwrap();
    assert_eq!(new.orders, [order("AB-1002")]);
    assert!(new.subscriber.receives(&order("AB-1002")));
    assert!(!new.subscriber.receives(&order("AB-1001")));
    assert_eq!(store.subscriber(&ann).await.unwrap(), Some(new.subscriber));
}

async fn start_after_stop_brings_back_exactly_what_was_confirmed(store: &dyn Store) {
    use crate::store::FollowChange;
    let phone = contact("+447700900123");
    store
        .subscribe(&phone, &order("AB-1001"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    store
        .request_subscription(&phone, &order("AB-1002"), "sms", at(0))
        .await
        .unwrap();
    let stop = store
        .change_follows(&phone, &FollowChange::StopByText, at(5))
        .await
        .unwrap();
    assert_eq!(stop.orders, [order("AB-1001"), order("AB-1002")]);
    assert_eq!(stop.subscriber.state(), SubscriberState::Unsubscribed);
    let start = store
        .change_follows(
            &phone,
            &FollowChange::AnsweredByText { order: None },
            at(999_999),
        )
        .await
        .unwrap();
    assert_eq!(
        start.orders,
        [order("AB-1001")],
        "the pending one was never consented to"
    );
    assert!(!start.subscriber.receives(&order("AB-1002")));
    let unknown = store
        .change_follows(
            &contact("+447700900999"),
            &FollowChange::AnsweredByText { order: None },
            at(1),
        )
        .await;
    assert!(matches!(unknown, Err(StoreError::UnknownSubscriber(_))));
}

async fn a_form_request_forgotten_after_its_link_expired_is_not_kept(store: &dyn Store) {
    use crate::store::{CONFIRM_TTL, FollowChange};
    let ann = contact("ann@example.com");
    store
        .request_subscription(&ann, &order("AB-1001"), "email", at(0))
        .await
        .unwrap();
    store
        .subscribe(&ann, &order("AB-1002"), true, FollowVia::Operator, at(0))
        .await
        .unwrap();
    let later = crate::clock::after(at(1), CONFIRM_TTL);
    let touched = FollowChange::Follow {
        order: order("AB-1003"),
        confirmed: true,
        via: FollowVia::Operator,
    };
    let now = store
        .change_follows(&ann, &touched, later)
        .await
        .unwrap()
        .subscriber;
    assert_eq!(
        now.follow_of(&order("AB-1001")),
        None,
        "the made-up request is gone"
    );
    assert_eq!(now.orders(), [order("AB-1002"), order("AB-1003")].into());
    let followers = Audience::Orders([order("AB-1001")].into());
    assert!(
        walk(store, &followers, 10).await.is_empty(),
        "nor does the order list it"
    );
}

async fn an_import_never_brings_back_an_order_the_contact_left(store: &dyn Store) {
    let ann = contact("ann@example.com");
    let rows = [
        row("ann@example.com", "AB-1001", true),
        row("ann@example.com", "AB-1002", true),
    ];
    store.subscribe_batch(&rows, at(0)).await.unwrap();
    store
        .unsubscribe(
            &ann,
            Some(&order("AB-1001")),
            FollowVia::UnsubscribeLink,
            at(1),
        )
        .await
        .unwrap();
    let again = store
        .subscribe_batch(&[row("ann@example.com", "AB-1001", true)], at(2))
        .await
        .unwrap();
    assert_eq!(again, [Subscribed::KeptUnsubscribed]);
    let now = store.subscriber(&ann).await.unwrap().unwrap();
    assert!(!now.receives(&order("AB-1001")));
    assert!(now.receives(&order("AB-1002")));
    assert_eq!(
        now.follow_of(&order("AB-1002")).unwrap().via,
        FollowVia::Import
    );
}

// ---- records from before consent per order ------------------------------------------------------

/// Subscribers as crier wrote them before consent was kept per order: a state for the contact,
/// the set of orders it followed.
const LEGACY_SUBSCRIBERS: [(&str, &str, &[&str]); 3] = [
    (
        "ann@example.com",
        r#"{"contact":"ann@example.com","state":"confirmed","orders":["AB-1001","AB-1002"],"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-02-01T00:00:00Z"}"#,
        &["AB-1001", "AB-1002"],
    ),
    (
        "bob@example.com",
        r#"{"contact":"bob@example.com","state":"pending","orders":["AB-1001"],"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-02-01T00:00:00Z"}"#,
        &["AB-1001"],
    ),
    (
        "+447700900123",
        r#"{"contact":"+447700900123","state":"unsubscribed","orders":[],"stopped_on":["sms"],"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-02-01T00:00:00Z"}"#,
        &[],
    ),
];

/// What a store holding [`LEGACY_SUBSCRIBERS`] must show, and do, once it reads them.
async fn legacy_subscribers_read_as_follows_per_order(store: &dyn Store) {
    use crate::store::FormRequest;
    let ann = store
        .subscriber(&contact("ann@example.com"))
        .await
        .unwrap()
        .unwrap();
    assert!(ann.receives(&order("AB-1001")) && ann.receives(&order("AB-1002")));
    assert_eq!(
        ann.follow_of(&order("AB-1001")).unwrap().via,
        FollowVia::Earlier
    );
    let bob = store
        .subscriber(&contact("bob@example.com"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bob.state(), SubscriberState::Pending);
    let phone = contact("+447700900123");
    let gone = store.subscriber(&phone).await.unwrap().unwrap();
    assert_eq!(gone.state(), SubscriberState::Unsubscribed);
    assert!(gone.stopped_on.contains("sms"));
    assert_eq!(
        store
            .request_subscription(&phone, &order("AB-1001"), "sms", at(0))
            .await
            .unwrap(),
        FormRequest::MustNotMessage,
        "an opted-out phone stays opted out"
    );
    let followers = Audience::Orders([order("AB-1001")].into());
    assert_eq!(
        sorted(walk(store, &followers, 10).await),
        ["ann@example.com", "bob@example.com"].map(String::from)
    );
    // Changed once, a record is written in the new form and still reads the same.
    store
        .unsubscribe(
            &contact("ann@example.com"),
            Some(&order("AB-1002")),
            FollowVia::Operator,
            at(0),
        )
        .await
        .unwrap();
    let ann = store
        .subscriber(&contact("ann@example.com"))
        .await
        .unwrap()
        .unwrap();
    assert!(ann.receives(&order("AB-1001")));
    assert_eq!(
        ann.follow_of(&order("AB-1002")).unwrap().state,
        FollowState::Left
    );
    assert_eq!(store.subscriber_count().await.unwrap(), 3);
}

#[tokio::test]
async fn a_sled_store_reads_subscribers_written_before_consent_per_order() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("store");
    {
        let db = ::sled::Config::new().path(&path).open().unwrap();
        let (subscribers, index, meta) = (
            db.open_tree("subscribers").unwrap(),
            db.open_tree("order_index").unwrap(),
            db.open_tree("meta").unwrap(),
        );
        for (key, record, orders) in LEGACY_SUBSCRIBERS {
            subscribers.insert(key, record.as_bytes()).unwrap();
            for order in orders {
                index
                    .insert([order.as_bytes(), &[0], key.as_bytes()].concat(), &[])
                    .unwrap();
            }
        }
        meta.insert("subscriber_count", b"3".as_slice()).unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open(&StoreSettings::sled(path, 8 << 20))
        .await
        .unwrap();
    legacy_subscribers_read_as_follows_per_order(&store).await;
}

#[tokio::test]
async fn a_postgres_store_reads_subscribers_written_before_consent_per_order() {
    let server = tokio::task::spawn_blocking(PostgresServer::shared)
        .await
        .unwrap();
    let url = tokio::task::spawn_blocking(|| server.database())
        .await
        .unwrap();
    let settings = PostgresSettings {
        url: url.clone().into(),
        variable: "CRIER_DATABASE_URL".into(),
        pool_size: 2,
    };
    // Opening runs the migrations; the records then go in as an older crier wrote them.
    drop(PostgresStore::open(&settings).await.unwrap());
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    for (key, record, orders) in LEGACY_SUBSCRIBERS {
        let record: serde_json::Value = serde_json::from_str(record).unwrap();
        client
            .execute(
                "INSERT INTO subscribers (contact, record) VALUES ($1, $2)",
                &[&key, &tokio_postgres::types::Json(record)],
            )
            .await
            .unwrap();
        for order in orders {
            client
                .execute(
                    "INSERT INTO followers (order_number, contact) VALUES ($1, $2)",
                    &[order, &key],
                )
                .await
                .unwrap();
        }
    }
    client
        .execute(
            "INSERT INTO counters (name, shard, value) VALUES ('subscribers', 0, 3)",
            &[],
        )
        .await
        .unwrap();
    drop(client);
    connection.await.unwrap().unwrap();
    let store = PostgresStore::open(&settings).await.unwrap();
    legacy_subscribers_read_as_follows_per_order(&store).await;
}
