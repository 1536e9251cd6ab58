//! The embedded sled backend: subscribers and their order index, incidents, updates, planning
//! cursors, the delivery outbox and its counters, each change that spans trees in one sled
//! transaction.
//!
//! Every call runs on the store's own thread (sled's reads may fault pages in, its flushes
//! wait for the disk), and every change returns once a flush it shares with the other changes
//! of the moment has put it on disk.

mod outbox;
mod thread;

use super::{
    Cursor, DeliveryFilter, FollowChange, Followed, FormRequest, IdempotentAnswer, Page, PlanState,
    Recorded, Store, StoreError, Subscribed, Subscription, apply_subscription,
};
use crate::config::StoreSettings;
use crate::delivery::{Counts, DeliveryKey, DeliveryRecord, Outcome};
use crate::domain::{Audience, Contact, FollowVia, Incident, OrderNumber, Subscriber, Update};
use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thread::{Done, Job, StoreThread};
use tokio::sync::watch;
use ulid::Ulid;

impl From<::sled::Error> for StoreError {
    fn from(error: ::sled::Error) -> Self {
        match error {
            ::sled::Error::Io(io) => io_error(io),
            // sled's own text carries a backtrace: say where, and only that.
            ::sled::Error::Corruption { at, .. } => StoreError::Corrupt(match at {
                Some(at) => format!("damaged data at {at}"),
                None => "damaged data".into(),
            }),
            other => StoreError::Unavailable {
                place: String::new(),
                reason: other.to_string(),
            },
        }
    }
}

/// An I/O failure, with what to do about the usual ones.
fn io_error(io: std::io::Error) -> StoreError {
    use std::io::ErrorKind::*;
    let reason = match io.kind() {
        PermissionDenied => {
            "permission denied: run crier as the user that owns the store's folder".to_owned()
        }
        StorageFull => {
            "the disk is full: free some space, then run `crier dispatch` to finish".to_owned()
        }
        ReadOnlyFilesystem => "the file system is read-only".to_owned(),
        _ => io.to_string(),
    };
    StoreError::Unavailable {
        place: String::new(),
        reason,
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(error: TransactionError<StoreError>) -> Self {
        match error {
            TransactionError::Abort(inner) => inner,
            TransactionError::Storage(inner) => inner.into(),
        }
    }
}

pub(crate) type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn abort(error: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(error)
}

/// Separates an order from a contact in the order index; neither can contain a NUL.
const INDEX_SEPARATOR: u8 = 0;

fn order_index_prefix(order: &OrderNumber) -> Vec<u8> {
    let mut key = order.as_str().as_bytes().to_vec();
    key.push(INDEX_SEPARATOR);
    key
}

fn order_index_key(order: &OrderNumber, contact: &Contact) -> Vec<u8> {
    let mut key = order_index_prefix(order);
    key.extend_from_slice(contact.as_str().as_bytes());
    key
}

/// The key, in the `meta` tree, of the watchdog's alert named `name`.
fn alert_key(name: &str) -> Vec<u8> {
    format!("alert:{name}").into_bytes()
}

/// The key of the subscriber counter in the `meta` tree.
const SUBSCRIBER_COUNT: &[u8] = b"subscriber_count";

/// The trees, which the blocking calls share.
pub(crate) struct Trees {
    db: ::sled::Db,
    subscribers: ::sled::Tree,
    order_index: ::sled::Tree,
    incidents: ::sled::Tree,
    updates: ::sled::Tree,
    plans: ::sled::Tree,
    deliveries: ::sled::Tree,
    outbox: ::sled::Tree,
    leases: ::sled::Tree,
    dead: ::sled::Tree,
    channel_state: ::sled::Tree,
    counts: ::sled::Tree,
    meta: ::sled::Tree,
    idempotent_answers: ::sled::Tree,
}

pub struct SledStore {
    path: PathBuf,
    thread: StoreThread,
    queue_changes: watch::Sender<u64>,
}

impl SledStore {
    pub async fn open(settings: &StoreSettings) -> Result<Self, StoreError> {
        let path = settings.path.clone();
        let cache = settings.cache_capacity_bytes;
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Self::open_trees(&path, cache))
                .await
                .map_err(|e| StoreError::Unavailable {
                    place: path_text(&settings.path),
                    reason: e.to_string(),
                })?
        };
        let trees = Arc::new(opened.map_err(|e| placed(e, &path))?);
        let thread = StoreThread::start(trees).map_err(|e| placed(e, &path))?;
        Ok(Self {
            path,
            thread,
            queue_changes: watch::Sender::new(0),
        })
    }

    fn open_trees(path: &Path, cache_capacity_bytes: u64) -> Result<Trees, StoreError> {
        let db = ::sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity_bytes)
            .open()
            .map_err(|e| match e {
                ::sled::Error::Io(ref io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    StoreError::Locked(path.to_owned())
                }
                other => other.into(),
            })?;
        restrict_permissions(path);
        let tree = |name: &str| db.open_tree(name);
        Ok(Trees {
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
            counts: tree("counts")?,
            meta: tree("meta")?,
            idempotent_answers: tree("idempotent_answers")?,
            db,
        })
    }

    /// Runs `work` on the store's thread and answers at once: a read, or a change nobody is
    /// told is durable (a lease).
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.thread.submit(Job::Run(Box::new(move |trees| {
            let result = work(trees);
            Done::Now(Box::new(move || {
                let _ = answer.send(result);
            }))
        })))?;
        self.answer(answered).await
    }

    /// Runs `work` on the store's thread, and answers once its writes are on disk.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.thread
            .submit(Job::Run(Box::new(move |trees| match work(trees) {
                Ok(value) => Done::AfterFlush(Box::new(move |flushed| {
                    let _ = answer.send(flushed.map(|()| value));
                })),
                Err(error) => Done::Now(Box::new(move || {
                    let _ = answer.send(Err(error));
                })),
            })))?;
        self.answer(answered).await
    }

    async fn answer<T>(
        &self,
        answered: tokio::sync::oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        answered
            .await
            .map_err(|_| StoreError::Unavailable {
                place: String::new(),
                reason: "the store's thread stopped".into(),
            })?
            .map_err(|e| placed(e, &self.path))
    }

    fn queue_changed(&self) {
        self.queue_changes
            .send_modify(|tick| *tick = tick.wrapping_add(1));
    }
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

