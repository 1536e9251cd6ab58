//! The status page channel: writes `status.html`, `feed.atom` and `status.json`, each
//! atomically, from every public update in the store.

use super::{Channel, DeliveryError, Reach, RejectError, RenderedPart};
use crate::config::{DeliveryPolicy, StatusPageSettings};
use crate::render::{
    BrandView, Composer, IncidentView, Links, MessageContext, Renderer, UpdateView, human_time,
    rfc3339,
};
use crate::store::{DeliveryRecord, Store};
use atom_syndication::{Content, Entry, Feed, FixedDateTime, Link, Person, Text};
use chrono::Utc;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const TEMPLATES: &[&str] = &["status.html"];

#[derive(Debug, Serialize)]
struct IncidentSection {
    #[serde(flatten)]
    incident: IncidentView,
    updated_at: String,
    /// Public updates only, newest first.
    updates: Vec<UpdateView>,
}

#[derive(Debug, Serialize)]
struct StatusView {
    brand: BrandView,
    links: Links,
    generated_at: String,
    generated_at_text: String,
    /// The newest public update anywhere, which every channel agrees is "the latest".
    latest: Option<UpdateView>,
    incidents: Vec<IncidentSection>,
}

pub struct StatusPageChannel {
    name: String,
    dir: PathBuf,
    incident_limit: usize,
    policy: DeliveryPolicy,
    renderer: Arc<Renderer>,
    store: Arc<Store>,
    brand: BrandView,
    links: Links,
    /// One rewrite at a time, so a slower, older rewrite never lands after a newer one.
    writing: tokio::sync::Mutex<()>,
}

