//! The PostgreSQL store: the same records and rules as the sled backend, in a database that
//! several `crier serve` nodes share. Each node leases deliveries with `FOR UPDATE SKIP
//! LOCKED`, so no two take the same one and none waits on another; every change is one
//! transaction, durable when it returns; and `LISTEN`/`NOTIFY` tells every node at once when
//! work was queued or an update accepted.
//!
//! Records are kept whole as JSON beside the columns searched and ordered by (see
//! `migrations/postgres/`, run at start-up). Read-modify-write changes lock their rows first,
//! always in key order, so two nodes never deadlock; counters are spread over shards, so
//! concurrent writers do not queue on one row.

mod copy;
mod listen;
#[cfg(test)]
pub(crate) mod test_server;

use super::{
    Cursor, DeliveryFilter, FollowChange, Followed, FormRequest, IdempotentAnswer, Page, PlanClaim,
    PlanState, Recorded, Slots, Store, StoreError, Subscribed, Subscription, apply_report,
    apply_subscription,
};
use crate::clock;
use crate::config::{PostgresSettings, Rate};
use crate::delivery::{
    Counts, DeliveryKey, DeliveryRecord, DeliveryState, FailureKind, Outcome, ProviderReport,
};
use crate::domain::{Audience, Contact, FollowVia, Incident, OrderNumber, Subscriber, Update};
use chrono::{DateTime, SecondsFormat, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use secrecy::ExposeSecret;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::NoTls;
use tokio_postgres::types::{Json, ToSql};
use ulid::Ulid;

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// How many transactions recording outcomes may run at once; each takes every outcome that
/// arrived meanwhile (up to [`OUTCOME_BATCH`]).
const OUTCOME_RECORDERS: usize = 4;
const OUTCOME_BATCH: usize = 256;

/// Counters and delivery counts are spread over this many rows each.
const COUNTER_SHARDS: i16 = 16;

/// Serializes the migrations of nodes starting together (an arbitrary, fixed key).
const MIGRATION_LOCK: i64 = 0x0063_7269_6572_6d69;

/// The channels `NOTIFY` speaks on.
const QUEUE_CHANNEL: &str = "crier_queue";
const UPDATES_CHANNEL: &str = "crier_updates";

/// How long a request waits for a connection, and a connection for the server, before the
/// store answers that it cannot be used.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub use copy::Copied;

pub struct PostgresStore {
    db: Database,
    /// Outcomes on their way to the recorders, which record those that arrive together in
    /// one transaction.
    outcomes: mpsc::UnboundedSender<OutcomeRequest>,
    queue_changes: watch::Sender<u64>,
    update_changes: watch::Sender<u64>,
    /// Hears the other nodes' `NOTIFY`s; stops with the store.
    listener: Option<StopOnDrop>,
}

/// The pool and the database's name in messages: what every transaction needs.
#[derive(Clone)]
struct Database {
    /// How to connect, for the connections outside the pool (listening, plan claims).
    config: tokio_postgres::Config,
    pool: Pool,
    /// The database as messages name it: host, port and name, never the password.
    place: String,
}

struct StopOnDrop(tokio::task::JoinHandle<()>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type PgError = tokio_postgres::Error;

/// A delivery row's state as the table spells it (serde's name for it).
fn state_name(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Queued => "queued",
        DeliveryState::InFlight => "in_flight",
        DeliveryState::Sent => "sent",
        DeliveryState::Retrying => "retrying",
        DeliveryState::Dead => "dead",
        DeliveryState::Skipped => "skipped",
    }
}

fn state_slot(state: DeliveryState) -> usize {
    match state {
        DeliveryState::Queued => 0,
        DeliveryState::InFlight => 1,
        DeliveryState::Sent => 2,
        DeliveryState::Retrying => 3,
        DeliveryState::Dead => 4,
        DeliveryState::Skipped => 5,
    }
}

/// How far under the configured rate a shared rate keeps, in thousandths. Between taking a
/// slot and the request reaching the provider, scheduling and the network move requests by
/// milliseconds; two slots drawn together by that must still fit the provider's window.
const SHARED_RATE_HEADROOM_PER_MILLE: u128 = 20;

/// The time between two slots of a shared rate, in nanoseconds.
fn slot_interval(rate: &Rate) -> i64 {
    let nanos = rate.period.as_nanos() * (1000 + SHARED_RATE_HEADROOM_PER_MILLE)
        / (1000 * u128::from(rate.count.max(1)));
    i64::try_from(nanos).unwrap_or(i64::MAX).max(1)
}

/// A count as SQL's `LIMIT` takes it (`usize::MAX` means no limit, not -1).
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The advisory lock that claims an update's planning: its id's low 64 bits (random).
fn plan_lock(update: Ulid) -> i64 {
    u128::from(update) as u64 as i64
}

/// A time as the tables compare it: nanoseconds since 1970, saturating at what an `i64`
/// holds (an absurdly long lease ends in 2262, which is as good as never).
fn nanos(time: DateTime<Utc>) -> i64 {
    time.timestamp_nanos_opt()
        .unwrap_or(if time.timestamp() < 0 {
            i64::MIN
        } else {
            i64::MAX
        })
}

fn exact_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("a stored time {text:?}: {e}")))
}

fn foreign_cursor() -> StoreError {
    StoreError::Corrupt("a cursor this store did not make".into())
}

fn cursor_text(cursor: &Cursor) -> Result<&str, StoreError> {
    std::str::from_utf8(cursor.as_bytes()).map_err(|_| foreign_cursor())
}

/// Separates the order from the contact in a follower cursor, as the other backends do.
const CURSOR_SEPARATOR: u8 = 0;

fn follower_cursor(order: &str, contact: &str) -> Cursor {
    let mut bytes = order.as_bytes().to_vec();
    bytes.push(CURSOR_SEPARATOR);
    bytes.extend_from_slice(contact.as_bytes());
    Cursor::from_bytes(bytes)
}

fn parse_follower_cursor(cursor: &Cursor) -> Result<(&str, &str), StoreError> {
    let bytes = cursor.as_bytes();
    let split = bytes
        .iter()
        .position(|&b| b == CURSOR_SEPARATOR)
        .ok_or_else(foreign_cursor)?;
    let order = std::str::from_utf8(&bytes[..split]).map_err(|_| foreign_cursor())?;
    let contact = std::str::from_utf8(&bytes[split + 1..]).map_err(|_| foreign_cursor())?;
    Ok((order, contact))
}

/// One column of a row. A row the store cannot read (its schema changed by hand, or by
/// another version of crier) is an error, never a panic.
fn field<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|e| StoreError::Corrupt(format!("column {index}: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(
    row: &tokio_postgres::Row,
    column: &str,
) -> Result<T, StoreError> {
    row.try_get::<_, Json<T>>(column)
        .map(|Json(value)| value)
        .map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

/// Deliveries moved between states in one transaction, per (update, channel).
#[derive(Default)]
struct CountMoves(BTreeMap<(String, String), [i64; 6]>);

impl CountMoves {
    fn moved(&mut self, record: &DeliveryRecord, from: Option<DeliveryState>) {
        let slots = self
            .0
            .entry((record.update.to_string(), record.channel.clone()))
            .or_default();
        if let Some(from) = from {
            slots[state_slot(from)] -= 1;
        }
        slots[state_slot(record.state)] += 1;
    }
}

/// A changed delivery, as the `deliveries` table holds it.
struct DeliveryRow<'a> {
    record: &'a DeliveryRecord,
}

impl DeliveryRow<'_> {
    fn lease_until(&self) -> Option<i64> {
        match self.record.state {
            DeliveryState::InFlight => self.record.lease_until.map(nanos),
            _ => None,
        }
    }
}

