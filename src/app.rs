//! Start-up and composing: opens the store, builds the channels, and turns a draft into an
//! accepted, planned update.

use crate::UserError;
use crate::channel::{Channel, RenderedPart, build_channels, check_templates};
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::dispatch::plan::plan_update;
use crate::domain::{Audience, Body, Headline, Incident, IncidentState, Update};
use crate::render::{Composer, Renderer};
use crate::store::Store;
use chrono::Utc;
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
    /// Channel names; empty means every configured channel.
    pub channels: Vec<String>,
    pub author: String,
}

/// A draft that every selected channel accepted, with what each will send.
pub struct Composed {
    pub update: Update,
    pub incident: Incident,
    pub new_incident: bool,
    pub previews: Vec<(String, Vec<RenderedPart>)>,
}

pub struct App {
    pub config: Config,
    pub store: Arc<Store>,
    pub channels: Vec<Arc<dyn Channel>>,
    pub composer: Composer,
}

impl App {
    /// Opens the store and builds every channel. sled creates the store's folders.
    pub fn open(config: Config) -> anyhow::Result<Self> {
        let renderer = Arc::new(Renderer::load(&config.templates_dir)?);
        check_templates(&config, &renderer)?;
        let store = Arc::new(Store::open(&config.store)?);
        let composer = Composer::new(&config);
        let channels = build_channels(&config, &renderer, &store, &composer)?;
        Ok(Self {
            config,
            store,
            channels,
            composer,
        })
    }

    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher::new(
            self.store.clone(),
            self.channels.clone(),
            self.composer.clone(),
            self.config.lease,
        )
    }

    /// Parses the draft and renders it for every selected channel. Nothing is stored: a
    /// channel that rejects the update stops it here.
    pub fn compose(&self, draft: Draft) -> anyhow::Result<Composed> {
        let now = Utc::now();
        let body = Body::parse(&draft.body)?;
        let (incident, new_incident) = match draft.incident {
            Some(id) => (self.store.incident(id)?, false),
            None => {
                let headline = draft.headline.as_deref().ok_or_else(|| {
                    UserError(
                        "a new incident needs --headline (or continue one with --incident ID)"
                            .into(),
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
            next_update_by: draft.next_update_in.map(|wait| {
                now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX)
            }),
            audience: draft.audience,
            author: draft.author,
            created_at: now,
            channels: channels.iter().map(|c| c.name().to_owned()).collect(),
        };
        let mut previews = Vec::new();
        for channel in &channels {
            let sample =
                crate::domain::Contact::parse("customer@example.com").expect("a valid sample");
            let orders: Vec<_> = match &update.audience {
                Audience::Orders(orders) => orders.iter().cloned().collect(),
                Audience::Everyone => Vec::new(),
            };
            let recipient = match channel.reach() {
                crate::channel::Reach::Subscribers(_) => Some((&sample, orders.as_slice())),
                crate::channel::Reach::Broadcast { .. } => None,
            };
            let message = self.composer.message(&update, &incident, recipient, now);
            previews.push((channel.name().to_owned(), channel.render(&message)?));
        }
        Ok(Composed {
            update,
            incident,
            new_incident,
            previews,
        })
    }

    fn select_channels(&self, names: &[String]) -> anyhow::Result<Vec<Arc<dyn Channel>>> {
        if names.is_empty() {
            return Ok(self.channels.clone());
        }
        names
            .iter()
            .map(|name| {
                self.channels
                    .iter()
                    .find(|c| c.name() == name)
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<&str> = self.channels.iter().map(|c| c.name()).collect();
                        UserError(format!(
                            "no channel is named '{name}'; configured: {}",
                            known.join(", ")
                        ))
                        .into()
                    })
            })
            .collect()
    }

    /// Stores the update durably, then plans its deliveries.
    pub async fn accept(&self, composed: &Composed) -> anyhow::Result<usize> {
        let new_incident = composed.new_incident.then_some(&composed.incident);
        self.store
            .accept_update(&composed.update, new_incident)
            .await?;
        self.plan(&composed.update).await
    }

    /// Plans an accepted update (again, after a crash: planning resumes where it stopped).
    pub async fn plan(&self, update: &Update) -> anyhow::Result<usize> {
        let store = self.store.clone();
        let channels = self.channels.clone();
        let update = update.clone();
        let batch = self.config.plan_batch;
        let added = tokio::task::spawn_blocking(move || {
            plan_update(&store, &update, &channels, batch, Utc::now())
        })
        .await??;
        self.store.commit().await?;
        Ok(added)
    }

    /// Gets the store ready to dispatch: leases left in it belong to a process that died (sled
    /// lets only one process open it), so they go back to the queue, and planning that a crash
    /// interrupted is finished. Returns how many deliveries that put in the queue.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        let requeued = self.store.requeue_leases(Utc::now(), true)?;
        Ok(requeued + self.resume_planning().await?)
    }

    /// Finishes planning every update whose planning a crash interrupted.
    pub async fn resume_planning(&self) -> anyhow::Result<usize> {
        let mut added = 0;
        for id in self.store.unfinished_plans()? {
            let update = self.store.update(id)?;
            added += self.plan(&update).await?;
        }
        Ok(added)
    }
}
