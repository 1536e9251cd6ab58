//! The command line: clap definitions and one function per command.

use crate::app::{App, UpdateRequest};
use crate::config::{Config, ProcessEnv};
use crate::delivery::Counts;
use crate::domain::{Contact, EmailAddress, FollowVia, IncidentState, OrderNumber, PhoneNumber};
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::remote::Remote;
use crate::render::{Renderer, human_time};
use crate::reports::{DeliveriesReport, OrderReport, PreviewReport, Progress};
use crate::runtime::{Delivered, StopSignal, deliver_queued};
use crate::store::Store;
use crate::web::api::{
    Accepted, LinkRequest, Retried, RetryRequest, SubscribeRequest, SubscriberSummary, SupportLink,
};
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use ulid::Ulid;

/// Writes one line to standard output; a closed pipe is reported as an error the caller
/// ends quietly on, never a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

/// Exit code after Ctrl-C: the usual 128 + SIGINT.
const INTERRUPTED: u8 = 130;
/// Exit code when an update reached nobody: every delivery went to dead letters.
const NOTHING_DELIVERED: u8 = 3;
/// Exit code when some deliveries went to dead letters and the rest were delivered: a script
/// that sends must not take a partial send for a whole one.
const SOME_UNDELIVERED: u8 = 4;

/// What to say when `dead` deliveries went to dead letters beside `sent` delivered ones, and
/// the exit code that goes with it.
fn dead_letter_outcome(sent: u64, dead: u64) -> Option<(String, u8)> {
    match (sent, dead) {
        (_, 0) => None,
        (0, dead) => Some((
            format!(
                "nothing was delivered: {dead} deliveries went to dead letters; see `crier deliveries --failed`"
            ),
            NOTHING_DELIVERED,
        )),
        (sent, dead) => Some((
            format!(
                "{dead} deliveries went to dead letters ({sent} delivered); see `crier deliveries --failed`, and `crier retry` once the cause is fixed"
            ),
            SOME_UNDELIVERED,
        )),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "crier",
    version,
    about = "One customer update, typed once, delivered to every channel.",
    long_about = "One customer update, typed once, delivered to every channel: subscribers by \
                  email, partners by signed webhook, and the public status page.\n\n\
                  Exit codes: 0 success, 1 a mistake in the input or configuration (the message \
                  says which), 2 an internal error or an unavailable store, 3 nothing was \
                  delivered (every delivery failed: see `crier deliveries --failed`), 130 stopped \
                  by Ctrl-C or SIGTERM (run `crier dispatch` to deliver the rest)."
)]
pub struct Cli {
    /// The main configuration file; relative paths in it are relative to its folder.
    #[arg(
        long,
        global = true,
        env = "CRIER_CONFIG",
        default_value = "crier.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the public pages, the admin API and console, and inbound replies, and deliver
    /// whatever is queued, until Ctrl-C or SIGTERM.
    #[command(
        long_about = "Serve the public pages, the admin API and console, and inbound replies, and \
                      deliver whatever is queued, until Ctrl-C or SIGTERM (deliveries in flight \
                      finish first).",
        after_help = "It serves, on server.listen:\n  \
            /                      the status page (and /feed.atom, /status.json, /incidents/ID.html)\n  \
            /subscribe             the subscribe form; /confirm/TOKEN, /unsubscribe/TOKEN, /s/TOKEN its links\n  \
            /inbound/sms/CHANNEL   replies (STOP, YES) and delivery reports from an SMS provider\n  \
            /admin                 the console for the comms lead (sign in with an [api] token)\n  \
            /api                   the admin API (a bearer token from [api]); /api/openapi.json describes it\n  \
            /metrics               Prometheus metrics (a bearer token from [api])\n  \
            /healthz, /readyz      health checks\n\n\
            While it runs it owns the store: the other commands go through its admin API."
    )]
    Serve,
    /// Store an update and deliver it to every channel, with a progress bar.
    Send(SendArgs),
    /// Render an update for every channel and check each channel's limits, without sending.
    Preview(PreviewArgs),
    /// Follow an order by email or phone.
    Subscribe(SubscribeArgs),
    /// Subscribe many at once from a CSV (order,email,phone,confirmed) or JSON-lines file.
    Import(ImportArgs),
    /// Stop updates for a contact (all of them, or one order's), or redeem an unsubscribe token.
    Unsubscribe(UnsubscribeArgs),
    /// Deliver whatever is queued (after a crash or Ctrl-C), then exit.
    Dispatch(DispatchArgs),
    /// For support: the latest update that applies to an order, how it reached each contact
    /// following the order (masked), and a reply to paste.
    Order(OrderArgs),
    /// For support: a signed link to the subscribe page for an order, or, with a contact, one
    /// button that subscribes that contact (confirmed: support's reply reached it).
    Link(LinkArgs),
    /// Show delivery counts per channel, and the failures.
    Deliveries(DeliveriesArgs),
    /// Queue dead letters again and deliver them.
    Retry(RetryArgs),
    /// Validate the configuration, channel files, secrets and templates without touching the store.
    CheckConfig,
    /// Manage the store itself.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Args)]