/// Every changed subscriber of a transaction: the orders of its follows before (none when it
/// is new), and its record after.
struct SubscriberWrite {
    before: BTreeSet<OrderNumber>,
    after: Subscriber,
}

/// What a change sees of the subscribers it locked.
struct Locked {
    /// By contact; `None` for one that did not exist before the transaction (its row holds
    /// a placeholder until the change writes it).
    existing: HashMap<String, Option<Subscriber>>,
}

impl PostgresStore {
    /// Connects, runs the migrations the database has not seen yet, and starts listening for
    /// other nodes' changes.
    pub async fn open(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config =
            settings
                .url
                .expose_secret()
                .parse()
                .map_err(|e| StoreError::Unavailable {
                    place: format!("the connection string in {}", settings.variable),
                    reason: format!("it is not a PostgreSQL connection string: {e}"),
                })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("crier");
        }
        let host_with_at = config.get_hosts().iter().any(
            |host| matches!(host, tokio_postgres::config::Host::Tcp(name) if name.contains('@')),
        );
        if host_with_at {
            // An unescaped '@' in the password splits the string at the wrong place, and the
            // rest of the password would be shown as the host.
            return Err(StoreError::Unavailable {
                place: format!("the connection string in {}", settings.variable),
                reason: "its host contains '@': write an '@' in the user or password as %40".into(),
            });
        }
        let place = describe(&config);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable {
                place: place.clone(),
                reason: e.to_string(),
            })?;
        let db = Database {
            config: config.clone(),
            pool,
            place: place.clone(),
        };
        let (outcomes, to_record) = mpsc::unbounded_channel();
        let to_record = Arc::new(tokio::sync::Mutex::new(to_record));
        for _ in 0..OUTCOME_RECORDERS {
            tokio::spawn(record_outcomes(db.clone(), to_record.clone()));
        }
        let mut store = Self {
            db,
            outcomes,
            queue_changes: watch::Sender::new(0),
            update_changes: watch::Sender::new(0),
            listener: None,
        };
        store.migrate().await?;
        store.listener = Some(StopOnDrop(listen::spawn(
            config,
            place,
            &[
                (QUEUE_CHANNEL, store.queue_changes.clone()),
                (UPDATES_CHANNEL, store.update_changes.clone()),
            ],
        )));
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let db = &self.db;
        let mut client = db.client().await?;
        let client: &mut tokio_postgres::Client = &mut client;
        // Nodes started together would otherwise race to create the history table.
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| db.failed(e))?;
        let migrated = embedded::migrations::runner()
            .set_abort_divergent(true)
            .run_async(client)
            .await;
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        migrated.map_err(|e| StoreError::Unavailable {
            place: db.place.clone(),
            reason: format!("its schema cannot be brought up to date: {e}"),
        })?;
        unlocked.map_err(|e| db.failed(e))?;
        Ok(())
    }

    async fn transaction<T>(
        &self,
        work: impl AsyncFnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.db.transaction(work).await
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.db.query(sql, params).await
    }

    /// The `record` column of the first row `sql` finds, if any.
    async fn one_record<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        let rows = self.query(sql, params).await?;
        rows.first().map(|row| decode(row, "record")).transpose()
    }

    /// The `record` column of every row `sql` finds, in its order.
    async fn records<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        let rows = self.query(sql, params).await?;
        rows.iter().map(|row| decode(row, "record")).collect()
    }

    /// Ticks this node's watchers at once (the others hear the `NOTIFY`).
    fn queued_here(&self) {
        self.queue_changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Database {
    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Unavailable {
            place: self.place.clone(),
            reason: match e {
                deadpool_postgres::PoolError::Backend(e) => reason(&e),
                deadpool_postgres::PoolError::Timeout(_) => {
                    "no connection within 5 seconds: is PostgreSQL running and reachable?".into()
                }
                other => other.to_string(),
            },
        })
    }

    /// Names this database in an error a statement helper raised without knowing it.
    fn placed(&self, error: StoreError) -> StoreError {
        match error {
            StoreError::Unavailable { reason, .. } => StoreError::Unavailable {
                place: self.place.clone(),
                reason,
            },
            StoreError::Refused { reason, .. } => StoreError::Refused {
                place: self.place.clone(),
                reason,
            },
            other => other,
        }
    }

    fn failed(&self, error: PgError) -> StoreError {
        self.placed(classify(&error))
    }

    /// Runs `work` in one transaction and commits it: the change is durable on return.
    async fn transaction<T>(
        &self,
        work: impl AsyncFnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.failed(e))?;
        let result = work(&tx).await.map_err(|e| self.placed(e))?;
        tx.commit().await.map_err(|e| self.failed(e))?;
        Ok(result)
    }

    /// Runs one statement outside a transaction.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.failed(e))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| self.failed(e))
    }
}

/// "PostgreSQL at host:port/database", without the user or password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().unwrap_or("(the user's database)");
    format!("PostgreSQL at {host}:{port}/{database}")
}

/// A driver error in words: the server's own message when it sent one.
fn reason(error: &PgError) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None if error.is_closed() => "the connection to the database was lost".into(),
        None => {
            // The driver's own words are general ("error connecting to server"); the cause
            // says which ("Connection refused").
            let mut words = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(inner) = cause {
                words.push_str(": ");
                words.push_str(&inner.to_string());
                cause = inner.source();
            }
            words
        }
    }
}

/// Runs one statement in a transaction, mapping a failure to what the store reports.
async fn run(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let statement = tx.prepare_cached(sql).await.map_err(unavailable)?;
    tx.query(&statement, params).await.map_err(unavailable)
}

async fn exec(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let statement = tx.prepare_cached(sql).await.map_err(unavailable)?;
    tx.execute(&statement, params).await.map_err(unavailable)
}

fn unavailable(error: PgError) -> StoreError {
    classify(&error)
}

/// Whether waiting cures a driver error: a lost or refused connection, a server shutting
/// down or out of resources, a deadlock or serialization failure (the next try succeeds).
/// Anything else is the change itself being refused. The place is filled in by the caller.
fn classify(error: &PgError) -> StoreError {
    let transient = match error.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            ["08", "53", "57", "58", "40"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        None => true,
    };
    let place = "PostgreSQL".to_owned();
    let reason = reason(error);
    if transient {
        StoreError::Unavailable { place, reason }
    } else {
        StoreError::Refused { place, reason }
    }
}

fn shard() -> i16 {
    rand::random_range(0..COUNTER_SHARDS)
}

async fn add_to_counter(tx: &Transaction<'_>, name: &str, by: i64) -> Result<(), StoreError> {
    if by == 0 {
        return Ok(());
    }
    exec(
        tx,
        "INSERT INTO counters (name, shard, value) VALUES ($1, $2, $3)
         ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + EXCLUDED.value",
        &[&name, &shard(), &by],
    )
    .await?;
    Ok(())
}

