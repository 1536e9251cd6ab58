//! Updates: the immutable message a comms lead sends, and who it is for.

use super::{DomainError, IncidentState, OrderNumber};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use ulid::Ulid;

const HEADLINE_LIMIT: usize = 200;
const BODY_LIMIT: usize = 5_000;

/// One line that says what is going on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headline(String);

impl Headline {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let text = input.trim();
        let single_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
        check_length("headline", &single_line, HEADLINE_LIMIT)?;
        Ok(Self(single_line))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The update's text: plain text, URLs allowed, paragraphs separated by blank lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Body(String);

impl Body {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let text = input.trim().replace("\r\n", "\n");
        check_length("body", &text, BODY_LIMIT)?;
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
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
    }
}
