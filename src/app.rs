//! Start-up and composing: opens the store, builds the channels, and turns a draft into an
//! accepted, planned update.

use crate::channel::{
    BuildContext, ConfiguredChannel, Reach, RenderedPart, build_channels, check_templates,
};
use crate::clock;
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::domain::{
    Audience, Body, Contact, Headline, Incident, IncidentState, OrderNumber, Update,
};
use crate::render::{Composer, MessageSource, Renderer};
use crate::status_view::StatusProjection;
use crate::store::Store;
use chrono::Utc;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use ulid::Ulid;

/// What the comms lead typed, before it is checked.
#[derive(Debug, Clone)]
pub struct Draft {
    pub headline: Option<String>,
    pub body: String,
    pub state: Option<IncidentState>,
    pub incident: Option<Ulid>,
    pub next_update_in: Option<Duration>,
    pub audience: Audience,
    /// Channel ids; empty means every configured channel.
    pub channels: Vec<String>,
    pub author: String,
}

/// An update as a client writes it, before anything is checked: what `crier send` reads from
/// its arguments and `POST /api/updates` from its body.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    /// One line that says what is going on (required for a new incident).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headline: Option<String>,
    /// The update's text.
    pub body: String,
    /// investigating, identified, monitoring or resolved [default: investigating, or the
    /// incident's current state].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Continue this incident (its id) instead of opening a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    /// Promise the next update within this long, like "2h" or "30m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_update_in: Option<String>,
    /// Send only to the subscribers of these orders [default: everyone].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orders: Vec<String>,
    /// Send through only these channels (their ids) [default: every channel].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

impl UpdateRequest {
    /// Checks every field but the text (compose checks that, with each channel's limits).
    pub fn into_draft(self, config: &Config, author: String) -> crate::Result<Draft> {
        let state = self
            .state
            .as_deref()
            .map(str::parse::<IncidentState>)
            .transpose()?;
        let incident = self
            .incident
            .as_deref()
            .map(|id| {
                Ulid::from_string(id.trim()).map_err(|_| {
                    crate::Error::user(format!("'{id}' is not an incident id (a ULID)"))
                })
            })
            .transpose()?;
        let next_update_in = self
            .next_update_in
            .as_deref()
            .map(crate::domain::parse_next_update_in)
            .transpose()?;
        let audience = if self.orders.is_empty() {
            Audience::Everyone
        } else {
            Audience::Orders(
                self.orders
                    .iter()
                    .map(|o| OrderNumber::parse(o, &config.orders))
                    .collect::<Result<BTreeSet<_>, _>>()?,
            )
        };
        Ok(Draft {
            headline: self.headline,
            body: self.body,
            state,
            incident,
            next_update_in,
            audience,
            channels: self.channels,
            author,
        })
    }
}

/// A draft that every selected channel accepted, with what each will send.
/// A draft made into an update, before any channel renders it.
struct Drafted {
    update: Update,
    incident: Incident,
    new_incident: bool,
    channels: Vec<ConfiguredChannel>,
    now: chrono::DateTime<Utc>,
}

/// One channel's rendering of a previewed update, or why it refuses it.
pub struct ChannelRendering {
    pub channel: String,
    /// email, sms, mastodon…
    pub kind: &'static str,
    pub rendered: Result<Vec<RenderedPart>, String>,
}

/// What [`App::preview_each`] makes: the update as drafted, and every channel's rendering.
pub struct EachPreviewed {
    pub update: Update,
    pub incident: Incident,
    pub channels: Vec<ChannelRendering>,
}

pub struct Composed {
    pub update: Update,
    pub incident: Incident,
    pub new_incident: bool,
    pub previews: Vec<(String, Vec<RenderedPart>)>,
}

pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub channels: Vec<ConfiguredChannel>,
    pub composer: Composer,
    /// This process, as recorded on the leases it takes.
    pub owner: String,
    /// The public status view, which the status page channel writes and the server serves.
    pub status: Arc<StatusProjection>,
    /// Every template, the web pages' among them.
    pub renderer: Arc<Renderer>,
}

