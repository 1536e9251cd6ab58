//! Rendering: the handlebars registries (strict mode) and the context every template sees.

use crate::config::Config;
use crate::domain::{Contact, Incident, OrderNumber, Update};
use crate::links::{LinkMaker, Links};
use chrono::{DateTime, Utc};
use handlebars::{Handlebars, handlebars_helper};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("templates: cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("template {name}: {reason}")]
    Template { name: String, reason: String },
    #[error("template {0} is missing from the templates folder")]
    Missing(String),
}

/// Every template in the templates folder, in one of two registries: `*.html*` and `pages/*`
/// templates escape HTML; all the others (subjects, plain text, SMS, posts) are left as typed.
pub struct Renderer {
    text: Handlebars<'static>,
    html: Handlebars<'static>,
}

handlebars_helper!(paragraphs: |text: str| paragraphs_html(text));

impl Renderer {
    pub fn load(dir: &Path) -> Result<Self, RenderError> {
        let mut text = Handlebars::new();
        text.set_strict_mode(true);
        text.register_escape_fn(handlebars::no_escape);
        let mut html = Handlebars::new();
        html.set_strict_mode(true);
        html.register_helper("paragraphs", Box::new(paragraphs));
        let mut renderer = Self { text, html };
        renderer.load_folder(dir, dir)?;
        Ok(renderer)
    }

