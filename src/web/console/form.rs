//! The compose form as the browser posts it (multipart, for the file of order numbers), and how
//! its fields become the same [`UpdateRequest`] the admin API and `crier send` take.

use crate::app::UpdateRequest;
use axum::extract::Multipart;
use chrono::{DateTime, Duration as Span, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// Every field of the compose form, as typed.
#[derive(Debug, Default, Clone)]
pub struct ComposeForm {
    pub csrf: String,
    /// The form's idempotency key: a double click or a resubmitted page sends nothing twice.
    pub key: String,
    pub action: String,
    pub incident: String,
    pub headline: String,
    pub body: String,
    pub state: String,
    pub next_update: String,
    /// everyone, orders or file.
    pub audience: String,
    pub orders: String,
    pub orders_file: String,
    pub orders_file_name: String,
    pub channels: Vec<String>,
    /// The audience the lead confirmed on the confirm step, as [`Self::audience_digest`].
    pub confirmed: String,
}

impl ComposeForm {
    /// What decides who an update reaches: the confirm step's answer holds only while these
    /// are unchanged, so changing them after it asks again.
    pub fn audience_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for part in [
            &self.incident,
            &self.audience,
            &self.orders,
            &self.orders_file,
        ]
        .into_iter()
        .chain(&self.channels)
        {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        digest[..12].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn set(&mut self, name: &str, value: String) {
        match name {
            "csrf" => self.csrf = value,
            "key" => self.key = value,
            "action" => self.action = value,
            "incident" => self.incident = value,
            "headline" => self.headline = value,
            "body" => self.body = value,
            "state" => self.state = value,
            "next_update" => self.next_update = value,
            "audience" => self.audience = value,
            "orders" => self.orders = value,
            "channel" => self.channels.push(value),
            "confirmed" => self.confirmed = value,
            // The orders of a file chosen earlier: a browser does not send a file again when
            // the page comes back (a preview without the script, the confirm step).
            "orders_file_kept" if self.orders_file.is_empty() => self.orders_file = value,
            "orders_file_kept_name" if self.orders_file_name.is_empty() => {
                self.orders_file_name = value
            }
            // A field this form does not have is ignored, as a browser's extra fields are.
            _ => {}
        }
    }

    /// The form from a `multipart/form-data` body.
    pub async fn from_multipart(mut multipart: Multipart) -> Result<Self, String> {
        let mut form = Self::default();
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| format!("the form could not be read: {e}"))?
        {
            let name = field.name().unwrap_or_default().to_owned();
            if name == "orders_file" {
                form.orders_file_name = field.file_name().unwrap_or_default().to_owned();
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| format!("the file of order numbers could not be read: {e}"))?;
                form.orders_file = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    "the file of order numbers is not UTF-8 text: save it as CSV or plain text"
                        .to_owned()
                })?;
                continue;
            }
            let value = field
                .text()
                .await
                .map_err(|e| format!("the form could not be read: {e}"))?;
            form.set(&name, value);
        }
        Ok(form)
    }

    /// The form from an `application/x-www-form-urlencoded` body (a script's, or a browser's
    /// without the file field).
    pub fn from_urlencoded(body: &[u8]) -> Self {
        let mut form = Self::default();
        for (name, value) in form_urlencoded::parse(body) {
            form.set(&name, value.into_owned());
        }
        form
    }

    /// The update the form asks for. `channels` are the configured channels' ids, in order;
    /// a promised time of day is in `zone`, the site's.
    pub fn to_request(
        &self,
        channels: &[String],
        now: DateTime<Utc>,
        zone: Tz,
    ) -> Result<UpdateRequest, String> {
        let filled = |text: &str| {
            let text = text.trim();
            (!text.is_empty()).then(|| text.to_owned())
        };
        let orders = match self.audience.as_str() {
            "" | "everyone" => Vec::new(),
            "orders" => {
                let orders = pasted_orders(&self.orders);
                if orders.is_empty() {
                    return Err("paste at least one order number, or send to everyone".into());
                }
                orders
            }
            "file" => {
                let orders = file_orders(&self.orders_file);
                if orders.is_empty() {
                    return Err(if self.orders_file_name.is_empty() {
                        "choose a file of order numbers, or send to everyone".into()
                    } else {
                        format!("{} holds no order number", self.orders_file_name)
                    });
                }
                orders
            }
            other => return Err(format!("'{other}' is not an audience")),
        };
        let chosen: Vec<String> = channels
            .iter()
            .filter(|id| self.channels.contains(id))
            .cloned()
            .collect();
        if let Some(unknown) = self.channels.iter().find(|id| !channels.contains(id)) {
            return Err(format!("no channel is named '{unknown}'"));
        }
        if chosen.is_empty() {
            return Err("choose at least one channel".into());
        }
        Ok(UpdateRequest {
            headline: filled(&self.headline),
            body: self.body.clone(),
            state: filled(&self.state),
            incident: filled(&self.incident),
            next_update_in: promise_wait(&self.next_update, now, zone)?,
            orders,
            // Every channel chosen is "every channel", as `crier send` without --channel.
            channels: if chosen.len() == channels.len() {
                Vec::new()
            } else {
                chosen
            },
        })
    }
}

