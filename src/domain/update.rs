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
/// and Unicode promises no text ever needs them. So are the bidirectional embeddings, overrides
/// and isolates (U+202A–U+202E, U+2066–U+2069): they make text display in another order than
/// it is stored, so a page, a feed or a message could show words the lead never typed in that
/// order. The marks (U+200E, U+200F) stay: they only settle the direction of neutral characters.
fn is_forbidden(c: char) -> bool {
    (c.is_control() && !matches!(c, '\t' | '\n' | '\r')) || is_noncharacter(c) || is_bidi_control(c)
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
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
    } else if is_bidi_control(c) {
        format!("a bidirectional control (U+{code:04X}, which reorders how text is shown)")
    } else if c.is_alphanumeric() || c.is_ascii_graphic() {
        format!("'{c}' (U+{code:04X})")
    } else {
        format!("the character U+{code:04X}")
    }
}

/// How much of a refused value an error message quotes: enough to recognise it, never a
/// megabyte echoed back per row of an import.
pub const QUOTED_CHARS: usize = 60;

/// `input` as it can be echoed in an error message: controls and other unprintable characters
/// are written as escapes so that a hostile input cannot drive the terminal or forge log lines,
/// and past [`QUOTED_CHARS`] characters it is cut, saying how long it was.
pub fn printable(input: &str) -> String {
    let total = input.chars().count();
    let mut shown = String::with_capacity(input.len().min(4 * QUOTED_CHARS));
    for c in input.chars().take(QUOTED_CHARS) {
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
    if total > QUOTED_CHARS {
        shown.push_str(&format!("… ({total} characters)"));
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

/// Strategies and settings shared by the property tests of the domain parsers.
#[cfg(test)]
pub(super) mod hostile {
    use proptest::prelude::*;
    use proptest::test_runner::Config;

    /// Characters a parser must be ready for: controls, separators, what Unicode case mapping or
    /// IDNA turn into ASCII, and the punctuation the parsed syntaxes give a meaning to.
    const TRICKY: &str = "\0\x01\t\n\x0b\x0c\r\x1b\x7f\u{80}\u{85}\u{9f}\u{a0}\u{ad}\u{200b}\u{2028}\
                          \u{202e}\u{3000}\u{fdd0}\u{fffe}\u{ffff}\u{10ffff}ßﬀıİ\u{212a}éü\u{661}\
                          \u{ff11}\u{ff20}\u{ff0e}@.+()-#;,x\"<>/[] :_?=";

    /// Modest, so the suite stays fast; a failure is reported, not written into the source tree.
    pub fn config() -> Config {
        Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// Any string at all, or one pieced together from `fragments` of plausible input and tricky
    /// characters, so that parsers are driven to accept as well as to refuse.
    pub fn text(fragments: &'static [&'static str]) -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => proptest::sample::select(fragments).prop_map(str::to_owned),
            2 => proptest::sample::select(TRICKY.chars().collect::<Vec<_>>())
                .prop_map(String::from),
            1 => any::<char>().prop_map(String::from),
        ];
        prop_oneof![
            1 => any::<String>(),
            3 => proptest::collection::vec(piece, 0..10).prop_map(|pieces| pieces.concat()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    /// Controls (C0 but tab and line ends, DEL, C1), what XML 1.0 cannot carry, and the
    /// bidirectional controls that reorder text.
    const FORBIDDEN: [char; 23] = [
        '\u{202a}',
        '\u{202b}',
        '\u{202c}',
        '\u{202d}',
        '\u{202e}',
        '\u{2066}',
        '\u{2067}',
        '\u{2068}',
        '\u{2069}',
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
        let err = Body::parse("Refund \u{202e}00.01$").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the body contains a bidirectional control (U+202E, which reorders how text is shown) at position 8"
        );
        // A direction mark only settles neutral characters: it stays.
        assert!(Body::parse("שלום\u{200f}!").is_ok());
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

    const TEXT: &[&str] = &[
        "Activations delayed",
        "We're on it.",
        "https://status.example.com",
        " ",
        "  ",
        "\r\n",
        "\n",
        "\r",
        "\t",
    ];
    const WAITS: &[&str] = &[
        "0",
        "1",
        "2",
        "30",
        "59",
        "720",
        "99999999999999999999",
        "s",
        "m",
        "h",
        "d",
        "w",
        "y",
        "ms",
        "min",
        "month",
        " ",
    ];

    /// What every error must be, whichever parser made it: readable on one terminal line.
    fn prop_assert_printable(err: &DomainError) -> Result<(), TestCaseError> {
        prop_assert!(!err.to_string().chars().any(char::is_control), "{err:?}");
        Ok(())
    }

    proptest! {
        #![proptest_config(hostile::config())]

        #[test]
        fn a_parsed_headline_is_one_clean_line_that_parses_to_itself(
            input in hostile::text(TEXT)
        ) {
            match Headline::parse(&input) {
                Ok(headline) => {
                    let text = headline.as_str();
                    prop_assert!(!text.chars().any(is_forbidden));
                    prop_assert!(!text.chars().any(|c| c.is_whitespace() && c != ' '));
                    prop_assert!(!text.contains("  ") && text == text.trim());
                    prop_assert!((1..=HEADLINE_LIMIT).contains(&text.chars().count()));
                    prop_assert_eq!(Headline::parse(text), Ok(headline.clone()));
                }
                Err(err) => {
                    prop_assert!(matches!(
                        err,
                        DomainError::Empty { field: "headline" }
                            | DomainError::TooLong { field: "headline", .. }
                            | DomainError::ForbiddenCharacter { field: "headline", .. }
                    ), "{err:?}");
                    prop_assert_printable(&err)?;
                }
            }
        }

        #[test]
        fn a_parsed_body_has_only_text_and_lf_and_parses_to_itself(input in hostile::text(TEXT)) {
            match Body::parse(&input) {
                Ok(body) => {
                    let text = body.as_str();
                    prop_assert!(!text.chars().any(|c| is_forbidden(c) || c == '\r'));
                    prop_assert!(text == text.trim());
                    prop_assert!((1..=BODY_LIMIT).contains(&text.chars().count()));
                    prop_assert_eq!(Body::parse(text), Ok(body.clone()));
                }
                Err(err) => {
                    prop_assert!(matches!(
                        err,
                        DomainError::Empty { field: "body" }
                            | DomainError::TooLong { field: "body", .. }
                            | DomainError::ForbiddenCharacter { field: "body", .. }
                    ), "{err:?}");
                    prop_assert_printable(&err)?;
                }
            }
        }

        #[test]
        fn a_parsed_next_update_is_within_bounds_and_reads_back(input in hostile::text(WAITS)) {
            match parse_next_update_in(&input) {
                Ok(wait) => {
                    prop_assert!((NEXT_UPDATE_SHORTEST..=NEXT_UPDATE_LONGEST).contains(&wait));
                    let written = humantime::format_duration(wait).to_string();
                    prop_assert_eq!(parse_next_update_in(&written), Ok(wait));
                }
                Err(err) => {
                    prop_assert!(
                        matches!(err, DomainError::InvalidNextUpdateIn { .. }),
                        "{err:?}"
                    );
                    prop_assert_printable(&err)?;
                }
            }
        }
    }
}