async fn write_counts(tx: &Transaction<'_>, moves: CountMoves) -> Result<(), StoreError> {
    let moves: Vec<_> = moves
        .0
        .into_iter()
        .filter(|(_, slots)| slots.iter().any(|&n| n != 0))
        .collect();
    if moves.is_empty() {
        return Ok(());
    }
    let updates: Vec<&str> = moves.iter().map(|((u, _), _)| u.as_str()).collect();
    let channels: Vec<&str> = moves.iter().map(|((_, c), _)| c.as_str()).collect();
    let slot = |i: usize| -> Vec<i64> { moves.iter().map(|(_, slots)| slots[i]).collect() };
    let shard = shard();
    exec(
        tx,
        "INSERT INTO delivery_counts
             (update_id, channel, shard, queued, in_flight, sent, retrying, dead, skipped)
         SELECT u, c, $3, q, f, s, r, d, k
         FROM unnest($1::text[], $2::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[],
                     $8::int8[], $9::int8[]) AS v(u, c, q, f, s, r, d, k)
         ON CONFLICT (update_id, channel, shard) DO UPDATE SET
             queued = delivery_counts.queued + EXCLUDED.queued,
             in_flight = delivery_counts.in_flight + EXCLUDED.in_flight,
             sent = delivery_counts.sent + EXCLUDED.sent,
             retrying = delivery_counts.retrying + EXCLUDED.retrying,
             dead = delivery_counts.dead + EXCLUDED.dead,
             skipped = delivery_counts.skipped + EXCLUDED.skipped",
        &[
            &updates,
            &channels,
            &shard,
            &slot(0),
            &slot(1),
            &slot(2),
            &slot(3),
            &slot(4),
            &slot(5),
        ],
    )
    .await?;
    Ok(())
}

/// Writes changed deliveries back, in key order (the order their rows were locked in).
async fn write_deliveries(
    tx: &Transaction<'_>,
    records: &[&DeliveryRecord],
) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let rows: Vec<DeliveryRow> = records
        .iter()
        .map(|record| DeliveryRow { record })
        .collect();
    let keys: Vec<String> = rows
        .iter()
        .map(|row| row.record.key().as_str().to_owned())
        .collect();
    let states: Vec<&str> = rows
        .iter()
        .map(|row| state_name(row.record.state))
        .collect();
    let due: Vec<i64> = rows.iter().map(|row| nanos(row.record.due_at)).collect();
    let leases: Vec<Option<i64>> = rows.iter().map(DeliveryRow::lease_until).collect();
    let bodies: Vec<Json<&DeliveryRecord>> = rows.iter().map(|row| Json(row.record)).collect();
    exec(
        tx,
        "UPDATE deliveries d SET state = v.state, due_ns = v.due_ns,
             lease_until_ns = v.lease_until_ns, record = v.record
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::jsonb[])
             AS v(key, state, due_ns, lease_until_ns, record)
         WHERE d.key = v.key",
        &[&keys, &states, &due, &leases, &bodies],
    )
    .await?;
    Ok(())
}

/// Inserts new deliveries, skipping any already planned; returns those inserted.
async fn insert_deliveries<'r>(
    tx: &Transaction<'_>,
    records: &'r [DeliveryRecord],
) -> Result<Vec<&'r DeliveryRecord>, StoreError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = records
        .iter()
        .map(|record| record.key().as_str().to_owned())
        .collect();
    let updates: Vec<String> = records.iter().map(|r| r.update.to_string()).collect();
    let channels: Vec<&str> = records.iter().map(|r| r.channel.as_str()).collect();
    let states: Vec<&str> = records.iter().map(|r| state_name(r.state)).collect();
    let due: Vec<i64> = records.iter().map(|r| nanos(r.due_at)).collect();
    let leases: Vec<Option<i64>> = records
        .iter()
        .map(|record| DeliveryRow { record }.lease_until())
        .collect();
    let bodies: Vec<Json<&DeliveryRecord>> = records.iter().map(Json).collect();
    let inserted = run(
        tx,
        "INSERT INTO deliveries (key, update_id, channel, state, due_ns, lease_until_ns, record)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[],
                              $6::int8[], $7::jsonb[])
         ON CONFLICT (key) DO NOTHING
         RETURNING key",
        &[&keys, &updates, &channels, &states, &due, &leases, &bodies],
    )
    .await?;
    // A planning page may hold one delivery twice (a subscriber following two targeted
    // orders): the row went in once, so it counts once, as the first record.
    let mut inserted: BTreeSet<String> = inserted
        .iter()
        .map(|row| field(row, 0))
        .collect::<Result<_, _>>()?;
    Ok(records
        .iter()
        .zip(&keys)
        .filter(|(_, key)| inserted.remove(*key))
        .map(|(record, _)| record)
        .collect())
}

/// Locks the deliveries with these keys, in key order, and reads them.
async fn lock_deliveries(
    tx: &Transaction<'_>,
    keys: &[String],
) -> Result<BTreeMap<String, DeliveryRecord>, StoreError> {
    let rows = run(
        tx,
        "SELECT key, record FROM deliveries WHERE key = ANY($1) ORDER BY key FOR UPDATE",
        &[&keys],
    )
    .await?;
    rows.iter()
        .map(|row| Ok((field(row, 0)?, decode(row, "record")?)))
        .collect()
}

/// Locks the subscribers with these contacts, in contact order. With `create_at`, a contact
/// not stored yet gets a row first (ready for the change to fill in), so a change never races
/// another node's creation of the same contact.
async fn lock_subscribers(
    tx: &Transaction<'_>,
    contacts: &[&Contact],
    create_at: Option<DateTime<Utc>>,
) -> Result<Locked, StoreError> {
    let mut by_key: BTreeMap<String, &Contact> = BTreeMap::new();
    for contact in contacts {
        by_key.insert(contact.as_str().to_owned(), contact);
    }
    let keys: Vec<&str> = by_key.keys().map(String::as_str).collect();
    let mut created = BTreeSet::<String>::new();
    if let Some(now) = create_at {
        let placeholders: Vec<Json<Subscriber>> = by_key
            .values()
            .map(|contact| Json(Subscriber::new((*contact).clone(), now)))
            .collect();
        let rows = run(
            tx,
            "INSERT INTO subscribers (contact, record)
             SELECT * FROM unnest($1::text[], $2::jsonb[])
             ON CONFLICT (contact) DO NOTHING
             RETURNING contact",
            &[&keys, &placeholders],
        )
        .await?;
        created = rows
            .iter()
            .map(|row| field(row, 0))
            .collect::<Result<_, _>>()?;
        add_to_counter(tx, "subscribers", created.len() as i64).await?;
    }
    let rows = run(
        tx,
        "SELECT contact, record FROM subscribers WHERE contact = ANY($1)
         ORDER BY contact FOR UPDATE",
        &[&keys],
    )
    .await?;
    let mut existing: HashMap<String, Option<Subscriber>> =
        keys.iter().map(|key| ((*key).to_owned(), None)).collect();
    for row in &rows {
        let contact: String = field(row, 0)?;
        if !created.contains(&contact) {
            existing.insert(contact, Some(decode(row, "record")?));
        }
    }
    Ok(Locked { existing })
}

