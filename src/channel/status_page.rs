//! The status page channel: writes the public status view as `status.html`, `feed.atom` and
//! `status.json`, each whole and readable by any web server. It owns its settings (the folder
//! and how many incidents to show).

use super::registry::{ChannelKind, ChannelSettings, SettingsInput};
use super::{Attempt, BuildContext, Channel, PartFormat, Reach, Rejection, RenderedPart};
use crate::config::{ConfigError, DeliveryPolicy};
use crate::delivery::{DeliveryError, Receipt};
use crate::render::MessageContext;
use crate::status_view::{PageShape, StatusProjection, TEMPLATE};
use chrono::Utc;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

pub static KIND: ChannelKind = ChannelKind {
    name: "status_page",
    templates: &[TEMPLATE],
    // One writer at a time: the page is rebuilt whole on every delivery.
    default_policy: DeliveryPolicy::with_concurrency(1),
    parse: StatusPageSettings::parse,
};

/// A channel file of kind `status_page`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusPageFile {
    /// The folder `status.html`, `feed.atom` and `status.json` are written into.
    dir: PathBuf,
    /// How many incidents the page shows, newest first.
    #[serde(default = "default_incidents")]
    incidents: usize,
    /// How many days of resolved incidents the page lists, today included.
    #[serde(default = "default_history_days")]
    history_days: u32,
}

fn default_incidents() -> usize {
    PageShape::default().incidents
}

fn default_history_days() -> u32 {
    PageShape::default().history_days
}

#[derive(Debug, Clone)]
pub struct StatusPageSettings {
    pub dir: PathBuf,
    /// How much of the store the page shows.
    pub shape: PageShape,
}

impl StatusPageSettings {
    fn parse(input: &SettingsInput) -> Result<Arc<dyn ChannelSettings>, ConfigError> {
        let raw: StatusPageFile = input.parse()?;
        if raw.incidents == 0 || raw.incidents > 1000 {
            return Err(ConfigError::at(
                input.file,
                "incidents",
                "must be between 1 and 1000",
            ));
        }
        if !(1..=90).contains(&raw.history_days) {
            return Err(ConfigError::at(
                input.file,
                "history_days",
                "must be between 1 and 90",
            ));
        }
        Ok(Arc::new(StatusPageSettings {
            dir: input.base.join(raw.dir),
            shape: PageShape {
                incidents: raw.incidents,
                history_days: raw.history_days,
                incident_page: false,
            },
        }))
    }
}

#[async_trait::async_trait]
impl ChannelSettings for StatusPageSettings {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn check(&self) -> Result<(), String> {
        crate::files::can_create_dir(&self.dir).map_err(|reason| format!("dir: {reason}"))
    }

    async fn build(
        &self,
        id: &str,
        _policy: &DeliveryPolicy,
        context: &BuildContext,
    ) -> crate::Result<Arc<dyn Channel>> {
        crate::files::create_public_dir(&self.dir)?;
        Ok(Arc::new(StatusPageChannel {
            id: id.to_owned(),
            dir: self.dir.clone(),
            shape: self.shape,
            projection: context.status.clone(),
            writing: tokio::sync::Mutex::new(()),
        }))
    }
}

pub struct StatusPageChannel {
    /// The page shows the updates sent through this channel.
    id: String,
    dir: PathBuf,
    shape: PageShape,
    projection: Arc<StatusProjection>,
    /// One rewrite at a time, so a slower, older rewrite never lands after a newer one.
    writing: tokio::sync::Mutex<()>,
}

#[async_trait::async_trait]
impl Channel for StatusPageChannel {
    fn reach(&self) -> Reach {
        Reach::Broadcast {
            accepts_targeted: false,
        }
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, Rejection> {
        let view = self.projection.preview(message);
        Ok(vec![RenderedPart {
            part: TEMPLATE.into(),
            text: self.projection.html(&view)?,
            format: PartFormat::Html,
        }])
    }

    async fn deliver(
        &self,
        message: &MessageContext,
        _attempt: &Attempt<'_>,
    ) -> Result<Receipt, DeliveryError> {
        // The page is rebuilt from the store, so a retry or a late delivery always writes the
        // newest state, never an older one.
        let _one_writer = self.writing.lock().await;
        let view = self
            .projection
            .view(&self.id, self.shape, Utc::now())
            .await
            .map_err(|e| DeliveryError::transient(e.to_string()))?;
        let files = self
            .projection
            .files(&view)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        // The incident's own page, with every public update on it: the status page shows its
        // latest few and links here.
        let incident = self
            .projection
            .store()
            .incident(message.source.incident.id)
            .await
            .map_err(|e| DeliveryError::transient(e.to_string()))?;
        let history = match self
            .projection
            .history(&self.id, &incident, Utc::now())
            .await
            .map_err(|e| DeliveryError::transient(e.to_string()))?
        {
            Some(view) => Some((
                crate::status_view::history_path(incident.id),
                self.projection
                    .html(&view)
                    .map_err(|e| DeliveryError::permanent(e.to_string()))?,
            )),
            None => None,
        };
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some((path, html)) = history {
                let path = dir.join(path);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                crate::files::write_public(&path, html.as_bytes())?;
            }
            crate::files::write_public(&dir.join("status.html"), files.html.as_bytes())?;
            crate::files::write_public(&dir.join("feed.atom"), files.atom.as_bytes())?;
            crate::files::write_public(&dir.join("status.json"), &files.json)
        })
        .await
        .map_err(|e| DeliveryError::transient(e.to_string()))?
        .map_err(|e| DeliveryError::transient(format!("cannot write the status page: {e}")))?;
        Ok(Receipt::none())
    }
}
