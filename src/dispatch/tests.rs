//! The dispatcher driven directly: a scripted fake channel, the in-memory store and tokio's
//! paused clock, so throttling, recipient-gone and receipts are tested without sockets or
//! real sleeps.

use super::plan::plan_update;
use super::{Dispatcher, Mode};
use crate::channel::{Attempt, Channel, ConfiguredChannel, Reach, Rejection, RenderedPart};
use crate::clock::Clock;
use crate::config::DeliveryPolicy;
use crate::delivery::{
    DeliveryError, DeliveryKey, DeliveryState, FailureKind, Receipt, Recipient, RemoteThread,
};
use crate::domain::token::TokenSigner;
use crate::domain::{
    Audience, Body, Contact, ContactKind, FollowVia, Headline, Incident, IncidentState,
    OrderNumber, OrderPattern, Update,
};
use crate::links::LinkMaker;
use crate::render::{Composer, MessageContext};
use crate::store::{MemoryStore, Store};
use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use ulid::Ulid;

/// One call the fake channel received.
#[derive(Debug, Clone)]
struct Call {
    started: DateTime<Utc>,
    key: DeliveryKey,
    recipient: Recipient,
    thread: Option<RemoteThread>,
}

type Script = dyn Fn(usize, &Recipient) -> Result<Receipt, DeliveryError> + Send + Sync;

/// A channel whose every answer comes from a script, each taking a second of (tokio) time.
struct Scripted {
    reach: Reach,
    clock: Clock,
    calls: Mutex<Vec<Call>>,
    script: Box<Script>,
    /// How long each call takes.
    takes: Duration,
}

impl Scripted {
    fn new(
        reach: Reach,
        clock: Clock,
        script: impl Fn(usize, &Recipient) -> Result<Receipt, DeliveryError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            reach,
            clock,
            calls: Mutex::new(Vec::new()),
            script: Box::new(script),
            takes: Duration::from_secs(1),
        })
    }

    /// A channel that answers at once, every time with success.
    fn instant(reach: Reach, clock: Clock) -> Arc<Self> {
        Arc::new(Self {
            reach,
            clock,
            calls: Mutex::new(Vec::new()),
            script: Box::new(|_, _| Ok(Receipt::none())),
            takes: Duration::ZERO,
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Channel for Scripted {
    fn reach(&self) -> Reach {
        self.reach
    }

    fn render(&self, _: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
        Ok(Vec::new())
    }

    async fn deliver(
        &self,
        _: &MessageContext,
        attempt: &Attempt<'_>,
    ) -> Result<Receipt, DeliveryError> {
        let index = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                started: self.clock.now(),
                key: attempt.key.clone(),
                recipient: attempt.recipient.clone(),
                thread: attempt.thread.cloned(),
            });
            calls.len() - 1
        };
        tokio::time::sleep(self.takes).await;
        (self.script)(index, attempt.recipient)
    }
}

struct Harness {
    store: Arc<MemoryStore>,
    clock: Clock,
    channels: Vec<ConfiguredChannel>,
}

impl Harness {
    fn new() -> Self {
        Self {
            store: Arc::new(MemoryStore::new()),
            clock: Clock::following_tokio(Utc::now()),
            channels: Vec::new(),
        }
    }

    fn channel(&mut self, id: &str, concurrency: usize, adapter: Arc<Scripted>) {
        self.channel_with_rate(id, concurrency, adapter, None);
    }

    fn channel_with_rate(
        &mut self,
        id: &str,
        concurrency: usize,
        adapter: Arc<Scripted>,
        rate: Option<crate::config::Rate>,
    ) {
        let mut policy = DeliveryPolicy::with_concurrency(concurrency);
        policy.max_attempts = 3;
        policy.rate = rate;
        self.channels.push(ConfiguredChannel {
            id: id.into(),
            kind: "scripted",
            policy,
            adapter,
        });
    }

    async fn subscribe(&self, contact: &str) {
        let pattern = OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap();
        let order = OrderNumber::parse("AB-1001", &pattern).unwrap();
        let contact = Contact::parse(contact).unwrap();
        self.store
            .subscribe(
                &contact,
                &order,
                true,
                FollowVia::Operator,
                self.clock.now(),
            )
            .await
            .unwrap();
    }

