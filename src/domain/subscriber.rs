//! Subscribers: one contact, and its consent to each order it follows (pending, confirmed or
//! left, with when and how), kept per order so a confirmation confirms exactly what it was
//! asked for.

use super::{Contact, OrderNumber};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The contact as a whole, read from its follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriberState {
    /// Follows orders but has confirmed none yet: receives nothing.
    Pending,
    /// Confirmed at least one order it follows.
    Confirmed,
    /// Asked to stop (or left every order): receives nothing until it subscribes again.
    Unsubscribed,
}

/// Where one (contact, order) follow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FollowState {
    /// Asked for, not confirmed: receives nothing about the order.
    Pending,
    Confirmed,
    /// Stopped following: kept so support sees it, and so nothing but the customer brings it
    /// back.
    Left,
}

/// How a follow came to its state: what support is shown, and what an audit would ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FollowVia {
    /// The public subscribe form.
    Form,
    /// The link of a confirmation message.
    ConfirmLink,
    /// A support agent's link, opened by the customer.
    SupportLink,
    /// A text message from the contact (YES, START, STOP).
    Text,
    /// An unsubscribe link.
    UnsubscribeLink,
    /// A bulk import from the order system.
    Import,
    /// An operator, through the CLI, the admin API or the console.
    Operator,
    /// Recorded before crier kept consent per order.
    Earlier,
}

impl FollowVia {
    /// How support reads it: "confirmed by a confirmation link".
    pub fn describe(self) -> &'static str {
        match self {
            FollowVia::Form => "through the subscribe form",
            FollowVia::ConfirmLink => "by a confirmation link",
            FollowVia::SupportLink => "by a support link",
            FollowVia::Text => "by text message",
            FollowVia::UnsubscribeLink => "by an unsubscribe link",
            FollowVia::Import => "by an import",
            FollowVia::Operator => "by an operator",
            FollowVia::Earlier => "before crier kept consent per order",
        }
    }
}

/// One (contact, order) follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Follow {
    pub state: FollowState,
    /// When it came to this state.
    pub since: DateTime<Utc>,
    pub via: FollowVia,
    /// When it was first asked for.
    pub first: DateTime<Utc>,
}