/// Names the store's folder in an error that does not yet say where it happened.
fn placed(error: StoreError, path: &Path) -> StoreError {
    match error {
        StoreError::Unavailable { place, reason } if place.is_empty() => StoreError::Unavailable {
            place: path_text(path),
            reason,
        },
        other => other,
    }
}

/// Subscriber data (emails, phone numbers) is private: the store's folder and files are
/// readable by their owner only, whatever the umask.
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let restrict = |path: &Path, mode: u32| {
            if let Err(error) =
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            {
                tracing::warn!(path = %path.display(), %error, "cannot restrict permissions");
            }
        };
        restrict(path, 0o700);
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            let mode = if entry.path().is_dir() { 0o700 } else { 0o600 };
            restrict(&entry.path(), mode);
        }
    }
}

/// Runs `transaction` on all of `jobs` at once, or, if that fails, on each on its own, so
/// one job that cannot be done never fails the others. `transaction` gives one result per
/// job; one that gave another number would be a bug, answered as an error, never a panic.
pub(super) fn together_or_each<J, T>(
    jobs: &[J],
    transaction: impl Fn(&[J]) -> Result<Vec<T>, StoreError>,
) -> Vec<Result<T, StoreError>> {
    if jobs.len() > 1
        && let Ok(done) = transaction(jobs)
        && done.len() == jobs.len()
    {
        return done.into_iter().map(Ok).collect();
    }
    jobs.iter()
        .map(|one| {
            transaction(std::slice::from_ref(one))?
                .pop()
                .ok_or_else(|| StoreError::Corrupt("a store write gave no answer".into()))
        })
        .collect()
}

/// A form request (`POST /subscribe`) for the store's thread to decide and store.
pub(super) struct FormRequestJob {
    pub contact: Contact,
    pub order: OrderNumber,
    pub channel: String,
    pub now: DateTime<Utc>,
}

fn read_subscriber(
    subscribers: &TransactionalTree,
    contact: &Contact,
) -> TxResult<Option<Subscriber>> {
    subscribers
        .get(contact.as_str())?
        .map(|bytes| decode(&bytes).map_err(abort))
        .transpose()
}

