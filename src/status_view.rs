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

#[derive(Debug, Clone, Serialize)]
pub struct IncidentSection {
    #[serde(flatten)]
    pub incident: IncidentView,
    pub updated_at: String,
    /// Public updates only, newest first.
    pub updates: Vec<UpdateView>,
    /// When the incident's next update is promised, while it is open.
    pub promise: Option<PromiseView>,
}

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
    pub incidents: Vec<IncidentSection>,
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

    /// The public updates sent through `channel`, by incident, newest first, at most
    /// `incident_limit` incidents.
    pub async fn view(
        &self,
        channel: &str,
        incident_limit: usize,
        now: DateTime<Utc>,
    ) -> Result<StatusView, StoreError> {
        let mut sections = Vec::new();
        for incident in self.store.incidents().await? {
            let mut updates = Vec::new();
            let mut promise = None;
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
                promise,
            });
            if sections.len() == incident_limit {
                break;
            }
        }
        let latest = sections
            .iter()
            .flat_map(|s| s.updates.first())
            .max_by(|a, b| a.created_at.cmp(&b.created_at))
            .cloned();
        Ok(StatusView {
            brand: self.brand.clone(),
            links: self.links.clone(),
            generated_at: rfc3339(now),
            generated_at_text: human_time(now),
            latest,
            incidents: sections,
        })
    }

    /// The view as a preview shows it: the new update as its own section.
    pub fn preview(&self, message: &MessageContext) -> StatusView {
        StatusView {
            brand: self.brand.clone(),
            links: self.links.clone(),
            generated_at: message.update.created_at.clone(),
            generated_at_text: message.update.created_at_text.clone(),
            latest: Some(message.update.clone()),
            incidents: vec![IncidentSection {
                incident: message.incident.clone(),
                updated_at: message.update.created_at.clone(),
                updates: vec![message.update.clone()],
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
            }],
        }
    }

    pub fn html(&self, view: &StatusView) -> Result<String, RenderError> {
        self.renderer.render(TEMPLATE, view)
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