/// A text that asked the contact to reply (YES to a confirmation, START after a STOP): a reply
/// answers it, and confirms exactly the orders it named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextAsk {
    pub orders: BTreeSet<OrderNumber>,
    pub at: DateTime<Utc>,
    /// A confirmation's question lasts as long as its link; START after a STOP has no end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl TextAsk {
    /// Whether a reply at `now` still answers it.
    pub fn open_at(&self, now: DateTime<Utc>) -> bool {
        self.until.is_none_or(|until| until > now)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredSubscriber")]
pub struct Subscriber {
    pub contact: Contact,
    /// Every order this contact follows or has followed, with its consent.
    pub follows: BTreeMap<OrderNumber, Follow>,
    /// When the contact last left everything (STOP, or the last order left): a link issued
    /// before it no longer subscribes anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opted_out_at: Option<DateTime<Utc>>,
    /// The texts that asked for a reply and wait for one, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub text_asks: Vec<TextAsk>,
    /// Channels this contact can no longer be reached on (an invalid number, an SMS STOP).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub stopped_on: BTreeSet<String>,
    /// Per channel, how many messages in a row its provider reported undelivered.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub undelivered: BTreeMap<String, u32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A subscriber as any version of crier wrote it. Records written before consent was kept per
/// order have a `state` for the contact and the set of `orders` it followed: each order
/// becomes a follow in that state, and an unsubscribed contact one that opted out then.
#[derive(Deserialize)]
struct StoredSubscriber {
    contact: Contact,
    #[serde(default)]
    follows: Option<BTreeMap<OrderNumber, Follow>>,
    #[serde(default)]
    state: Option<SubscriberState>,
    #[serde(default)]
    orders: BTreeSet<OrderNumber>,
    #[serde(default)]
    opted_out_at: Option<DateTime<Utc>>,
    #[serde(default)]
    text_asks: Vec<TextAsk>,
    #[serde(default)]
    stopped_on: BTreeSet<String>,
    #[serde(default)]
    undelivered: BTreeMap<String, u32>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<StoredSubscriber> for Subscriber {
    fn from(stored: StoredSubscriber) -> Self {
        let earlier = stored.updated_at;
        let (follows, opted_out_at) = match stored.follows {
            Some(follows) => (follows, stored.opted_out_at),
            None => {
                let state = match stored.state {
                    Some(SubscriberState::Confirmed) => FollowState::Confirmed,
                    Some(SubscriberState::Unsubscribed) => FollowState::Left,
                    _ => FollowState::Pending,
                };
                let follows = stored
                    .orders
                    .into_iter()
                    .map(|order| {
                        let follow = Follow {
                            state,
                            since: earlier,
                            via: FollowVia::Earlier,
                            first: stored.created_at,
                        };
                        (order, follow)
                    })
                    .collect();
                let opted_out = (stored.state == Some(SubscriberState::Unsubscribed))
                    .then_some(earlier)
                    .or(stored.opted_out_at);
                (follows, opted_out)
            }
        };
        Self {
            contact: stored.contact,
            follows,
            opted_out_at,
            text_asks: stored.text_asks,
            stopped_on: stored.stopped_on,
            undelivered: stored.undelivered,
            created_at: stored.created_at,
            updated_at: stored.updated_at,
        }
    }
}

impl Subscriber {
    pub fn new(contact: Contact, now: DateTime<Utc>) -> Self {
        Self {
            contact,
            follows: BTreeMap::new(),
            opted_out_at: None,
            text_asks: Vec::new(),
            stopped_on: BTreeSet::new(),
            undelivered: BTreeMap::new(),
            created_at: now,
            updated_at: now,
        }
    }

    /// The contact as a whole: confirmed if it receives anything, pending if it waits to
    /// confirm something, unsubscribed otherwise (it left, or opted out).
    pub fn state(&self) -> SubscriberState {
        let states = || self.follows.values().map(|f| f.state);
        if states().any(|s| s == FollowState::Confirmed) {
            SubscriberState::Confirmed
        } else if states().any(|s| s == FollowState::Pending) {
            SubscriberState::Pending
        } else if self.opted_out_at.is_some() || !self.follows.is_empty() {
            SubscriberState::Unsubscribed
        } else {
            SubscriberState::Pending
        }
    }

    /// The orders it follows now, confirmed or waiting to be.
    pub fn orders(&self) -> BTreeSet<OrderNumber> {
        self.follows
            .iter()
            .filter(|(_, f)| f.state != FollowState::Left)
            .map(|(order, _)| order.clone())
            .collect()
    }

    /// The orders it receives updates about.
    pub fn confirmed_orders(&self) -> BTreeSet<OrderNumber> {
        self.follows
            .iter()
            .filter(|(_, f)| f.state == FollowState::Confirmed)
            .map(|(order, _)| order.clone())
            .collect()
    }

    pub fn follow_of(&self, order: &OrderNumber) -> Option<&Follow> {
        self.follows.get(order)
    }

    /// Whether it receives updates about `order`.
    pub fn receives(&self, order: &OrderNumber) -> bool {
        self.follows
            .get(order)
            .is_some_and(|f| f.state == FollowState::Confirmed)
    }

    /// Whether it receives any update: an update for everyone reaches it.
    pub fn receives_updates(&self) -> bool {
        self.state() == SubscriberState::Confirmed
    }

    /// Whether updates reach this subscriber on `channel`.
    pub fn receives_on(&self, channel: &str) -> bool {
        self.receives_updates() && !self.stopped_on.contains(channel)
    }

    /// Whether it left everything and follows nothing since.
    pub fn opted_out(&self) -> bool {
        self.state() == SubscriberState::Unsubscribed
    }

    /// How many orders wait for it to confirm.
    pub fn pending_count(&self) -> usize {
        self.follows
            .values()
            .filter(|f| f.state == FollowState::Pending)
            .count()
    }

    /// Whether a link issued at `issued` may still change what it follows: not if it opted out
    /// after, nor if it left the link's order after.
    pub fn honours_link(&self, order: &OrderNumber, issued: DateTime<Utc>) -> bool {
        let opted_out_after = self.opted_out_at.is_some_and(|at| at > issued);
        let left_after = self
            .follows
            .get(order)
            .is_some_and(|f| f.state == FollowState::Left && f.since > issued);
        !opted_out_after && !left_after
    }

    /// Follows `order`, confirmed (the caller vouches for the contact) or pending. A confirmed
    /// follow is never made pending again. Returns whether anything changed.
    pub fn follow(
        &mut self,
        order: OrderNumber,
        confirmed: bool,
        via: FollowVia,
        now: DateTime<Utc>,
    ) -> bool {
        let state = if confirmed {
            FollowState::Confirmed
        } else {
            FollowState::Pending
        };
        let changed = match self.follows.get_mut(&order) {
            Some(follow) if follow.state == state || follow.state == FollowState::Confirmed => {
                false
            }
            Some(follow) => {
                follow.state = state;
                follow.since = now;
                follow.via = via;
                true
            }
            None => {
                let follow = Follow {
                    state,
                    since: now,
                    via,
                    first: now,
                };
                self.follows.insert(order, follow);
                true
            }
        };
        if changed {
            self.updated_at = now;
        }
        changed
    }

    /// Stops following `order`, or every order when `None`. Leaving every order (or the last
    /// one) opts the contact out: a link issued before no longer brings it back, and subscribing
    /// again to one order later brings back no other. Returns the orders no longer followed.
    pub fn leave(
        &mut self,
        order: Option<&OrderNumber>,
        via: FollowVia,
        now: DateTime<Utc>,
    ) -> Vec<OrderNumber> {
        let mut left = Vec::new();
        for (followed, follow) in &mut self.follows {
            if order.is_some_and(|o| o != followed) || follow.state == FollowState::Left {
                continue;
            }
            follow.state = FollowState::Left;
            follow.since = now;
            follow.via = via;
            left.push(followed.clone());
        }
        if order.is_none() || self.orders().is_empty() {
            self.opted_out_at = Some(now);
        }
        for ask in &mut self.text_asks {
            ask.orders.retain(|o| !left.contains(o));
        }
        self.text_asks.retain(|ask| !ask.orders.is_empty());
        self.updated_at = now;
        left
    }

    /// Remembers that a text asked the contact to reply about `orders`: a reply confirms them.
    /// With no end (START after a STOP), it replaces every open question.
    pub fn ask_by_text(
        &mut self,
        orders: BTreeSet<OrderNumber>,
        until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        if until.is_none() {
            self.text_asks.clear();
        }
        self.text_asks
            .retain(|ask| ask.open_at(now) && ask.orders != orders);
        if !orders.is_empty() {
            self.text_asks.push(TextAsk {
                orders,
                at: now,
                until,
            });
        }
        self.updated_at = now;
    }

    /// The orders of the questions still open at `now`.
    pub fn asked_by_text(&self, now: DateTime<Utc>) -> BTreeSet<OrderNumber> {
        self.text_asks
            .iter()
            .filter(|ask| ask.open_at(now))
            .flat_map(|ask| ask.orders.iter().cloned())
            .collect()
    }

    /// The contact replied YES (or START) to a text that asked, naming `order` or not: confirms
    /// exactly the orders of the question it answers, and returns them. A bare YES answers the
    /// one open question; with several open it is not clear which, and confirms nothing (the
    /// reply asks for the order). A YES naming an order answers the question about it.
    pub fn answer_by_text(
        &mut self,
        order: Option<&OrderNumber>,
        now: DateTime<Utc>,
    ) -> Vec<OrderNumber> {
        let open: Vec<usize> = self
            .text_asks
            .iter()
            .enumerate()
            .filter(|(_, ask)| ask.open_at(now))
            .map(|(i, _)| i)
            .collect();
        let answered: BTreeSet<OrderNumber> = match (order, open.as_slice()) {
            (None, [only]) => self.text_asks.remove(*only).orders,
            (Some(order), _)
                if open
                    .iter()
                    .any(|i| self.text_asks[*i].orders.contains(order)) =>
            {
                for ask in &mut self.text_asks {
                    ask.orders.remove(order);
                }
                [order.clone()].into()
            }
            _ => return Vec::new(),
        };
        self.text_asks
            .retain(|ask| !ask.orders.is_empty() && ask.open_at(now));
        let confirmed = answered
            .into_iter()
            .filter(|order| self.follow(order.clone(), true, FollowVia::Text, now))
            .collect();
        self.updated_at = now;
        confirmed
    }

    /// Forgets follows asked for through the form and never confirmed once their link expired
    /// (`asked_before`): a made-up request is not kept. Returns whether any was forgotten.
    pub fn forget_unconfirmed(&mut self, asked_before: DateTime<Utc>) -> bool {
        let before = self.follows.clone();
        self.follows.retain(|_, f| {
            let expired = f.state == FollowState::Pending
                && f.via == FollowVia::Form
                && f.since < asked_before;
            if expired && f.first < f.since {
                // It had left before the form asked again: it goes back to having left.
                f.state = FollowState::Left;
                return true;
            }
            !expired
        });
        let pending = |o: &OrderNumber| {
            self.follows
                .get(o)
                .is_some_and(|f| f.state == FollowState::Pending)
        };
        let asks = std::mem::take(&mut self.text_asks);
        self.text_asks = asks
            .into_iter()
            .filter_map(|mut ask| {
                if ask.until.is_some() {
                    ask.orders.retain(|o| pending(o));
                }
                (!ask.orders.is_empty()).then_some(ask)
            })
            .collect();
        self.follows != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    fn order(raw: &str) -> OrderNumber {
        OrderNumber::parse(
            raw,
            &crate::domain::OrderPattern::new(r"[A-Z]{2}-\d{4}").unwrap(),
        )
        .unwrap()
    }

    fn phone() -> Subscriber {
        Subscriber::new(Contact::parse("+447700900123").unwrap(), at(0))
    }

    #[test]
    fn a_reply_confirms_exactly_the_orders_the_text_named() {
        let mut owner = phone();
        owner.follow(order("AB-1001"), false, FollowVia::Form, at(0));
        owner.ask_by_text([order("AB-1001")].into(), Some(at(3600)), at(1));
        // A stranger adds two more orders for the same number, and no text asks about them.
        owner.follow(order("AB-1002"), false, FollowVia::Form, at(2));
        owner.follow(order("AB-1003"), false, FollowVia::Import, at(3));
        assert_eq!(owner.answer_by_text(None, at(10)), vec![order("AB-1001")]);
        assert!(owner.receives(&order("AB-1001")));
        assert!(!owner.receives(&order("AB-1002")));
        assert!(!owner.receives(&order("AB-1003")));
        assert_eq!(owner.follows[&order("AB-1001")].via, FollowVia::Text);
        assert_eq!(owner.answer_by_text(None, at(11)), vec![], "answered once");
    }

    #[test]
    fn a_bare_yes_to_several_questions_confirms_none_and_one_naming_its_order_confirms_it() {
        let mut owner = phone();
        for (number, at_second) in [("AB-1001", 0), ("AB-1002", 5), ("AB-1003", 6)] {
            owner.follow(order(number), false, FollowVia::Form, at(at_second));
            owner.ask_by_text([order(number)].into(), Some(at(3600)), at(at_second));
        }
        assert_eq!(owner.answer_by_text(None, at(10)), vec![], "which one?");
        assert_eq!(owner.asked_by_text(at(10)).len(), 3);
        assert_eq!(
            owner.answer_by_text(Some(&order("AB-1001")), at(11)),
            vec![order("AB-1001")]
        );
        assert!(!owner.receives(&order("AB-1002")) && !owner.receives(&order("AB-1003")));
        assert_eq!(
            owner.answer_by_text(Some(&order("AB-1009")), at(12)),
            vec![],
            "no text asked about it"
        );
        assert_eq!(
            owner.asked_by_text(at(12)),
            [order("AB-1002"), order("AB-1003")].into()
        );
    }

    #[test]
    fn a_reply_after_the_question_expired_confirms_nothing() {
        let mut owner = phone();
        owner.follow(order("AB-1001"), false, FollowVia::Form, at(0));
        owner.ask_by_text([order("AB-1001")].into(), Some(at(3600)), at(1));
        assert_eq!(owner.answer_by_text(None, at(3600)), vec![]);
        assert_eq!(owner.state(), SubscriberState::Pending);
    }

    #[test]
    fn leaving_keeps_the_follow_as_left_and_the_last_one_opts_out() {
        let mut ann = phone();
        ann.follow(order("AB-1001"), true, FollowVia::Operator, at(0));
        ann.follow(order("AB-1002"), true, FollowVia::Operator, at(0));
        assert_eq!(
            ann.leave(Some(&order("AB-1001")), FollowVia::UnsubscribeLink, at(5)),
            vec![order("AB-1001")]
        );
        assert_eq!(ann.state(), SubscriberState::Confirmed);
        assert_eq!(ann.opted_out_at, None);
        assert_eq!(ann.follows[&order("AB-1001")].state, FollowState::Left);
        assert!(
            !ann.honours_link(&order("AB-1001"), at(4)),
            "a link from before the leave"
        );
        assert!(ann.honours_link(&order("AB-1002"), at(4)));
        ann.leave(Some(&order("AB-1002")), FollowVia::UnsubscribeLink, at(6));
        assert_eq!(ann.state(), SubscriberState::Unsubscribed);
        assert_eq!(ann.opted_out_at, Some(at(6)));
        assert!(!ann.honours_link(&order("AB-1002"), at(5)));
        assert!(
            ann.honours_link(&order("AB-1002"), at(7)),
            "a link issued after"
        );
    }

    #[test]
    fn a_confirmed_follow_is_never_made_pending_again() {
        let mut ann = phone();
        ann.follow(order("AB-1001"), true, FollowVia::ConfirmLink, at(0));
        assert!(!ann.follow(order("AB-1001"), false, FollowVia::Form, at(1)));
        assert!(ann.receives(&order("AB-1001")));
        assert_eq!(ann.follows[&order("AB-1001")].via, FollowVia::ConfirmLink);
    }

    #[test]
    fn a_stop_by_text_can_be_taken_back_by_a_reply_for_exactly_what_it_left() {
        let mut ann = phone();
        ann.follow(order("AB-1001"), true, FollowVia::Operator, at(0));
        ann.follow(order("AB-1002"), false, FollowVia::Form, at(0));
        let left = ann.leave(None, FollowVia::Text, at(5));
        ann.ask_by_text(
            left.iter()
                .filter(|o| o.as_str() == "AB-1001")
                .cloned()
                .collect(),
            None,
            at(5),
        );
        assert_eq!(
            ann.answer_by_text(None, at(9_999_999)),
            vec![order("AB-1001")]
        );
        assert!(!ann.receives(&order("AB-1002")));
    }

    #[test]
    fn records_from_before_per_order_consent_become_follows_in_their_state() {
        let confirmed = r#"{"contact":"ann@example.com","state":"confirmed","orders":["AB-1001","AB-1002"],
            "created_at":"2026-01-01T00:00:00Z","updated_at":"2026-02-01T00:00:00Z"}"#;
        let ann: Subscriber = serde_json::from_str(confirmed).unwrap();
        assert_eq!(ann.state(), SubscriberState::Confirmed);
        assert!(ann.receives(&order("AB-1001")) && ann.receives(&order("AB-1002")));
        assert_eq!(ann.follows[&order("AB-1002")].via, FollowVia::Earlier);
        assert_eq!(ann.opted_out_at, None);
        let gone = r#"{"contact":"bob@example.com","state":"unsubscribed","orders":[],
            "stopped_on":["sms"],"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-02-01T00:00:00Z"}"#;
        let bob: Subscriber = serde_json::from_str(gone).unwrap();
        assert_eq!(bob.state(), SubscriberState::Unsubscribed);
        assert!(bob.opted_out_at.is_some());
        assert!(bob.stopped_on.contains("sms"));
        let pending = r#"{"contact":"cat@example.com","state":"pending","orders":["AB-1003"],
            "created_at":"2026-01-01T00:00:00Z","updated_at":"2026-02-01T00:00:00Z"}"#;
        let cat: Subscriber = serde_json::from_str(pending).unwrap();
        assert_eq!(cat.follows[&order("AB-1003")].state, FollowState::Pending);
        // Written again, it is in the new form, and reads back the same.
        let again: Subscriber =
            serde_json::from_str(&serde_json::to_string(&ann).unwrap()).unwrap();
        assert_eq!(again, ann);
    }

    #[test]
    fn unconfirmed_form_requests_are_forgotten_once_their_link_expired() {
        let mut ann = phone();
        ann.follow(order("AB-1001"), false, FollowVia::Form, at(0));
        ann.follow(order("AB-1002"), false, FollowVia::Operator, at(0));
        ann.follow(order("AB-1003"), true, FollowVia::Operator, at(0));
        ann.ask_by_text([order("AB-1001")].into(), Some(at(100)), at(0));
        assert!(!ann.forget_unconfirmed(at(0)));
        assert!(ann.forget_unconfirmed(at(1)));
        assert_eq!(ann.orders(), [order("AB-1002"), order("AB-1003")].into());
        assert!(ann.text_asks.is_empty());
    }
}