/// Writes `after` in place of the contact's record (`before`, none if new), keeping the order
/// index in step with its follows.
fn write_subscriber(
    subscribers: &TransactionalTree,
    index: &TransactionalTree,
    before: Option<&Subscriber>,
    after: &Subscriber,
) -> TxResult<()> {
    let contact = &after.contact;
    subscribers.insert(contact.as_str(), encode(after).map_err(abort)?)?;
    if let Some(before) = before {
        for gone in before
            .follows
            .keys()
            .filter(|o| !after.follows.contains_key(*o))
        {
            index.remove(order_index_key(gone, contact))?;
        }
    }
    for order in after.follows.keys() {
        if before.is_none_or(|b| !b.follows.contains_key(order)) {
            index.insert(order_index_key(order, contact), &[])?;
        }
    }
    Ok(())
}

/// Applies `change` to the contact's record and writes it, counting a new subscriber.
fn change_follows(
    subscribers: &TransactionalTree,
    index: &TransactionalTree,
    meta: &TransactionalTree,
    contact: &Contact,
    change: &FollowChange,
    now: DateTime<Utc>,
) -> TxResult<Followed> {
    let existing = read_subscriber(subscribers, contact)?;
    let followed = change
        .apply(existing.clone(), contact, now)
        .map_err(abort)?;
    write_subscriber(subscribers, index, existing.as_ref(), &followed.subscriber)?;
    if followed.created {
        add_to_count(meta, 1)?;
    }
    Ok(followed)
}

/// Adds `created` new subscribers to the count kept in `meta`.
fn add_to_count(meta: &TransactionalTree, created: u64) -> TxResult<()> {
    let count: u64 = match meta.get(SUBSCRIBER_COUNT)? {
        Some(bytes) => decode(&bytes).map_err(abort)?,
        None => 0,
    };
    meta.insert(SUBSCRIBER_COUNT, encode(&(count + created)).map_err(abort)?)?;
    Ok(())
}