impl App {
    /// Opens the store and builds every channel.
    pub async fn open(config: Config) -> crate::Result<Self> {
        let renderer = Arc::new(Renderer::load(&config.templates_dir)?);
        check_templates(&config, &renderer)?;
        let store = crate::store::open(&config.store).await?;
        let composer = Composer::new(&config);
        let status = Arc::new(StatusProjection::new(
            store.clone(),
            renderer.clone(),
            composer.brand().clone(),
            composer.links().clone(),
        ));
        let context = BuildContext {
            renderer: renderer.clone(),
            composer: composer.clone(),
            status: status.clone(),
        };
        let channels = build_channels(&config, &context).await?;
        Ok(Self {
            config,
            store,
            channels,
            composer,
            owner: format!("crier-{}-{}", std::process::id(), Ulid::new()),
            status,
            renderer,
        })
    }

    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher::new(
            self.store.clone(),
            self.channels.clone(),
            self.composer.clone(),
            self.config.lease,
            self.owner.clone(),
        )
    }

    /// Parses the draft and renders it for every selected channel. Nothing is stored: a
    /// channel that rejects the update stops it here.
    pub async fn compose(&self, draft: Draft) -> crate::Result<Composed> {
        let drafted = self.draft_update(draft).await?;
        let mut previews = Vec::new();
        for channel in &drafted.channels {
            previews.push((channel.id.clone(), self.render_for(&drafted, channel)?));
        }
        Ok(Composed {
            update: drafted.update,
            incident: drafted.incident,
            new_incident: drafted.new_incident,
            previews,
        })
    }

    /// Like [`compose`](Self::compose), but a channel that rejects the update does not stop
    /// the others: each channel's rendering or why it refuses, as the console shows while the
    /// comms lead types.
    pub async fn preview_each(&self, draft: Draft) -> crate::Result<EachPreviewed> {
        let drafted = self.draft_update(draft).await?;
        let channels = drafted
            .channels
            .iter()
            .map(|channel| ChannelRendering {
                channel: channel.id.clone(),
                kind: channel.kind,
                rendered: self
                    .render_for(&drafted, channel)
                    .map_err(|refused| refused.rejection.to_string()),
            })
            .collect();
        Ok(EachPreviewed {
            update: drafted.update,
            incident: drafted.incident,
            channels,
        })
    }

    /// The update a draft makes, its incident, and the channels it goes through.
    async fn draft_update(&self, draft: Draft) -> crate::Result<Drafted> {
        let now = Utc::now();
        let body = Body::parse(&draft.body)?;
        let (incident, new_incident) = match draft.incident {
            Some(id) => (self.store.incident(id).await?, false),
            None => {
                let headline = draft.headline.as_deref().ok_or_else(|| {
                    crate::Error::user(
                        "a new incident needs --headline (or continue one with --incident ID)",
                    )
                })?;
                let title = Headline::parse(headline)?;
                let state = draft.state.unwrap_or(IncidentState::Investigating);
                (Incident::open(title.as_str().to_owned(), state, now), true)
            }
        };
        let headline = Headline::parse(draft.headline.as_deref().unwrap_or(&incident.title))?;
        let channels = self.select_channels(&draft.channels)?;
        let update = Update {
            id: Ulid::new(),
            incident: incident.id,
            state: draft.state.unwrap_or(incident.state),
            headline,
            body,
            next_update_by: draft.next_update_in.map(|wait| clock::after(now, wait)),
            audience: draft.audience,
            author: draft.author,
            created_at: now,
            channels: channels.iter().map(|c| c.id.clone()).collect(),
        };
        Ok(Drafted {
            update,
            incident,
            new_incident,
            channels,
            now,
        })
    }

    /// What one channel would send of a drafted update, to a sample subscriber.
    fn render_for(
        &self,
        drafted: &Drafted,
        channel: &ConfiguredChannel,
    ) -> Result<Vec<RenderedPart>, crate::channel::RejectError> {
        let source = MessageSource {
            update: drafted.update.clone(),
            incident: drafted.incident.clone(),
        };
        let source = Arc::new(source);
        let sample = Contact::parse("customer@example.com").expect("the sample address is valid");
        let orders: Vec<_> = match &drafted.update.audience {
            Audience::Orders(orders) => orders.iter().cloned().collect(),
            Audience::Everyone => Vec::new(),
        };
        let recipient = match channel.reach() {
            Reach::Subscribers(_) => Some((&sample, orders.as_slice())),
            Reach::Broadcast { .. } => None,
        };
        let message = self.composer.message(&source, recipient, drafted.now);
        channel.render(&message)
    }

    fn select_channels(&self, ids: &[String]) -> crate::Result<Vec<ConfiguredChannel>> {
        if ids.is_empty() {
            return Ok(self.channels.clone());
        }
        ids.iter()
            .map(|id| {
                self.channels
                    .iter()
                    .find(|c| c.id == *id)
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            self.channels.iter().map(|c| c.id.as_str()).collect();
                        crate::Error::user(format!(
                            "no channel is named '{id}'; configured: {}",
                            known.join(", ")
                        ))
                    })
            })
            .collect()
    }

    /// The first status page channel, and how much its page shows: what `crier serve`
    /// serves at `/`.
    pub fn status_page(&self) -> Option<(String, crate::status_view::PageShape)> {
        self.config.channels.iter().find_map(|channel| {
            channel
                .settings
                .as_any()
                .downcast_ref::<crate::channel::status_page::StatusPageSettings>()
                .map(|settings| (channel.id.clone(), settings.shape))
        })
    }

    /// Stores the update durably; its planning starts with the next dispatch
    /// ([`crate::runtime::deliver_queued`]), which delivers while it plans.
    pub async fn accept(&self, composed: &Composed) -> crate::Result<()> {
        let new_incident = composed.new_incident.then_some(&composed.incident);
        self.store
            .accept_update(&composed.update, new_incident)
            .await?;
        Ok(())
    }
}
