//! The reports support staff and the comms lead read: what an order has been told
//! (`crier order`, `GET /api/orders/{n}`) and how an update's deliveries went (`crier
//! deliveries`, `GET /api/deliveries`). Built once here, so the CLI prints the same report
//! whether it read the store itself or asked a running server.

use crate::config::Config;
use crate::delivery::{Counts, DeliveryKey, DeliveryRecord, Recipient};
use crate::domain::{Audience, OrderNumber, Update};
use crate::links::LinkMaker;
use crate::render::{human_time, rfc3339};
use crate::store::{DeliveryFilter, Store};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use ulid::Ulid;

/// How far back an order's report looks for an update that applies.
const UPDATES_SEARCHED: usize = 1000;
/// How long the support link in an order's reply works.
const SUPPORT_LINK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How many contacts of one order a report lists at most.
const CONTACTS_LISTED: usize = 100;
/// How many failures a deliveries report lists at most.
pub const FAILURES_SHOWN: usize = 1000;

/// An update as the reports show it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpdateSummary {
    pub id: String,
    pub incident: String,
    /// investigating, identified, monitoring or resolved.
    pub state: String,
    pub headline: String,
    /// RFC 3339, when the update promised the next one.
    pub next_update_by: Option<String>,
    /// RFC 3339.
    pub created_at: String,
}

impl UpdateSummary {
    pub fn of(update: &Update) -> Self {
        Self {
            id: update.id.to_string(),
            incident: update.incident.to_string(),
            state: update.state.as_str().to_owned(),
            headline: update.headline.as_str().to_owned(),
            next_update_by: update.next_update_by.map(rfc3339),
            created_at: rfc3339(update.created_at),
        }
    }
}

/// One contact that follows or followed an order, masked: where its consent to the order
/// stands, since when and how, and how the latest update reached it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Follower {
    /// Masked: `a***@example.com`, `+44*******123`.
    pub contact: String,
    /// Its follow of this order: pending (not confirmed yet), confirmed, or left.
    pub state: String,
    /// When the follow came to that state (RFC 3339).
    pub since: String,
    /// How it came to it, in words: "by a confirmation link", "by text message".
    pub how: String,
    /// When the contact first asked for this order (RFC 3339).
    pub first: String,
    /// Channels the contact can no longer be reached on (a STOP, a dead number).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stopped_on: Vec<String>,
    /// The latest update's delivery state on each channel that reached the contact.
    pub deliveries: BTreeMap<String, String>,
}

/// What support needs to answer a customer about one order.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderReport {
    pub order: String,
    /// The latest update that applies to the order (sent to everyone, or targeted at it).
    pub update: Option<UpdateSummary>,
    pub contacts: Vec<Follower>,
    /// A reply to paste: the update in plain words and a fresh support link.
    pub snippet: Option<String>,
}

/// A value that serializes as a string (a state, say), as that string.
pub(crate) fn as_text<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub async fn order_report(
    store: &dyn Store,
    config: &Config,
    order: &OrderNumber,
) -> crate::Result<OrderReport> {
    let latest = store
        .recent_updates(UPDATES_SEARCHED)
        .await?
        .into_iter()
        .find(|update| match &update.audience {
            Audience::Everyone => true,
            Audience::Orders(orders) => orders.contains(order),
        });
    let audience = Audience::Orders(BTreeSet::from([order.clone()]));
    let followers = store
        .subscriber_page(&audience, None, CONTACTS_LISTED)
        .await?
        .items;
    let mut contacts = Vec::new();
    for subscriber in &followers {
        let mut deliveries = BTreeMap::new();
        if let Some(update) = &latest {
            for channel in &update.channels {
                let recipient = Recipient::Contact(subscriber.contact.clone());
                let key = DeliveryKey::new(update.id, channel, &recipient);
                if let Some(record) = store.delivery(&key).await? {
                    deliveries.insert(channel.clone(), as_text(&record.state));
                }
            }
        }
        let Some(follow) = subscriber.follow_of(order) else {
            continue;
        };
        contacts.push(Follower {
            contact: subscriber.contact.masked(),
            state: as_text(&follow.state),
            since: rfc3339(follow.since),
            how: follow.via.describe().to_owned(),
            first: rfc3339(follow.first),
            stopped_on: subscriber.stopped_on.iter().cloned().collect(),
            deliveries,
        });
    }
    let status_page = format!("{}/", config.brand.public_url);
    let links = LinkMaker::new(config);
    let snippet = latest.as_ref().map(|update| {
        let mut text = format!(
            "Here is the latest on your order {order}: {}\n\n{}",
            update.headline.as_str(),
            update.body.as_str()
        );
        if let Some(next) = update.next_update_by {
            text.push_str(&format!("\n\nNext update by {}.", human_time(next)));
        }
        text.push_str(&format!("\n\nEvery update, as it happens: {status_page}"));
        text.push_str(&format!(
            "\nTo get the next ones by email or SMS: {}",
            links.support_url(
                order,
                None,
                crate::clock::after(Utc::now(), SUPPORT_LINK_TTL)
            )
        ));
        text
    });
    Ok(OrderReport {
        order: order.as_str().to_owned(),
        update: latest.as_ref().map(UpdateSummary::of),
        contacts,
        snippet,
    })
}

