//! The command line: clap definitions and one function per command.

use crate::UserError;
use crate::app::{App, Composed, Draft};
use crate::config::{Config, ProcessEnv};
use crate::dispatch::{Dispatcher, Finished, Mode};
use crate::domain::token::TokenPurpose;
use crate::domain::{Audience, Contact, EmailAddress, IncidentState, OrderNumber, PhoneNumber};
use crate::render::Renderer;
use crate::store::{Counts, DeliveryState, Store};
use anyhow::Context;
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use ulid::Ulid;

/// Exit code after Ctrl-C: the usual 128 + SIGINT.
const INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "crier",
    version,
    about = "One customer update, typed once, delivered to every channel.",
    long_about = "One customer update, typed once, delivered to every channel: subscribers by \
                  email, partners by signed webhook, and the public status page.\n\n\
                  Exit codes: 0 success, 1 a mistake in the input or configuration (the message \
                  says which), 2 an internal error, 130 stopped by Ctrl-C or SIGTERM (run `crier dispatch` \
                  to deliver the rest)."
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
    /// Store an update and deliver it to every channel, with a progress bar.
    Send(SendArgs),
    /// Render an update for every channel and check each channel's limits, without sending.
    Preview(PreviewArgs),
    /// Follow an order by email or phone.
    Subscribe(SubscribeArgs),
    /// Stop updates for a contact (all of them, or one order's), or redeem an unsubscribe token.
    Unsubscribe(UnsubscribeArgs),
    /// Deliver whatever is queued (after a crash or Ctrl-C), then exit.
    Dispatch(JsonArgs),
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
    #[arg(long, value_enum)]
    pub state: Option<IncidentState>,
    /// Continue this incident (its id, as printed by an earlier send) instead of opening a new one.
    #[arg(long)]
    pub incident: Option<Ulid>,
    /// Promise the next update within this long, like 2h or 30m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub next_update_in: Option<Duration>,
    /// Send only to the subscribers of these orders (comma-separated). Of the broadcast
    /// channels only webhooks get it, marked as targeted.
    #[arg(long, value_delimiter = ',', conflicts_with = "orders_file")]
    pub orders: Vec<String>,
    /// Like --orders, with one order number per line of this file (- for standard input).
    #[arg(long)]
    pub orders_file: Option<PathBuf>,
    /// Send through only this channel; repeat for several [default: every channel].
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
#[command(group(clap::ArgGroup::new("who").required(true).args(["email", "phone", "token"])))]
pub struct UnsubscribeArgs {
    #[arg(long)]
    pub email: Option<String>,
    #[arg(long)]
    pub phone: Option<String>,
    /// An unsubscribe token, as found in a message's List-Unsubscribe link.
    #[arg(long)]
    pub token: Option<String>,
    /// Stop only this order's updates.
    #[arg(long)]
    pub order: Option<String>,
}

#[derive(Debug, Args)]
pub struct JsonArgs {
    /// Print one JSON object with the counts per channel.
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

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(&cli.config, &ProcessEnv)?;
    match cli.command {
        Command::CheckConfig => check_config(&config),
        Command::Subscribe(args) => subscribe(config, args),
        Command::Unsubscribe(args) => unsubscribe(config, args),
        Command::Preview(args) => preview(config, args),
        Command::Send(args) => send(config, args).await,
        Command::Dispatch(args) => dispatch(config, args).await,
        Command::Deliveries(args) => deliveries(config, args),
        Command::Retry(args) => retry(config, args).await,
    }
}

fn check_config(config: &Config) -> anyhow::Result<ExitCode> {
    let renderer = Renderer::load(&config.templates_dir)?;
    crate::channel::check_templates(config, &renderer)?;
    println!("{}: OK", config.file.display());
    for channel in &config.channels {
        println!(
            "  channel {} ({}) from {}",
            channel.name,
            channel.kind.name(),
            channel.file.display()
        );
    }
    if config.channels.is_empty() {
        println!("  no channels are configured: updates would reach nobody");
    }
    Ok(ExitCode::SUCCESS)
}

