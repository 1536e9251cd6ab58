//! Bulk import of subscribers: CSV (`order,email,phone,confirmed`, with a header) or JSON
//! lines, streamed and written in batches that each share one durable commit. A bad row is
//! refused with its line number and reason and never stops the rest; importing the same file
//! again changes nothing, so a killed import is simply run again.

use crate::domain::{Contact, EmailAddress, OrderNumber, OrderPattern, PhoneNumber, Subscriber};
use crate::store::{Store, Subscribed, Subscription, apply_subscription};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;

/// How many refused rows the report lists; the rest are only counted, so memory stays flat
/// whatever the file holds.
pub const REFUSALS_LISTED: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

/// One row as written, before it is checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    order: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    confirmed: Option<Confirmed>,
}

/// `confirmed` as a CSV cell or a JSON value.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Confirmed {
    Flag(bool),
    Text(String),
}

impl Confirmed {
    fn parse(&self) -> Result<bool, String> {
        match self {
            Confirmed::Flag(flag) => Ok(*flag),
            Confirmed::Text(text) => match text.trim().to_ascii_lowercase().as_str() {
                "" | "false" | "no" | "n" | "0" => Ok(false),
                "true" | "yes" | "y" | "1" => Ok(true),
                other => Err(format!(
                    "confirmed is '{}': use true or false (or yes, no, 1, 0)",
                    crate::domain::printable(other)
                )),
            },
        }
    }
}

/// The longest reason a refusal gives, in characters.
const REASON_CHARS: usize = 200;

/// A row the import refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Refusal {
    /// The line of the file the row starts on (the header is line 1 of a CSV file).
    pub line: u64,
    pub reason: String,
}

/// Rows per durable commit unless asked otherwise.
pub const DEFAULT_BATCH: usize = 1000;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ImportReport {
    /// Rows read, good and bad (a row with an email and a phone is one row).
    pub rows: u64,
    /// Subscriptions that changed the store (or would have, with `--dry-run`): a new
    /// subscriber, a newly followed order, a confirmation.
    pub imported: u64,
    /// Of those, the subscribers that are new.
    pub new_subscribers: u64,
    /// Subscriptions that were already there, in the store or earlier in the file.
    pub duplicates: u64,
    /// Contacts that unsubscribed earlier and are not subscribed again.
    pub kept_unsubscribed: u64,
    pub refused: u64,
    /// The first [`REFUSALS_LISTED`] refusals.
    pub refusals: Vec<Refusal>,
}

impl ImportReport {
    fn refuse(&mut self, line: u64, reason: String) {
        self.refused += 1;
        if self.refusals.len() < REFUSALS_LISTED {
            // A parser's own words may quote the whole value (serde's "invalid type: string
            // …"): no reason is longer than this, whatever the row held.
            let reason = match reason.char_indices().nth(REASON_CHARS) {
                Some((end, _)) => format!("{}…", &reason[..end]),
                None => reason,
            };
            self.refusals.push(Refusal { line, reason });
        }
    }

    fn count(&mut self, outcome: Subscribed) {
        match outcome {
            Subscribed::Created => {
                self.imported += 1;
                self.new_subscribers += 1;
            }
            Subscribed::Updated => self.imported += 1,
            Subscribed::Unchanged => self.duplicates += 1,
            Subscribed::KeptUnsubscribed => self.kept_unsubscribed += 1,
        }
    }
}

/// Checks one row: its order and each contact it gives.
fn check_row(raw: RawRow, pattern: &OrderPattern) -> Result<Vec<Subscription>, String> {
    let order = OrderNumber::parse(&raw.order, pattern).map_err(|e| e.to_string())?;
    let confirmed = match &raw.confirmed {
        Some(value) => value.parse()?,
        None => false,
    };
    let present = |cell: &Option<String>| {
        cell.as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
    };
    let mut contacts = Vec::new();
    if let Some(email) = present(&raw.email) {
        contacts.push(Contact::Email(
            EmailAddress::parse(&email).map_err(|e| e.to_string())?,
        ));
    }
    if let Some(phone) = present(&raw.phone) {
        contacts.push(Contact::Phone(
            PhoneNumber::parse(&phone).map_err(|e| e.to_string())?,
        ));
    }
    if contacts.is_empty() {
        return Err("the row has neither an email nor a phone".into());
    }
    Ok(contacts
        .into_iter()
        .map(|contact| Subscription {
            contact,
            order: order.clone(),
            confirmed,
        })
        .collect())
}

