//! The watchdog: keeps the promise of a next update. An open incident whose latest update says
//! "next update by T" holds a promise; at T minus the lead time the comms lead is reminded, at T
//! told it is overdue. The promises are the updates in the store and each alert sent is
//! recorded there, so a restart neither forgets a promise nor repeats an alert, and a server
//! started after T alerts at once.

use crate::clock::{Clock, after, until};
use crate::domain::{IncidentState, Update};
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use ulid::Ulid;

/// How long after a failed alert it is tried again.
const RETRY_ALERT: Duration = Duration::from_secs(60);
/// The longest the watchdog sleeps: a new update that queues nothing (a channel-less one)
/// still renews its promise within this long.
const LOOK_AGAIN: Duration = Duration::from_secs(60);

/// One open promise: the latest update of an open incident said when the next one comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Promise {
    pub incident: Ulid,
    pub title: String,
    /// The update that made the promise.
    pub update: Ulid,
    pub headline: String,
    pub due: DateTime<Utc>,
}

/// How far along a promise is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Within the lead time of its due time.
    DueSoon,
    /// Past its due time with no new update.
    Overdue,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::DueSoon => "due_soon",
            Stage::Overdue => "overdue",
        }
    }
}

/// A promise and the stage it has reached, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Watched {
    #[serde(flatten)]
    pub promise: Promise,
    pub stage: Option<Stage>,
}

/// What the comms lead is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    #[serde(flatten)]
    pub promise: Promise,
    pub stage: Stage,
}

impl Alert {
    /// The name it is recorded under: one alert per promise and stage.
    pub fn key(&self) -> String {
        format!("{}:{}", self.promise.update, self.stage.as_str())
    }
}

/// Where alerts go: email, a webhook, a test's list.
#[async_trait::async_trait]
pub trait Alerter: Send + Sync {
    /// Sends the alert, or says why it could not; it is tried again later.
    async fn alert(&self, alert: &Alert) -> Result<(), String>;
}

/// The promise of `update`, the latest of an open incident, if it made one.
pub fn promise_of(update: &Update, title: &str) -> Option<Promise> {
    if update.state == IncidentState::Resolved {
        return None;
    }
    update.next_update_by.map(|due| Promise {
        incident: update.incident,
        title: title.to_owned(),
        update: update.id,
        headline: update.headline.as_str().to_owned(),
        due,
    })
}

/// Every open promise, soonest due first. A new update on an incident replaces its promise
/// (or, saying nothing of the next one, ends it), and resolving the incident ends it.
pub async fn open_promises(store: &dyn Store) -> Result<Vec<Promise>, StoreError> {
    let mut promises = Vec::new();
    for incident in store.incidents().await? {
        if incident.state == IncidentState::Resolved {
            continue;
        }
        let Some(latest) = incident.updates.last() else {
            continue;
        };
        let update = store.update(*latest).await?;
        promises.extend(promise_of(&update, &incident.title));
    }
    promises.sort_by_key(|promise| promise.due);
    Ok(promises)
}

/// The stage `promise` has reached at `now`, reminding `lead` before it is due.
pub fn stage_at(promise: &Promise, now: DateTime<Utc>, lead: Duration) -> Option<Stage> {
    if now >= promise.due {
        Some(Stage::Overdue)
    } else if until(now, promise.due) <= lead {
        Some(Stage::DueSoon)
    } else {
        None
    }
}

/// The next moment after `now` at which a promise reaches a stage.
pub fn next_stage_change(
    promises: &[Promise],
    now: DateTime<Utc>,
    lead: Duration,
) -> Option<DateTime<Utc>> {
    promises
        .iter()
        .flat_map(|promise| {
            let reminder = promise
                .due
                .checked_sub_signed(chrono::TimeDelta::from_std(lead).unwrap_or_default())
                .unwrap_or(promise.due);
            [reminder, promise.due]
        })
        .filter(|moment| *moment > now)
        .min()
}

