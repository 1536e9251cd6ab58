//! Domain values of crier: each one is parsed from raw input once, then trusted.

mod contact;
mod incident;
mod order;
mod subscriber;
pub mod token;
mod update;

pub use contact::{Contact, ContactKind, EmailAddress, PhoneNumber};
pub use incident::{Incident, IncidentState};
pub use order::{OrderNumber, OrderPattern};
pub use subscriber::{Follow, FollowState, FollowVia, Subscriber, SubscriberState, TextAsk};
pub use update::{Audience, Body, Headline, Update, parse_next_update_in, printable};

/// Input that does not describe a valid domain value. Each variant is a user error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("'{input}' is not an order number: {looks_like}")]
    InvalidOrderNumber { input: String, looks_like: String },
    /// `position` counts characters from 1, in the input as typed.
    #[error(
        "'{input}' is not an order number: it contains {} at position {position}; \
         order numbers are printable ASCII",
        update::describe_char(*.character)
    )]
    InvalidOrderNumberCharacter {
        input: String,
        character: char,
        position: usize,
    },
    #[error("'{input}' is not an email address: {reason}")]
    InvalidEmail { input: String, reason: String },
    #[error("'{input}' is not a phone number in E.164 form (like +447700900123): {reason}")]
    InvalidPhone { input: String, reason: String },
    #[error("the {field} is empty")]
    Empty { field: &'static str },
    #[error("the {field} is {length} characters long; the limit is {limit}")]
    TooLong {
        field: &'static str,
        length: usize,
        limit: usize,
    },
    /// `position` counts characters from 1, in the input as typed.
    #[error("the {field} contains {} at position {position}", update::describe_char(*.character))]
    ForbiddenCharacter {
        field: &'static str,
        character: char,
        position: usize,
    },
    #[error("'{input}' is not a time until the next update (like 2h or 30m): {reason}")]
    InvalidNextUpdateIn { input: String, reason: String },
    #[error(
        "'{0}' is not an incident state: use investigating, identified, monitoring or resolved"
    )]
    InvalidIncidentState(String),
}