/// The columns a CSV file may have.
const COLUMNS: [&str; 4] = ["order", "email", "phone", "confirmed"];

/// Streams rows out of a reader, each with its line number.
enum Rows<R: Read> {
    Csv {
        reader: csv::Reader<R>,
        headers: csv::StringRecord,
        record: csv::StringRecord,
    },
    JsonLines {
        lines: std::io::Lines<std::io::BufReader<R>>,
        line: u64,
    },
}

impl<R: Read> Rows<R> {
    /// Starts reading; a CSV file's header must name known columns, `order` among them.
    fn new(reader: R, format: Format) -> Result<Self, String> {
        match format {
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .trim(csv::Trim::All)
                    .from_reader(reader);
                let headers = reader
                    .headers()
                    .map_err(|e| format!("cannot read the header: {e}"))?
                    .clone();
                if let Some(unknown) = headers.iter().find(|h| !COLUMNS.contains(h)) {
                    return Err(format!(
                        "the header names an unknown column '{unknown}': use {}",
                        COLUMNS.join(",")
                    ));
                }
                if !headers.iter().any(|h| h == "order") {
                    return Err(format!(
                        "the header has no 'order' column: use {}",
                        COLUMNS.join(",")
                    ));
                }
                Ok(Rows::Csv {
                    reader,
                    headers,
                    record: csv::StringRecord::new(),
                })
            }
            Format::JsonLines => Ok(Rows::JsonLines {
                lines: std::io::BufRead::lines(std::io::BufReader::new(reader)),
                line: 0,
            }),
        }
    }
}

/// What reading the next row gave: a row, a row that cannot be read, or a failure of the
/// file itself (which ends the import).
enum Next {
    Row(u64, RawRow),
    Unreadable(u64, String),
    Failed(String),
}

impl<R: Read> Iterator for Rows<R> {
    type Item = Next;

    fn next(&mut self) -> Option<Next> {
        match self {
            Rows::Csv {
                reader,
                headers,
                record,
            } => match reader.read_record(record) {
                Ok(false) => None,
                Ok(true) => {
                    let line = record.position().map_or(0, |p| p.line());
                    Some(match record.deserialize::<RawRow>(Some(headers)) {
                        Ok(row) => Next::Row(line, row),
                        Err(error) => Next::Unreadable(line, csv_reason(&error)),
                    })
                }
                Err(error) => {
                    let line = error.position().map_or(0, |p| p.line());
                    Some(match error.kind() {
                        csv::ErrorKind::Io(io) => Next::Failed(io.to_string()),
                        csv::ErrorKind::Utf8 { .. } => {
                            Next::Unreadable(line, "the row is not UTF-8 text".into())
                        }
                        csv::ErrorKind::UnequalLengths {
                            expected_len, len, ..
                        } => Next::Unreadable(
                            line,
                            format!("the row has {len} fields; the header has {expected_len}"),
                        ),
                        _ => Next::Unreadable(line, error.to_string()),
                    })
                }
            },
            Rows::JsonLines { lines, line } => loop {
                let text = lines.next()?;
                *line += 1;
                let text = match text {
                    Ok(text) => text,
                    Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                        return Some(Next::Unreadable(*line, "the line is not UTF-8 text".into()));
                    }
                    Err(error) => return Some(Next::Failed(error.to_string())),
                };
                if text.trim().is_empty() {
                    continue;
                }
                return Some(match serde_json::from_str::<RawRow>(&text) {
                    Ok(row) => Next::Row(*line, row),
                    Err(error) => Next::Unreadable(*line, format!("not a row: {error}")),
                });
            },
        }
    }
}

/// A CSV row's deserializing error, naming the column.
fn csv_reason(error: &csv::Error) -> String {
    match error.kind() {
        csv::ErrorKind::Deserialize { err, .. } => match err.field() {
            Some(field) => format!(
                "{}: {}",
                COLUMNS.get(field as usize).copied().unwrap_or("a field"),
                err.kind()
            ),
            None => err.kind().to_string(),
        },
        _ => error.to_string(),
    }
}