/// Writes changed subscribers and keeps the followers table in step with their follows.
async fn write_subscribers(
    tx: &Transaction<'_>,
    writes: &[SubscriberWrite],
) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    let contacts: Vec<&str> = writes.iter().map(|w| w.after.contact.as_str()).collect();
    let bodies: Vec<Json<&Subscriber>> = writes.iter().map(|w| Json(&w.after)).collect();
    exec(
        tx,
        "UPDATE subscribers s SET record = v.record
         FROM unnest($1::text[], $2::jsonb[]) AS v(contact, record)
         WHERE s.contact = v.contact",
        &[&contacts, &bodies],
    )
    .await?;
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for write in writes {
        let contact = write.after.contact.as_str();
        let after = &write.after.follows;
        for order in after.keys().filter(|o| !write.before.contains(*o)) {
            added.push((order.as_str(), contact));
        }
        for order in write.before.iter().filter(|o| !after.contains_key(*o)) {
            removed.push((order.as_str(), contact));
        }
    }
    added.sort_unstable();
    removed.sort_unstable();
    if !added.is_empty() {
        let (orders, contacts): (Vec<&str>, Vec<&str>) = added.into_iter().unzip();
        exec(
            tx,
            "INSERT INTO followers (order_number, contact)
             SELECT * FROM unnest($1::text[], $2::text[])
             ON CONFLICT DO NOTHING",
            &[&orders, &contacts],
        )
        .await?;
    }
    if !removed.is_empty() {
        let (orders, contacts): (Vec<&str>, Vec<&str>) = removed.into_iter().unzip();
        exec(
            tx,
            "DELETE FROM followers f USING unnest($1::text[], $2::text[]) AS v(o, c)
             WHERE f.order_number = v.o AND f.contact = v.c",
            &[&orders, &contacts],
        )
        .await?;
    }
    Ok(())
}

/// Writes one subscriber changed in place (its follows as they were).
fn rewrite(subscriber: Subscriber, before: Option<&Subscriber>) -> SubscriberWrite {
    SubscriberWrite {
        before: before
            .map(|s| s.follows.keys().cloned().collect())
            .unwrap_or_default(),
        after: subscriber,
    }
}

async fn notify(tx: &Transaction<'_>, channel: &str) -> Result<(), StoreError> {
    exec(tx, "SELECT pg_notify($1, '')", &[&channel]).await?;
    Ok(())
}

/// Puts back in the queue the leases `pick` selects, locked and skipping any another node
/// is working on.
async fn requeue_where(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let rows = run(tx, sql, params).await?;
    let mut records: Vec<DeliveryRecord> = rows
        .iter()
        .map(|row| decode(row, "record"))
        .collect::<Result<_, _>>()?;
    let mut moves = CountMoves::default();
    for record in &mut records {
        let from = record.state;
        record.release(now);
        moves.moved(record, Some(from));
    }
    let refs: Vec<&DeliveryRecord> = records.iter().collect();
    write_deliveries(tx, &refs).await?;
    write_counts(tx, moves).await?;
    if !records.is_empty() {
        notify(tx, QUEUE_CHANNEL).await?;
    }
    Ok(records.len())
}

impl PostgresStore {
    /// Locks, changes and writes back the subscribers with these contacts, in one
    /// transaction; `change` sees each as it was (none if new) and says what to write.
    async fn change_subscribers<T>(
        &self,
        contacts: &[&Contact],
        create_at: Option<DateTime<Utc>>,
        change: impl FnOnce(&mut Locked) -> Result<(T, Vec<SubscriberWrite>), StoreError>,
    ) -> Result<T, StoreError> {
        self.transaction(async |tx| {
            let mut locked = lock_subscribers(tx, contacts, create_at).await?;
            let (result, writes) = change(&mut locked)?;
            write_subscribers(tx, &writes).await?;
            Ok(result)
        })
        .await
    }