/// Watches the promises in a store and alerts on them.
pub struct Watchdog {
    store: Arc<dyn Store>,
    clock: Clock,
    lead: Duration,
    /// None when alerts go nowhere: then none is sent or recorded, so configuring a way
    /// later still tells the lead about a promise that is open then.
    alerter: Option<Arc<dyn Alerter>>,
    watched: watch::Sender<Vec<Watched>>,
}

impl Watchdog {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Clock,
        lead: Duration,
        alerter: Option<Arc<dyn Alerter>>,
    ) -> Self {
        Self {
            store,
            clock,
            lead,
            alerter,
            watched: watch::channel(Vec::new()).0,
        }
    }

    /// The open promises and their stages, as of the last look: for the admin pages' banner,
    /// the metrics, and the status page, which is rendered again when a stage changes.
    pub fn watched(&self) -> watch::Receiver<Vec<Watched>> {
        self.watched.subscribe()
    }

    /// Looks once: sends every alert that is due and not yet sent, and says when to look
    /// again.
    pub async fn check(&self) -> Result<DateTime<Utc>, StoreError> {
        let now = self.clock.now();
        let promises = open_promises(self.store.as_ref()).await?;
        let mut failed = false;
        let mut watched = Vec::with_capacity(promises.len());
        for promise in promises.iter().cloned() {
            let stage = stage_at(&promise, now, self.lead);
            if let (Some(stage), Some(alerter)) = (stage, &self.alerter) {
                let alert = Alert {
                    promise: promise.clone(),
                    stage,
                };
                failed |= !self.alert_once(alerter.as_ref(), &alert, now).await?;
            }
            watched.push(Watched { promise, stage });
        }
        self.watched.send_if_modified(|current| {
            let changed = *current != watched;
            *current = watched;
            changed
        });
        let mut next = after(now, LOOK_AGAIN);
        if let Some(change) = next_stage_change(&promises, now, self.lead) {
            next = next.min(change);
        }
        if failed {
            next = next.min(after(now, RETRY_ALERT));
        }
        Ok(next)
    }

    /// Sends `alert` unless it was sent before; records it once sent. Returns whether it is
    /// sent (now or before).
    async fn alert_once(
        &self,
        alerter: &dyn Alerter,
        alert: &Alert,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let key = alert.key();
        if self.store.alert_sent(&key).await?.is_some() {
            return Ok(true);
        }
        match alerter.alert(alert).await {
            Ok(()) => {
                // Recorded after sending: a crash in between sends it twice, never not at all.
                self.store.record_alert(&key, now).await?;
                tracing::info!(incident = %alert.promise.incident, stage = alert.stage.as_str(), due = %alert.promise.due, "promise alert sent");
                Ok(true)
            }
            Err(error) => {
                tracing::warn!(incident = %alert.promise.incident, stage = alert.stage.as_str(), %error, "promise alert not sent; trying again");
                Ok(false)
            }
        }
    }

    /// Looks whenever a stage is due to change, the queue changes (a new update was planned),
    /// or a minute has passed, until the task is dropped.
    pub async fn run(self) {
        let mut queue_changes = self.store.queue_changes();
        loop {
            let wait = match self.check().await {
                Ok(next) => until(self.clock.now(), next),
                Err(error) => {
                    tracing::error!(%error, "the watchdog cannot read the promises");
                    RETRY_ALERT
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = queue_changes.changed() => {
                    if changed.is_err() {
                        // The store is gone: only the timer wakes us from now on.
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }
}

// ---- alerting the comms lead ------------------------------------------------------------

/// The templates an alert email is rendered from.
pub const ALERT_TEMPLATES: &[&str] = &["alert.subject", "alert.txt", "alert.html"];

/// What the alert templates and the webhook's JSON see.
#[derive(Debug, Serialize)]
struct AlertView<'a> {
    brand: &'a crate::render::BrandView,
    links: &'a crate::links::Links,
    #[serde(flatten)]
    alert: &'a Alert,
    overdue: bool,
    due_text: String,
}

/// Sends alerts to `alerts.to` through the first email channel and to `alerts.webhook`,
/// signed the Standard Webhooks way. An alert counts as sent once every configured way took
/// it; until then it is tried again, all ways at once, so one may see it twice.
pub struct LeadAlerter {
    email: Option<(crate::channel::ConfiguredChannel, crate::domain::Contact)>,
    webhook: Option<crate::config::AlertWebhook>,
    client: reqwest::Client,
    renderer: Arc<crate::render::Renderer>,
    brand: crate::render::BrandView,
    links: crate::links::Links,
}

impl LeadAlerter {
    /// `None` when the config names nowhere to send alerts; the watchdog still watches (the
    /// status page says when an update is late) but tells no one.
    pub fn new(app: &crate::app::App) -> crate::Result<Option<Self>> {
        let settings = &app.config.alerts;
        if settings.to.is_none() && settings.webhook.is_none() {
            return Ok(None);
        }
        let email = match &settings.to {
            None => None,
            Some(to) => {
                let channel = app
                    .channels
                    .iter()
                    .find(|channel| channel.kind == "email")
                    .cloned()
                    .ok_or_else(|| {
                        crate::Error::user(
                            "alerts.to needs an email channel to send through; add one or leave alerts.to out",
                        )
                    })?;
                app.renderer.require(ALERT_TEMPLATES)?;
                Some((channel, crate::domain::Contact::Email(to.clone())))
            }
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| crate::Error::internal(anyhow::anyhow!("HTTP client: {e}")))?;
        Ok(Some(Self {
            email,
            webhook: settings.webhook.clone(),
            client,
            renderer: app.renderer.clone(),
            brand: app.composer.brand().clone(),
            links: app.composer.links().clone(),
        }))
    }

    async fn email(&self, view: &AlertView<'_>) -> Result<(), String> {
        let Some((channel, to)) = &self.email else {
            return Ok(());
        };
        let render = |name: &str| self.renderer.render(name, view).map_err(|e| e.to_string());
        let notice = crate::channel::Notice {
            subject: render("alert.subject")?.trim().to_owned(),
            text: render("alert.txt")?,
            html: render("alert.html")?,
        };
        channel
            .adapter
            .notify(to, &notice)
            .await
            .map(|_| ())
            .map_err(|e| format!("email: {}", e.reason))
    }

    async fn webhook(&self, view: &AlertView<'_>) -> Result<(), String> {
        use secrecy::ExposeSecret;
        let Some(webhook) = &self.webhook else {
            return Ok(());
        };
        let mut data = serde_json::to_value(view.alert).map_err(|e| e.to_string())?;
        data["status_page"] = view.links.status_page.clone().into();
        let body = serde_json::to_vec(&serde_json::json!({
            "type": format!("promise.{}", view.alert.stage.as_str()),
            "timestamp": crate::render::rfc3339(Utc::now()),
            "data": data,
        }))
        .map_err(|e| e.to_string())?;
        // The same id on every try of one alert, so the receiver can drop a repeat.
        let id = format!("msg_{}", view.alert.key().replace(':', "_"));
        let response = crate::channel::webhook::signed_post(
            &self.client,
            &webhook.url,
            webhook.secret.expose_secret(),
            &id,
            body,
        )
        .send()
        .await
        .map_err(|e| format!("webhook: {}", e.without_url()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook: answered {}", response.status()))
        }
    }
}

#[async_trait::async_trait]
impl Alerter for LeadAlerter {
    async fn alert(&self, alert: &Alert) -> Result<(), String> {
        let view = AlertView {
            brand: &self.brand,
            links: &self.links,
            alert,
            overdue: alert.stage == Stage::Overdue,
            due_text: crate::render::human_time(alert.promise.due),
        };
        let (email, webhook) = tokio::join!(self.email(&view), self.webhook(&view));
        match (email, webhook) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Err(a), Err(b)) => Err(format!("{a}; {b}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Audience, Body, Headline, Incident};
    use crate::store::MemoryStore;
    use std::sync::Mutex;

    const LEAD: Duration = Duration::from_secs(15 * 60);

    /// Keeps every alert, and fails while told to.
    #[derive(Default)]
    struct Recorder {
        alerts: Mutex<Vec<(Stage, Ulid, DateTime<Utc>)>>,
        failing: Mutex<bool>,
        clock: Mutex<Option<Clock>>,
    }

    #[async_trait::async_trait]
    impl Alerter for Recorder {
        async fn alert(&self, alert: &Alert) -> Result<(), String> {
            if *self.failing.lock().unwrap() {
                return Err("the mail server is down".into());
            }
            let now = self.clock.lock().unwrap().expect("a clock").now();
            self.alerts
                .lock()
                .unwrap()
                .push((alert.stage, alert.promise.update, now));
            Ok(())
        }
    }

    impl Recorder {
        fn stages(&self) -> Vec<(Stage, DateTime<Utc>)> {
            let alerts = self.alerts.lock().unwrap();
            alerts.iter().map(|(stage, _, at)| (*stage, *at)).collect()
        }
    }

    fn start() -> DateTime<Utc> {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn minutes(n: u64) -> Duration {
        Duration::from_secs(n * 60)
    }

    fn update(
        incident: &Incident,
        state: IncidentState,
        at: DateTime<Utc>,
        next: Option<Duration>,
    ) -> Update {
        Update {
            id: Ulid::new(),
            incident: incident.id,
            state,
            headline: Headline::parse("Activations delayed").unwrap(),
            body: Body::parse("We are on it.").unwrap(),
            next_update_by: next.map(|wait| after(at, wait)),
            audience: Audience::Everyone,
            author: "lead".into(),
            created_at: at,
            channels: vec![],
        }
    }

    /// A store with one incident promising its next update in 2 hours, and a watchdog on it
    /// whose clock follows tokio's paused time.
    async fn promised() -> (Arc<dyn Store>, Incident, Arc<Recorder>, Clock) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let incident = Incident::open("Activations".into(), IncidentState::Investigating, start());
        let first = update(
            &incident,
            IncidentState::Investigating,
            start(),
            Some(minutes(120)),
        );
        store.accept_update(&first, Some(&incident)).await.unwrap();
        let clock = Clock::following_tokio(start());
        let recorder = Arc::new(Recorder::default());
        *recorder.clock.lock().unwrap() = Some(clock);
        (store, incident, recorder, clock)
    }

    fn spawn(
        store: &Arc<dyn Store>,
        recorder: &Arc<Recorder>,
        clock: Clock,
    ) -> tokio::task::JoinHandle<()> {
        let watchdog = Watchdog::new(
            store.clone(),
            clock,
            LEAD,
            Some(recorder.clone() as Arc<dyn Alerter>),
        );
        tokio::spawn(watchdog.run())
    }

    #[tokio::test(start_paused = true)]
    async fn the_lead_is_reminded_15_minutes_before_the_promise_and_told_when_it_is_overdue() {
        let (store, _, recorder, clock) = promised().await;
        let watching = spawn(&store, &recorder, clock);
        tokio::time::sleep(minutes(104)).await;
        assert!(recorder.stages().is_empty(), "nothing before T-15");
        tokio::time::sleep(minutes(2)).await;
        assert_eq!(
            recorder.stages(),
            vec![(Stage::DueSoon, after(start(), minutes(105)))]
        );
        tokio::time::sleep(minutes(20)).await;
        assert_eq!(
            recorder.stages(),
            vec![
                (Stage::DueSoon, after(start(), minutes(105))),
                (Stage::Overdue, after(start(), minutes(120))),
            ]
        );
        tokio::time::sleep(minutes(600)).await;
        assert_eq!(recorder.stages().len(), 2, "each alert once");
        watching.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_in_time_ends_the_promise_or_renews_it() {
        let (store, incident, recorder, clock) = promised().await;
        let watching = spawn(&store, &recorder, clock);
        tokio::time::sleep(minutes(60)).await;
        // An hour in, a new update promises the next in another 2 hours.
        let renewed = update(
            &incident,
            IncidentState::Identified,
            clock.now(),
            Some(minutes(120)),
        );
        store.accept_update(&renewed, None).await.unwrap();
        tokio::time::sleep(minutes(100)).await;
        assert!(
            recorder.stages().is_empty(),
            "the first promise was kept: {:?}",
            recorder.stages()
        );
        tokio::time::sleep(minutes(10)).await;
        assert_eq!(
            recorder.stages(),
            vec![(Stage::DueSoon, after(start(), minutes(165)))]
        );
        // Resolving the incident ends the renewed promise before it is overdue.
        let resolved = update(&incident, IncidentState::Resolved, clock.now(), None);
        store.accept_update(&resolved, None).await.unwrap();
        tokio::time::sleep(minutes(600)).await;
        assert_eq!(recorder.stages().len(), 1, "{:?}", recorder.stages());
        watching.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_watchdog_started_past_the_due_time_alerts_at_once_and_a_second_start_does_not_repeat_it()
     {
        let (store, _, recorder, _) = promised().await;
        let late = Clock::following_tokio(after(start(), minutes(180)));
        *recorder.clock.lock().unwrap() = Some(late);
        let watching = spawn(&store, &recorder, late);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            recorder.stages(),
            vec![(Stage::Overdue, after(start(), minutes(180)))],
            "overdue at once, and no reminder that is already too late"
        );
        watching.abort();
        let again = spawn(&store, &recorder, late);
        tokio::time::sleep(minutes(5)).await;
        assert_eq!(
            recorder.stages().len(),
            1,
            "recorded in the store, so not sent twice"
        );
        again.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_alert_that_cannot_be_sent_is_tried_again_until_it_is() {
        let (store, _, recorder, _) = promised().await;
        let clock = Clock::following_tokio(after(start(), minutes(121)));
        *recorder.clock.lock().unwrap() = Some(clock);
        *recorder.failing.lock().unwrap() = true;
        let watchdog = Watchdog::new(
            store.clone(),
            clock,
            LEAD,
            Some(recorder.clone() as Arc<dyn Alerter>),
        );
        let watched = watchdog.watched();
        let watching = tokio::spawn(watchdog.run());
        tokio::time::sleep(minutes(3)).await;
        assert!(recorder.stages().is_empty());
        assert_eq!(
            watched.borrow()[0].stage,
            Some(Stage::Overdue),
            "overdue even while unsent"
        );
        *recorder.failing.lock().unwrap() = false;
        tokio::time::sleep(minutes(1)).await;
        assert_eq!(recorder.stages().len(), 1);
        watching.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_watchdog_with_nowhere_to_alert_records_nothing_so_a_later_one_still_tells() {
        let (store, _, recorder, _) = promised().await;
        let late = Clock::following_tokio(after(start(), minutes(130)));
        *recorder.clock.lock().unwrap() = Some(late);
        let silent = Watchdog::new(store.clone(), late, LEAD, None);
        let watched = silent.watched();
        silent.check().await.unwrap();
        assert_eq!(
            watched.borrow()[0].stage,
            Some(Stage::Overdue),
            "it still watches"
        );
        let told = spawn(&store, &recorder, late);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            recorder.stages().len(),
            1,
            "the overdue promise is still alerted"
        );
        told.abort();
    }

    #[test]
    fn stages_follow_the_clock_and_the_next_change_is_the_nearest_boundary() {
        let promise = Promise {
            incident: Ulid::new(),
            title: "t".into(),
            update: Ulid::new(),
            headline: "h".into(),
            due: after(start(), minutes(120)),
        };
        let at = |m: u64| after(start(), minutes(m));
        assert_eq!(stage_at(&promise, at(104), LEAD), None);
        assert_eq!(stage_at(&promise, at(105), LEAD), Some(Stage::DueSoon));
        assert_eq!(stage_at(&promise, at(120), LEAD), Some(Stage::Overdue));
        let promises = [promise];
        assert_eq!(next_stage_change(&promises, at(0), LEAD), Some(at(105)));
        assert_eq!(next_stage_change(&promises, at(105), LEAD), Some(at(120)));
        assert_eq!(next_stage_change(&promises, at(120), LEAD), None);
    }
}