impl Trees {
    fn subscriber(&self, contact: &Contact) -> Result<Option<Subscriber>, StoreError> {
        self.subscribers
            .get(contact.as_str())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    fn change_follows(
        &self,
        contact: &Contact,
        change: &FollowChange,
        now: DateTime<Utc>,
    ) -> Result<Followed, StoreError> {
        let followed = (&self.subscribers, &self.order_index, &self.meta).transaction(
            |(subscribers, index, meta)| {
                change_follows(subscribers, index, meta, contact, change, now)
            },
        )?;
        Ok(followed)
    }

    /// Decides and stores form requests (`POST /subscribe`) that arrived together, in one
    /// transaction: each sled transaction writes log buffers of its own, and a surge of forms
    /// is many small ones. If any of them cannot be stored, each is stored on its own instead,
    /// so one bad record never fails the others.
    pub(super) fn request_subscriptions(
        &self,
        requests: &[FormRequestJob],
    ) -> Vec<Result<FormRequest, StoreError>> {
        together_or_each(requests, |some| self.form_request_transaction(some))
    }

    fn form_request_transaction(
        &self,
        requests: &[FormRequestJob],
    ) -> Result<Vec<FormRequest>, StoreError> {
        let decided = (&self.subscribers, &self.order_index, &self.meta).transaction(
            |(subscribers, index, meta)| {
                let mut decided = Vec::with_capacity(requests.len());
                for request in requests {
                    let contact = &request.contact;
                    let existing = read_subscriber(subscribers, contact)?;
                    let (answer, store) =
                        FormRequest::decide(existing.as_ref(), &request.order, &request.channel);
                    match (store, existing) {
                        (true, _) => {
                            let change = FollowChange::Follow {
                                order: request.order.clone(),
                                confirmed: false,
                                via: FollowVia::Form,
                            };
                            change_follows(
                                subscribers,
                                index,
                                meta,
                                contact,
                                &change,
                                request.now,
                            )?;
                        }
                        // Nothing changes, but the record is written again all the same: an
                        // answer that came sooner would tell that the contact is known.
                        (false, Some(existing)) => {
                            subscribers
                                .insert(contact.as_str(), encode(&existing).map_err(abort)?)?;
                        }
                        (false, None) => {}
                    }
                    decided.push(answer);
                }
                Ok(decided)
            },
        )?;
        Ok(decided)
    }

    fn subscribe_batch(
        &self,
        rows: &[Subscription],
        now: DateTime<Utc>,
    ) -> Result<Vec<Subscribed>, StoreError> {
        let outcomes = (&self.subscribers, &self.order_index, &self.meta).transaction(
            |(subscribers, index, meta)| {
                let mut created = 0u64;
                let mut outcomes = Vec::with_capacity(rows.len());
                for row in rows {
                    let key = row.contact.as_str();
                    let existing = match subscribers.get(key)? {
                        Some(bytes) => Some(decode::<Subscriber>(&bytes).map_err(abort)?),
                        None => None,
                    };
                    let (write, outcome) = apply_subscription(existing.clone(), row, now);
                    if let Some(subscriber) = write {
                        write_subscriber(subscribers, index, existing.as_ref(), &subscriber)?;
                    }
                    created += u64::from(outcome == Subscribed::Created);
                    outcomes.push(outcome);
                }
                if created > 0 {
                    add_to_count(meta, created)?;
                }
                Ok(outcomes)
            },
        )?;
        Ok(outcomes)
    }

    /// Every subscriber, in contact order, after the cursor (the last contact returned).
    fn everyone_after(
        &self,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let range = match after {
            Some(cursor) => self
                .subscribers
                .range::<&[u8], _>((Excluded(cursor.as_bytes()), Unbounded)),
            None => self.subscribers.iter(),
        };
        let mut items = Vec::new();
        let mut next = None;
        for entry in range.take(limit) {
            let (key, value) = entry?;
            items.push(decode(&value)?);
            next = Some(Cursor::from_bytes(key.to_vec()));
        }
        Ok(Page { items, next })
    }

    /// The followers of `orders`, walking the order index order by order. The cursor is the
    /// last index key returned; each call starts right after it.
    fn followers_after(
        &self,
        orders: &std::collections::BTreeSet<OrderNumber>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let mut items = Vec::new();
        let mut next = None;
        if limit == 0 {
            return Ok(Page { items, next });
        }
        let after = after.map(Cursor::as_bytes);
        for order in orders {
            let prefix = order_index_prefix(order);
            // Index keys sort as (order, contact) because the separator is the lowest byte.
            let start = match after {
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
                    items.push(decode(&bytes)?);
                    next = Some(Cursor::from_bytes(key.to_vec()));
                    if items.len() == limit {
                        return Ok(Page { items, next });
                    }
                }
            }
        }
        Ok(Page { items, next })
    }

    fn subscriber_count(&self) -> Result<u64, StoreError> {
        match self.meta.get(SUBSCRIBER_COUNT)? {
            Some(bytes) => decode(&bytes),
            None => Ok(0),
        }
    }

    fn incident(&self, id: Ulid) -> Result<Incident, StoreError> {
        let bytes = self
            .incidents
            .get(id.to_string())?
            .ok_or(StoreError::UnknownIncident(id))?;
        decode(&bytes)
    }

    fn update(&self, id: Ulid) -> Result<Update, StoreError> {
        let bytes = self
            .updates
            .get(id.to_string())?
            .ok_or(StoreError::UnknownUpdate(id))?;
        decode(&bytes)
    }

    fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        let mut incidents = self
            .incidents
            .iter()
            .map(|entry| decode(&entry?.1))
            .collect::<Result<Vec<Incident>, StoreError>>()?;
        incidents.sort_by_key(|incident| std::cmp::Reverse((incident.updated_at, incident.id)));
        Ok(incidents)
    }

    fn accept_update(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
    ) -> Result<Incident, StoreError> {
        match self.accept_update_remembering(update, new_incident, None)? {
            Ok(incident) => Ok(incident),
            // Without an answer to remember, no earlier one is looked for.
            Err(earlier) => Err(StoreError::Corrupt(format!(
                "an unasked-for idempotent answer under {}",
                earlier.key
            ))),
        }
    }

    /// Accepts the update and remembers `answer`, in one transaction; when an answer is
    /// already remembered under its key, accepts nothing and returns that answer.
    fn accept_update_remembering(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
        answer: Option<&IdempotentAnswer>,
    ) -> Result<Result<Incident, IdempotentAnswer>, StoreError> {
        let accepted = (
            &self.incidents,
            &self.updates,
            &self.plans,
            &self.idempotent_answers,
        )
            .transaction(|(incidents, updates, plans, answers)| {
                if let Some(answer) = answer {
                    if let Some(earlier) = answers.get(answer.key.as_bytes())? {
                        return Ok(Err(decode::<IdempotentAnswer>(&earlier).map_err(abort)?));
                    }
                    answers.insert(answer.key.as_bytes(), encode(answer).map_err(abort)?)?;
                }
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
                incidents.insert(incident_key.as_bytes(), encode(&incident).map_err(abort)?)?;
                updates.insert(
                    update.id.to_string().as_bytes(),
                    encode(update).map_err(abort)?,
                )?;
                plans.insert(
                    update.id.to_string().as_bytes(),
                    encode(&PlanState::default()).map_err(abort)?,
                )?;
                Ok(Ok(incident))
            })?;
        Ok(accepted)
    }

    fn idempotent_answer(&self, key: &str) -> Result<Option<IdempotentAnswer>, StoreError> {
        self.idempotent_answers
            .get(key.as_bytes())?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    fn recent_updates(&self, limit: usize) -> Result<Vec<Update>, StoreError> {
        // Update ids are ULIDs, which sort by creation time.
        self.updates
            .iter()
            .rev()
            .take(limit)
            .map(|entry| decode(&entry?.1))
            .collect()
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn subscriber(&self, contact: &Contact) -> Result<Option<Subscriber>, StoreError> {
        let contact = contact.clone();
        self.blocking(move |trees| trees.subscriber(&contact)).await
    }

    async fn subscribers(
        &self,
        contacts: &[Contact],
    ) -> Result<Vec<Option<Subscriber>>, StoreError> {
        let contacts = contacts.to_vec();
        self.blocking(move |trees| contacts.iter().map(|c| trees.subscriber(c)).collect())
            .await
    }

    async fn change_follows(
        &self,
        contact: &Contact,
        change: &FollowChange,
        now: DateTime<Utc>,
    ) -> Result<Followed, StoreError> {
        let (contact, change) = (contact.clone(), change.clone());
        self.write(move |trees| trees.change_follows(&contact, &change, now))
            .await
    }

    async fn request_subscription(
        &self,
        contact: &Contact,
        order: &OrderNumber,
        channel: &str,
        now: DateTime<Utc>,
    ) -> Result<FormRequest, StoreError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let request = FormRequestJob {
            contact: contact.clone(),
            order: order.clone(),
            channel: channel.to_owned(),
            now,
        };
        self.thread
            .submit(Job::FormRequest(Box::new((request, answer))))?;
        self.answer(answered).await
    }

    async fn subscribe_batch(
        &self,
        rows: &[Subscription],
        now: DateTime<Utc>,
    ) -> Result<Vec<Subscribed>, StoreError> {
        let rows = rows.to_vec();
        self.write(move |trees| trees.subscribe_batch(&rows, now))
            .await
    }

    async fn subscriber_page(
        &self,
        audience: &Audience,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError> {
        let (audience, after) = (audience.clone(), after.cloned());
        self.blocking(move |trees| match &audience {
            Audience::Everyone => trees.everyone_after(after.as_ref(), limit),
            Audience::Orders(orders) => trees.followers_after(orders, after.as_ref(), limit),
        })
        .await
    }

    async fn subscriber_count(&self) -> Result<u64, StoreError> {
        self.blocking(|trees| trees.subscriber_count()).await
    }

    async fn incident(&self, id: Ulid) -> Result<Incident, StoreError> {
        self.blocking(move |trees| trees.incident(id)).await
    }

    async fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        self.blocking(|trees| trees.incidents()).await
    }

    async fn update(&self, id: Ulid) -> Result<Update, StoreError> {
        self.blocking(move |trees| trees.update(id)).await
    }

    async fn recent_updates(&self, limit: usize) -> Result<Vec<Update>, StoreError> {
        self.blocking(move |trees| trees.recent_updates(limit))
            .await
    }

    async fn accept_update(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
    ) -> Result<Incident, StoreError> {
        let (update, new_incident) = (update.clone(), new_incident.cloned());
        self.write(move |trees| trees.accept_update(&update, new_incident.as_ref()))
            .await
    }

    async fn accept_update_once(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
        answer: &IdempotentAnswer,
    ) -> Result<Option<IdempotentAnswer>, StoreError> {
        let (update, new_incident, answer) =
            (update.clone(), new_incident.cloned(), answer.clone());
        self.write(move |trees| {
            trees
                .accept_update_remembering(&update, new_incident.as_ref(), Some(&answer))
                .map(Result::err)
        })
        .await
    }

    async fn idempotent_answer(&self, key: &str) -> Result<Option<IdempotentAnswer>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |trees| trees.idempotent_answer(&key))
            .await
    }

    async fn plan_state(&self, update: Ulid) -> Result<PlanState, StoreError> {
        self.blocking(move |trees| trees.plan_state(update)).await
    }

    async fn unfinished_plans(&self) -> Result<Vec<Ulid>, StoreError> {
        self.blocking(|trees| trees.unfinished_plans()).await
    }

    async fn enqueue_planned(
        &self,
        update: Ulid,
        records: &[DeliveryRecord],
        state: &PlanState,
    ) -> Result<usize, StoreError> {
        let (records, state) = (records.to_vec(), state.clone());
        let added = self
            .write(move |trees| trees.enqueue_planned(update, &records, &state))
            .await?;
        if added > 0 {
            self.queue_changed();
        }
        Ok(added)
    }

    async fn next_due(&self, channel: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let channel = channel.to_owned();
        self.blocking(move |trees| trees.next_due(&channel)).await
    }

    async fn lease_due(
        &self,
        channel: &str,
        owner: &str,
        max: usize,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        // A lease is not an acknowledgement to anyone: if it is lost in a crash, the delivery
        // simply was never leased. So leasing does not wait for the disk.
        let request = outbox::LeaseRequest {
            channel: channel.to_owned(),
            owner: owner.to_owned(),
            max,
            lease,
            now,
        };
        self.blocking(move |trees| {
            let mut leased = trees.lease_many(std::slice::from_ref(&request))?;
            Ok(leased.pop().unwrap_or_default())
        })
        .await
    }

    async fn record_outcome(
        &self,
        leased: &DeliveryRecord,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<Recorded, StoreError> {
        let requeued = matches!(outcome, Outcome::Retry { .. });
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.thread
            .submit(Job::Outcome(Box::new(thread::OutcomeJob {
                leased: leased.clone(),
                outcome: outcome.clone(),
                now,
                answer,
            })))?;
        let recorded = self.answer(answered).await?;
        if requeued && recorded.applied {
            self.queue_changed();
        }
        Ok(recorded)
    }

    async fn give_back(
        &self,
        leased: &[DeliveryRecord],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let leased = leased.to_vec();
        let given = self
            .blocking(move |trees| trees.give_back(&leased, now))
            .await?;
        if given > 0 {
            self.queue_changed();
        }
        Ok(given)
    }

    async fn requeue_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let moved = self
            .write(move |trees| trees.requeue_leases(now, None))
            .await?;
        if moved > 0 {
            self.queue_changed();
        }
        Ok(moved)
    }

    async fn recover_orphaned(&self, owner: &str, now: DateTime<Utc>) -> Result<usize, StoreError> {
        // sled lets one process open the store, so a lease another owner holds is a dead
        // process's.
        let owner = owner.to_owned();
        let moved = self
            .write(move |trees| trees.requeue_leases(now, Some(&owner)))
            .await?;
        if moved > 0 {
            self.queue_changed();
        }
        Ok(moved)
    }

    async fn requeue_dead(
        &self,
        update: Option<Ulid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let requeued = self
            .write(move |trees| trees.requeue_dead(update, now))
            .await?;
        if !requeued.is_empty() {
            self.queue_changed();
        }
        Ok(requeued)
    }

    async fn delivery(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        let key = key.clone();
        self.blocking(move |trees| trees.delivery(&key)).await
    }

    async fn record_report(
        &self,
        key: &DeliveryKey,
        provider_id: Option<&str>,
        report: &crate::delivery::ProviderReport,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let (key, provider_id, report) =
            (key.clone(), provider_id.map(str::to_owned), report.clone());
        self.write(move |trees| trees.record_report(&key, provider_id.as_deref(), &report))
            .await
    }

    async fn deliveries(
        &self,
        update: Ulid,
        filter: DeliveryFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<DeliveryRecord>, StoreError> {
        let after = after.cloned();
        self.blocking(move |trees| trees.deliveries(update, filter, after.as_ref(), limit))
            .await
    }

    async fn prune_settled(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.write(move |trees| trees.prune_settled(before, limit))
            .await
    }

    async fn counts(&self, update: Option<Ulid>) -> Result<BTreeMap<String, Counts>, StoreError> {
        self.blocking(move |trees| trees.counts(update)).await
    }

    async fn channel_disabled(&self, channel: &str) -> Result<Option<String>, StoreError> {
        let channel = channel.to_owned();
        self.blocking(move |trees| trees.channel_disabled(&channel))
            .await
    }

    async fn enable_channel(&self, channel: &str) -> Result<bool, StoreError> {
        let channel = channel.to_owned();
        self.write(move |trees| trees.enable_channel(&channel))
            .await
    }

    async fn alert_sent(&self, key: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let key = alert_key(key);
        self.blocking(move |trees| {
            trees
                .meta
                .get(&key)?
                .map(|bytes| decode(&bytes))
                .transpose()
        })
        .await
    }

    async fn record_alert(&self, key: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let key = alert_key(key);
        self.write(move |trees| {
            trees.meta.insert(key, encode(&at)?)?;
            Ok(())
        })
        .await
    }

    fn queue_changes(&self) -> watch::Receiver<u64> {
        self.queue_changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderPattern, SubscriberState};
    use chrono::TimeZone;

    fn request(raw: &str, number: &str) -> FormRequestJob {
        let pattern = OrderPattern::new(r"[A-Z]{2}-\d{4}").unwrap();
        FormRequestJob {
            contact: Contact::parse(raw).unwrap(),
            order: OrderNumber::parse(number, &pattern).unwrap(),
            channel: "email".into(),
            now: Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0).unwrap(),
        }
    }

    #[test]
    fn form_requests_decided_together_see_each_other_and_one_bad_record_fails_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let trees = SledStore::open_trees(&dir.path().join("store"), 8 << 20).unwrap();
        // A record that is not a subscriber: deciding its request fails, and with it the
        // shared transaction, so each request is then decided on its own.
        trees
            .subscribers
            .insert("bad@example.com", &b"not json"[..])
            .unwrap();
        let requests = [
            request("ann@example.com", "AB-1001"),
            request("bad@example.com", "AB-1001"),
            request("ann@example.com", "AB-1002"),
            request("bob@example.com", "AB-1001"),
        ];
        let decided = trees.request_subscriptions(&requests);
        assert_eq!(decided.len(), 4);
        assert!(matches!(decided[0], Ok(FormRequest::AskToConfirm)));
        assert!(
            matches!(decided[1], Err(StoreError::Corrupt(_))),
            "{:?}",
            decided[1]
        );
        assert!(matches!(decided[2], Ok(FormRequest::AskToConfirm)));
        assert!(matches!(decided[3], Ok(FormRequest::AskToConfirm)));
        let ann = trees
            .subscriber(&requests[0].contact)
            .unwrap()
            .expect("ann is stored");
        assert_eq!(ann.state(), SubscriberState::Pending);
        assert_eq!(ann.orders().len(), 2, "the second request saw the first");
        assert!(trees.subscriber(&requests[3].contact).unwrap().is_some());
        let count: u64 = decode(&trees.meta.get(SUBSCRIBER_COUNT).unwrap().unwrap()).unwrap();
        assert_eq!(count, 2, "ann once, and bob");

        // Without a bad record, one transaction decides them all, in order.
        let more = [
            request("cat@example.com", "AB-1001"),
            request("cat@example.com", "AB-1001"),
            request("dan@example.com", "AB-1003"),
        ];
        let decided = trees.request_subscriptions(&more);
        assert!(
            decided
                .iter()
                .all(|d| matches!(d, Ok(FormRequest::AskToConfirm)))
        );
        let count: u64 = decode(&trees.meta.get(SUBSCRIBER_COUNT).unwrap().unwrap()).unwrap();
        assert_eq!(count, 4, "cat once, and dan");
        let cat_follows = trees
            .order_index
            .scan_prefix(order_index_key(&more[0].order, &more[0].contact))
            .count();
        assert_eq!(cat_follows, 1, "the order index holds cat once");
    }
}