/// "2h", "in 90 minutes", or a time like "16:30" (in the site's time zone, the next one to
/// come), as the wait `next_update_in` takes: whole seconds, rounded up, so the promise reads
/// the time typed and never the minute before.
fn promise_wait(typed: &str, now: DateTime<Utc>, zone: Tz) -> Result<Option<String>, String> {
    let typed = typed.trim();
    let typed = typed.strip_prefix("in ").unwrap_or(typed).trim();
    if typed.is_empty() {
        return Ok(None);
    }
    let Ok(time) = NaiveTime::parse_from_str(typed, "%H:%M") else {
        return Ok(Some(typed.to_owned()));
    };
    let today = now.with_timezone(&zone).date_naive();
    let mut due = None;
    for day in [today, today + Span::days(1)] {
        // A clock change may repeat the time (the earlier one is meant) or skip it.
        match zone.from_local_datetime(&day.and_time(time)).earliest() {
            Some(at) if at.with_timezone(&Utc) > now => {
                due = Some(at.with_timezone(&Utc));
                break;
            }
            Some(_) => continue,
            None => {
                return Err(format!(
                    "{typed} does not exist on {day} in {zone}: the clocks change then"
                ));
            }
        }
    }
    let due = due.ok_or_else(|| format!("{typed} does not come in the next two days"))?;
    let seconds = ((due - now).num_milliseconds() + 999) / 1000;
    if seconds < 60 {
        return Err(format!("{typed} is less than a minute away"));
    }
    Ok(Some(format!("{seconds}s")))
}