    async fn accept(
        &self,
        tx: &Transaction<'_>,
        update: &Update,
        new_incident: Option<&Incident>,
    ) -> Result<Incident, StoreError> {
        let id = update.incident.to_string();
        if let Some(new) = new_incident.filter(|new| new.id == update.incident) {
            exec(
                tx,
                "INSERT INTO incidents (id, updated_ns, record) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO NOTHING",
                &[&id, &nanos(new.updated_at), &Json(new)],
            )
            .await?;
        }
        let rows = run(
            tx,
            "SELECT record FROM incidents WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
        let Some(row) = rows.first() else {
            return Err(StoreError::UnknownIncident(update.incident));
        };
        let mut incident: Incident = decode(row, "record")?;
        incident.state = update.state;
        incident.updated_at = update.created_at;
        incident.updates.push(update.id);
        exec(
            tx,
            "UPDATE incidents SET updated_ns = $2, record = $3 WHERE id = $1",
            &[&id, &nanos(incident.updated_at), &Json(&incident)],
        )
        .await?;
        let update_id = update.id.to_string();
        exec(
            tx,
            "INSERT INTO updates (id, created_ns, record) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET created_ns = EXCLUDED.created_ns,
                                            record = EXCLUDED.record",
            &[&update_id, &nanos(update.created_at), &Json(update)],
        )
        .await?;
        exec(
            tx,
            "INSERT INTO plans (update_id, done, record) VALUES ($1, false, $2)
             ON CONFLICT (update_id) DO UPDATE SET done = false, record = EXCLUDED.record",
            &[&update_id, &Json(PlanState::default())],
        )
        .await?;
        notify(tx, UPDATES_CHANNEL).await?;
        Ok(incident)
    }
}

/// What recording a batch of outcomes changes besides the deliveries, gathered first and
/// applied after, each kind of row locked in key order (incidents, then subscribers, then
/// channels), so concurrent batches on any nodes take their locks in one order.
#[derive(Default)]
struct SideEffects {
    /// A receipt's thread, kept on the incident of the delivery's update: (update, channel,
    /// thread).
    threads: Vec<(Ulid, String, serde_json::Value)>,
    /// A `RecipientGone` failure stops the contact on the channel.
    stops: Vec<(Contact, String, DateTime<Utc>)>,
    /// An `EndpointGone` failure disables the channel: (since, reason).
    disables: BTreeMap<String, (DateTime<Utc>, String)>,
}

impl SideEffects {
    async fn apply(self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        keep_threads(tx, &self.threads).await?;
        stop_contacts(tx, &self.stops).await?;
        for (channel, (since, reason)) in &self.disables {
            exec(
                tx,
                "INSERT INTO disabled_channels (channel, since, reason) VALUES ($1, $2, $3)
                 ON CONFLICT (channel) DO UPDATE SET since = EXCLUDED.since,
                                                     reason = EXCLUDED.reason",
                &[channel, &exact_time(*since), reason],
            )
            .await?;
        }
        Ok(())
    }
}

/// Stores the remote threads receipts named on the incidents of their updates.
async fn keep_threads(
    tx: &Transaction<'_>,
    threads: &[(Ulid, String, serde_json::Value)],
) -> Result<(), StoreError> {
    if threads.is_empty() {
        return Ok(());
    }
    let updates: Vec<String> = threads.iter().map(|(u, _, _)| u.to_string()).collect();
    let rows = run(
        tx,
        "SELECT id, record->>'incident' FROM updates WHERE id = ANY($1)",
        &[&updates],
    )
    .await?;
    let incident_of: HashMap<String, String> = rows
        .iter()
        .map(|row| {
            Ok((
                field(row, 0)?,
                field::<Option<String>>(row, 1)?.unwrap_or_default(),
            ))
        })
        .collect::<Result<_, StoreError>>()?;
    let mut ids: Vec<&str> = incident_of.values().map(String::as_str).collect();
    ids.sort_unstable();
    ids.dedup();
    let rows = run(
        tx,
        "SELECT id, record FROM incidents WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&ids],
    )
    .await?;
    let mut incidents: BTreeMap<String, Incident> = BTreeMap::new();
    for row in &rows {
        incidents.insert(field(row, 0)?, decode(row, "record")?);
    }
    for (update, channel, thread) in threads {
        let incident = incident_of
            .get(&update.to_string())
            .and_then(|id| incidents.get_mut(id));
        match incident {
            Some(incident) => {
                incident
                    .remote_threads
                    .insert(channel.clone(), thread.clone());
            }
            None => tracing::warn!(
                %update,
                channel,
                "the receipt names a thread, but the delivery's update has no incident to keep it on"
            ),
        }
    }
    for (id, incident) in &incidents {
        exec(
            tx,
            "UPDATE incidents SET record = $2 WHERE id = $1",
            &[id, &Json(incident)],
        )
        .await?;
    }
    Ok(())
}

/// Stops contacts on channels, as `RecipientGone` failures say.
async fn stop_contacts(
    tx: &Transaction<'_>,
    stops: &[(Contact, String, DateTime<Utc>)],
) -> Result<(), StoreError> {
    if stops.is_empty() {
        return Ok(());
    }
    let contacts: Vec<&Contact> = stops.iter().map(|(contact, _, _)| contact).collect();
    let locked = lock_subscribers(tx, &contacts, None).await?;
    let mut changed: BTreeMap<String, (Subscriber, Subscriber)> = BTreeMap::new();
    for (contact, channel, now) in stops {
        let key = contact.as_str();
        let entry = match changed.get_mut(key) {
            Some(entry) => entry,
            None => {
                let Some(Some(before)) = locked.existing.get(key) else {
                    continue;
                };
                changed
                    .entry(key.to_owned())
                    .or_insert_with(|| (before.clone(), before.clone()))
            }
        };
        entry.1.stopped_on.insert(channel.clone());
        entry.1.updated_at = *now;
    }
    let writes: Vec<SubscriberWrite> = changed
        .into_values()
        .map(|(before, after)| rewrite(after, Some(&before)))
        .collect();
    write_subscribers(tx, &writes).await
}

impl PostgresStore {
    async fn followers_page(
        &self,
        orders: &BTreeSet<OrderNumber>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError> {
        let (order, contact) = match after {
            Some(cursor) => parse_follower_cursor(cursor)?,
            None => ("", ""),
        };
        let orders: Vec<&str> = orders.iter().map(OrderNumber::as_str).collect();
        let rows = self
            .query(
                "SELECT f.order_number, s.record FROM followers f
                 JOIN subscribers s ON s.contact = f.contact
                 WHERE f.order_number = ANY($1) AND (f.order_number, f.contact) > ($2, $3)
                 ORDER BY f.order_number, f.contact LIMIT $4",
                &[&orders, &order, &contact, &sql_limit(limit)],
            )
            .await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut next = None;
        for row in &rows {
            let subscriber: Subscriber = decode(row, "record")?;
            next = Some(follower_cursor(field(row, 0)?, subscriber.contact.as_str()));
            items.push(subscriber);
        }
        Ok(Page { items, next })
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    // ---- subscribers ----------------------------------------------------------------------

    async fn subscriber(&self, contact: &Contact) -> Result<Option<Subscriber>, StoreError> {
        self.one_record(
            "SELECT record FROM subscribers WHERE contact = $1",
            &[&contact.as_str()],
        )
        .await
    }

    async fn subscribers(
        &self,
        contacts: &[Contact],
    ) -> Result<Vec<Option<Subscriber>>, StoreError> {
        let keys: Vec<&str> = contacts.iter().map(Contact::as_str).collect();
        let rows = self
            .query(
                "SELECT contact, record FROM subscribers WHERE contact = ANY($1)",
                &[&keys],
            )
            .await?;
        let mut found: HashMap<String, Subscriber> = HashMap::with_capacity(rows.len());
        for row in &rows {
            found.insert(field(row, 0)?, decode(row, "record")?);
        }
        Ok(keys.iter().map(|key| found.get(*key).cloned()).collect())
    }

    async fn change_follows(
        &self,
        contact: &Contact,
        change: &FollowChange,
        now: DateTime<Utc>,
    ) -> Result<Followed, StoreError> {
        let create_at = change.creates().then_some(now);
        self.change_subscribers(&[contact], create_at, |locked| {
            let before = locked.existing.remove(contact.as_str()).flatten();
            let followed = change.apply(before.clone(), contact, now)?;
            let write = rewrite(followed.subscriber.clone(), before.as_ref());
            Ok((followed, vec![write]))
        })
        .await
    }

    async fn request_subscription(
        &self,
        contact: &Contact,
        order: &OrderNumber,
        channel: &str,
        now: DateTime<Utc>,
    ) -> Result<FormRequest, StoreError> {
        self.change_subscribers(&[contact], Some(now), |locked| {
            let before = locked.existing.remove(contact.as_str()).flatten();
            let (request, store) = FormRequest::decide(before.as_ref(), order, channel);
            let after = if store {
                let change = FollowChange::Follow {
                    order: order.clone(),
                    confirmed: false,
                    via: FollowVia::Form,
                };
                change.apply(before.clone(), contact, now)?.subscriber
            } else {
                before
                    .clone()
                    .unwrap_or_else(|| Subscriber::new(contact.clone(), now))
            };
            // Written whatever was decided, so the answer takes as long either way.
            Ok((request, vec![rewrite(after, before.as_ref())]))
        })
        .await
    }

    async fn subscribe_batch(
        &self,
        rows: &[Subscription],
        now: DateTime<Utc>,
    ) -> Result<Vec<Subscribed>, StoreError> {
        let contacts: Vec<&Contact> = rows.iter().map(|row| &row.contact).collect();
        self.change_subscribers(&contacts, Some(now), |locked| {
            // Rows apply in order, so a contact twice in the batch sees its first row's change.
            let mut current: HashMap<String, Option<Subscriber>> =
                std::mem::take(&mut locked.existing);
            let before: HashMap<String, Option<Subscriber>> = current.clone();
            let mut changed = BTreeSet::new();
            let outcomes = rows
                .iter()
                .map(|row| {
                    let key = row.contact.as_str();
                    let existing = current.get(key).cloned().flatten();
                    let (write, outcome) = apply_subscription(existing, row, now);
                    if let Some(subscriber) = write {
                        current.insert(key.to_owned(), Some(subscriber));
                        changed.insert(key.to_owned());
                    }
                    outcome
                })
                .collect();
            let writes = changed
                .into_iter()
                .filter_map(|key| {
                    let after = current.remove(&key).flatten()?;
                    Some(rewrite(after, before.get(&key).and_then(Option::as_ref)))
                })
                .collect();
            Ok((outcomes, writes))
        })
        .await
    }

    async fn subscriber_page(
        &self,
        audience: &Audience,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<Subscriber>, StoreError> {
        if limit == 0 {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        match audience {
            Audience::Orders(orders) => self.followers_page(orders, after, limit).await,
            Audience::Everyone => {
                let after = after.map(cursor_text).transpose()?;
                let rows = self
                    .query(
                        "SELECT contact, record FROM subscribers
                         WHERE $1::text IS NULL OR contact > $1
                         ORDER BY contact LIMIT $2",
                        &[&after, &sql_limit(limit)],
                    )
                    .await?;
                let mut items = Vec::with_capacity(rows.len());
                let mut next = None;
                for row in &rows {
                    next = Some(Cursor::from_bytes(field::<String>(row, 0)?.into_bytes()));
                    items.push(decode(row, "record")?);
                }
                Ok(Page { items, next })
            }
        }
    }

    async fn subscriber_count(&self) -> Result<u64, StoreError> {
        let rows = self
            .query(
                "SELECT coalesce(sum(value), 0)::int8 FROM counters WHERE name = 'subscribers'",
                &[],
            )
            .await?;
        let count: i64 = rows
            .first()
            .map(|row| field(row, 0))
            .transpose()?
            .unwrap_or(0);
        Ok(count.max(0) as u64)
    }

    // ---- incidents and updates ------------------------------------------------------------

    async fn incident(&self, id: Ulid) -> Result<Incident, StoreError> {
        self.one_record(
            "SELECT record FROM incidents WHERE id = $1",
            &[&id.to_string()],
        )
        .await?
        .ok_or(StoreError::UnknownIncident(id))
    }

    async fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        self.records(
            "SELECT record FROM incidents ORDER BY updated_ns DESC, id DESC",
            &[],
        )
        .await
    }

    async fn update(&self, id: Ulid) -> Result<Update, StoreError> {
        self.one_record(
            "SELECT record FROM updates WHERE id = $1",
            &[&id.to_string()],
        )
        .await?
        .ok_or(StoreError::UnknownUpdate(id))
    }

    async fn recent_updates(&self, limit: usize) -> Result<Vec<Update>, StoreError> {
        self.records(
            "SELECT record FROM updates ORDER BY id DESC LIMIT $1",
            &[&sql_limit(limit)],
        )
        .await
    }

    async fn accept_update(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
    ) -> Result<Incident, StoreError> {
        self.transaction(async |tx| self.accept(tx, update, new_incident).await)
            .await
    }

    async fn accept_update_once(
        &self,
        update: &Update,
        new_incident: Option<&Incident>,
        answer: &IdempotentAnswer,
    ) -> Result<Option<IdempotentAnswer>, StoreError> {
        self.transaction(async |tx| {
            // A second request with the key waits here for the first to commit, then finds
            // its answer.
            let inserted = exec(
                tx,
                "INSERT INTO idempotent_answers (key, record) VALUES ($1, $2)
                 ON CONFLICT (key) DO NOTHING",
                &[&answer.key, &Json(answer)],
            )
            .await?;
            if inserted == 0 {
                let rows = run(
                    tx,
                    "SELECT record FROM idempotent_answers WHERE key = $1",
                    &[&answer.key],
                )
                .await?;
                return rows.first().map(|row| decode(row, "record")).transpose();
            }
            self.accept(tx, update, new_incident).await?;
            Ok(None)
        })
        .await
    }

    async fn idempotent_answer(&self, key: &str) -> Result<Option<IdempotentAnswer>, StoreError> {
        self.one_record(
            "SELECT record FROM idempotent_answers WHERE key = $1",
            &[&key],
        )
        .await
    }

    // ---- planning -------------------------------------------------------------------------

    async fn plan_state(&self, update: Ulid) -> Result<PlanState, StoreError> {
        self.one_record(
            "SELECT record FROM plans WHERE update_id = $1",
            &[&update.to_string()],
        )
        .await?
        .ok_or(StoreError::UnknownUpdate(update))
    }

    async fn unfinished_plans(&self) -> Result<Vec<Ulid>, StoreError> {
        let rows = self
            .query(
                "SELECT update_id FROM plans WHERE NOT done ORDER BY update_id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = field(row, 0)?;
                id.parse()
                    .map_err(|e| StoreError::Corrupt(format!("a plan's update id {id:?}: {e}")))
            })
            .collect()
    }

    async fn enqueue_planned(
        &self,
        update: Ulid,
        records: &[DeliveryRecord],
        state: &PlanState,
    ) -> Result<usize, StoreError> {
        let added = self
            .transaction(async |tx| {
                let inserted = insert_deliveries(tx, records).await?;
                let mut moves = CountMoves::default();
                for record in &inserted {
                    moves.moved(record, None);
                }
                write_counts(tx, moves).await?;
                exec(
                    tx,
                    "INSERT INTO plans (update_id, done, record) VALUES ($1, $2, $3)
                     ON CONFLICT (update_id) DO UPDATE SET done = EXCLUDED.done,
                                                           record = EXCLUDED.record",
                    &[&update.to_string(), &state.done, &Json(state)],
                )
                .await?;
                if inserted.iter().any(|record| !record.state.is_settled()) {
                    notify(tx, QUEUE_CHANNEL).await?;
                }
                Ok(inserted.len())
            })
            .await?;
        if added > 0 {
            self.queued_here();
        }
        Ok(added)
    }

    // ---- the outbox -----------------------------------------------------------------------

    async fn next_due(&self, channel: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let rows = self
            .query(
                "SELECT record FROM deliveries
                 WHERE channel = $1 AND state IN ('queued', 'retrying')
                 ORDER BY due_ns, key LIMIT 1",
                &[&channel],
            )
            .await?;
        Ok(rows
            .first()
            .map(|row| decode::<DeliveryRecord>(row, "record"))
            .transpose()?
            .map(|record| record.due_at))
    }

    async fn lease_due(
        &self,
        channel: &str,
        owner: &str,
        max: usize,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let lease_until = clock::after(now, lease);
        self.transaction(async |tx| {
            // Rows another node has locked are skipped, not waited for: it is leasing them.
            let rows = run(
                tx,
                "SELECT record FROM deliveries
                 WHERE channel = $1 AND state IN ('queued', 'retrying') AND due_ns <= $2
                 ORDER BY due_ns, key LIMIT $3
                 FOR UPDATE SKIP LOCKED",
                &[&channel, &nanos(now), &sql_limit(max)],
            )
            .await?;
            let mut leased: Vec<DeliveryRecord> = rows
                .iter()
                .map(|row| decode(row, "record"))
                .collect::<Result<_, _>>()?;
            let mut moves = CountMoves::default();
            for record in &mut leased {
                let from = record.state;
                record.lease(owner, lease_until);
                moves.moved(record, Some(from));
            }
            let refs: Vec<&DeliveryRecord> = leased.iter().collect();
            write_deliveries(tx, &refs).await?;
            write_counts(tx, moves).await?;
            Ok(leased)
        })
        .await
    }

    async fn record_outcome(
        &self,
        leased: &DeliveryRecord,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<Recorded, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = OutcomeRequest {
            leased: leased.clone(),
            outcome: outcome.clone(),
            now,
            reply,
        };
        let gone = || StoreError::Unavailable {
            place: self.db.place.clone(),
            reason: "the outcome recorders stopped".into(),
        };
        self.outcomes.send(request).map_err(|_| gone())?;
        let recorded = answer.await.map_err(|_| gone())??;
        if recorded.applied
            && matches!(
                recorded.record.state,
                DeliveryState::Queued | DeliveryState::Retrying
            )
        {
            self.queued_here();
        }
        Ok(recorded)
    }

    async fn give_back(
        &self,
        leased: &[DeliveryRecord],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let keys: Vec<String> = leased
            .iter()
            .map(|record| record.key().as_str().to_owned())
            .collect();
        let given = self
            .transaction(async |tx| {
                let mut locked = lock_deliveries(tx, &keys).await?;
                let mut moves = CountMoves::default();
                let mut changed = Vec::new();
                for lease in leased {
                    let Some(mut record) = locked.remove(lease.key().as_str()) else {
                        continue;
                    };
                    if record.state != DeliveryState::InFlight || record.leases != lease.leases {
                        continue;
                    }
                    let from = record.state;
                    record.give_back(now);
                    moves.moved(&record, Some(from));
                    changed.push(record);
                }
                changed.sort_by(|a, b| a.key().as_str().cmp(b.key().as_str()));
                let refs: Vec<&DeliveryRecord> = changed.iter().collect();
                write_deliveries(tx, &refs).await?;
                write_counts(tx, moves).await?;
                if !changed.is_empty() {
                    notify(tx, QUEUE_CHANNEL).await?;
                }
                Ok(changed.len())
            })
            .await?;
        if given > 0 {
            self.queued_here();
        }
        Ok(given)
    }

    async fn requeue_expired(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let requeued = self
            .transaction(async |tx| {
                requeue_where(
                    tx,
                    "SELECT record FROM deliveries
                     WHERE state = 'in_flight' AND lease_until_ns <= $1
                     ORDER BY key FOR UPDATE SKIP LOCKED",
                    &[&nanos(now)],
                    now,
                )
                .await
            })
            .await?;
        if requeued > 0 {
            self.queued_here();
        }
        Ok(requeued)
    }

    async fn recover_orphaned(
        &self,
        _owner: &str,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        // Other nodes share this store, so a lease another owner holds may be live: only an
        // expired one is known to be orphaned.
        self.requeue_expired(now).await
    }

    async fn requeue_dead(
        &self,
        update: Option<Ulid>,
        now: DateTime<Utc>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let update = update.map(|id| id.to_string());
        let requeued = self
            .transaction(async |tx| {
                let rows = run(
                    tx,
                    "SELECT record FROM deliveries
                     WHERE state = 'dead' AND ($1::text IS NULL OR update_id = $1)
                     ORDER BY key FOR UPDATE",
                    &[&update],
                )
                .await?;
                let mut records: Vec<DeliveryRecord> = rows
                    .iter()
                    .map(|row| decode(row, "record"))
                    .collect::<Result<_, _>>()?;
                let mut moves = CountMoves::default();
                for record in &mut records {
                    let from = record.state;
                    record.revive(now);
                    moves.moved(record, Some(from));
                }
                let refs: Vec<&DeliveryRecord> = records.iter().collect();
                write_deliveries(tx, &refs).await?;
                write_counts(tx, moves).await?;
                if !records.is_empty() {
                    notify(tx, QUEUE_CHANNEL).await?;
                }
                Ok(records)
            })
            .await?;
        if !requeued.is_empty() {
            self.queued_here();
        }
        Ok(requeued)
    }

    async fn delivery(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        self.one_record(
            "SELECT record FROM deliveries WHERE key = $1",
            &[&key.as_str()],
        )
        .await
    }

    async fn record_report(
        &self,
        key: &DeliveryKey,
        provider_id: Option<&str>,
        report: &ProviderReport,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let key = key.as_str().to_owned();
        self.transaction(async |tx| {
            let mut locked = lock_deliveries(tx, std::slice::from_ref(&key)).await?;
            let Some(mut record) = locked.remove(&key) else {
                return Ok(None);
            };
            let contact = record.recipient.contact().cloned();
            let mut subscribers = match &contact {
                Some(contact) => lock_subscribers(tx, &[contact], None).await?.existing,
                None => HashMap::new(),
            };
            let before = contact
                .as_ref()
                .and_then(|contact| subscribers.remove(contact.as_str()))
                .flatten();
            let mut after = before.clone();
            if !apply_report(&mut record, after.as_mut(), provider_id, report) {
                return Ok(None);
            }
            write_deliveries(tx, &[&record]).await?;
            if let Some(after) = after {
                write_subscribers(tx, &[rewrite(after, before.as_ref())]).await?;
            }
            Ok(Some(record))
        })
        .await
    }

    async fn deliveries(
        &self,
        update: Ulid,
        filter: DeliveryFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<DeliveryRecord>, StoreError> {
        let after = after.map(cursor_text).transpose()?.unwrap_or("");
        let failed_only = filter == DeliveryFilter::Failed;
        let rows = self
            .query(
                "SELECT key, record FROM deliveries
                 WHERE update_id = $1 AND key > $2
                   AND (NOT $3 OR state IN ('dead', 'retrying'))
                 ORDER BY key LIMIT $4",
                &[&update.to_string(), &after, &failed_only, &sql_limit(limit)],
            )
            .await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut next = None;
        for row in &rows {
            next = Some(Cursor::from_bytes(field::<String>(row, 0)?.into_bytes()));
            items.push(decode(row, "record")?);
        }
        Ok(Page { items, next })
    }

    async fn prune_settled(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let rows = self
            .query(
                "WITH old AS (
                     SELECT d.key FROM deliveries d JOIN updates u ON u.id = d.update_id
                     WHERE u.created_ns < $1 AND d.state IN ('sent', 'skipped')
                     ORDER BY d.update_id, d.key LIMIT $2
                     FOR UPDATE OF d SKIP LOCKED
                 )
                 DELETE FROM deliveries WHERE key IN (SELECT key FROM old) RETURNING key",
                &[&nanos(before), &sql_limit(limit)],
            )
            .await?;
        Ok(rows.len())
    }

    async fn counts(&self, update: Option<Ulid>) -> Result<BTreeMap<String, Counts>, StoreError> {
        let update = update.map(|id| id.to_string());
        let rows = self
            .query(
                "SELECT channel, sum(queued)::int8, sum(in_flight)::int8, sum(sent)::int8,
                        sum(retrying)::int8, sum(dead)::int8, sum(skipped)::int8
                 FROM delivery_counts WHERE $1::text IS NULL OR update_id = $1
                 GROUP BY channel",
                &[&update],
            )
            .await?;
        let count = |row: &tokio_postgres::Row, column: usize| {
            field::<i64>(row, column).map(|n| n.max(0) as u64)
        };
        rows.iter()
            .map(|row| {
                let counts = Counts {
                    queued: count(row, 1)?,
                    in_flight: count(row, 2)?,
                    sent: count(row, 3)?,
                    retrying: count(row, 4)?,
                    dead: count(row, 5)?,
                    skipped: count(row, 6)?,
                };
                Ok((field(row, 0)?, counts))
            })
            .collect()
    }

    // ---- channels -------------------------------------------------------------------------

    async fn channel_disabled(&self, channel: &str) -> Result<Option<String>, StoreError> {
        let rows = self
            .query(
                "SELECT since, reason FROM disabled_channels WHERE channel = $1",
                &[&channel],
            )
            .await?;
        rows.first()
            .map(|row| {
                let since = parse_time(field(row, 0)?)?;
                let reason: String = field(row, 1)?;
                Ok(format!("disabled since {}: {reason}", since.to_rfc3339()))
            })
            .transpose()
    }

    async fn enable_channel(&self, channel: &str) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "DELETE FROM disabled_channels WHERE channel = $1 RETURNING channel",
                &[&channel],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn alert_sent(&self, key: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let rows = self
            .query("SELECT sent_at FROM alerts WHERE key = $1", &[&key])
            .await?;
        rows.first()
            .map(|row| parse_time(field(row, 0)?))
            .transpose()
    }

    async fn record_alert(&self, key: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.query(
            "INSERT INTO alerts (key, sent_at) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET sent_at = EXCLUDED.sent_at",
            &[&key, &exact_time(at)],
        )
        .await?;
        Ok(())
    }

    async fn take_slots(&self, channel: &str, rate: &Rate, want: u32) -> Result<Slots, StoreError> {
        if want == 0 {
            return Ok(Slots {
                granted: 0,
                wait: Duration::ZERO,
            });
        }
        let interval = slot_interval(rate);
        let burst = i64::from(rate.burst());
        self.transaction(async |tx| {
            // The row is locked until the commit: nodes take slots one after another.
            let rows = run(
                tx,
                "INSERT INTO rate_slots (channel, tat_ns) VALUES ($1, 0)
                 ON CONFLICT (channel) DO UPDATE SET channel = EXCLUDED.channel
                 RETURNING tat_ns,
                           (extract(epoch FROM clock_timestamp()) * 1000000)::int8 * 1000",
                &[&channel],
            )
            .await?;
            let row = rows
                .first()
                .ok_or_else(|| StoreError::Corrupt("a rate slot row vanished".into()))?;
            let (tat, now): (i64, i64) = (field(row, 0)?, field(row, 1)?);
            let tat = tat.max(now);
            let room = now
                .saturating_add(burst.saturating_mul(interval))
                .saturating_sub(tat);
            let granted = (room / interval).clamp(0, i64::from(want));
            if granted == 0 {
                let frees_at = tat.saturating_sub((burst - 1).saturating_mul(interval));
                let wait = u64::try_from(frees_at.saturating_sub(now))
                    .unwrap_or(0)
                    .max(1);
                return Ok(Slots {
                    granted: 0,
                    wait: Duration::from_nanos(wait),
                });
            }
            exec(
                tx,
                "UPDATE rate_slots SET tat_ns = $2 WHERE channel = $1",
                &[
                    &channel,
                    &tat.saturating_add(granted.saturating_mul(interval)),
                ],
            )
            .await?;
            Ok(Slots {
                granted: u32::try_from(granted).unwrap_or(want),
                wait: Duration::ZERO,
            })
        })
        .await
    }

    async fn claim_plan(&self, update: Ulid) -> Result<Option<PlanClaim>, StoreError> {
        // A session lock on a connection of the claim's own: it ends with the connection, so
        // a node that dies (or loses the database) lets go of its plans by itself.
        let (client, connection) = self
            .db
            .config
            .connect(NoTls)
            .await
            .map_err(|e| self.db.failed(e))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        // The claim lasts as long as the server believes the session alive: with keepalives,
        // a machine that vanishes (power, network) lets go within about 30 s, not hours.
        client
            .batch_execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5;
                 SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000;",
            )
            .await
            .map_err(|e| self.db.failed(e))?;
        let lock = plan_lock(update);
        let rows = client
            .query("SELECT pg_try_advisory_lock($1)", &[&lock])
            .await
            .map_err(|e| self.db.failed(e))?;
        let granted = rows
            .first()
            .map(|row| field::<bool>(row, 0))
            .transpose()?
            .unwrap_or(false);
        if !granted {
            driver.abort();
            return Ok(None);
        }
        Ok(Some(PlanClaim::holding((client, StopOnDrop(driver)))))
    }

    fn queue_changes(&self) -> watch::Receiver<u64> {
        self.queue_changes.subscribe()
    }

    fn shared(&self) -> bool {
        true
    }

    fn update_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.update_changes.subscribe())
    }
}

