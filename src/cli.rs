//! The command line: clap definitions and one function per command.

use crate::app::{App, Composed, Draft};
use crate::config::{Config, ProcessEnv};
use crate::delivery::{Counts, DeliveryRecord};
use crate::domain::token::TokenPurpose;
use crate::domain::{Audience, Contact, EmailAddress, IncidentState, OrderNumber, PhoneNumber};
use crate::error::{Error, Result};
use crate::render::{Renderer, human_time};
use crate::runtime::{Delivered, StopSignal, deliver_queued};
use crate::store::{DeliveryFilter, Store};
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, BTreeSet};
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
    /// Serve the status page and health checks, and deliver whatever is queued, until Ctrl-C
    /// or SIGTERM.
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
    #[arg(long, value_parser = crate::domain::parse_next_update_in)]
    pub next_update_in: Option<Duration>,
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
    #[arg(long)]
    pub email: Option<String>,
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
    #[arg(long, default_value = "7d", value_parser = parse_link_expiry)]
    pub expires: Duration,
}

#[derive(Debug, Args)]
pub struct OrderArgs {
    /// The order number, as the customer gives it.
    pub order: String,
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
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Only this update's dead letters [default: all of them].
    #[arg(long)]
    pub update: Option<Ulid>,
    #[arg(long)]
    pub json: bool,
}