/// Order numbers pasted into the form: separated by lines, spaces, commas or semicolons.
fn pasted_orders(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .map(|order| order.trim_matches('"').trim())
        .filter(|order| !order.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Order numbers from a file: one per line, or the first column of a CSV, whose header line
/// (`order`) is skipped.
fn file_orders(text: &str) -> Vec<String> {
    let mut orders = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let first = line
            .split([',', ';', '\t'])
            .next()
            .unwrap_or_default()
            .trim()
            .trim_matches('"')
            .trim();
        let is_header = index == 0
            && matches!(
                first.to_ascii_lowercase().as_str(),
                "order" | "orders" | "order_number" | "order number"
            );
        if !first.is_empty() && !is_header {
            orders.push(first.to_owned());
        }
    }
    orders
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels() -> Vec<String> {
        vec!["email".into(), "sms".into(), "status".into()]
    }

    fn noon() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn form() -> ComposeForm {
        ComposeForm {
            headline: " Activations delayed ".into(),
            body: "We are on it.".into(),
            audience: "everyone".into(),
            channels: channels(),
            ..ComposeForm::default()
        }
    }

    #[test]
    fn every_channel_and_everyone_ask_for_nothing_narrower() {
        let request = form()
            .to_request(&channels(), noon(), chrono_tz::UTC)
            .unwrap();
        assert_eq!(request.headline.as_deref(), Some("Activations delayed"));
        assert!(request.channels.is_empty());
        assert!(request.orders.is_empty());
        assert_eq!(request.next_update_in, None);
        assert_eq!(request.incident, None);
    }

    #[test]
    fn a_choice_of_channels_is_kept_in_the_configured_order() {
        let mut form = form();
        form.channels = vec!["status".into(), "email".into()];
        let request = form
            .to_request(&channels(), noon(), chrono_tz::UTC)
            .unwrap();
        assert_eq!(request.channels, vec!["email", "status"]);
        form.channels.clear();
        assert_eq!(
            form.to_request(&channels(), noon(), chrono_tz::UTC)
                .unwrap_err(),
            "choose at least one channel"
        );
        form.channels = vec!["fax".into()];
        assert!(
            form.to_request(&channels(), noon(), chrono_tz::UTC)
                .unwrap_err()
                .contains("'fax'")
        );
    }

    #[test]
    fn pasted_orders_are_split_on_any_separator() {
        let mut form = form();
        form.audience = "orders".into();
        form.orders = "AB-1001, AB-1002\nAB-1003;\"AB-1004\"  ".into();
        let request = form
            .to_request(&channels(), noon(), chrono_tz::UTC)
            .unwrap();
        assert_eq!(
            request.orders,
            vec!["AB-1001", "AB-1002", "AB-1003", "AB-1004"]
        );
        form.orders = " \n ".into();
        assert!(
            form.to_request(&channels(), noon(), chrono_tz::UTC)
                .is_err()
        );
    }

    #[test]
    fn a_file_of_orders_is_read_one_per_line_or_from_a_csv_first_column() {
        let mut form = form();
        form.audience = "file".into();
        form.orders_file = "order,email\nAB-1001,ann@example.com\n\n\"AB-1002\",x\nAB-1003".into();
        form.orders_file_name = "orders.csv".into();
        let request = form
            .to_request(&channels(), noon(), chrono_tz::UTC)
            .unwrap();
        assert_eq!(request.orders, vec!["AB-1001", "AB-1002", "AB-1003"]);
        form.orders_file = "order\n".into();
        assert_eq!(
            form.to_request(&channels(), noon(), chrono_tz::UTC)
                .unwrap_err(),
            "orders.csv holds no order number"
        );
    }

    #[test]
    fn a_promise_is_a_wait_or_the_next_such_time_of_day() {
        let utc = chrono_tz::UTC;
        assert_eq!(promise_wait("", noon(), utc), Ok(None));
        assert_eq!(promise_wait("2h", noon(), utc), Ok(Some("2h".into())));
        assert_eq!(promise_wait("in 90m", noon(), utc), Ok(Some("90m".into())));
        assert_eq!(
            promise_wait("16:30", noon(), utc),
            Ok(Some("16200s".into()))
        );
        // A time already past today is tomorrow's.
        assert_eq!(
            promise_wait("11:00", noon(), utc),
            Ok(Some("82800s".into()))
        );
        // Never the minute before: part of a second left rounds up.
        let later = noon() + Span::milliseconds(300);
        assert_eq!(promise_wait("16:30", later, utc), Ok(Some("16200s".into())));
        assert_eq!(
            promise_wait("12:00", noon() - Span::seconds(30), utc),
            Err("12:00 is less than a minute away".into())
        );
        // In the site's zone: noon UTC is 13:00 in Paris in November.
        let paris = chrono_tz::Europe::Paris;
        assert_eq!(
            promise_wait("16:30", noon(), paris),
            Ok(Some("12600s".into()))
        );
        assert_eq!(
            promise_wait("12:30", noon(), paris),
            Ok(Some("84600s".into()))
        );
        // 02:30 does not exist in Paris on the last Sunday of March.
        let spring = DateTime::parse_from_rfc3339("2026-03-29T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert!(
            promise_wait("02:30", spring, paris)
                .unwrap_err()
                .contains("clocks change")
        );
    }

    #[test]
    fn an_unknown_audience_is_named() {
        let mut form = form();
        form.audience = "martians".into();
        assert_eq!(
            form.to_request(&channels(), noon(), chrono_tz::UTC)
                .unwrap_err(),
            "'martians' is not an audience"
        );
    }
}