/// Only the store is needed to manage subscribers, so no channel is built. sled creates the
/// store's folders.
fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(Store::open(&config.store)?)
}

fn contact_from(email: Option<&str>, phone: Option<&str>) -> anyhow::Result<Contact> {
    Ok(match (email, phone) {
        (Some(email), _) => Contact::Email(EmailAddress::parse(email)?),
        (None, Some(phone)) => Contact::Phone(PhoneNumber::parse(phone)?),
        (None, None) => return Err(UserError("give --email or --phone".into()).into()),
    })
}

fn subscribe(config: Config, args: SubscribeArgs) -> anyhow::Result<ExitCode> {
    let order = OrderNumber::parse(&args.order, &config.orders)?;
    let contact = contact_from(args.email.as_deref(), args.phone.as_deref())?;
    let store = open_store(&config)?;
    let subscriber = store.subscribe(&contact, &order, args.confirmed, Utc::now())?;
    let orders: Vec<String> = subscriber.orders.iter().map(ToString::to_string).collect();
    println!(
        "{} follows {} ({})",
        subscriber.contact,
        orders.join(", "),
        serde_json::to_value(subscriber.state)?
            .as_str()
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

fn unsubscribe(config: Config, args: UnsubscribeArgs) -> anyhow::Result<ExitCode> {
    let order = args
        .order
        .as_deref()
        .map(|o| OrderNumber::parse(o, &config.orders))
        .transpose()?;
    let contact = match &args.token {
        Some(token) => {
            let signer = crate::domain::token::TokenSigner::new(&config.link_secret);
            let subject = signer.verify(TokenPurpose::Unsubscribe, token, Utc::now())?;
            Contact::parse(&subject)?
        }
        None => contact_from(args.email.as_deref(), args.phone.as_deref())?,
    };
    let store = open_store(&config)?;
    let subscriber = store.unsubscribe(&contact, order.as_ref(), Utc::now())?;
    match order {
        Some(order) => println!("{} no longer follows {order}", subscriber.contact),
        None => println!("{} is unsubscribed from every update", subscriber.contact),
    }
    Ok(ExitCode::SUCCESS)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read standard input")?;
    Ok(text)
}

fn draft(config: &Config, args: ComposeArgs) -> anyhow::Result<Draft> {
    let body = match args.body.as_deref() {
        Some("-") => read_stdin()?,
        Some(body) => body.to_owned(),
        None => return Err(UserError("the update's text is missing: give it as the last argument, or - to read it from standard input".into()).into()),
    };
    let raw_orders: Vec<String> = match &args.orders_file {
        Some(path) => {
            let text = if path == Path::new("-") {
                read_stdin()?
            } else {
                std::fs::read_to_string(path)
                    .map_err(|e| UserError(format!("cannot read {}: {e}", path.display())))?
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
            return Err(UserError("the orders file lists no order numbers".into()).into());
        }
        Audience::Everyone
    } else {
        let orders = raw_orders
            .iter()
            .map(|o| OrderNumber::parse(o, &config.orders))
            .collect::<Result<BTreeSet<_>, _>>()?;
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

fn print_previews(composed: &Composed) {
    let update = &composed.update;
    println!("incident {} · {}", composed.incident.title, update.state);
    if let Some(next) = update.next_update_by {
        println!("next update by {}", crate::render::human_time(next));
    }
    match &update.audience {
        Audience::Everyone => println!("audience: everyone"),
        Audience::Orders(orders) => {
            let orders: Vec<&str> = orders.iter().map(|o| o.as_str()).collect();
            println!(
                "audience: the subscribers of {} (targeted)",
                orders.join(", ")
            );
        }
    }
    for (channel, parts) in &composed.previews {
        println!("\n=== {channel} ===");
        for part in parts {
            println!("--- {} ---\n{}", part.part, part.text.trim_end());
        }
    }
}

fn preview(config: Config, args: PreviewArgs) -> anyhow::Result<ExitCode> {
    let draft = draft(&config, args.compose)?;
    let app = App::open(config)?;
    let composed = app.compose(draft)?;
    if args.json {
        let channels: BTreeMap<&str, _> = composed
            .previews
            .iter()
            .map(|(name, parts)| (name.as_str(), parts))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "update": &composed.update, "channels": channels })
        );
    } else {
        print_previews(&composed);
    }
    Ok(ExitCode::SUCCESS)
}

fn confirm_send(composed: &Composed) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(UserError("not sending without confirmation: add --yes (standard input is not a terminal to ask on)".into()).into());
    }
    print_previews(composed);
    print!(
        "\nSend this update through {} channel(s)? [y/N] ",
        composed.previews.len()
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        return Err(UserError("not sent".into()).into());
    }
    Ok(())
}