/// How one update's deliveries went, per channel, with the failures when asked for.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveriesReport {
    /// The update's id; none when no update was sent yet.
    pub update: Option<String>,
    pub incident: Option<String>,
    pub headline: Option<String>,
    /// RFC 3339.
    pub created_at: Option<String>,
    pub channels: BTreeMap<String, Counts>,
    /// Dead letters and deliveries waiting to retry, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub failures: Option<Vec<DeliveryRecord>>,
}

/// The report on `update` (the latest when none is named).
pub async fn deliveries_report(
    store: &dyn Store,
    update: Option<Ulid>,
    failed: bool,
) -> crate::Result<DeliveriesReport> {
    let update = match update {
        Some(id) => store.update(id).await?,
        None => match store.recent_updates(1).await?.into_iter().next() {
            Some(latest) => latest,
            None => {
                return Ok(DeliveriesReport {
                    update: None,
                    incident: None,
                    headline: None,
                    created_at: None,
                    channels: BTreeMap::new(),
                    failures: None,
                });
            }
        },
    };
    let channels = store.counts(Some(update.id)).await?;
    let failures = if failed {
        Some(
            store
                .deliveries(update.id, DeliveryFilter::Failed, None, FAILURES_SHOWN)
                .await?
                .items,
        )
    } else {
        None
    };
    Ok(DeliveriesReport {
        update: Some(update.id.to_string()),
        incident: Some(update.incident.to_string()),
        headline: Some(update.headline.as_str().to_owned()),
        created_at: Some(rfc3339(update.created_at)),
        channels,
        failures,
    })
}

/// Per-channel progress of one update: what `send` follows.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub update: UpdateSummary,
    /// Whether every delivery of the update is planned.
    pub planned: bool,
    pub channels: BTreeMap<String, Counts>,
}

impl Progress {
    /// Everything planned and nothing queued or in flight: only retries (or nothing) remain.
    pub fn settled(&self) -> bool {
        self.planned
            && self
                .channels
                .values()
                .all(|c| c.queued == 0 && c.in_flight == 0)
    }

    pub fn totals(&self) -> Counts {
        self.channels
            .values()
            .fold(Counts::default(), |mut sum, c| {
                sum.add(c);
                sum
            })
    }
}

/// What retrying dead letters did: how many were queued again, and which channels a gone
/// endpoint had disabled were enabled again.
#[derive(Debug, Default)]
pub struct Requeued {
    pub count: usize,
    pub enabled: Vec<String>,
}

/// Queues the dead letters of `update` (of every update when none is named) again with a
/// fresh attempt budget, and enables every channel among them that a gone endpoint had
/// disabled: what `crier retry`, `POST /api/deliveries/retry` and the console's button do.
pub async fn retry_dead_letters(
    store: &dyn Store,
    update: Option<Ulid>,
) -> crate::Result<Requeued> {
    let requeued = store.requeue_dead(update, Utc::now()).await?;
    let channels: BTreeSet<&str> = requeued.iter().map(|r| r.channel.as_str()).collect();
    let mut enabled = Vec::new();
    for channel in channels {
        if store.enable_channel(channel).await? {
            enabled.push(channel.to_owned());
        }
    }
    Ok(Requeued {
        count: requeued.len(),
        enabled,
    })
}

pub async fn progress(store: &dyn Store, update: Ulid) -> crate::Result<Progress> {
    let record = store.update(update).await?;
    let planned = store.plan_state(update).await?.done;
    let channels = store.counts(Some(update)).await?;
    Ok(Progress {
        update: UpdateSummary::of(&record),
        planned,
        channels,
    })
}

/// What each channel would send for an update, before it is sent.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PreviewReport {
    /// The update as it would be stored (its id is not kept).
    pub update: UpdateSummary,
    /// The incident's title.
    pub incident_title: String,
    /// The orders a targeted update goes to; empty for everyone.
    pub orders: Vec<String>,
    /// In the configured order.
    pub channels: Vec<ChannelPreview>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChannelPreview {
    pub channel: String,
    pub parts: Vec<crate::channel::RenderedPart>,
}

impl PreviewReport {
    pub fn of(composed: &crate::app::Composed) -> Self {
        Self {
            update: UpdateSummary::of(&composed.update),
            incident_title: composed.incident.title.clone(),
            orders: match &composed.update.audience {
                Audience::Everyone => Vec::new(),
                Audience::Orders(orders) => orders.iter().map(|o| o.as_str().to_owned()).collect(),
            },
            channels: composed
                .previews
                .iter()
                .map(|(channel, parts)| ChannelPreview {
                    channel: channel.clone(),
                    parts: parts.clone(),
                })
                .collect(),
        }
    }
}