/// Imports every row of `reader` into `store` (or only checks them, with `dry_run`), `batch`
/// subscriptions per durable commit. `progress` is called after each batch with the rows read
/// so far. Only a failure of the file or the store is an error; a bad row is a refusal.
pub async fn import<R: Read + Send + 'static>(
    store: &dyn Store,
    reader: R,
    format: Format,
    pattern: &OrderPattern,
    batch: usize,
    dry_run: bool,
    mut progress: impl FnMut(&ImportReport),
) -> crate::Result<ImportReport> {
    let batch = batch.max(1);
    let pattern = pattern.clone();
    // Reading and checking run on a blocking thread (the file may be standard input); checked
    // batches come back through a bounded channel, so memory holds at most a few batches.
    let (batches, mut received) =
        tokio::sync::mpsc::channel::<Result<(Vec<Subscription>, ImportReport), String>>(2);
    let reader_task = tokio::task::spawn_blocking(move || {
        let mut report = ImportReport::default();
        let mut pending = Vec::with_capacity(batch);
        let rows = match Rows::new(reader, format) {
            Ok(rows) => rows,
            Err(reason) => {
                let _ = batches.blocking_send(Err(reason));
                return;
            }
        };
        for next in rows {
            match next {
                Next::Row(line, raw) => {
                    report.rows += 1;
                    match check_row(raw, &pattern) {
                        Ok(subscriptions) => pending.extend(subscriptions),
                        Err(reason) => report.refuse(line, reason),
                    }
                }
                Next::Unreadable(line, reason) => {
                    report.rows += 1;
                    report.refuse(line, reason);
                }
                Next::Failed(reason) => {
                    let _ = batches.blocking_send(Err(format!("cannot read the file: {reason}")));
                    return;
                }
            }
            if pending.len() >= batch {
                let full = std::mem::replace(&mut pending, Vec::with_capacity(batch));
                if batches
                    .blocking_send(Ok((full, std::mem::take(&mut report))))
                    .is_err()
                {
                    return;
                }
            }
        }
        let _ = batches.blocking_send(Ok((pending, report)));
    });

    let mut report = ImportReport::default();
    let now = Utc::now();
    // A dry run remembers the subscribers its earlier rows would have changed, so it counts
    // duplicates as the import would: its memory grows with the file's contacts, the
    // import's does not.
    let mut would_be = HashMap::new();
    while let Some(next) = received.recv().await {
        let (subscriptions, read) = next.map_err(crate::Error::user)?;
        merge(&mut report, read);
        if subscriptions.is_empty() {
            progress(&report);
            continue;
        }
        let outcomes = if dry_run {
            dry_run_outcomes(store, &subscriptions, &mut would_be, now).await?
        } else {
            store.subscribe_batch(&subscriptions, now).await?
        };
        for outcome in outcomes {
            report.count(outcome);
        }
        progress(&report);
    }
    reader_task.await?;
    Ok(report)
}

/// Adds what the reader found since its last batch.
fn merge(report: &mut ImportReport, read: ImportReport) {
    report.rows += read.rows;
    report.refused += read.refused;
    let room = REFUSALS_LISTED.saturating_sub(report.refusals.len());
    report.refusals.extend(read.refusals.into_iter().take(room));
}

