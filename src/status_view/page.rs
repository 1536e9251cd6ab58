//! The status page's layout: what its HTML shows, worked out from the status view so that each
//! thing appears once. The state at a glance first, then one card per open incident (its title
//! once, its latest update and its one promise on top, earlier updates as a timeline), then
//! past incidents by day. The JSON and the feed keep the view as it is.

use super::{IncidentSection, PromiseView, StatusView};
use crate::links::Links;
use crate::render::{BrandView, UpdateView, day_text, human_time, local_day};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// What one rendering of the page lays out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageShape {
    /// How many incidents the view holds, newest first.
    pub incidents: usize,
    /// How many days of resolved incidents the front page lists, today included.
    pub history_days: u32,
    /// One incident's own page rather than the front page.
    pub incident_page: bool,
}

impl Default for PageShape {
    fn default() -> Self {
        Self {
            incidents: 20,
            history_days: 14,
            incident_page: false,
        }
    }
}

impl PageShape {
    pub fn incident_page() -> Self {
        Self {
            incident_page: true,
            ..Self::default()
        }
    }
}

/// The state at a glance: the worst open incident's state, or all clear.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Overall {
    /// `investigating`, `identified`, `monitoring`, or `clear` when nothing is open.
    pub state: &'static str,
    /// The same in words, for the banner.
    pub label: &'static str,
    pub open_incidents: usize,
}

impl Overall {
    pub fn of(sections: &[IncidentSection]) -> Self {
        let open: Vec<&IncidentSection> = sections.iter().filter(|s| is_open(s)).collect();
        let worst = open
            .iter()
            .map(|s| s.incident.state.as_str())
            .max_by_key(|state| severity(state));
        let (state, label) = match worst {
            Some("investigating") => ("investigating", "We are investigating a problem"),
            Some("identified") => ("identified", "We know the cause and are fixing it"),
            Some(_) => ("monitoring", "A fix is in place and we are watching it"),
            None => ("clear", "All clear"),
        };
        Overall {
            state,
            label,
            open_incidents: open.len(),
        }
    }
}

fn is_open(section: &IncidentSection) -> bool {
    section.incident.state != "resolved"
}

/// How bad an open state is: the banner shows the worst.
fn severity(state: &str) -> u8 {
    match state {
        "investigating" => 3,
        "identified" => 2,
        _ => 1,
    }
}

/// Everything the template `status.html` reads.
#[derive(Debug, Serialize)]
pub struct Page<'a> {
    pub brand: &'a BrandView,
    pub links: &'a Links,
    /// The document's title.
    pub title: String,
    /// Search results and link previews.
    pub description: String,
    /// This page's own address.
    pub canonical: String,
    pub generated_at: &'a str,
    pub generated_at_text: &'a str,
    pub incident_page: bool,
    pub banner: Banner,
    pub cards: Vec<Card<'a>>,
    /// Present on the front page: one entry per day, newest first.
    pub past: Vec<PastDay<'a>>,
    pub history_days: u32,
}

#[derive(Debug, Serialize)]
pub struct Banner {
    /// The colour's name in the stylesheet; the heading says the same in words.
    pub tone: &'static str,
    pub heading: String,
    pub detail: String,
}

/// One incident: its title once, the latest update and its promise first.
#[derive(Debug, Serialize)]
pub struct Card<'a> {
    pub id: &'a str,
    pub title: &'a str,
    pub state: &'a str,
    pub state_label: &'a str,
    pub latest: Entry<'a>,
    /// The incident's one open promise, shown under its latest update only.
    pub promise: Option<&'a PromiseView>,
    /// The earlier updates shown, newest first.
    pub timeline: Vec<Entry<'a>>,
    /// The incident's own page, when it holds updates this card leaves out.
    pub more: Option<&'a str>,
    pub history: &'a str,
}

/// One update in a card.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub id: &'a str,
    pub state: &'a str,
    pub state_label: &'a str,
    /// The update's headline when it says more than the incident's title.
    pub headline: Option<&'a str>,
    pub body: &'a str,
    pub created_at: &'a str,
    pub created_at_text: &'a str,
}

#[derive(Debug, Serialize)]
pub struct PastDay<'a> {
    pub date: String,
    pub date_text: String,
    pub incidents: Vec<PastIncident<'a>>,
}

#[derive(Debug, Serialize)]
pub struct PastIncident<'a> {
    pub title: &'a str,
    pub url: &'a str,
    pub state_label: &'a str,
    /// The first paragraph of its latest update, shortened.
    pub summary: String,
    pub updated_at_text: String,
}

/// How much of a past incident's last update the list shows.
const SUMMARY_CHARS: usize = 240;