fn parse_state(text: &str) -> std::result::Result<IncidentState, String> {
    text.parse()
        .map_err(|e: crate::domain::DomainError| e.to_string())
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let config = Config::load(&cli.config, &ProcessEnv)?;
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
        Command::Link(args) => link(&config, args),
        Command::Deliveries(args) => deliveries(config, args).await,
        Command::Retry(args) => retry(config, args).await,
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
    say!("{}: OK", config.file.display());
    for channel in &config.channels {
        say!(
            "  channel {} ({}) from {}",
            channel.id,
            channel.kind.name,
            channel.file.display()
        );
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

async fn subscribe(config: Config, args: SubscribeArgs) -> Result<ExitCode> {
    let order = OrderNumber::parse(&args.order, &config.orders)?;
    let contact = contact_from(args.email.as_deref(), args.phone.as_deref())?;
    let store = open_store(&config).await?;
    let subscriber = store
        .subscribe(&contact, &order, args.confirmed, Utc::now())
        .await?;
    let orders: Vec<String> = subscriber.orders.iter().map(ToString::to_string).collect();
    say!(
        "{} follows {} ({})",
        subscriber.contact,
        orders.join(", "),
        serde_json::to_value(subscriber.state)?
            .as_str()
            .unwrap_or_default()
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
    let store = open_store(&config).await?;
    let report = crate::import::import(
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
    .await?;
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
            let subject = signer.verify(TokenPurpose::Unsubscribe, token, Utc::now())?;
            Contact::parse(&subject)?
        }
        None => contact_from(args.email.as_deref(), args.phone.as_deref())?,
    };
    let store = open_store(&config).await?;
    let subscriber = store
        .unsubscribe(&contact, order.as_ref(), Utc::now())
        .await?;
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

fn draft(config: &Config, args: ComposeArgs) -> Result<Draft> {
    let body = match args.body.as_deref() {
        Some("-") => read_stdin()?,
        Some(body) => body.to_owned(),
        None => {
            return Err(Error::user(
                "the update's text is missing: give it as the last argument, or - to read it from standard input",
            ));
        }
    };
    let raw_orders: Vec<String> = match &args.orders_file {
        Some(path) => {
            let text = if path == Path::new("-") {
                read_stdin()?
            } else {
                std::fs::read_to_string(path)
                    .map_err(|e| Error::user(format!("cannot read {}: {e}", path.display())))?
            };
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        }
        None => args.orders.clone(),
    };
    let audience = if raw_orders.is_empty() {
        if args.orders_file.is_some() {
            return Err(Error::user("the orders file lists no order numbers"));
        }
        Audience::Everyone
    } else {
        let orders = raw_orders
            .iter()
            .map(|o| OrderNumber::parse(o, &config.orders))
            .collect::<std::result::Result<BTreeSet<_>, _>>()?;
        Audience::Orders(orders)
    };
    Ok(Draft {
        headline: args.headline,
        body,
        state: args.state,
        incident: args.incident,
        next_update_in: args.next_update_in,
        audience,
        channels: args.channels,
        author: args
            .author
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "crier".into()),
    })
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

fn print_previews(composed: &Composed) -> Result<()> {
    let update = &composed.update;
    say!(
        "incident {} · {}",
        terminal_safe(&composed.incident.title),
        update.state
    );
    if let Some(next) = update.next_update_by {
        say!("next update by {}", human_time(next));
    }
    match &update.audience {
        Audience::Everyone => say!("audience: everyone"),
        Audience::Orders(orders) => {
            let orders: Vec<&str> = orders.iter().map(|o| o.as_str()).collect();
            say!(
                "audience: the subscribers of {} (targeted)",
                orders.join(", ")
            );
        }
    }
    for (channel, parts) in &composed.previews {
        say!("\n=== {channel} ===");
        for part in parts {
            say!(
                "--- {} ---\n{}",
                part.part,
                terminal_safe(part.text.trim_end())
            );
        }
    }
    Ok(())
}

async fn preview(config: Config, args: PreviewArgs) -> Result<ExitCode> {
    let draft = draft(&config, args.compose)?;
    let app = App::open(config).await?;
    let composed = app.compose(draft).await?;
    if args.json {
        let channels: BTreeMap<&str, _> = composed
            .previews
            .iter()
            .map(|(name, parts)| (name.as_str(), parts))
            .collect();
        say!(
            "{}",
            serde_json::json!({ "update": &composed.update, "channels": channels })
        );
    } else {
        print_previews(&composed)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn confirm_send(composed: &Composed) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::user(
            "not sending without confirmation: add --yes (standard input is not a terminal to ask on)",
        ));
    }
    print_previews(composed)?;
    print!(
        "\nSend this update through {} channel(s)? [y/N] ",
        composed.previews.len()
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
    let app = App::open(config).await?;
    let stop = StopSignal::install()?;
    crate::runtime::serve(&app, &stop, |address| {
        eprintln!("crier serves http://{address}/ (Ctrl-C or SIGTERM to stop)");
    })
    .await?;
    eprintln!("stopped; whatever was still queued stays queued for the next start");
    Ok(ExitCode::SUCCESS)
}

async fn send(config: Config, args: SendArgs) -> Result<ExitCode> {
    let reads_stdin = args.compose.body.as_deref() == Some("-");
    let draft = draft(&config, args.compose)?;
    let app = App::open(config).await?;
    let composed = app.compose(draft).await?;
    if !args.yes {
        if reads_stdin {
            return Err(Error::user(
                "the text came from standard input, so add --yes to send it",
            ));
        }
        confirm_send(&composed)?;
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

async fn retry(config: Config, args: RetryArgs) -> Result<ExitCode> {
    let app = App::open(config).await?;
    let stop = StopSignal::install()?;
    let requeued = app.store.requeue_dead(args.update, Utc::now()).await?;
    let channels: BTreeSet<&str> = requeued.iter().map(|r| r.channel.as_str()).collect();
    for channel in channels {
        if app.store.enable_channel(channel).await? {
            eprintln!("channel {channel} is enabled again");
        }
    }
    eprintln!("{} dead letter(s) queued again", requeued.len());
    let delivered = deliver_queued(&app, &stop, None).await?;
    let counts = app.store.counts(args.update).await?;
    if args.json {
        say!(
            "{}",
            serde_json::json!({ "requeued": requeued.len(), "channels": counts })
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
    if delivered.sent == 0 && delivered.dead > 0 && delivered.left_for_later.is_none() {
        eprintln!(
            "nothing was delivered: {} deliveries went to dead letters; see `crier deliveries --failed`",
            delivered.dead
        );
        return ExitCode::from(NOTHING_DELIVERED);
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

/// How far back `order` looks for an update that applies.
const UPDATES_SEARCHED: usize = 1000;
/// How long the support link in `order`'s reply works.
const SUPPORT_LINK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How many contacts of one order `order` lists at most.
const CONTACTS_LISTED: usize = 100;

/// A support link's lifetime: at least an hour (a customer reads support's reply later), at
/// most 90 days (a link in an old ticket should not work forever).
fn parse_link_expiry(text: &str) -> std::result::Result<Duration, String> {
    let wait = humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration like 7d or 12h: {e}"))?;
    if !(Duration::from_secs(3600)..=Duration::from_secs(90 * 24 * 3600)).contains(&wait) {
        return Err(format!("'{text}' is not between an hour and 90 days"));
    }
    Ok(wait)
}

/// Needs only the configuration: the link is signed, nothing is stored.
fn link(config: &Config, args: LinkArgs) -> Result<ExitCode> {
    let order = OrderNumber::parse(&args.order, &config.orders)?;
    let contact = match (&args.email, &args.phone) {
        (None, None) => None,
        (email, phone) => Some(contact_from(email.as_deref(), phone.as_deref())?),
    };
    let links = crate::links::LinkMaker::new(config);
    let expires = crate::clock::after(Utc::now(), args.expires);
    say!("{}", links.support_url(&order, contact.as_ref(), expires));
    Ok(ExitCode::SUCCESS)
}

async fn order(config: Config, args: OrderArgs) -> Result<ExitCode> {
    let order = OrderNumber::parse(&args.order, &config.orders)?;
    let store = open_store(&config).await?;
    let latest = store
        .recent_updates(UPDATES_SEARCHED)
        .await?
        .into_iter()
        .find(|update| match &update.audience {
            Audience::Everyone => true,
            Audience::Orders(orders) => orders.contains(&order),
        });
    let audience = Audience::Orders(BTreeSet::from([order.clone()]));
    let followers = store
        .subscriber_page(&audience, None, CONTACTS_LISTED)
        .await?
        .items;
    let mut contacts = Vec::new();
    for subscriber in &followers {
        let mut deliveries = BTreeMap::new();
        if let Some(update) = &latest {
            for channel in &update.channels {
                let recipient = crate::delivery::Recipient::Contact(subscriber.contact.clone());
                let key = crate::delivery::DeliveryKey::new(update.id, channel, &recipient);
                if let Some(record) = store.delivery(&key).await? {
                    deliveries.insert(channel.clone(), record.state);
                }
            }
        }
        contacts.push(serde_json::json!({
            "contact": subscriber.contact.masked(),
            "state": subscriber.state,
            "deliveries": deliveries,
        }));
    }
    let status_page = format!("{}/", config.brand.public_url);
    let links = crate::links::LinkMaker::new(&config);
    let snippet = latest.as_ref().map(|update| {
        let mut text = format!(
            "Here is the latest on your order {order}: {}\n\n{}",
            update.headline.as_str(),
            update.body.as_str()
        );
        if let Some(next) = update.next_update_by {
            text.push_str(&format!("\n\nNext update by {}.", human_time(next)));
        }
        text.push_str(&format!("\n\nEvery update, as it happens: {status_page}"));
        text.push_str(&format!(
            "\nTo get the next ones by email or SMS: {}",
            links.support_url(
                &order,
                None,
                crate::clock::after(Utc::now(), SUPPORT_LINK_TTL)
            )
        ));
        text
    });
    if args.json {
        say!(
            "{}",
            serde_json::json!({
                "order": order.as_str(),
                "update": latest.as_ref().map(|u| serde_json::json!({
                    "id": u.id.to_string(),
                    "incident": u.incident.to_string(),
                    "state": u.state.as_str(),
                    "headline": u.headline.as_str(),
                    "next_update_by": u.next_update_by.map(crate::render::rfc3339),
                    "created_at": crate::render::rfc3339(u.created_at),
                })),
                "contacts": contacts,
                "snippet": snippet,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    match &latest {
        Some(update) => {
            say!(
                "order {order} · latest update {} ({}) · {}",
                update.id,
                human_time(update.created_at),
                update.state
            );
            say!("  {}", terminal_safe(update.headline.as_str()));
            if let Some(next) = update.next_update_by {
                say!("  next update promised by {}", human_time(next));
            }
        }
        None => say!("order {order}: no update applies to it yet"),
    }
    if contacts.is_empty() {
        say!("nobody follows order {order}");
    } else {
        say!("contacts following {order}:");
        for contact in &contacts {
            let deliveries: Vec<String> = contact["deliveries"]
                .as_object()
                .map(|d| {
                    d.iter()
                        .map(|(channel, state)| {
                            format!("{channel}: {}", state.as_str().unwrap_or("?"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            say!(
                "  {} ({}){}",
                contact["contact"].as_str().unwrap_or_default(),
                contact["state"].as_str().unwrap_or_default(),
                if deliveries.is_empty() {
                    String::new()
                } else {
                    format!(" · {}", deliveries.join(", "))
                }
            );
        }
    }
    if let Some(snippet) = snippet {
        say!("\nreply to paste:\n{}", terminal_safe(&snippet));
    }
    Ok(ExitCode::SUCCESS)
}

/// How many failures `deliveries --failed` lists at most.
const FAILURES_SHOWN: usize = 1000;

async fn deliveries(config: Config, args: DeliveriesArgs) -> Result<ExitCode> {
    let store = open_store(&config).await?;
    let update = match args.update {
        Some(id) => store.update(id).await?,
        None => match store.recent_updates(1).await?.into_iter().next() {
            Some(latest) => latest,
            None => {
                if args.json {
                    say!(
                        "{}",
                        serde_json::json!({ "update": null, "incident": null, "channels": {} })
                    );
                } else {
                    say!("no update has been sent yet");
                }
                return Ok(ExitCode::SUCCESS);
            }
        },
    };
    let counts = store.counts(Some(update.id)).await?;
    let failures: Vec<DeliveryRecord> = if args.failed {
        store
            .deliveries(update.id, DeliveryFilter::Failed, None, FAILURES_SHOWN)
            .await?
            .items
    } else {
        Vec::new()
    };
    if args.json {
        let mut object = serde_json::json!({
            "update": update.id.to_string(),
            "incident": update.incident.to_string(),
            "channels": counts,
        });
        if args.failed {
            object["failures"] = serde_json::to_value(&failures)?;
        }
        say!("{object}");
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "update {} · {} · {}",
        update.id,
        terminal_safe(update.headline.as_str()),
        human_time(update.created_at)
    );
    print_counts(&counts)?;
    if args.failed {
        if failures.is_empty() {
            say!("\nno failures");
        } else {
            say!("\nfailures:");
        }
        for failure in &failures {
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