/// One attempt's outcome, waiting to be recorded, and who waits for the answer.
struct OutcomeRequest {
    leased: DeliveryRecord,
    outcome: Outcome,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<Recorded, StoreError>>,
}

/// A recorder: takes every outcome waiting (one at least), records them in one transaction,
/// and answers each once it is committed. Outcomes that arrive while a transaction runs wait
/// for the next, so under load many share one commit instead of a round trip each.
async fn record_outcomes(
    db: Database,
    waiting: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<OutcomeRequest>>>,
) {
    loop {
        let batch = {
            let mut waiting = waiting.lock().await;
            let Some(first) = waiting.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < OUTCOME_BATCH {
                match waiting.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            batch
        };
        let requests: Vec<(&DeliveryRecord, &Outcome, DateTime<Utc>)> = batch
            .iter()
            .map(|request| (&request.leased, &request.outcome, request.now))
            .collect();
        match db
            .transaction(async |tx| record_batch(tx, &requests).await)
            .await
        {
            Ok(answers) => {
                for (request, answer) in batch.into_iter().zip(answers) {
                    let _ = request.reply.send(answer);
                }
            }
            // One outcome the database refuses (or a deadlock) must not fail the others that
            // shared its transaction: each is tried again on its own.
            Err(_) if batch.len() > 1 => {
                for request in batch {
                    let one = [(&request.leased, &request.outcome, request.now)];
                    let answer = db
                        .transaction(async |tx| record_batch(tx, &one).await)
                        .await
                        .and_then(|mut answers| {
                            answers.pop().unwrap_or_else(|| {
                                Err(StoreError::Corrupt("an outcome went unanswered".into()))
                            })
                        });
                    let _ = request.reply.send(answer);
                }
            }
            Err(error) => {
                for request in batch {
                    let _ = request.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Records outcomes in one transaction, each fenced by its lease: an attempt whose lease was
/// taken over only gets its say if it succeeded, and nothing reopens a sent delivery. Returns
/// each outcome's answer, in order.
async fn record_batch(
    tx: &Transaction<'_>,
    requests: &[(&DeliveryRecord, &Outcome, DateTime<Utc>)],
) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
    let mut keys: Vec<String> = requests
        .iter()
        .map(|(leased, _, _)| leased.key().as_str().to_owned())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    // Read afresh: if a lease expired meanwhile, the record went back to the queue (or to
    // another attempt), and that must be undone on success, or it would be sent again.
    let mut records = lock_deliveries(tx, &keys).await?;
    let mut moves = CountMoves::default();
    let mut changed = BTreeSet::new();
    let mut answers = Vec::with_capacity(requests.len());
    let (mut queued, mut broadcast_settled) = (false, false);
    let mut effects = SideEffects::default();
    for (leased, outcome, now) in requests {
        let key = leased.key().as_str().to_owned();
        let Some(record) = records.get_mut(&key) else {
            answers.push(Err(StoreError::Corrupt(format!("delivery {key} vanished"))));
            continue;
        };
        let superseded = record.leases != leased.leases || record.state.is_settled();
        let succeeded = matches!(outcome, Outcome::Sent { .. });
        if record.state == DeliveryState::Sent || (superseded && !succeeded) {
            answers.push(Ok(Recorded {
                record: record.clone(),
                applied: false,
            }));
            continue;
        }
        let from = record.state;
        record.apply(outcome, *now);
        moves.moved(record, Some(from));
        changed.insert(key);
        match outcome {
            Outcome::Sent { receipt } => {
                if let Some(thread) = &receipt.thread {
                    effects
                        .threads
                        .push((record.update, record.channel.clone(), thread.clone()));
                }
            }
            Outcome::Dead { failure } => match failure.kind {
                FailureKind::RecipientGone => {
                    if let Some(contact) = record.recipient.contact() {
                        effects
                            .stops
                            .push((contact.clone(), record.channel.clone(), *now));
                    }
                }
                FailureKind::EndpointGone => {
                    effects
                        .disables
                        .insert(record.channel.clone(), (*now, failure.reason.clone()));
                }
                FailureKind::Transient | FailureKind::Throttled | FailureKind::Permanent => {}
            },
            Outcome::Retry { .. } | Outcome::Skipped { .. } => {}
        }
        queued |= matches!(
            record.state,
            DeliveryState::Queued | DeliveryState::Retrying
        );
        // A broadcast (the status page, a post) settling changes what every node's page shows.
        broadcast_settled |= record.recipient.contact().is_none() && record.state.is_settled();
        answers.push(Ok(Recorded {
            record: record.clone(),
            applied: true,
        }));
    }
    let written: Vec<&DeliveryRecord> = changed.iter().filter_map(|key| records.get(key)).collect();
    write_deliveries(tx, &written).await?;
    write_counts(tx, moves).await?;
    effects.apply(tx).await?;
    if queued {
        notify(tx, QUEUE_CHANNEL).await?;
    }
    if broadcast_settled {
        notify(tx, UPDATES_CHANNEL).await?;
    }
    Ok(answers)
}