    fn load_folder(&mut self, root: &Path, dir: &Path) -> Result<(), RenderError> {
        let read_error = |path: &Path, e: std::io::Error| RenderError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| read_error(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                self.load_folder(root, &path)?;
                continue;
            }
            let Some(relative) = path.strip_prefix(root).ok().and_then(|p| p.to_str()) else {
                continue;
            };
            let Some(name) = relative.strip_suffix(".hbs") else {
                continue;
            };
            let name = name.replace('\\', "/");
            let source = std::fs::read_to_string(&path).map_err(|e| read_error(&path, e))?;
            let registry = if is_html(&name) {
                &mut self.html
            } else {
                &mut self.text
            };
            registry
                .register_template_string(&name, source)
                .map_err(|e| RenderError::Template {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    fn registry(&self, name: &str) -> &Handlebars<'static> {
        if is_html(name) {
            &self.html
        } else {
            &self.text
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.registry(name).has_template(name)
    }

    /// Fails unless every named template is present.
    pub fn require(&self, names: &[&str]) -> Result<(), RenderError> {
        match names.iter().find(|name| !self.has(name)) {
            Some(missing) => Err(RenderError::Missing(format!("{missing}.hbs"))),
            None => Ok(()),
        }
    }

    pub fn render<T: Serialize>(&self, name: &str, context: &T) -> Result<String, RenderError> {
        self.registry(name)
            .render(name, context)
            .map_err(|e| RenderError::Template {
                name: name.to_owned(),
                reason: e.to_string(),
            })
    }
}

fn is_html(name: &str) -> bool {
    name.contains(".html") || name.starts_with("pages/")
}

/// Escapes `text` for HTML, turns blank-line-separated paragraphs into `<p>`, line breaks into
/// `<br>` and http(s) URLs into links.
pub fn paragraphs_html(text: &str) -> String {
    text.split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|paragraph| {
            let lines: Vec<String> = paragraph.lines().map(linkify).collect();
            format!("<p>{}</p>", lines.join("<br>\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn linkify(line: &str) -> String {
    line.split(' ')
        .map(|word| {
            if word.starts_with("https://") || word.starts_with("http://") {
                let url = word.trim_end_matches(['.', ',', ')', ';', '!', '?']);
                let rest = &word[url.len()..];
                let url = handlebars::html_escape(url);
                format!(
                    "<a href=\"{url}\">{url}</a>{}",
                    handlebars::html_escape(rest)
                )
            } else {
                handlebars::html_escape(word)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The machine-readable form of a time: RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The site's time zone (`brand.time_zone`), set once when the configuration is read. It is
/// process-wide because a process serves one site, and times are written for people in many
/// places (pages, messages, alerts, reports) that have no configuration at hand.
static TIME_ZONE: std::sync::OnceLock<chrono_tz::Tz> = std::sync::OnceLock::new();

/// Writes every later [`human_time`] in `zone`. The first call wins: one process, one site.
pub fn use_time_zone(zone: chrono_tz::Tz) {
    let _ = TIME_ZONE.set(zone);
}

/// A length of time as a person writes it, in its two largest units: "45 seconds",
/// "1 minute 30 seconds", "2 hours", "3 days 4 hours", "about 10 years". Never humantime's
/// "9years 11months 27days 1h 2m 3s".
pub fn duration_text(wait: std::time::Duration) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    const YEAR: u64 = 365 * DAY;
    let seconds = wait.as_secs();
    let unit = |n: u64, one: &str| {
        if n == 1 {
            format!("1 {one}")
        } else {
            format!("{} {one}s", thousands(n))
        }
    };
    let two = |big: u64, big_name: &str, small: u64, small_name: &str| {
        if small == 0 {
            unit(big, big_name)
        } else {
            format!("{} {}", unit(big, big_name), unit(small, small_name))
        }
    };
    match seconds {
        0 if wait.is_zero() => "no time".into(),
        0 => "less than a second".into(),
        s if s < MINUTE => unit(s, "second"),
        s if s < HOUR => two(s / MINUTE, "minute", s % MINUTE, "second"),
        s if s < DAY => two(s / HOUR, "hour", s % HOUR / MINUTE, "minute"),
        s if s < YEAR => two(s / DAY, "day", s % DAY / HOUR, "hour"),
        s if s % YEAR == 0 => unit(s / YEAR, "year"),
        s => {
            let years = s / YEAR + u64::from(s % YEAR >= YEAR / 2);
            format!("about {}", unit(years, "year"))
        }
    }
}

/// "16:00 UTC, Mon 23 Nov 2026" (or "17:00 CET, …" in the site's time zone): how a time is
/// written to customers and to the comms lead.
pub fn human_time(time: DateTime<Utc>) -> String {
    human_time_in(time, TIME_ZONE.get().copied().unwrap_or(chrono_tz::UTC))
}

/// "12,403": a count as people read it.
pub fn thousands(count: u64) -> String {
    let digits = count.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// "a, b and c".
pub fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The calendar day `time` falls on where the site is (`brand.time_zone`).
pub fn local_day(time: DateTime<Utc>) -> chrono::NaiveDate {
    time.with_timezone(&TIME_ZONE.get().copied().unwrap_or(chrono_tz::UTC))
        .date_naive()
}

/// "Mon 7 Dec 2026": a day as the status page writes it.
pub fn day_text(day: chrono::NaiveDate) -> String {
    day.format("%a %-d %b %Y").to_string()
}

/// [`human_time`] in `zone`.
pub fn human_time_in(time: DateTime<Utc>, zone: chrono_tz::Tz) -> String {
    time.with_timezone(&zone)
        .format("%H:%M %Z, %a %-d %b %Y")
        .to_string()
}

#[derive(Debug, Clone, Serialize)]
pub struct UpdateView {
    pub id: String,
    pub state: String,
    pub state_label: String,
    pub headline: String,
    pub body: String,
    pub next_update_by: Option<String>,
    pub next_update_by_text: Option<String>,
    pub created_at: String,
    pub created_at_text: String,
    pub targeted: bool,
    /// The orders a targeted update concerns; empty for everyone.
    pub orders: Vec<String>,
}

impl UpdateView {
    pub fn new(update: &Update) -> Self {
        Self {
            id: update.id.to_string(),
            state: update.state.as_str().to_owned(),
            state_label: update.state.label().to_owned(),
            headline: update.headline.as_str().to_owned(),
            body: update.body.as_str().to_owned(),
            next_update_by: update.next_update_by.map(rfc3339),
            next_update_by_text: update.next_update_by.map(human_time),
            created_at: rfc3339(update.created_at),
            created_at_text: human_time(update.created_at),
            targeted: update.audience.is_targeted(),
            orders: match &update.audience {
                crate::domain::Audience::Everyone => Vec::new(),
                crate::domain::Audience::Orders(orders) => {
                    orders.iter().map(ToString::to_string).collect()
                }
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IncidentView {
    pub id: String,
    pub title: String,
    pub state: String,
    pub state_label: String,
}

impl IncidentView {
    pub fn new(incident: &Incident) -> Self {
        Self {
            id: incident.id.to_string(),
            title: incident.title.clone(),
            state: incident.state.as_str().to_owned(),
            state_label: incident.state.label().to_owned(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipientView {
    pub contact: String,
    /// The recipient's orders this update concerns (targeted), or all it follows (everyone).
    pub orders: Vec<String>,
    pub unsubscribe_url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrandView {
    pub name: String,
    pub public_url: String,
    /// What search results and link previews say about the status page.
    pub description: String,
    pub logo_url: Option<String>,
    /// The accent colour as `#rrggbb`, and the colour text on it takes.
    pub accent: String,
    pub accent_text: String,
    /// The pages' icon: the brand's initial on its accent colour, as a `data:` URL, so no
    /// page asks the server for a `/favicon.ico` it does not have.
    pub favicon: String,
}

impl BrandView {
    pub fn new(brand: &crate::config::Brand, public_url: &str) -> Self {
        Self {
            name: brand.name.clone(),
            public_url: public_url.to_owned(),
            description: brand.description.clone(),
            logo_url: brand.logo_url.clone(),
            accent: brand.accent.hex(),
            accent_text: brand.accent.text_on().hex(),
            favicon: favicon(&brand.name, brand.accent),
        }
    }
}

/// A square in `accent` with the first letter or digit of `name` on it, as an SVG `data:` URL.
fn favicon(name: &str, accent: crate::config::Rgb) -> String {
    // Only an ASCII letter or digit goes in: nothing in the URL needs more escaping than this.
    let initial = name
        .chars()
        .find(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase().to_string())
        .unwrap_or_default();
    let colour = |rgb: crate::config::Rgb| rgb.hex().replace('#', "%23");
    format!(
        "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 32 32'%3E\
         %3Crect width='32' height='32' rx='7' fill='{fill}'/%3E\
         %3Ctext x='16' y='23' font-family='system-ui,sans-serif' font-size='20' \
         font-weight='700' text-anchor='middle' fill='{ink}'%3E{initial}%3C/text%3E%3C/svg%3E",
        fill = colour(accent),
        ink = colour(accent.text_on()),
    )
}

/// The update and incident a message was made from, for a channel that builds its own
/// payload from the domain values (webhooks) rather than from a template.
#[derive(Debug)]
pub struct MessageSource {
    pub update: Update,
    pub incident: Incident,
}

/// What a channel renders one message from. The update view holds nothing private (no
/// author): whatever a template shows, a customer may read.
#[derive(Debug, Clone, Serialize)]
pub struct MessageContext {
    pub update: UpdateView,
    pub incident: IncidentView,
    pub recipient: Option<RecipientView>,
    pub links: Links,
    pub brand: BrandView,
    #[serde(skip)]
    pub source: Arc<MessageSource>,
}

/// Builds message contexts: holds what is the same for every message.
#[derive(Clone)]
pub struct Composer {
    brand: BrandView,
    links: LinkMaker,
}

impl Composer {
    pub fn new(config: &Config) -> Self {
        Self::with_links(&config.brand, LinkMaker::new(config))
    }

    /// A composer for `brand`, whose links `links` makes.
    pub fn with_links(brand: &crate::config::Brand, links: LinkMaker) -> Self {
        Self {
            brand: BrandView::new(brand, links.public_url()),
            links,
        }
    }

    pub fn brand(&self) -> &BrandView {
        &self.brand
    }

    pub fn links(&self) -> &Links {
        self.links.links()
    }

    pub fn link_maker(&self) -> &LinkMaker {
        &self.links
    }

    pub fn message(
        &self,
        source: &Arc<MessageSource>,
        recipient: Option<(&Contact, &[OrderNumber])>,
        now: DateTime<Utc>,
    ) -> MessageContext {
        MessageContext {
            update: UpdateView::new(&source.update),
            incident: IncidentView::new(&source.incident),
            recipient: recipient.map(|(contact, orders)| RecipientView {
                contact: contact.to_string(),
                orders: orders.iter().map(ToString::to_string).collect(),
                unsubscribe_url: self.links.unsubscribe_url(contact, now),
            }),
            links: self.links.links().clone(),
            brand: self.brand.clone(),
            source: source.clone(),
        }
    }
}

#[cfg(test)]
mod counting_tests {
    use super::{and_list, duration_text, thousands};
    use std::time::Duration;

    #[test]
    fn durations_read_in_their_two_largest_units() {
        let cases: [(u64, &str); 12] = [
            (1, "1 second"),
            (45, "45 seconds"),
            (60, "1 minute"),
            (90, "1 minute 30 seconds"),
            (600, "10 minutes"),
            (3600, "1 hour"),
            (9000, "2 hours 30 minutes"),
            (86_400, "1 day"),
            (273_600, "3 days 4 hours"),
            (365 * 86_400, "1 year"),
            (3_650 * 86_400 - 3 * 86_400 + 3_723, "about 10 years"),
            (u64::MAX, "about 584,942,417,355 years"),
        ];
        for (seconds, text) in cases {
            assert_eq!(
                duration_text(Duration::from_secs(seconds)),
                text,
                "{seconds}"
            );
        }
        assert_eq!(duration_text(Duration::ZERO), "no time");
        assert_eq!(
            duration_text(Duration::from_millis(300)),
            "less than a second"
        );
    }

    #[test]
    fn counts_and_lists_read_as_people_write_them() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12_403), "12,403");
        assert_eq!(thousands(1_000_000), "1,000,000");
        let items = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(and_list(&items(&[])), "");
        assert_eq!(and_list(&items(&["a"])), "a");
        assert_eq!(and_list(&items(&["a", "b"])), "a and b");
        assert_eq!(and_list(&items(&["a", "b", "c"])), "a, b and c");
    }
}