pub struct ComposeArgs {
    /// One line that says what is going on (required for a new incident).
    #[arg(long)]
    pub headline: Option<String>,
    /// The incident's state after this update [default: investigating, or the incident's current state].
    #[arg(long, value_parser = parse_state)]
    pub state: Option<IncidentState>,
    /// Continue this incident (its id, as printed by an earlier send) instead of opening a new one.
    #[arg(long)]
    pub incident: Option<Ulid>,
    /// Promise the next update within this long, like 2h or 30m (a minute to 30 days).
    #[arg(long, value_parser = checked_next_update_in)]
    pub next_update_in: Option<String>,
    /// Send only to the subscribers of these orders (comma-separated). Of the broadcast
    /// channels only webhooks get it, marked as targeted.
    #[arg(long, value_delimiter = ',', conflicts_with = "orders_file")]
    pub orders: Vec<String>,
    /// Like --orders, with one order number per line of this file (- for standard input).
    #[arg(long)]
    pub orders_file: Option<PathBuf>,
    /// Send through only this channel (its id); repeat for several [default: every channel].
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// Who is sending it [default: $USER].
    #[arg(long)]
    pub author: Option<String>,
    /// The update's text; - reads it from standard input.
    pub body: Option<String>,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub compose: ComposeArgs,
    /// Send without asking for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Print one JSON object with the update, the incident and the counts per channel.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub compose: ComposeArgs,
    /// Print the rendered parts as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("contact").required(true).args(["email", "phone"])))]
pub struct SubscribeArgs {
    /// The order to follow.
    #[arg(long)]
    pub order: String,
    /// The email address that follows it.
    #[arg(long)]
    pub email: Option<String>,
    /// In E.164 form, like +447700900123.
    #[arg(long)]
    pub phone: Option<String>,
    /// Mark the contact as confirmed (it was verified elsewhere) instead of pending.
    #[arg(long)]
    pub confirmed: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "A CSV file starts with a header naming its columns: order, email, phone, \
                        confirmed (order and email or phone required). A JSON-lines file holds one \
                        object per line with the same keys. A row with an email and a phone \
                        subscribes both. Bad rows are refused with their line number and the rest \
                        imported; importing a file again changes nothing, so a killed import is \
                        simply run again. Contacts that unsubscribed are never subscribed again \
                        by an import. Exit code 1 when a row was refused."
)]
pub struct ImportArgs {
    /// The file to import; - reads standard input.
    pub file: PathBuf,
    /// csv or jsonl [default: jsonl for .jsonl, .ndjson and .json files, csv otherwise].
    #[arg(long, value_parser = ["csv", "jsonl"])]
    pub format: Option<String>,
    /// Check every row and report what would change, without storing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Rows written per durable commit.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["email", "phone", "token"])))]
pub struct UnsubscribeArgs {
    /// The email address to stop sending to.
    #[arg(long)]
    pub email: Option<String>,
    /// The mobile number to stop texting, in E.164 form, like +447700900123.
    #[arg(long)]
    pub phone: Option<String>,
    /// An unsubscribe token, or the whole link from a message's List-Unsubscribe header.
    #[arg(long)]
    pub token: Option<String>,
    /// Stop only this order's updates.
    #[arg(long)]
    pub order: Option<String>,
}

#[derive(Debug, Args)]
pub struct DispatchArgs {
    /// Print one JSON object with the counts per channel.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("contact").args(["email", "phone"])))]
pub struct LinkArgs {
    /// The order the link subscribes to.
    #[arg(long)]
    pub order: String,
    /// The customer's email: the link then subscribes it with one button.
    #[arg(long)]
    pub email: Option<String>,
    /// The customer's mobile number, in E.164 form: the link then subscribes it with one button.
    #[arg(long)]
    pub phone: Option<String>,
    /// How long the link works, like 7d or 12h (an hour to 90 days).
    #[arg(long, default_value = "7d", value_parser = crate::links::parse_link_lifetime)]
    pub expires: Duration,
}

#[derive(Debug, Args)]
pub struct OrderArgs {
    /// The order number, as the customer gives it.
    pub order: String,
    /// Print one JSON object: the update, the promise, the contacts and the reply.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DeliveriesArgs {
    /// The update to report on [default: the latest].
    #[arg(long)]
    pub update: Option<Ulid>,
    /// List the deliveries that failed (dead letters and those waiting to retry).
    #[arg(long)]
    pub failed: bool,
    /// Print one JSON object with the counts per channel (and the failures with --failed).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy every subscriber, order, incident, update and delivery (in its state, with its
    /// counts) from an embedded sled store into the PostgreSQL database the config names
    /// (store.backend = "postgres"), before any node uses it. Records the database already
    /// holds are kept; run it again after an interruption.
    Copy(CopyArgs),
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The store to copy, as sled:PATH (the folder store.path named).
    #[arg(long)]
    pub from: String,
    /// Where to copy it: postgres, the database in the config.
    #[arg(long, default_value = "postgres", value_parser = ["postgres"])]
    pub to: String,
    /// Print one JSON object with what was copied and what was already there.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Only this update's dead letters [default: all of them].
    #[arg(long)]
    pub update: Option<Ulid>,
    /// Print one JSON object with the counts per channel after the retry.
    #[arg(long)]
    pub json: bool,
}

/// Checked here for a clear error at once, and passed on as typed.
fn checked_next_update_in(text: &str) -> std::result::Result<String, String> {
    crate::domain::parse_next_update_in(text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_state(text: &str) -> std::result::Result<IncidentState, String> {
    text.parse()
        .map_err(|e: crate::domain::DomainError| e.to_string())
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let config = Config::load(&cli.config, &ProcessEnv)?;
    crate::render::use_time_zone(config.brand.time_zone);
    match cli.command {
        Command::CheckConfig => check_config(&config),
        Command::Serve => serve(config).await,
        Command::Subscribe(args) => subscribe(config, args).await,
        Command::Import(args) => import(config, args).await,
        Command::Unsubscribe(args) => unsubscribe(config, args).await,
        Command::Preview(args) => preview(config, args).await,
        Command::Send(args) => send(config, args).await,
        Command::Dispatch(args) => dispatch(config, args).await,
        Command::Order(args) => order(config, args).await,
        Command::Link(args) => link(&config, args).await,
        Command::Deliveries(args) => deliveries(config, args).await,
        Command::Retry(args) => retry(config, args).await,
        Command::Store(StoreCommand::Copy(args)) => copy_store(config, args).await,
    }
}

fn check_config(config: &Config) -> Result<ExitCode> {
    let renderer = Renderer::load(&config.templates_dir)?;
    crate::channel::check_templates(config, &renderer)?;
    // The pages `crier serve` shows, so a custom templates folder is found short before the
    // server refuses to start.
    renderer.require(crate::web::pages::TEMPLATES)?;
    for channel in &config.channels {
        channel
            .settings
            .check()
            .map_err(|reason| Error::user(format!("{}: {reason}", channel.file.display())))?;
    }
    if let Err(reason) = crate::files::can_create_dir(&config.store.path) {
        return Err(Error::user(format!(
            "{}: store.path: {reason}",
            config.file.display()
        )));
    }
    // Only `crier serve` reads the admin tokens, but it refuses to start without them: found
    // here, before the day it is started.
    if let Some(token) = config.api_tokens.iter().find(|t| t.secret.is_none()) {
        return Err(Error::user(format!(
            "{}: api.tokens.{}: the environment variable {} is not set (only crier serve needs \
             it, and it will not start without it)",
            config.file.display(),
            token.name,
            token.variable
        )));
    }
    say!("{}: OK", config.file.display());
    for channel in &config.channels {
        say!(
            "  channel {} ({}) from {}",
            channel.id,
            channel.kind.name,
            channel.file.display()
        );
        for warning in channel.settings.warnings() {
            say!("    warning: {warning}");
        }
    }
    if config.channels.is_empty() {
        say!("  no channels are configured: updates would reach nobody");
    }
    Ok(ExitCode::SUCCESS)
}

/// Only the store is needed to manage subscribers, so no channel is built.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    Ok(crate::store::open(&config.store).await?)
}

fn contact_from(email: Option<&str>, phone: Option<&str>) -> Result<Contact> {
    Ok(match (email, phone) {
        (Some(email), _) => Contact::Email(EmailAddress::parse(email)?),
        (None, Some(phone)) => Contact::Phone(PhoneNumber::parse(phone)?),
        (None, None) => return Err(Error::user("give --email or --phone")),
    })
}

/// A contact as the admin API's requests name it: an `email` or a `phone` field.
fn contact_fields(contact: Option<&Contact>) -> (Option<String>, Option<String>) {
    match contact {
        Some(Contact::Email(email)) => (Some(email.as_str().to_owned()), None),
        Some(Contact::Phone(phone)) => (None, Some(phone.as_str().to_owned())),
        None => (None, None),
    }
}

/// A contact as a path segment of the admin API (`+` and `@` escaped).
fn path_segment(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

async fn subscribe(config: Config, args: SubscribeArgs) -> Result<ExitCode> {
    let order = OrderNumber::parse(&args.order, &config.orders)?;
    let contact = contact_from(args.email.as_deref(), args.phone.as_deref())?;
    let subscriber: SubscriberSummary = match Remote::find(&config).await? {
        Some(remote) => {
            let (email, phone) = contact_fields(Some(&contact));
            let request = SubscribeRequest {
                order: order.to_string(),
                email,
                phone,
                confirmed: args.confirmed,
            };
            remote.post("/subscribers", &request, None).await?
        }
        None => {
            let store = open_store(&config).await?;
            let subscriber = store
                .subscribe(
                    &contact,
                    &order,
                    args.confirmed,
                    FollowVia::Operator,
                    Utc::now(),
                )
                .await?;
            SubscriberSummary::of(&subscriber)
        }
    };
    say!(
        "{} follows {} ({})",
        subscriber.contact,
        subscriber.orders.join(", "),
        subscriber.state
    );
    Ok(ExitCode::SUCCESS)
}

async fn import(config: Config, args: ImportArgs) -> Result<ExitCode> {
    use crate::import::Format;
    let from_stdin = args.file == Path::new("-");
    let format = match args.format.as_deref() {
        Some("jsonl") => Format::JsonLines,
        Some(_) => Format::Csv,
        None => match args.file.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson" | "json") => Format::JsonLines,
            _ => Format::Csv,
        },
    };
    let bar = if from_stdin {
        ProgressBar::with_draw_target(None, progress_target())
    } else {
        let size = std::fs::metadata(&args.file)
            .map_err(|e| Error::user(format!("cannot read {}: {e}", args.file.display())))?
            .len();
        ProgressBar::with_draw_target(Some(size), progress_target())
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let reader: Box<dyn Read + Send> = if from_stdin {
        Box::new(std::io::stdin())
    } else {
        let file = std::fs::File::open(&args.file)
            .map_err(|e| Error::user(format!("cannot read {}: {e}", args.file.display())))?;
        Box::new(bar.wrap_read(std::io::BufReader::new(file)))
    };
    let report = match Remote::find(&config).await? {
        // crier serve owns the store: the file goes through its import endpoint, whole.
        Some(remote) => {
            let limit = crate::web::api::IMPORT_BODY_LIMIT;
            let mut body = Vec::new();
            reader
                .take(limit as u64 + 1)
                .read_to_end(&mut body)
                .map_err(|e| Error::user(format!("cannot read {}: {e}", args.file.display())))?;
            if body.len() > limit {
                return Err(Error::user(format!(
                    "{} is over the {} MiB crier serve takes in one import: split it, or stop \
                     crier serve and import it directly",
                    args.file.display(),
                    limit >> 20
                )));
            }
            bar.set_message("crier serve is importing it");
            let content_type = match format {
                Format::Csv => "text/csv",
                Format::JsonLines => "application/x-ndjson",
            };
            let path = format!("/subscribers/import?dry_run={}", args.dry_run);
            remote
                .post_bytes::<crate::import::ImportReport>(&path, content_type, body)
                .await?
        }
        None => {
            let store = open_store(&config).await?;
            crate::import::import(
                store.as_ref(),
                reader,
                format,
                &config.orders,
                args.batch as usize,
                args.dry_run,
                |so_far| {
                    bar.set_message(format!(
                        "{} rows · {} imported · {} refused",
                        so_far.rows, so_far.imported, so_far.refused
                    ))
                },
            )
            .await?
        }
    };
    bar.finish_and_clear();
    if args.json {
        say!(
            "{}",
            serde_json::json!({ "dry_run": args.dry_run, "report": &report })
        );
    } else {
        let verb = if args.dry_run {
            "would import"
        } else {
            "imported"
        };
        say!(
            "{} rows: {verb} {} ({} new subscribers), {} duplicates merged, {} kept unsubscribed, {} refused",
            report.rows,
            report.imported,
            report.new_subscribers,
            report.duplicates,
            report.kept_unsubscribed,
            report.refused
        );
        for refusal in &report.refusals {
            say!(
                "  line {}: {}",
                refusal.line,
                terminal_safe(&refusal.reason)
            );
        }
        if report.refused > report.refusals.len() as u64 {
            say!(
                "  … and {} more refused rows",
                report.refused - report.refusals.len() as u64
            );
        }
    }
    if report.refused > 0 {
        eprintln!(
            "{} rows refused (listed above); the other rows are {}",
            report.refused,
            if args.dry_run { "fine" } else { "imported" }
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

async fn unsubscribe(config: Config, args: UnsubscribeArgs) -> Result<ExitCode> {
    let order = args
        .order
        .as_deref()
        .map(|o| OrderNumber::parse(o, &config.orders))
        .transpose()?;
    let contact = match &args.token {
        Some(token) => {
            use secrecy::ExposeSecret;
            let signer = crate::domain::token::TokenSigner::new(config.link_secret.expose_secret());
            crate::links::verify_unsubscribe(&signer, token, Utc::now())?
        }
        None => contact_from(args.email.as_deref(), args.phone.as_deref())?,
    };
    let subscriber: SubscriberSummary = match Remote::find(&config).await? {
        Some(remote) => {
            let mut path = format!("/subscribers/{}", path_segment(contact.as_str()));
            if let Some(order) = &order {
                path.push_str(&format!("?order={}", path_segment(order.as_str())));
            }
            remote.delete(&path).await?
        }
        None => {
            let store = open_store(&config).await?;
            let subscriber = store
                .unsubscribe(&contact, order.as_ref(), FollowVia::Operator, Utc::now())
                .await?;
            SubscriberSummary::of(&subscriber)
        }
    };
    match order {
        Some(order) => say!("{} no longer follows {order}", subscriber.contact),
        None => say!("{} is unsubscribed from every update", subscriber.contact),
    }
    Ok(ExitCode::SUCCESS)
}

fn read_stdin() -> Result<String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| Error::user(format!("cannot read standard input: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|e| Error::user(format!("standard input is not UTF-8 text: {e}")))
}

/// The update as typed: the text (or standard input) and the orders (or their file) read, and
/// nothing checked yet: the store's owner checks it, this process or the server.
fn update_request(args: ComposeArgs) -> Result<(UpdateRequest, Option<String>)> {
    let body = match args.body.as_deref() {
        Some("-") => read_stdin()?,
        Some(body) => body.to_owned(),
        None => {
            return Err(Error::user(
                "the update's text is missing: give it as the last argument, or - to read it from standard input",
            ));
        }
    };
    let orders: Vec<String> = match &args.orders_file {
        Some(path) => {
            let text = if path == Path::new("-") {
                read_stdin()?
            } else {
                std::fs::read_to_string(path)
                    .map_err(|e| Error::user(format!("cannot read {}: {e}", path.display())))?
            };
            let orders: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            if orders.is_empty() {
                return Err(Error::user("the orders file lists no order numbers"));
            }
            orders
        }
        None => args.orders.clone(),
    };
    let request = UpdateRequest {
        headline: args.headline,
        body,
        state: args.state.map(|state| state.as_str().to_owned()),
        incident: args.incident.map(|id| id.to_string()),
        next_update_in: args.next_update_in,
        orders,
        channels: args.channels,
    };
    Ok((request, args.author))
}

fn author(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "crier".into())
}

/// Control characters (ESC above all) are never written to a terminal raw: they could
/// rewrite what the comms lead sees. Compose refuses them in the update itself; templates
/// could still hold some.
fn terminal_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                char::REPLACEMENT_CHARACTER
            } else {
                c
            }
        })
        .collect()
}

fn print_previews(preview: &PreviewReport) -> Result<()> {
    let update = &preview.update;
    say!(
        "incident {} · {}",
        terminal_safe(&preview.incident_title),
        update.state
    );
    if let Some(next) = update.next_update_by.as_deref().and_then(parse_time) {
        say!("next update by {}", human_time(next));
    }
    if preview.orders.is_empty() {
        say!("audience: everyone");
    } else {
        say!(
            "audience: the subscribers of {} (targeted)",
            preview.orders.join(", ")
        );
    }
    for channel in &preview.channels {
        say!("\n=== {} ===", channel.channel);
        for part in &channel.parts {
            say!(
                "--- {} ---\n{}",
                part.part,
                terminal_safe(part.text.trim_end())
            );
        }
    }
    Ok(())
}

fn parse_time(text: &str) -> Option<chrono::DateTime<Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// The preview of a request: from the server while one runs, else composed here.
async fn previewed(
    config: Config,
    request: UpdateRequest,
    author: String,
) -> Result<PreviewReport> {
    match Remote::find(&config).await? {
        Some(remote) => remote.post("/preview", &request, None).await,
        None => {
            let draft = request.into_draft(&config, author)?;
            let app = App::open(config).await?;
            Ok(PreviewReport::of(&app.compose(draft).await?))
        }
    }
}

async fn preview(config: Config, args: PreviewArgs) -> Result<ExitCode> {
    let (request, author_flag) = update_request(args.compose)?;
    let preview = previewed(config, request, author(author_flag)).await?;
    if args.json {
        let channels: serde_json::Map<String, serde_json::Value> = preview
            .channels
            .iter()
            .map(|c| Ok((c.channel.clone(), serde_json::to_value(&c.parts)?)))
            .collect::<Result<_>>()?;
        say!(
            "{}",
            serde_json::json!({ "update": &preview.update, "incident_title": &preview.incident_title, "channels": channels })
        );
    } else {
        print_previews(&preview)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn confirm_send(preview: &PreviewReport) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::user(
            "not sending without confirmation: add --yes (standard input is not a terminal to ask on)",
        ));
    }
    print_previews(preview)?;
    print!(
        "\nSend this update through {} channel(s)? [y/N] ",
        preview.channels.len()
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        return Err(Error::user("not sent"));
    }
    Ok(())
}

async fn serve(config: Config) -> Result<ExitCode> {
    for channel in &config.channels {
        for warning in channel.settings.warnings() {
            tracing::warn!(channel = %channel.id, "{warning}");
        }
    }
    let app = App::open(config).await?;
    let stop = StopSignal::install()?;
    crate::runtime::serve(Arc::new(app), &stop, |address| {
        eprintln!("crier serves http://{address}/ (Ctrl-C or SIGTERM to stop)");
    })
    .await?;
    eprintln!("stopped; whatever was still queued stays queued for the next start");
    Ok(ExitCode::SUCCESS)
}

async fn send(config: Config, args: SendArgs) -> Result<ExitCode> {
    let reads_stdin = args.compose.body.as_deref() == Some("-");
    let (request, author_flag) = update_request(args.compose)?;
    if !args.yes && reads_stdin {
        return Err(Error::user(
            "the text came from standard input, so add --yes to send it",
        ));
    }
    if let Some(remote) = Remote::find(&config).await? {
        return send_through(&remote, request, args.yes, args.json).await;
    }
    let draft = request.into_draft(&config, author(author_flag))?;
    let app = App::open(config).await?;
    let composed = app.compose(draft).await?;
    if !args.yes {
        confirm_send(&PreviewReport::of(&composed))?;
    }
    // From here on a stop request waits for a clean point instead of killing the process.
    let stop = StopSignal::install()?;
    app.accept(&composed).await?;
    let accepted_at = std::time::Instant::now();
    let update = &composed.update;
    eprintln!(
        "accepted update {} (incident {})",
        update.id, update.incident
    );
    let delivered = deliver_queued(&app, &stop, Some((update.id, accepted_at))).await?;
    report(app.store.as_ref(), update.id, args.json).await?;
    Ok(exit_after(&delivered))
}

/// How often `send` asks a running server how its update is going.
const PROGRESS_POLL: Duration = Duration::from_millis(200);

/// `send` while `crier serve` runs: the server stores, plans and delivers the update; this
/// process follows its progress until nothing is queued or in flight (and retries due soon
/// are done), then prints the same report as a send of its own.
async fn send_through(
    remote: &Remote,
    request: UpdateRequest,
    yes: bool,
    json: bool,
) -> Result<ExitCode> {
    if !yes {
        let preview: PreviewReport = remote.post("/preview", &request, None).await?;
        confirm_send(&preview)?;
    }
    let stop = StopSignal::install()?;
    // One key per send: if the answer is lost and the request is sent again, the server
    // replays its first answer instead of storing the update twice.
    let key = Ulid::new().to_string();
    let accepted: Accepted = match remote.post("/updates", &request, Some(&key)).await {
        Ok(accepted) => accepted,
        Err(error) if error.kind() == ErrorKind::Unavailable => {
            remote.post("/updates", &request, Some(&key)).await?
        }
        Err(error) => return Err(error),
    };
    eprintln!(
        "accepted update {} (incident {}) by crier serve at {}",
        accepted.update,
        accepted.incident,
        remote.base()
    );
    let bar = ProgressBar::with_draw_target(None, progress_target());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} deliveries settled {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut stopped = stop.receiver();
    let mut only_retries_since: Option<std::time::Instant> = None;
    let progress: Progress = loop {
        let progress: Progress = match remote.get(&accepted.progress["/api".len()..]).await {
            Ok(progress) => progress,
            Err(error) if error.kind() == ErrorKind::Unavailable => {
                // The update is stored: the server that stopped answering delivers it when it
                // runs again (or another node does).
                bar.finish_and_clear();
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    anyhow::anyhow!(
                        "update {} was accepted and stays queued, but crier serve at {} stopped \
                         answering while its progress was followed; it is delivered when crier \
                         serve runs again (see `crier deliveries --update {}` then)",
                        accepted.update,
                        remote.base(),
                        accepted.update
                    ),
                ));
            }
            Err(error) => return Err(error),
        };
        let totals = progress.totals();
        bar.set_length(totals.total());
        bar.set_position(totals.settled());
        bar.set_message(format!(
            "· {} sent · {} retrying · {} dead",
            totals.sent, totals.retrying, totals.dead
        ));
        if progress.settled() {
            if totals.retrying == 0 {
                break progress;
            }
            let since = *only_retries_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= crate::runtime::PATIENCE {
                break progress;
            }
        } else {
            only_retries_since = None;
        }
        tokio::select! {
            _ = tokio::time::sleep(PROGRESS_POLL) => {}
            _ = stopped.wait_for(|stop| *stop) => {
                bar.finish_and_clear();
                eprintln!("stopped following; crier serve goes on delivering update {}", accepted.update);
                return Ok(ExitCode::from(INTERRUPTED));
            }
        }
    };
    bar.finish_and_clear();
    let totals = progress.totals();
    if json {
        say!(
            "{}",
            serde_json::json!({ "update": accepted.update, "incident": accepted.incident, "channels": progress.channels })
        );
    } else {
        print_counts(&progress.channels)?;
        say!("update {}", accepted.update);
        say!("incident {}", accepted.incident);
    }
    if totals.retrying > 0 {
        eprintln!(
            "{} deliveries wait for a retry; crier serve delivers them (see `crier deliveries`)",
            totals.retrying
        );
    } else if let Some((hint, code)) = dead_letter_outcome(totals.sent, totals.dead) {
        eprintln!("{hint}");
        return Ok(ExitCode::from(code));
    }
    Ok(ExitCode::SUCCESS)
}

