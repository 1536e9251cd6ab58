//! Subscribers: one contact, its confirmation state and the orders it follows.

use super::{Contact, OrderNumber};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriberState {
    /// Subscribed but has not confirmed the contact yet: receives nothing.
    Pending,
    Confirmed,
    /// Asked to stop: receives nothing until it subscribes again.
    Unsubscribed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscriber {
    pub contact: Contact,
    pub state: SubscriberState,
    pub orders: BTreeSet<OrderNumber>,
    /// Channels this contact can no longer be reached on (an invalid number, an SMS STOP).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub stopped_on: BTreeSet<String>,
    /// Per channel, how many messages in a row its provider reported undelivered.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub undelivered: std::collections::BTreeMap<String, u32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Subscriber {
    pub fn new(contact: Contact, now: DateTime<Utc>) -> Self {
        Self {
            contact,
            state: SubscriberState::Pending,
            orders: BTreeSet::new(),
            stopped_on: BTreeSet::new(),
            undelivered: Default::default(),
            created_at: now,
            updated_at: now,
        }
    }

    pub fn receives_updates(&self) -> bool {
        self.state == SubscriberState::Confirmed
    }

    /// Whether updates reach this subscriber on `channel`.
    pub fn receives_on(&self, channel: &str) -> bool {
        self.receives_updates() && !self.stopped_on.contains(channel)
    }

    /// Follows `order`. Someone who unsubscribed and subscribes again starts over as pending,
    /// unless the caller vouches for the contact.
    pub fn follow(&mut self, order: OrderNumber, confirmed: bool, now: DateTime<Utc>) {
        self.orders.insert(order);
        if confirmed {
            self.state = SubscriberState::Confirmed;
        } else if self.state == SubscriberState::Unsubscribed {
            self.state = SubscriberState::Pending;
        }
        self.updated_at = now;
    }

    /// Stops following `order`, or every order when `None`; with none left, the contact has
    /// unsubscribed. Leaving means leaving every order: subscribing again later to one order
    /// must not bring the others back. Returns the orders no longer followed.
    pub fn leave(&mut self, order: Option<&OrderNumber>, now: DateTime<Utc>) -> Vec<OrderNumber> {
        let left = match order {
            Some(order) => self.orders.take(order).into_iter().collect(),
            None => std::mem::take(&mut self.orders).into_iter().collect(),
        };
        if self.orders.is_empty() {
            self.state = SubscriberState::Unsubscribed;
        }
        self.updated_at = now;
        left
    }
}
