//! Incidents: the thread of updates on one matter, and its current state.

use super::DomainError;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use ulid::Ulid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentState {
    Investigating,
    Identified,
    Monitoring,
    Resolved,
}

impl IncidentState {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentState::Investigating => "investigating",
            IncidentState::Identified => "identified",
            IncidentState::Monitoring => "monitoring",
            IncidentState::Resolved => "resolved",
        }
    }

    /// The word shown to customers.
    pub fn label(self) -> &'static str {
        match self {
            IncidentState::Investigating => "Investigating",
            IncidentState::Identified => "Identified",
            IncidentState::Monitoring => "Monitoring",
            IncidentState::Resolved => "Resolved",
        }
    }
}

impl fmt::Display for IncidentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IncidentState {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_lowercase().as_str() {
            "investigating" => Ok(Self::Investigating),
            "identified" => Ok(Self::Identified),
            "monitoring" => Ok(Self::Monitoring),
            "resolved" => Ok(Self::Resolved),
            _ => Err(DomainError::InvalidIncidentState(s.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    pub id: Ulid,
    pub title: String,
    pub state: IncidentState,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Every update of this incident, oldest first.
    pub updates: Vec<Ulid>,
    /// Per channel, the remote thread later posts reply to (a status id, a topic id…).
    #[serde(default)]
    pub remote_threads: BTreeMap<String, serde_json::Value>,
}

impl Incident {
    pub fn open(title: String, state: IncidentState, now: DateTime<Utc>) -> Self {
        Self {
            id: Ulid::new(),
            title,
            state,
            created_at: now,
            updated_at: now,
            updates: Vec::new(),
            remote_threads: BTreeMap::new(),
        }
    }
}
