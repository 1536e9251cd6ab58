//! Updates: the immutable message a comms lead sends, and who it is for.

use super::{DomainError, IncidentState, OrderNumber};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;
use ulid::Ulid;

const HEADLINE_LIMIT: usize = 200;
const BODY_LIMIT: usize = 5_000;
/// The promised time is shown to the minute, so a shorter wait would promise "now".
const NEXT_UPDATE_SHORTEST: Duration = Duration::from_secs(60);
/// Far enough for a planned migration; further is no promise a customer can hold anyone to.
const NEXT_UPDATE_LONGEST: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// One line that says what is going on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headline(String);

impl Headline {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        // Checked before folding: split_whitespace counts VT, FF and NEL as spaces, and would
        // otherwise launder them.
        refuse_forbidden_chars("headline", input)?;
        let single_line = input.split_whitespace().collect::<Vec<_>>().join(" ");
        check_length("headline", &single_line, HEADLINE_LIMIT)?;
        Ok(Self(single_line))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The update's text: plain text, URLs allowed, paragraphs separated by blank lines.
///
/// Line ends are stored as LF. A bare CR is read as a line end too rather than refused: it is
/// what text pasted from old Mac tools has, and kept as CR it would let a body overwrite its
/// own first line in a terminal preview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Body(String);

impl Body {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        refuse_forbidden_chars("body", input)?;
        let text = input.replace("\r\n", "\n").replace('\r', "\n");
        let text = text.trim();
        check_length("body", text, BODY_LIMIT)?;
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Reads how long until the next update is promised, in humantime syntax (`2h`, `30m`,
/// `1h 30m`): at least a minute and at most 30 days.
pub fn parse_next_update_in(input: &str) -> Result<Duration, DomainError> {
    let invalid = |reason: String| DomainError::InvalidNextUpdateIn {
        input: printable(input),
        reason,
    };
    let wait = humantime::parse_duration(input.trim()).map_err(|e| invalid(e.to_string()))?;
    if wait < NEXT_UPDATE_SHORTEST {
        return Err(invalid("it must be at least a minute".into()));
    }
    if wait > NEXT_UPDATE_LONGEST {
        return Err(invalid("it must be at most 30 days".into()));
    }
    Ok(wait)
}

/// Refuses the first character of `input` that has no place in customer-facing text.
///
/// The position counts characters from 1, in the text as typed, so it can be found in an editor.
fn refuse_forbidden_chars(field: &'static str, input: &str) -> Result<(), DomainError> {
    match input.chars().enumerate().find(|&(_, c)| is_forbidden(c)) {
        Some((index, character)) => Err(DomainError::ForbiddenCharacter {
            field,
            character,
            position: index + 1,
        }),
        None => Ok(()),
    }
}

/// Whether `c` may not appear in text crier sends: C0 and C1 controls and DEL drive terminals
/// and printers and confuse SMS gateways, and XML 1.0 (the Atom feed) has no way to carry most
/// of them. Tab, LF and CR are text; the parsers decide what they become.
///
/// Non-characters (U+FFFE, U+FFFF, U+FDD0…) are refused too: XML forbids or discourages them,
/// and Unicode promises no text ever needs them.
fn is_forbidden(c: char) -> bool {
    (c.is_control() && !matches!(c, '\t' | '\n' | '\r')) || is_noncharacter(c)
}

fn is_noncharacter(c: char) -> bool {
    let code = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&code) || code & 0xFFFE == 0xFFFE
}

/// Names `c` for an error message without printing it raw, as a raw control character would
/// act on the terminal that shows the message.
pub(super) fn describe_char(c: char) -> String {
    let code = u32::from(c);
    if c.is_control() {
        format!("a control character (U+{code:04X})")
    } else if is_noncharacter(c) {
        format!("a non-character (U+{code:04X})")
    } else if c.is_alphanumeric() || c.is_ascii_graphic() {
        format!("'{c}' (U+{code:04X})")
    } else {
        format!("the character U+{code:04X}")
    }
}

/// `input` as it can be echoed in an error message: controls and other unprintable characters
/// are written as escapes so that a hostile input cannot drive the terminal or forge log lines.
pub(super) fn printable(input: &str) -> String {
    let mut shown = String::with_capacity(input.len());
    for c in input.chars() {
        if c == ' ' || c.is_ascii_graphic() {
            shown.push(c);
        } else if is_forbidden(c) || c.is_control() {
            shown.extend(c.escape_unicode());
        } else {
            // Printable non-ASCII stays as it is; escape_debug escapes only what Rust deems
            // unprintable (format characters such as the bidi overrides).
            shown.extend(c.escape_debug());
        }
    }
    shown
}

fn check_length(field: &'static str, text: &str, limit: usize) -> Result<(), DomainError> {
    let length = text.chars().count();
    if length == 0 {
        return Err(DomainError::Empty { field });
    }
    if length > limit {
        return Err(DomainError::TooLong {
            field,
            length,
            limit,
        });
    }
    Ok(())
}

/// Who an update is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "orders", rename_all = "snake_case")]
pub enum Audience {
    /// Every broadcast channel and every confirmed subscriber.
    Everyone,
    /// Only the confirmed subscribers of these orders, plus webhooks (marked as targeted).
    Orders(BTreeSet<OrderNumber>),
}

impl Audience {
    pub fn is_targeted(&self) -> bool {
        matches!(self, Audience::Orders(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub id: Ulid,
    pub incident: Ulid,
    pub state: IncidentState,
    pub headline: Headline,
    pub body: Body,
    /// When the next update is promised, if one is.
    pub next_update_by: Option<DateTime<Utc>>,
    pub audience: Audience,
    pub author: String,
    pub created_at: DateTime<Utc>,
    /// The channels it was sent through, by name.
    pub channels: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_blank_body_is_rejected() {
        assert_eq!(
            Body::parse("  \n "),
            Err(DomainError::Empty { field: "body" })
        );
    }

    #[test]
    fn an_over_long_body_is_rejected_with_its_length() {
        let err = Body::parse(&"x".repeat(BODY_LIMIT + 1)).unwrap_err();
        assert_eq!(
            err,
            DomainError::TooLong {
                field: "body",
                length: BODY_LIMIT + 1,
                limit: BODY_LIMIT
            }
        );
    }

    #[test]
    fn a_headline_is_folded_onto_one_line() {
        let headline = Headline::parse(" Activations\n  delayed ").unwrap();
        assert_eq!(headline.as_str(), "Activations delayed");
        let headline = Headline::parse("Activations\t\r\n delayed\r").unwrap();
        assert_eq!(headline.as_str(), "Activations delayed");
    }

    /// Controls (C0 but tab and line ends, DEL, C1) and what XML 1.0 cannot carry.
    const FORBIDDEN: [char; 14] = [
        '\0',
        '\x01',
        '\x0b',
        '\x0c',
        '\x1b',
        '\x7f',
        '\u{80}',
        '\u{85}',
        '\u{9f}',
        '\u{fdd0}',
        '\u{fffe}',
        '\u{ffff}',
        '\u{1fffe}',
        '\u{10ffff}',
    ];

    #[test]
    fn a_control_or_non_xml_character_in_a_headline_or_body_is_refused_with_its_position() {
        for c in FORBIDDEN {
            let text = format!("Fixed{c} now");
            assert_eq!(
                Headline::parse(&text),
                Err(DomainError::ForbiddenCharacter {
                    field: "headline",
                    character: c,
                    position: 6
                }),
                "{c:?}"
            );
            assert_eq!(
                Body::parse(&text),
                Err(DomainError::ForbiddenCharacter {
                    field: "body",
                    character: c,
                    position: 6
                }),
                "{c:?}"
            );
        }
    }

    #[test]
    fn the_error_names_the_field_the_character_and_where_it_is() {
        let err = Body::parse("We're on it\x1b[2J").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the body contains a control character (U+001B) at position 12"
        );
        let err = Headline::parse("Delayed\u{fffe}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the headline contains a non-character (U+FFFE) at position 8"
        );
    }

    #[test]
    fn a_body_keeps_its_tabs_and_line_ends_as_lf() {
        let body = Body::parse("Steps:\r\n\t1. wait\r\n\t2. retry").unwrap();
        assert_eq!(body.as_str(), "Steps:\n\t1. wait\n\t2. retry");
    }

    #[test]
    fn the_time_until_the_next_update_is_read_like_2h_or_30m() {
        for (written, seconds) in [
            ("2h", 7_200),
            (" 30m ", 1_800),
            ("1h 30m", 5_400),
            ("1m", 60),
            ("30d", 30 * 86_400),
        ] {
            assert_eq!(
                parse_next_update_in(written),
                Ok(Duration::from_secs(seconds)),
                "{written}"
            );
        }
    }

    fn next_update_reason(input: &str) -> String {
        match parse_next_update_in(input) {
            Err(DomainError::InvalidNextUpdateIn { reason, .. }) => reason,
            other => panic!("{input}: {other:?}"),
        }
    }

    #[test]
    fn a_next_update_now_or_over_30_days_away_is_refused() {
        for written in ["0s", "0", "59s", "500ms"] {
            assert_eq!(
                next_update_reason(written),
                "it must be at least a minute",
                "{written}"
            );
        }
        for written in [
            "30d 1s",
            "31d",
            "1month",
            "1000000000y",
            "18446744073709551615s",
        ] {
            assert_eq!(
                next_update_reason(written),
                "it must be at most 30 days",
                "{written}"
            );
        }
    }

    #[test]
    fn a_next_update_in_humantime_cannot_read_is_refused_with_its_reason() {
        for written in [
            "",
            "soonish",
            "-1h",
            "2 hours from now",
            "99999999999999999999999h",
        ] {
            next_update_reason(written);
        }
        assert_eq!(
            parse_next_update_in("0s").unwrap_err().to_string(),
            "'0s' is not a time until the next update (like 2h or 30m): it must be at least a minute"
        );
    }

    #[test]
    fn a_bare_cr_in_a_body_is_read_as_a_line_end() {
        let body = Body::parse("All fine\rNothing works").unwrap();
        assert_eq!(body.as_str(), "All fine\nNothing works");
    }
}