    /// Accepts and plans an update to everyone through every channel, in `incident` or a new
    /// one.
    async fn send(&self, incident: Option<Ulid>) -> Update {
        self.send_to(incident, Audience::Everyone).await
    }

    /// [`Harness::send`] to `audience`.
    async fn send_to(&self, incident: Option<Ulid>, audience: Audience) -> Update {
        let now = self.clock.now();
        let (incident_id, new) = match incident {
            Some(id) => (id, None),
            None => {
                let incident = Incident::open(
                    "Activations delayed".into(),
                    IncidentState::Investigating,
                    now,
                );
                (incident.id, Some(incident))
            }
        };
        let update = Update {
            id: Ulid::new(),
            incident: incident_id,
            state: IncidentState::Investigating,
            headline: Headline::parse("Activations delayed").unwrap(),
            body: Body::parse("We're on it.").unwrap(),
            next_update_by: None,
            audience,
            author: "test".into(),
            created_at: now,
            channels: self.channels.iter().map(|c| c.id.clone()).collect(),
        };
        self.store
            .accept_update(&update, new.as_ref())
            .await
            .unwrap();
        plan_update(self.store.as_ref(), &update, &self.channels, 100, now)
            .await
            .unwrap();
        update
    }

    /// Runs the dispatcher until everything due within ten minutes is settled.
    async fn dispatch(&self) {
        let left = self.try_dispatch().await.unwrap();
        assert_eq!(left, None, "nothing is left for later");
    }

    async fn try_dispatch(&self) -> crate::Result<Option<DateTime<Utc>>> {
        let composer = Composer::with_links(
            &crate::config::Brand::plain("Example Mobile", "https://status.example.com"),
            LinkMaker::for_site(
                "https://status.example.com",
                TokenSigner::new(b"a test secret that is long enough"),
                Duration::from_secs(3600),
            ),
        );
        let dispatcher = Dispatcher::new(
            self.store.clone(),
            self.channels.clone(),
            composer,
            Duration::from_secs(120),
            "test-node".into(),
        )
        .with_clock(self.clock);
        let (_keep_running, shutdown) = watch::channel(false);
        Arc::new(dispatcher)
            .run(
                Mode::UntilDrained {
                    patience: Duration::from_secs(600),
                },
                shutdown,
            )
            .await
    }
}

fn email() -> Reach {
    Reach::Subscribers(ContactKind::Email)
}