async fn dispatch(config: Config, args: DispatchArgs) -> Result<ExitCode> {
    let app = App::open(config).await?;
    let stop = StopSignal::install()?;
    let delivered = deliver_queued(&app, &stop, None).await?;
    let counts = app.store.counts(None).await?;
    if args.json {
        say!("{}", serde_json::json!({ "channels": counts }));
    } else {
        print_counts(&counts)?;
    }
    Ok(exit_after(&delivered))
}

async fn copy_store(config: Config, args: CopyArgs) -> Result<ExitCode> {
    let Some(path) = args.from.strip_prefix("sled:").filter(|p| !p.is_empty()) else {
        return Err(Error::user(format!(
            "--from {}: give the store to copy as sled:PATH",
            args.from
        )));
    };
    let crate::config::StoreBackend::Postgres(target) = &config.store.backend else {
        return Err(Error::user(format!(
            "{}: store.backend: set it to \"postgres\" (with the connection string in the variable store.url_env names) to copy into PostgreSQL",
            config.file.display()
        )));
    };
    let path = std::path::PathBuf::from(path);
    if !path.join("db").is_file() {
        return Err(Error::user(format!(
            "--from sled:{}: no sled store there",
            path.display()
        )));
    }
    let source = crate::store::SledStore::open(&crate::config::StoreSettings::sled(
        path,
        config.store.cache_capacity_bytes,
    ))
    .await?;
    let target = crate::store::PostgresStore::open(target).await?;
    let bar = ProgressBar::with_draw_target(None, progress_target());
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
        bar.set_style(style);
    }
    let copied = target
        .copy_from(&source, Utc::now(), |so_far| {
            bar.set_message(format!(
                "{} subscribers, {} updates, {} deliveries",
                so_far.subscribers, so_far.updates, so_far.deliveries
            ));
            bar.tick();
        })
        .await?;
    bar.finish_and_clear();
    if args.json {
        say!("{}", serde_json::to_string(&copied)?);
    } else {
        say!(
            "copied {} subscribers, {} incidents, {} updates and {} deliveries ({} already there{})",
            copied.subscribers,
            copied.incidents,
            copied.updates,
            copied.deliveries,
            copied.already_there,
            if copied.released > 0 {
                format!(
                    "; {} left in flight by a stopped process are queued again",
                    copied.released
                )
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn retry(config: Config, args: RetryArgs) -> Result<ExitCode> {
    if let Some(remote) = Remote::find(&config).await? {
        let request = RetryRequest {
            update: args.update.map(|id| id.to_string()),
        };
        let retried: Retried = remote.post("/deliveries/retry", &request, None).await?;
        for channel in &retried.enabled {
            eprintln!("channel {channel} is enabled again");
        }
        if args.json {
            say!(
                "{}",
                serde_json::json!({ "requeued": retried.requeued, "enabled": retried.enabled })
            );
        } else {
            say!(
                "{} dead letter(s) queued again; crier serve at {} delivers them (see `crier deliveries`)",
                retried.requeued,
                remote.base()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let app = App::open(config).await?;
    let stop = StopSignal::install()?;
    let requeued = crate::reports::retry_dead_letters(app.store.as_ref(), args.update).await?;
    for channel in &requeued.enabled {
        eprintln!("channel {channel} is enabled again");
    }
    eprintln!("{} dead letter(s) queued again", requeued.count);
    let delivered = deliver_queued(&app, &stop, None).await?;
    let counts = app.store.counts(args.update).await?;
    if args.json {
        say!(
            "{}",
            serde_json::json!({ "requeued": requeued.count, "channels": counts })
        );
    } else {
        print_counts(&counts)?;
    }
    Ok(exit_after(&delivered))
}

fn exit_after(delivered: &Delivered) -> ExitCode {
    if let Some(due) = delivered.left_for_later {
        eprintln!(
            "some deliveries wait for a retry due at {}: run `crier dispatch` then to deliver them",
            human_time(due)
        );
    }
    if delivered.interrupted {
        eprintln!(
            "stopped by Ctrl-C or SIGTERM; the rest stays queued: run `crier dispatch` to deliver it"
        );
        return ExitCode::from(INTERRUPTED);
    }
    if delivered.left_for_later.is_none()
        && let Some((hint, code)) = dead_letter_outcome(delivered.sent, delivered.dead)
    {
        eprintln!("{hint}");
        return ExitCode::from(code);
    }
    ExitCode::SUCCESS
}

async fn report(store: &dyn Store, update: Ulid, json: bool) -> Result<()> {
    let record = store.update(update).await?;
    let counts = store.counts(Some(update)).await?;
    if json {
        say!(
            "{}",
            serde_json::json!({ "update": update.to_string(), "incident": record.incident.to_string(), "channels": counts })
        );
    } else {
        print_counts(&counts)?;
        say!("update {update}");
        say!("incident {}", record.incident);
    }
    Ok(())
}

fn print_counts(counts: &BTreeMap<String, Counts>) -> Result<()> {
    say!(
        "{:<16} {:>7} {:>9} {:>7} {:>8} {:>6} {:>7}",
        "channel",
        "queued",
        "in_flight",
        "sent",
        "retrying",
        "dead",
        "skipped"
    );
    for (channel, c) in counts {
        say!(
            "{:<16} {:>7} {:>9} {:>7} {:>8} {:>6} {:>7}",
            channel,
            c.queued,
            c.in_flight,
            c.sent,
            c.retrying,
            c.dead,
            c.skipped
        );
    }
    if counts.is_empty() {
        say!("(no deliveries)");
    }
    Ok(())
}

/// Needs only the configuration: the link is signed, nothing is stored. While a server runs,
/// it signs it (with the same secret), so a client without the secret could too.
async fn link(config: &Config, args: LinkArgs) -> Result<ExitCode> {
    let order = OrderNumber::parse(&args.order, &config.orders)?;
    let contact = match (&args.email, &args.phone) {
        (None, None) => None,
        (email, phone) => Some(contact_from(email.as_deref(), phone.as_deref())?),
    };
    if let Some(remote) = Remote::find(config).await? {
        let (email, phone) = contact_fields(contact.as_ref());
        let request = LinkRequest {
            order: order.to_string(),
            email,
            phone,
            expires: Some(format!("{}s", args.expires.as_secs())),
        };
        let link: SupportLink = remote.post("/links", &request, None).await?;
        say!("{}", link.url);
        return Ok(ExitCode::SUCCESS);
    }
    let links = crate::links::LinkMaker::new(config);
    let expires = crate::clock::after(Utc::now(), args.expires);
    say!("{}", links.support_url(&order, contact.as_ref(), expires));
    Ok(ExitCode::SUCCESS)
}

async fn order(config: Config, args: OrderArgs) -> Result<ExitCode> {
    let order = OrderNumber::parse(&args.order, &config.orders)?;
    let report: OrderReport = match Remote::find(&config).await? {
        Some(remote) => {
            remote
                .get(&format!("/orders/{}", path_segment(order.as_str())))
                .await?
        }
        None => {
            let store = open_store(&config).await?;
            crate::reports::order_report(store.as_ref(), &config, &order).await?
        }
    };
    if args.json {
        say!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &report.update {
        Some(update) => {
            say!(
                "order {order} · latest update {} ({}) · {}",
                update.id,
                parse_time(&update.created_at)
                    .map(human_time)
                    .unwrap_or_else(|| update.created_at.clone()),
                update.state
            );
            say!("  {}", terminal_safe(&update.headline));
            if let Some(next) = update.next_update_by.as_deref().and_then(parse_time) {
                say!("  next update promised by {}", human_time(next));
            }
        }
        None => say!("order {order}: no update applies to it yet"),
    }
    if report.contacts.is_empty() {
        say!("nobody follows order {order}, and nobody has");
    } else {
        say!("contacts that follow or followed {order}:");
        for contact in &report.contacts {
            let deliveries: Vec<String> = contact
                .deliveries
                .iter()
                .map(|(channel, state)| format!("{channel}: {state}"))
                .collect();
            let since = parse_time(&contact.since)
                .map(human_time)
                .unwrap_or_else(|| contact.since.clone());
            let stopped = if contact.stopped_on.is_empty() {
                String::new()
            } else {
                format!(" · stopped on {}", contact.stopped_on.join(", "))
            };
            say!(
                "  {} · {} {} {}{}{}",
                contact.contact,
                contact.state,
                since,
                contact.how,
                stopped,
                if deliveries.is_empty() {
                    String::new()
                } else {
                    format!(" · latest update: {}", deliveries.join(", "))
                }
            );
        }
    }
    if let Some(snippet) = &report.snippet {
        say!("\nreply to paste:\n{}", terminal_safe(snippet));
    }
    Ok(ExitCode::SUCCESS)
}

async fn deliveries(config: Config, args: DeliveriesArgs) -> Result<ExitCode> {
    let report: DeliveriesReport = match Remote::find(&config).await? {
        Some(remote) => {
            let mut path = format!("/deliveries?failed={}", args.failed);
            if let Some(update) = args.update {
                path.push_str(&format!("&update={update}"));
            }
            remote.get(&path).await?
        }
        None => {
            let store = open_store(&config).await?;
            crate::reports::deliveries_report(store.as_ref(), args.update, args.failed).await?
        }
    };
    if args.json {
        say!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(update) = &report.update else {
        say!("no update has been sent yet");
        return Ok(ExitCode::SUCCESS);
    };
    say!(
        "update {} · {} · {}",
        update,
        terminal_safe(report.headline.as_deref().unwrap_or_default()),
        report
            .created_at
            .as_deref()
            .and_then(parse_time)
            .map(human_time)
            .unwrap_or_default()
    );
    print_counts(&report.channels)?;
    if let Some(failures) = &report.failures {
        if failures.is_empty() {
            say!("\nno failures");
        } else {
            say!("\nfailures:");
        }
        for failure in failures {
            say!(
                "  {} {:?} after {} attempt(s): {}",
                failure.key(),
                failure.state,
                failure.attempts,
                terminal_safe(failure.last_error.as_deref().unwrap_or("-"))
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every flag and argument of every command, with the command's path, that has no help.
    fn without_help(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            if arg.is_hide_set() || arg.get_help().is_some() {
                continue;
            }
            missing.push(format!("{path} {}", arg.get_id()));
        }
        for sub in command.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(format!("{path} {} (the command)", sub.get_name()));
            }
            without_help(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    #[test]
    fn every_command_flag_and_argument_says_what_it_does() {
        let mut missing = Vec::new();
        let mut command = Cli::command();
        command.build();
        without_help(&command, "crier", &mut missing);
        // clap's own --help and --version explain themselves.
        missing.retain(|m| !m.ends_with(" help") && !m.ends_with(" version"));
        assert!(missing.is_empty(), "no help: {missing:?}");
    }

    #[test]
    fn serve_help_lists_what_it_serves() {
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_long_help()
            .to_string();
        for path in [
            "/subscribe",
            "/inbound/sms/",
            "/admin",
            "/api",
            "/metrics",
            "/healthz",
        ] {
            assert!(help.contains(path), "{path} in:\n{help}");
        }
    }
}
