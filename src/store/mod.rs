//! The sled store: subscribers and their order index, incidents, updates, planning cursors,
//! and the delivery outbox. Every change that spans trees is one sled transaction.

mod commit;
mod outbox;

pub use outbox::{BROADCAST_RECIPIENT, Counts, DeliveryRecord, DeliveryState, Outcome, PlanState};

use crate::config::StoreSettings;
use crate::domain::{Contact, Incident, OrderNumber, Subscriber, SubscriberState, Update};
use chrono::{DateTime, Utc};
use commit::GroupCommit;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::collections::BTreeSet;
use std::path::PathBuf;
use ulid::Ulid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {0} is in use by another crier process (is `crier serve` running?)")]
    Locked(PathBuf),
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "store holds a record it cannot read ({0}); it was written by another version of crier?"
    )]
    Corrupt(String),
    #[error("no incident has the id {0}")]
    UnknownIncident(Ulid),
    #[error("no update has the id {0}")]
    UnknownUpdate(Ulid),
    #[error("no subscriber has the contact {0}")]
    UnknownSubscriber(String),
}

impl StoreError {
    /// Whether the caller asked for something that is not there, rather than the store failing.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            StoreError::Locked(_)
                | StoreError::UnknownIncident(_)
                | StoreError::UnknownUpdate(_)
                | StoreError::UnknownSubscriber(_)
        )
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(error: TransactionError<StoreError>) -> Self {
        match error {
            TransactionError::Abort(inner) => inner,
            TransactionError::Storage(inner) => StoreError::Sled(inner),
        }
    }
}

pub(crate) type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store records always serialize")
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn abort(error: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(error)
}

/// Separates an order from a contact in the order index; neither can contain a NUL.
const INDEX_SEPARATOR: u8 = 0;

fn order_index_key(order: &OrderNumber, contact: &Contact) -> Vec<u8> {
    let mut key = order_index_prefix(order);
    key.extend_from_slice(contact.as_str().as_bytes());
    key
}

fn order_index_prefix(order: &OrderNumber) -> Vec<u8> {
    let mut key = order.as_str().as_bytes().to_vec();
    key.push(INDEX_SEPARATOR);
    key
}

pub struct Store {
    db: sled::Db,
    subscribers: sled::Tree,
    order_index: sled::Tree,
    incidents: sled::Tree,
    updates: sled::Tree,
    plans: sled::Tree,
    deliveries: sled::Tree,
    outbox: sled::Tree,
    leases: sled::Tree,
    dead: sled::Tree,
    channel_state: sled::Tree,
    group_commit: GroupCommit,
}