impl StatusPageChannel {
    pub fn build(
        name: &str,
        settings: &StatusPageSettings,
        policy: DeliveryPolicy,
        renderer: Arc<Renderer>,
        store: Arc<Store>,
        composer: &Composer,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.dir).map_err(|e| {
            anyhow::anyhow!(
                "channel {name}: cannot create {}: {e}",
                settings.dir.display()
            )
        })?;
        Ok(Self {
            name: name.to_owned(),
            dir: settings.dir.clone(),
            incident_limit: settings.incidents,
            policy,
            renderer,
            store,
            brand: composer.brand().clone(),
            links: composer.links().clone(),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    /// Gathers the page from the store.
    fn view(&self) -> Result<StatusView, crate::store::StoreError> {
        let mut incidents = self.store.incidents()?;
        incidents.sort_by_key(|incident| std::cmp::Reverse(incident.updated_at));
        let mut sections = Vec::new();
        for incident in incidents {
            let mut updates = Vec::new();
            for id in incident.updates.iter().rev() {
                let update = self.store.update(*id)?;
                // Targeted updates concern a few customers and never appear in public, and an
                // update sent through other channels only was not meant for this page.
                let sent_here = update.channels.contains(&self.name);
                if sent_here && !update.audience.is_targeted() {
                    updates.push(UpdateView::new(&update));
                }
            }
            if updates.is_empty() {
                continue;
            }
            sections.push(IncidentSection {
                incident: IncidentView::new(&incident),
                updated_at: rfc3339(incident.updated_at),
                updates,
            });
            if sections.len() == self.incident_limit {
                break;
            }
        }
        let latest = sections
            .iter()
            .flat_map(|s| s.updates.first())
            .max_by(|a, b| a.created_at.cmp(&b.created_at))
            .cloned();
        let now = Utc::now();
        Ok(StatusView {
            brand: self.brand.clone(),
            links: self.links.clone(),
            generated_at: rfc3339(now),
            generated_at_text: human_time(now),
            latest,
            incidents: sections,
        })
    }

    fn feed(&self, view: &StatusView) -> Feed {
        let parse_time = |text: &str| FixedDateTime::parse_from_rfc3339(text).unwrap_or_default();
        let entries: Vec<Entry> = view
            .incidents
            .iter()
            .flat_map(|section| section.updates.iter().map(move |update| (section, update)))
            .map(|(section, update)| {
                let mut text = update.body.clone();
                if let Some(next) = &update.next_update_by_text {
                    text.push_str(&format!("\n\nNext update by {next}."));
                }
                Entry {
                    id: format!("{}#update-{}", self.links.status_page, update.id),
                    title: Text::plain(format!("[{}] {}", update.state_label, update.headline)),
                    updated: parse_time(&update.created_at),
                    published: Some(parse_time(&update.created_at)),
                    summary: Some(Text::plain(section.incident.title.clone())),
                    content: Some(Content {
                        value: Some(text),
                        content_type: Some("text".into()),
                        ..Default::default()
                    }),
                    links: vec![Link {
                        href: format!(
                            "{}#incident-{}",
                            self.links.status_page, section.incident.id
                        ),
                        rel: "alternate".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect();
        Feed {
            id: self.links.status_page.clone(),
            title: Text::plain(format!("{} status", self.brand.name)),
            updated: entries
                .iter()
                .map(|e| e.updated)
                .max()
                .unwrap_or_else(|| parse_time(&view.generated_at)),
            authors: vec![Person {
                name: self.brand.name.clone(),
                ..Default::default()
            }],
            links: vec![
                Link {
                    href: format!("{}feed.atom", self.links.status_page),
                    rel: "self".into(),
                    ..Default::default()
                },
                Link {
                    href: self.links.status_page.clone(),
                    rel: "alternate".into(),
                    ..Default::default()
                },
            ],
            entries,
            ..Default::default()
        }
    }

    fn render_page(&self, view: &StatusView) -> Result<String, RejectError> {
        self.renderer
            .render("status.html", view)
            .map_err(|source| RejectError::Render {
                channel: self.name.clone(),
                source,
            })
    }
}

/// Writes to a fresh temporary file beside `path`, syncs it, then renames it over `path`, so
/// a reader sees the old file or the new one, never half of one.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[async_trait::async_trait]
impl Channel for StatusPageChannel {
    fn name(&self) -> &str {
        &self.name
    }

    fn reach(&self) -> Reach {
        Reach::Broadcast { targeted: false }
    }

    fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    fn render(&self, message: &MessageContext) -> Result<Vec<RenderedPart>, RejectError> {
        // The preview shows the update as its own section: the rest of the page is unchanged.
        let view = StatusView {
            brand: self.brand.clone(),
            links: self.links.clone(),
            generated_at: message.update.created_at.clone(),
            generated_at_text: message.update.created_at_text.clone(),
            latest: Some(message.update.clone()),
            incidents: vec![IncidentSection {
                incident: message.incident.clone(),
                updated_at: message.update.created_at.clone(),
                updates: vec![message.update.clone()],
            }],
        };
        Ok(vec![RenderedPart {
            part: "status.html".into(),
            text: self.render_page(&view)?,
        }])
    }

    async fn deliver(
        &self,
        _message: &MessageContext,
        _delivery: &DeliveryRecord,
    ) -> Result<(), DeliveryError> {
        // The page is rebuilt from the store, so a retry or a late delivery always writes the
        // newest state, never an older one.
        let _one_writer = self.writing.lock().await;
        let view = self
            .view()
            .map_err(|e| DeliveryError::transient(e.to_string()))?;
        let page = self
            .render_page(&view)
            .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        let feed = self.feed(&view).to_string();
        let json = serde_json::to_vec_pretty(&view).expect("the status view always serializes");
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            write_atomically(&dir.join("status.html"), page.as_bytes())?;
            write_atomically(&dir.join("feed.atom"), feed.as_bytes())?;
            write_atomically(&dir.join("status.json"), &json)
        })
        .await
        .map_err(|e| DeliveryError::transient(e.to_string()))?
        .map_err(|e| DeliveryError::transient(format!("cannot write the status page: {e}")))
    }
}
