//! The public status view: the projection of the store that the status page shows, as HTML, an
//! Atom feed and JSON. The status page channel writes it to files; `crier serve` will serve
//! the same view. Only public updates are in it, and nothing private (no author, no contact).

use crate::links::Links;
use crate::render::{BrandView, IncidentView, MessageContext, RenderError, Renderer, UpdateView};
use crate::render::{human_time, rfc3339};
use crate::store::{Store, StoreError};
use atom_syndication::{Content, Entry, Feed, FixedDateTime, Link, Person, Text};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::Arc;

mod page;

pub use page::PageShape;

#[derive(Debug, Clone, Serialize)]
pub struct IncidentSection {
    #[serde(flatten)]
    pub incident: IncidentView,
    pub updated_at: String,
    /// Public updates only, newest first: at most [`UPDATES_SHOWN`] on the page.
    pub updates: Vec<UpdateView>,
    /// Whether the incident has earlier public updates than those shown.
    pub earlier: bool,
    /// The incident's own page, every public update on it: `{status page}incidents/{id}.html`.
    pub history: String,
    /// When the incident's next update is promised, while it is open.
    pub promise: Option<PromiseView>,
    /// When the incident last changed, for grouping past incidents by day.
    #[serde(skip)]
    pub updated: DateTime<Utc>,
}

/// How many updates of one incident the page, the feed and the JSON show, newest first. The
/// rest are on the incident's own page, so a long incident keeps the page small and the
/// refresh that renders it reads a bounded number of updates.
pub const UPDATES_SHOWN: usize = 10;

/// The open promise of an incident, as the page shows it: "next update by", or late.
#[derive(Debug, Clone, Serialize)]
pub struct PromiseView {
    pub due: String,
    pub due_text: String,
    /// Past its time with no new update: the page says so plainly.
    pub overdue: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub brand: BrandView,
    pub links: Links,
    pub generated_at: String,
    pub generated_at_text: String,
    /// The newest public update anywhere, which every channel agrees is "the latest".
    pub latest: Option<UpdateView>,
    /// The state at a glance: the worst open incident's, or all clear.
    pub overall: page::Overall,
    pub incidents: Vec<IncidentSection>,
    /// What the HTML page lays out: the front page or one incident's own page, and how far
    /// back it lists past incidents.
    #[serde(skip)]
    pub shape: PageShape,
    /// When the view was made, for the page's "past incidents" days.
    #[serde(skip)]
    pub now: DateTime<Utc>,
}

/// The three files of the status page, rendered.
pub struct StatusFiles {
    pub html: String,
    pub atom: String,
    pub json: Vec<u8>,
}

/// Gathers and renders the status view.
pub struct StatusProjection {
    store: Arc<dyn Store>,
    renderer: Arc<Renderer>,
    brand: BrandView,
    links: Links,
}

pub const TEMPLATE: &str = "status.html";

/// Where an incident's own page is, beside the status page: `incidents/{id}.html`.
pub fn history_path(incident: ulid::Ulid) -> String {
    format!("incidents/{incident}.html")
}

fn history_url(links: &Links, incident: ulid::Ulid) -> String {
    let base = links.status_page.trim_end_matches('/');
    format!("{base}/{}", history_path(incident))
}

impl StatusProjection {
    pub fn new(
        store: Arc<dyn Store>,
        renderer: Arc<Renderer>,
        brand: BrandView,
        links: Links,
    ) -> Self {
        Self {
            store,
            renderer,
            brand,
            links,
        }
    }

    /// The store the view is read from.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The public updates sent through `channel`, by incident, newest first, at most
    /// `shape.incidents` incidents and [`UPDATES_SHOWN`] updates of each.
    pub async fn view(
        &self,
        channel: &str,
        shape: PageShape,
        now: DateTime<Utc>,
    ) -> Result<StatusView, StoreError> {
        let incident_limit = shape.incidents;
        let mut sections = Vec::new();
        for incident in self.store.incidents().await? {
            if let Some(section) = self
                .section(channel, &incident, Some(UPDATES_SHOWN), now)
                .await?
            {
                sections.push(section);
            }
            if sections.len() == incident_limit {
                break;
            }
        }
        Ok(self.status_view(sections, shape, now))
    }

    /// One incident with every public update sent through `channel`: its own page. None when
    /// it has no public update there.
    pub async fn history(
        &self,
        channel: &str,
        incident: &crate::domain::Incident,
        now: DateTime<Utc>,
    ) -> Result<Option<StatusView>, StoreError> {
        Ok(self
            .section(channel, incident, None, now)
            .await?
            .map(|section| self.status_view(vec![section], PageShape::incident_page(), now)))
    }

    fn status_view(
        &self,
        sections: Vec<IncidentSection>,
        shape: PageShape,
        now: DateTime<Utc>,
    ) -> StatusView {
        let latest = sections
            .iter()
            .flat_map(|s| s.updates.first())
            .max_by(|a, b| a.created_at.cmp(&b.created_at))
            .cloned();
        StatusView {
            brand: self.brand.clone(),
            links: self.links.clone(),
            generated_at: rfc3339(now),
            generated_at_text: human_time(now),
            latest,
            overall: page::Overall::of(&sections),
            incidents: sections,
            shape,
            now,
        }
    }