impl Store {
    pub fn open(settings: &StoreSettings) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(&settings.path)
            .cache_capacity(settings.cache_capacity_bytes)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked(settings.path.clone())
                }
                sled::Error::Io(ref io) if io.to_string().contains("lock") => {
                    StoreError::Locked(settings.path.clone())
                }
                other => StoreError::Sled(other),
            })?;
        let tree = |name: &str| db.open_tree(name);
        Ok(Self {
            subscribers: tree("subscribers")?,
            order_index: tree("order_index")?,
            incidents: tree("incidents")?,
            updates: tree("updates")?,
            plans: tree("plans")?,
            deliveries: tree("deliveries")?,
            outbox: tree("outbox")?,
            leases: tree("leases")?,
            dead: tree("dead")?,
            channel_state: tree("channel_state")?,
            group_commit: GroupCommit::start(db.clone()),
            db,
        })
    }

    /// Waits until every write made so far is on disk, sharing the flush with concurrent callers.
    pub async fn commit(&self) -> Result<(), StoreError> {
        Ok(self.group_commit.commit().await?)
    }

    /// The blocking form of [`Store::commit`], for callers outside the runtime.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    // ---- subscribers -------------------------------------------------------------------------

    pub fn subscriber(&self, contact: &Contact) -> Result<Option<Subscriber>, StoreError> {
        self.subscribers
            .get(contact.as_str())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// Adds `order` to the contact's followed orders, creating the subscriber if needed.
    pub fn subscribe(
        &self,
        contact: &Contact,
        order: &OrderNumber,
        confirmed: bool,
        now: DateTime<Utc>,
    ) -> Result<Subscriber, StoreError> {
        let subscriber =
            (&self.subscribers, &self.order_index).transaction(|(subscribers, index)| {
                let mut subscriber = match subscribers.get(contact.as_str())? {
                    Some(bytes) => decode::<Subscriber>(&bytes).map_err(abort)?,
                    None => Subscriber::new(contact.clone(), now),
                };
                subscriber.follow(order.clone(), confirmed, now);
                subscribers.insert(contact.as_str(), encode(&subscriber))?;
                index.insert(order_index_key(order, contact), &[])?;
                Ok(subscriber)
            })?;
        self.flush()?;
        Ok(subscriber)
    }

    /// Stops updates for one order, or for everything when `order` is `None`.
    pub fn unsubscribe(
        &self,
        contact: &Contact,
        order: Option<&OrderNumber>,
        now: DateTime<Utc>,
    ) -> Result<Subscriber, StoreError> {
        let subscriber =
            (&self.subscribers, &self.order_index).transaction(|(subscribers, index)| {
                let Some(bytes) = subscribers.get(contact.as_str())? else {
                    return Err(abort(StoreError::UnknownSubscriber(contact.to_string())));
                };
                let mut subscriber: Subscriber = decode(&bytes).map_err(abort)?;
                match order {
                    Some(order) => {
                        subscriber.orders.remove(order);
                        index.remove(order_index_key(order, contact))?;
                        if subscriber.orders.is_empty() {
                            subscriber.state = SubscriberState::Unsubscribed;
                        }
                    }
                    None => {
                        // Leaving means leaving every order: subscribing again later to one
                        // order must not bring the others back.
                        for followed in std::mem::take(&mut subscriber.orders) {
                            index.remove(order_index_key(&followed, contact))?;
                        }
                        subscriber.state = SubscriberState::Unsubscribed;
                    }
                }
                subscriber.updated_at = now;
                subscribers.insert(contact.as_str(), encode(&subscriber))?;
                Ok(subscriber)
            })?;
        self.flush()?;
        Ok(subscriber)
    }

    /// Up to `limit` subscribers after `cursor`, in key order, for streaming over all of them.
    pub fn subscribers_after(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Subscriber)>, StoreError> {
        let range = match cursor {
            Some(cursor) => self.subscribers.range::<&[u8], _>((
                std::ops::Bound::Excluded(cursor),
                std::ops::Bound::Unbounded,
            )),
            None => self.subscribers.iter(),
        };
        range
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                Ok((key.to_vec(), decode(&value)?))
            })
            .collect()
    }

    /// Up to `limit` followers of `orders` after `cursor`, walking the order index order by
    /// order. The cursor is the last index key returned; each call starts right after it.
    pub fn followers_after(
        &self,
        orders: &BTreeSet<OrderNumber>,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Subscriber)>, StoreError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let mut found = Vec::new();
        for order in orders {
            let prefix = order_index_prefix(order);
            // Index keys sort as (order, contact) because the separator is the lowest byte.
            let start = match cursor {
                Some(cursor) if cursor.starts_with(&prefix) => Excluded(cursor.to_vec()),
                Some(cursor) if cursor > prefix.as_slice() => continue,
                _ => Included(prefix.clone()),
            };
            for entry in self.order_index.range::<Vec<u8>, _>((start, Unbounded)) {
                let (key, _) = entry?;
                if !key.starts_with(&prefix) {
                    break;
                }
                let contact = &key[prefix.len()..];
                if let Some(bytes) = self.subscribers.get(contact)? {
                    found.push((key.to_vec(), decode(&bytes)?));
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
        }
        Ok(found)
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    // ---- incidents and updates ---------------------------------------------------------------

    pub fn incident(&self, id: Ulid) -> Result<Incident, StoreError> {
        let bytes = self
            .incidents
            .get(id.to_string())?
            .ok_or(StoreError::UnknownIncident(id))?;
        decode(&bytes)
    }

    pub fn update(&self, id: Ulid) -> Result<Update, StoreError> {
        let bytes = self
            .updates
            .get(id.to_string())?
            .ok_or(StoreError::UnknownUpdate(id))?;
        decode(&bytes)
    }

    pub fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        self.incidents
            .iter()
            .map(|entry| decode(&entry?.1))
            .collect()
    }

    /// Stores the update, opens or bumps its incident and starts its plan, all at once, then
    /// waits until that is on disk: the update id returned is a promise.
    pub async fn accept_update(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
    ) -> Result<Incident, StoreError> {
        let incident = (&self.incidents, &self.updates, &self.plans).transaction(
            |(incidents, updates, plans)| {
                let incident_key = update.incident.to_string();
                let mut incident = match (incidents.get(&incident_key)?, new_incident) {
                    (Some(bytes), _) => decode::<Incident>(&bytes).map_err(abort)?,
                    (None, Some(new)) => new.clone(),
                    (None, None) => {
                        return Err(abort(StoreError::UnknownIncident(update.incident)));
                    }
                };
                incident.state = update.state;
                incident.updated_at = update.created_at;
                incident.updates.push(update.id);
                incidents.insert(incident_key.as_bytes(), encode(&incident))?;
                updates.insert(update.id.to_string().as_bytes(), encode(update))?;
                plans.insert(
                    update.id.to_string().as_bytes(),
                    encode(&PlanState::default()),
                )?;
                Ok(incident)
            },
        )?;
        self.commit().await?;
        Ok(incident)
    }

    /// The most recent updates, newest first.
    pub fn recent_updates(&self, limit: usize) -> Result<Vec<Update>, StoreError> {
        self.updates
            .iter()
            .rev()
            .take(limit)
            .map(|entry| decode(&entry?.1))
            .collect()
    }
}