async fn send(config: Config, args: SendArgs) -> anyhow::Result<ExitCode> {
    let reads_stdin = args.compose.body.as_deref() == Some("-");
    let draft = draft(&config, args.compose)?;
    let app = App::open(config)?;
    let composed = app.compose(draft)?;
    if !args.yes {
        if reads_stdin {
            return Err(UserError(
                "the text came from standard input, so add --yes to send it".into(),
            )
            .into());
        }
        confirm_send(&composed)?;
    }
    // From here on a stop request waits for a clean point instead of killing the process.
    let stop = StopSignal::install()?;
    app.accept(&composed).await?;
    let update = &composed.update;
    eprintln!(
        "accepted update {} (incident {})",
        update.id, update.incident
    );
    let interrupted = deliver_queued(&app, &stop).await?;
    report(&app.store, update.id, args.json)?;
    Ok(exit_after(interrupted))
}

async fn dispatch(config: Config, args: JsonArgs) -> anyhow::Result<ExitCode> {
    let app = App::open(config)?;
    let stop = StopSignal::install()?;
    let interrupted = deliver_queued(&app, &stop).await?;
    let counts = app.store.counts(None)?;
    if args.json {
        println!("{}", serde_json::json!({ "channels": counts }));
    } else {
        print_counts(&counts);
    }
    Ok(exit_after(interrupted))
}

async fn retry(config: Config, args: RetryArgs) -> anyhow::Result<ExitCode> {
    let app = App::open(config)?;
    let stop = StopSignal::install()?;
    let requeued = app.store.requeue_dead(args.update, Utc::now())?;
    let channels: BTreeSet<&str> = requeued.iter().map(|r| r.channel.as_str()).collect();
    for channel in channels {
        if app.store.enable_channel(channel)? {
            eprintln!("channel {channel} is enabled again");
        }
    }
    app.store.commit().await?;
    eprintln!("{} dead letter(s) queued again", requeued.len());
    let interrupted = deliver_queued(&app, &stop).await?;
    let counts = app.store.counts(args.update)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "requeued": requeued.len(), "channels": counts })
        );
    } else {
        print_counts(&counts);
    }
    Ok(exit_after(interrupted))
}

fn exit_after(interrupted: bool) -> ExitCode {
    if interrupted {
        eprintln!(
            "stopped by Ctrl-C or SIGTERM; the rest stays queued: run `crier dispatch` to deliver it"
        );
        ExitCode::from(INTERRUPTED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs the dispatcher until everything queued is delivered or dead-lettered, with a progress
/// bar on a terminal. Returns whether a stop request ended it first.
async fn deliver_queued(app: &App, stop: &StopSignal) -> anyhow::Result<bool> {
    let recovered = app.recover().await?;
    if recovered > 0 {
        eprintln!("{recovered} deliveries left by an earlier run are queued again");
    }
    let total = app.store.unfinished_deliveries() as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<Finished>();
    let dispatcher: Arc<Dispatcher> = Arc::new(app.dispatcher().report_to(finished_tx));
    let progress = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let (mut sent, mut dead, mut skipped) = (0u64, 0u64, 0u64);
            while let Some(finished) = finished_rx.recv().await {
                match finished.state {
                    DeliveryState::Sent => sent += 1,
                    DeliveryState::Dead => dead += 1,
                    _ => skipped += 1,
                }
                bar.set_message(format!("sent {sent} · dead {dead} · skipped {skipped}"));
                bar.inc(1);
            }
        })
    };
    let result = dispatcher.run(Mode::UntilDrained, stop.receiver()).await;
    progress.await.ok();
    bar.finish_and_clear();
    result?;
    Ok(stop.was_requested())
}