    /// The incident's public updates through `channel`, newest first, at most `shown`; None
    /// when it has none.
    async fn section(
        &self,
        channel: &str,
        incident: &crate::domain::Incident,
        shown: Option<usize>,
        now: DateTime<Utc>,
    ) -> Result<Option<IncidentSection>, StoreError> {
        let mut updates = Vec::new();
        let mut promise = None;
        let mut earlier = false;
        for (index, id) in incident.updates.iter().rev().enumerate() {
            let update = self.store.update(*id).await?;
            if index == 0 {
                // The latest update, whoever it went to, holds the incident's promise: the
                // watchdog reads it the same way.
                promise = crate::watchdog::promise_of(&update, &incident.title)
                    .filter(|_| incident.state != crate::domain::IncidentState::Resolved)
                    .map(|promise| PromiseView {
                        due: rfc3339(promise.due),
                        due_text: human_time(promise.due),
                        overdue: now >= promise.due,
                    });
            }
            // Targeted updates concern a few customers and never appear in public, and an
            // update sent through other channels only was not meant for this page.
            let sent_here = update.channels.iter().any(|c| c == channel);
            if sent_here && !update.audience.is_targeted() {
                if shown.is_some_and(|shown| updates.len() == shown) {
                    earlier = true;
                    break;
                }
                updates.push(UpdateView::new(&update));
            }
        }
        if updates.is_empty() {
            return Ok(None);
        }
        Ok(Some(IncidentSection {
            incident: IncidentView::new(incident),
            updated_at: rfc3339(incident.updated_at),
            updates,
            earlier,
            history: history_url(&self.links, incident.id),
            promise,
            updated: incident.updated_at,
        }))
    }

    /// The view as a preview shows it: the new update as its own section.
    pub fn preview(&self, message: &MessageContext) -> StatusView {
        let sections = vec![IncidentSection {
            incident: message.incident.clone(),
            updated_at: message.update.created_at.clone(),
            updates: vec![message.update.clone()],
            earlier: false,
            history: history_url(&self.links, message.source.incident.id),
            promise: message
                .update
                .next_update_by
                .clone()
                .zip(message.update.next_update_by_text.clone())
                .map(|(due, due_text)| PromiseView {
                    due,
                    due_text,
                    overdue: false,
                }),
            updated: message.source.update.created_at,
        }];
        StatusView {
            brand: self.brand.clone(),
            links: self.links.clone(),
            generated_at: message.update.created_at.clone(),
            generated_at_text: message.update.created_at_text.clone(),
            latest: Some(message.update.clone()),
            overall: page::Overall::of(&sections),
            incidents: sections,
            shape: PageShape::default(),
            now: message.source.update.created_at,
        }
    }

    /// The page a reader sees: laid out from the view by [`page::Page`], so the JSON keeps
    /// every field while the page shows each thing once.
    pub fn html(&self, view: &StatusView) -> Result<String, RenderError> {
        self.renderer.render(TEMPLATE, &page::Page::of(view))
    }

    pub fn files(&self, view: &StatusView) -> Result<StatusFiles, RenderError> {
        let json = serde_json::to_vec_pretty(view).map_err(|e| RenderError::Template {
            name: "status.json".into(),
            reason: e.to_string(),
        })?;
        Ok(StatusFiles {
            html: self.html(view)?,
            atom: self.feed(view).to_string(),
            json,
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
                    title: Text::plain(xml_safe(&format!(
                        "[{}] {}",
                        update.state_label, update.headline
                    ))),
                    updated: parse_time(&update.created_at),
                    published: Some(parse_time(&update.created_at)),
                    summary: Some(Text::plain(xml_safe(&section.incident.title))),
                    content: Some(Content {
                        value: Some(xml_safe(&text)),
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
            title: Text::plain(xml_safe(&format!("{} status", self.brand.name))),
            updated: entries
                .iter()
                .map(|e| e.updated)
                .max()
                .unwrap_or_else(|| parse_time(&view.generated_at)),
            authors: vec![Person {
                name: xml_safe(&self.brand.name),
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
}

/// `text` without the characters XML 1.0 forbids (most C0 controls, surrogates, U+FFFE and
/// U+FFFF). Compose already refuses them; this keeps a feed valid whatever the store holds.
pub fn xml_safe(text: &str) -> String {
    text.chars()
        .filter(|&c| {
            matches!(c, '\t' | '\n' | '\r')
                || ('\u{20}'..='\u{D7FF}').contains(&c)
                || ('\u{E000}'..='\u{FFFD}').contains(&c)
                || c >= '\u{10000}'
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_xml_forbids_are_left_out_of_the_feed() {
        assert_eq!(xml_safe("a\u{0}b\u{1b}c\u{b}d\u{c}e\u{fffe}f"), "abcdef");
        assert_eq!(
            xml_safe("tab\there\nnewline é 🎉"),
            "tab\there\nnewline é 🎉"
        );
    }
}