#[tokio::test(start_paused = true)]
async fn a_throttled_answer_pauses_every_worker_of_the_channel_and_costs_no_attempt() {
    let mut harness = Harness::new();
    let channel = Scripted::new(email(), harness.clock, |call, _| {
        if call == 0 {
            Err(
                DeliveryError::new(FailureKind::Throttled, "the provider answered 429")
                    .with_status(429)
                    .with_retry_after(Some(Duration::from_secs(30))),
            )
        } else {
            Ok(Receipt::none())
        }
    });
    harness.channel("email", 3, channel.clone());
    for i in 0..6 {
        harness.subscribe(&format!("c{i}@example.com")).await;
    }
    let start = harness.clock.now();
    let update = harness.send(None).await;
    harness.dispatch().await;

    let calls = channel.calls();
    assert_eq!(calls.len(), 7, "six deliveries and one retry: {calls:?}");
    let offsets: Vec<i64> = calls
        .iter()
        .map(|c| (c.started - start).num_seconds())
        .collect();
    // The first three started together; the 429 came back a second later, and from then on
    // no worker of the channel sent anything until the 30 seconds had passed.
    assert_eq!(&offsets[..3], &[0, 0, 0], "{offsets:?}");
    assert!(
        offsets[3..].iter().all(|&offset| offset >= 31),
        "every later call waited for the throttle: {offsets:?}"
    );
    let counts = harness.store.counts(Some(update.id)).await.unwrap();
    assert_eq!(counts["email"].sent, 6);
    let throttled = harness
        .store
        .delivery(&calls[0].key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(throttled.state, DeliveryState::Sent);
    assert_eq!(
        throttled.attempts, 1,
        "the throttled attempt was not counted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_recipient_gone_answer_stops_that_contact_on_that_channel_only() {
    let mut harness = Harness::new();
    let gone = Contact::parse("gone@example.com").unwrap();
    let sms_like = {
        let gone = gone.clone();
        Scripted::new(email(), harness.clock, move |_, recipient| {
            if recipient.contact() == Some(&gone) {
                Err(
                    DeliveryError::new(FailureKind::RecipientGone, "the mailbox does not exist")
                        .with_status(550)
                        .with_code("5.1.1"),
                )
            } else {
                Ok(Receipt::none())
            }
        })
    };
    let other = Scripted::new(email(), harness.clock, |_, _| Ok(Receipt::none()));
    harness.channel("email", 2, sms_like.clone());
    harness.channel("backup", 2, other.clone());
    harness.subscribe("gone@example.com").await;
    harness.subscribe("here@example.com").await;

    let first = harness.send(None).await;
    harness.dispatch().await;
    let key = DeliveryKey::new(first.id, "email", &Recipient::Contact(gone.clone()));
    let dead = harness.store.delivery(&key).await.unwrap().unwrap();
    assert_eq!(dead.state, DeliveryState::Dead);
    assert_eq!(dead.attempts, 1, "not retried");
    assert_eq!(dead.last_status, Some(550));
    assert_eq!(dead.last_code.as_deref(), Some("5.1.1"));
    let subscriber = harness.store.subscriber(&gone).await.unwrap().unwrap();
    assert!(!subscriber.receives_on("email"));
    assert!(subscriber.receives_on("backup"));

    let second = harness.send(Some(first.incident)).await;
    harness.dispatch().await;
    let counts = harness.store.counts(Some(second.id)).await.unwrap();
    assert_eq!(counts["email"].sent, 1, "only here@ on the channel it left");
    assert_eq!(counts["email"].total(), 1);
    assert_eq!(
        counts["backup"].sent, 2,
        "gone@ still gets the other channel"
    );
}

#[tokio::test(start_paused = true)]
async fn a_contact_that_leaves_the_order_after_planning_is_skipped_not_sent() {
    let mut harness = Harness::new();
    let email = Scripted::new(email(), harness.clock, |_, _| Ok(Receipt::none()));
    harness.channel("email", 2, email.clone());
    harness.subscribe("ann@example.com").await;
    harness.subscribe("bob@example.com").await;
    let pattern = OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap();
    let (launch, other) = (
        OrderNumber::parse("AB-1001", &pattern).unwrap(),
        OrderNumber::parse("AB-1002", &pattern).unwrap(),
    );
    let ann = Contact::parse("ann@example.com").unwrap();
    let now = harness.clock.now();
    // Ann still receives updates about another order: only her consent to this one ends.
    harness
        .store
        .subscribe(&ann, &other, true, FollowVia::Operator, now)
        .await
        .unwrap();
    let update = harness
        .send_to(None, Audience::Orders([launch.clone()].into()))
        .await;
    harness
        .store
        .unsubscribe(&ann, Some(&launch), FollowVia::UnsubscribeLink, now)
        .await
        .unwrap();
    harness.dispatch().await;
    let key = DeliveryKey::new(update.id, "email", &Recipient::Contact(ann));
    let skipped = harness.store.delivery(&key).await.unwrap().unwrap();
    assert_eq!(skipped.state, DeliveryState::Skipped);
    let counts = harness.store.counts(Some(update.id)).await.unwrap();
    assert_eq!((counts["email"].sent, counts["email"].skipped), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_receipts_thread_is_kept_on_the_incident_and_handed_to_the_next_update() {
    let mut harness = Harness::new();
    let forum = Scripted::new(
        Reach::Broadcast {
            accepts_targeted: false,
        },
        harness.clock,
        |_, _| {
            Ok(Receipt {
                provider_id: Some("post-1".into()),
                thread: Some(serde_json::json!({ "topic_id": 42 })),
            })
        },
    );
    harness.channel("forum", 1, forum.clone());

    let first = harness.send(None).await;
    harness.dispatch().await;
    let incident = harness.store.incident(first.incident).await.unwrap();
    assert_eq!(
        incident.remote_threads.get("forum"),
        Some(&serde_json::json!({ "topic_id": 42 }))
    );
    let key = DeliveryKey::new(first.id, "forum", &Recipient::Broadcast);
    let sent = harness.store.delivery(&key).await.unwrap().unwrap();
    assert_eq!(sent.provider_id.as_deref(), Some("post-1"));

    harness.send(Some(first.incident)).await;
    harness.dispatch().await;
    let calls = forum.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].thread, None, "the first post starts the thread");
    assert_eq!(
        calls[1].thread,
        Some(serde_json::json!({ "topic_id": 42 })),
        "the follow-up replies in it"
    );
    assert!(calls.iter().all(|c| c.recipient == Recipient::Broadcast));
}

#[tokio::test(start_paused = true)]
async fn a_store_that_fails_stops_the_worker_and_never_dead_letters_the_delivery() {
    let mut harness = Harness::new();
    let channel = Scripted::new(email(), harness.clock, |_, _| Ok(Receipt::none()));
    harness.channel("email", 2, channel.clone());
    harness.subscribe("ann@example.com").await;
    let update = harness.send(None).await;
    harness.store.fail_reads();

    let error = harness
        .try_dispatch()
        .await
        .expect_err("the store failing is the dispatcher's error");
    assert_eq!(error.kind(), crate::ErrorKind::Unavailable);
    assert!(channel.calls().is_empty(), "nothing was sent blind");
    let counts = harness.store.counts(Some(update.id)).await.unwrap();
    assert_eq!(
        counts["email"].dead, 0,
        "a store failure is not the message's fault"
    );
    assert_eq!(
        counts["email"].in_flight, 1,
        "it stays leased, and comes back when its lease is recovered"
    );
}

#[tokio::test(start_paused = true)]
async fn a_delivery_is_finished_when_its_attempt_ends_not_when_it_starts() {
    let mut harness = Harness::new();
    let channel = Scripted::new(email(), harness.clock, |_, _| Ok(Receipt::none()));
    harness.channel("email", 1, channel.clone());
    harness.subscribe("ann@example.com").await;
    harness.send(None).await;
    harness.dispatch().await;

    let call = &channel.calls()[0];
    let sent = harness.store.delivery(&call.key).await.unwrap().unwrap();
    let took = sent.finished_at.unwrap() - call.started;
    assert_eq!(took.num_seconds(), 1, "the attempt took a second: {took}");
}

/// In real time: the rate limiter reads the system's monotonic clock.
#[tokio::test]
async fn a_channels_rate_spaces_its_attempts_evenly_whatever_its_concurrency() {
    let mut harness = Harness {
        clock: Clock::System,
        ..Harness::new()
    };
    let channel = Scripted::instant(email(), harness.clock);
    let rate = crate::config::Rate::new(10, Duration::from_secs(1));
    harness.channel_with_rate("email", 4, channel.clone(), Some(rate));
    for i in 0..6 {
        harness.subscribe(&format!("c{i}@example.com")).await;
    }
    harness.send(None).await;
    harness.dispatch().await;

    let calls = channel.calls();
    assert_eq!(calls.len(), 6);
    let mut starts: Vec<DateTime<Utc>> = calls.iter().map(|c| c.started).collect();
    starts.sort();
    for pair in starts.windows(2) {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        // One permit every 100 ms; a little slack for the clocks' granularity.
        assert!(gap >= 90, "attempts {gap} ms apart: {starts:?}");
    }
}

#[test]
fn only_a_rate_of_thousands_a_second_gives_its_permits_in_bursts() {
    use crate::config::Rate;
    let burst = |text: &str| super::burst_of(&Rate::parse(text).unwrap()).get();
    assert_eq!(burst("1/1s"), 1);
    assert_eq!(burst("300/5m"), 1);
    assert_eq!(burst("1000/1s"), 1);
    assert_eq!(burst("2000/1s"), 2);
    assert_eq!(burst("1000000/1s"), 1000);
}