/// What a batch would change, without writing: each row against the store as it stands and
/// the subscribers earlier rows would have written (`would_be`).
async fn dry_run_outcomes(
    store: &dyn Store,
    subscriptions: &[Subscription],
    would_be: &mut HashMap<String, Subscriber>,
    now: chrono::DateTime<Utc>,
) -> crate::Result<Vec<Subscribed>> {
    let mut outcomes = Vec::with_capacity(subscriptions.len());
    for row in subscriptions {
        let key = row.contact.as_str();
        let existing = match would_be.get(key) {
            Some(subscriber) => Some(subscriber.clone()),
            None => store.subscriber(&row.contact).await?,
        };
        let (write, outcome) = apply_subscription(existing, row, now);
        if let Some(subscriber) = write {
            would_be.insert(key.to_owned(), subscriber);
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn pattern() -> OrderPattern {
        OrderPattern::new("[A-Z]{2}-[0-9]{4}").unwrap()
    }

    async fn run(
        store: &MemoryStore,
        text: &'static str,
        format: Format,
        dry_run: bool,
    ) -> ImportReport {
        import(
            store,
            text.as_bytes(),
            format,
            &pattern(),
            2,
            dry_run,
            |_| {},
        )
        .await
        .unwrap()
    }

    const CSV: &str = "order,email,phone,confirmed
AB-0001,ann@example.com,,true
AB-0002,ann@example.com,+447700900123,yes
12345,bob@example.com,,true
AB-0003,not-an-email,,true
AB-0004,,+44123,true
AB-0001,ann@example.com,,true
AB-0005,,,true
AB-0006,cy@example.com,,maybe
AB-0007,dee@example.com,,
";

    #[tokio::test]
    async fn a_csv_file_gives_the_exact_report_of_good_bad_and_duplicate_rows() {
        let store = MemoryStore::new();
        let report = run(&store, CSV, Format::Csv, false).await;
        assert_eq!(report.rows, 9);
        // ann@ AB-0001, ann@ AB-0002, the phone AB-0002, dee@ AB-0007.
        assert_eq!(report.imported, 4);
        assert_eq!(report.new_subscribers, 3);
        assert_eq!(report.duplicates, 1, "ann@ AB-0001 twice");
        assert_eq!(report.refused, 5);
        let lines: Vec<u64> = report.refusals.iter().map(|r| r.line).collect();
        assert_eq!(lines, [4, 5, 6, 8, 9]);
        assert!(
            report.refusals[0]
                .reason
                .contains("'12345' is not an order number")
        );
        assert!(report.refusals[1].reason.contains("not an email address"));
        assert!(report.refusals[2].reason.contains("wrong number of digits"));
        assert!(
            report.refusals[3]
                .reason
                .contains("neither an email nor a phone")
        );
        assert!(report.refusals[4].reason.contains("confirmed is 'maybe'"));
        assert_eq!(store.subscriber_count().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn importing_the_same_file_again_doubles_nothing() {
        let store = MemoryStore::new();
        run(&store, CSV, Format::Csv, false).await;
        let again = run(&store, CSV, Format::Csv, false).await;
        assert_eq!(again.imported, 0);
        assert_eq!(again.duplicates, 5);
        assert_eq!(again.refused, 5);
        assert_eq!(store.subscriber_count().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_dry_run_reports_the_same_and_stores_nothing() {
        let store = MemoryStore::new();
        let checked = run(&store, CSV, Format::Csv, true).await;
        assert_eq!(store.subscriber_count().await.unwrap(), 0);
        let imported = run(&store, CSV, Format::Csv, false).await;
        assert_eq!(checked, imported);
    }

    #[tokio::test]
    async fn json_lines_are_read_with_their_line_numbers_and_blank_lines_skipped() {
        let store = MemoryStore::new();
        let text = r#"{"order": "AB-0001", "email": "ann@example.com", "confirmed": true}

{"order": "AB-0002", "phone": "+447700900123"}
{"order": "AB-0003", "email": "ann@example.com", "colour": "red"}
not json
"#;
        let report = run(&store, text, Format::JsonLines, false).await;
        assert_eq!(report.rows, 4);
        assert_eq!(report.imported, 2);
        let lines: Vec<u64> = report.refusals.iter().map(|r| r.line).collect();
        assert_eq!(lines, [4, 5]);
        assert!(report.refusals[0].reason.contains("colour"));
    }

    #[tokio::test]
    async fn a_csv_row_with_too_many_fields_is_refused_and_the_rest_imported() {
        let store = MemoryStore::new();
        let text = "order,email,phone,confirmed\nAB-0001,a@example.com,,true,extra\nAB-0002,b@example.com,,true\n";
        let report = run(&store, text, Format::Csv, false).await;
        assert_eq!(report.imported, 1);
        assert_eq!(report.refusals.len(), 1);
        assert_eq!(report.refusals[0].line, 2);
        assert!(
            report.refusals[0].reason.contains("5 fields"),
            "{:?}",
            report.refusals
        );
    }
}