/// Listens for Ctrl-C (SIGINT) and, on Unix, SIGTERM from the moment it is installed, so a
/// stop asked for while the update is being stored or planned is honoured at the next clean
/// point instead of killing the process.
struct StopSignal {
    requested: watch::Receiver<bool>,
    listener: tokio::task::JoinHandle<()>,
}

impl StopSignal {
    fn install() -> anyhow::Result<Self> {
        let (request, requested) = watch::channel(false);
        #[cfg(unix)]
        let listener = {
            use tokio::signal::unix::{SignalKind, signal};
            // Registered here, synchronously: from now on the signals are ours.
            let mut interrupt = signal(SignalKind::interrupt())?;
            let mut terminate = signal(SignalKind::terminate())?;
            tokio::spawn(async move {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                let _ = request.send(true);
            })
        };
        #[cfg(not(unix))]
        let listener = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = request.send(true);
            }
        });
        Ok(Self {
            requested,
            listener,
        })
    }

    fn receiver(&self) -> watch::Receiver<bool> {
        self.requested.clone()
    }

    fn was_requested(&self) -> bool {
        *self.requested.borrow()
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn report(store: &Store, update: Ulid, json: bool) -> anyhow::Result<()> {
    let record = store.update(update)?;
    let counts = store.counts(Some(update))?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "update": update.to_string(), "incident": record.incident.to_string(), "channels": counts })
        );
    } else {
        print_counts(&counts);
        println!("update {update}");
        println!("incident {}", record.incident);
    }
    Ok(())
}

fn print_counts(counts: &BTreeMap<String, Counts>) {
    println!(
        "{:<16} {:>7} {:>9} {:>7} {:>8} {:>6} {:>7}",
        "channel", "queued", "in_flight", "sent", "retrying", "dead", "skipped"
    );
    for (channel, c) in counts {
        println!(
            "{:<16} {:>7} {:>9} {:>7} {:>8} {:>6} {:>7}",
            channel, c.queued, c.in_flight, c.sent, c.retrying, c.dead, c.skipped
        );
    }
    if counts.is_empty() {
        println!("(no deliveries)");
    }
}

fn deliveries(config: Config, args: DeliveriesArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&config)?;
    let update = match args.update {
        Some(id) => store.update(id)?,
        None => match store.recent_updates(1)?.into_iter().next() {
            Some(latest) => latest,
            None => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({ "update": null, "incident": null, "channels": {} })
                    );
                } else {
                    println!("no update has been sent yet");
                }
                return Ok(ExitCode::SUCCESS);
            }
        },
    };
    let counts = store.counts(Some(update.id))?;
    let failures: Vec<_> = if args.failed {
        store
            .deliveries(Some(update.id))
            .filter(|r| {
                r.as_ref()
                    .map(|r| matches!(r.state, DeliveryState::Dead | DeliveryState::Retrying))
                    .unwrap_or(true)
            })
            .collect::<Result<_, _>>()?
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
        println!("{object}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "update {} · {} · {}",
        update.id,
        update.headline.as_str(),
        crate::render::human_time(update.created_at)
    );
    print_counts(&counts);
    if args.failed {
        if failures.is_empty() {
            println!("\nno failures");
        } else {
            println!("\nfailures:");
        }
        for failure in &failures {
            println!(
                "  {} {:?} after {} attempt(s): {}",
                failure.key(),
                failure.state,
                failure.attempts,
                failure.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