impl<'a> Page<'a> {
    pub fn of(view: &'a StatusView) -> Page<'a> {
        let shape = view.shape;
        let cards: Vec<Card<'a>> = view
            .incidents
            .iter()
            .filter(|s| shape.incident_page || is_open(s))
            .filter_map(card)
            .collect();
        let (title, description, canonical, banner) = match view.incidents.first() {
            Some(section) if shape.incident_page => (
                format!("{} · {} status", section.incident.title, view.brand.name),
                section
                    .updates
                    .first()
                    .map(|u| summary(&u.body, 160))
                    .unwrap_or_default(),
                section.history.clone(),
                incident_banner(section),
            ),
            _ => (
                format!("{} status", view.brand.name),
                view.brand.description.clone(),
                view.links.status_page.clone(),
                front_banner(view, shape),
            ),
        };
        Page {
            brand: &view.brand,
            links: &view.links,
            title,
            description,
            canonical,
            generated_at: &view.generated_at,
            generated_at_text: &view.generated_at_text,
            incident_page: shape.incident_page,
            banner,
            cards,
            past: if shape.incident_page {
                Vec::new()
            } else {
                past_days(view, shape.history_days)
            },
            history_days: shape.history_days,
        }
    }
}

fn card(section: &IncidentSection) -> Option<Card<'_>> {
    let title = section.incident.title.as_str();
    let (latest, earlier) = section.updates.split_first()?;
    Some(Card {
        id: &section.incident.id,
        title,
        state: &section.incident.state,
        state_label: &section.incident.state_label,
        latest: entry(title, latest),
        promise: section.promise.as_ref(),
        timeline: earlier.iter().map(|update| entry(title, update)).collect(),
        more: section.earlier.then_some(section.history.as_str()),
        history: &section.history,
    })
}

fn entry<'a>(title: &str, update: &'a UpdateView) -> Entry<'a> {
    Entry {
        id: &update.id,
        state: &update.state,
        state_label: &update.state_label,
        headline: Some(update.headline.as_str())
            .filter(|headline| !headline.trim().eq_ignore_ascii_case(title.trim())),
        body: &update.body,
        created_at: &update.created_at,
        created_at_text: &update.created_at_text,
    }
}

fn front_banner(view: &StatusView, shape: PageShape) -> Banner {
    let overall = &view.overall;
    let detail = if overall.open_incidents > 0 {
        let latest = view
            .incidents
            .iter()
            .filter(|s| is_open(s))
            .filter_map(|s| s.updates.first())
            .max_by(|a, b| a.created_at.cmp(&b.created_at));
        let count = match overall.open_incidents {
            1 => "1 open incident".to_owned(),
            n => format!("{n} open incidents"),
        };
        match latest {
            Some(update) => format!("{count}. Last update {}.", update.created_at_text),
            None => format!("{count}."),
        }
    } else {
        match view.incidents.iter().map(|s| s.updated).max() {
            Some(last) => format!(
                "No open incidents. The last one was resolved at {}.",
                human_time(last)
            ),
            None => match shape.history_days {
                1 => "No incidents reported today.".to_owned(),
                days => format!("No incidents reported in the last {days} days."),
            },
        }
    };
    Banner {
        tone: overall.state,
        heading: overall.label.to_owned(),
        detail,
    }
}

fn incident_banner(section: &IncidentSection) -> Banner {
    if is_open(section) {
        let overall = Overall::of(std::slice::from_ref(section));
        Banner {
            tone: overall.state,
            heading: overall.label.to_owned(),
            detail: match section.updates.first() {
                Some(update) => format!("Last update {}.", update.created_at_text),
                None => String::new(),
            },
        }
    } else {
        Banner {
            tone: "clear",
            heading: "Resolved".to_owned(),
            detail: format!(
                "This incident was resolved at {}.",
                human_time(section.updated)
            ),
        }
    }
}

/// Every day of the last `days`, newest first, with the incidents resolved on it.
fn past_days(view: &StatusView, days: u32) -> Vec<PastDay<'_>> {
    let today = local_day(view.now);
    (0..days)
        .filter_map(|back| today.checked_sub_days(chrono::Days::new(u64::from(back))))
        .map(|day| PastDay {
            date: day.format("%Y-%m-%d").to_string(),
            date_text: day_text(day),
            incidents: view
                .incidents
                .iter()
                .filter(|s| !is_open(s) && local_day(s.updated) == day)
                .map(|s| PastIncident {
                    title: &s.incident.title,
                    url: &s.history,
                    state_label: &s.incident.state_label,
                    summary: s
                        .updates
                        .first()
                        .map(|u| summary(&u.body, SUMMARY_CHARS))
                        .unwrap_or_default(),
                    updated_at_text: time_of_day(s.updated),
                })
                .collect(),
        })
        .collect()
}

/// "14:05 UTC": the time alone, under a heading that names the day.
fn time_of_day(time: DateTime<Utc>) -> String {
    let full = human_time(time);
    full.split(',').next().unwrap_or(&full).to_owned()
}

/// The first paragraph of `body`, at most `max` characters, on one line.
fn summary(body: &str, max: usize) -> String {
    let first = body.split("\n\n").map(str::trim).find(|p| !p.is_empty());
    let line = first
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    match line.char_indices().nth(max) {
        Some((end, _)) => {
            let cut = line[..end].rfind(' ').unwrap_or(end);
            format!("{}…", &line[..cut])
        }
        None => line,
    }
}
