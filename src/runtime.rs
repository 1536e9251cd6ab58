//! Running the dispatcher for a command: the stop signal (Ctrl-C, SIGTERM) and delivering what
//! is queued with a progress bar. `send`, `dispatch` and `retry` use it; `serve` will too.

use crate::app::App;
use crate::delivery::DeliveryState;
use crate::dispatch::plan::plan_update_counting;
use crate::dispatch::{Dispatcher, Mode, Settled};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use ulid::Ulid;

/// How long `send` and `dispatch` wait for a retry before leaving it for a later
/// `crier dispatch`: they hold the store while they wait.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How many settled deliveries one pass of retention forgets at most, so a start-up after a
/// long time does not stall on it; the next pass goes on.
const PRUNED_PER_PASS: usize = 100_000;

/// How often `crier serve` forgets what is past its retention.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How soon `crier serve` tries again to plan an update while a shared store is away.
const PLAN_AGAIN_AFTER: Duration = Duration::from_secs(2);

/// How often `crier serve`, on a shared store, looks for plans a dead node left unfinished.
const PLAN_SWEEP_EVERY: Duration = Duration::from_secs(3);

/// Forgets the settled deliveries older than `retention` (one bounded pass).
pub async fn prune(store: &dyn crate::store::Store, retention: Duration) -> crate::Result<()> {
    let before = Utc::now() - chrono::TimeDelta::from_std(retention).unwrap_or_default();
    let forgotten = store.prune_settled(before, PRUNED_PER_PASS).await?;
    if forgotten > 0 {
        tracing::info!(
            forgotten,
            "settled deliveries past their retention were forgotten"
        );
    }
    Ok(())
}

/// How a run of the dispatcher ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivered {
    /// A stop request ended it first.
    pub interrupted: bool,
    /// The earliest retry it left queued for later.
    pub left_for_later: Option<DateTime<Utc>>,
    pub sent: u64,
    pub dead: u64,
    pub skipped: u64,
}

/// Runs the dispatcher until everything queued is delivered or dead-lettered (or waits for
/// longer than [`PATIENCE`]), with a progress bar when standard error is a terminal.
///
/// First it puts back in the queue the leases a process that died left, then it plans every
/// update whose planning has not finished (the one `send` just accepted, or one a crash
/// interrupted) while the dispatcher already delivers what is planned: the first message does
/// not wait for the last subscriber to be planned. `accepted` is the update `send` just
/// accepted, and when.
pub async fn deliver_queued(
    app: &App,
    stop: &StopSignal,
    accepted: Option<(Ulid, Instant)>,
) -> crate::Result<Delivered> {
    let started = accepted.map_or_else(Instant::now, |(_, at)| at);
    prune(app.store.as_ref(), app.config.retention).await?;
    let orphaned = app.store.recover_orphaned(&app.owner, Utc::now()).await?;
    if orphaned > 0 {
        eprintln!("{orphaned} deliveries left in flight by an earlier run are queued again");
    }
    let unfinished = app.store.unfinished_plans().await?;
    let resumed = unfinished
        .iter()
        .filter(|id| Some(**id) != accepted.map(|(id, _)| id))
        .count();
    let (planning_tx, planning_rx) = watch::channel(!unfinished.is_empty());
    let planned = Arc::new(AtomicU64::new(0));
    let planner = {
        let (store, channels) = (app.store.clone(), app.channels.clone());
        let (batch, planned) = (app.config.plan_batch, planned.clone());
        tokio::spawn(async move {
            let result = async {
                for id in unfinished {
                    let update = store.update(id).await?;
                    plan_update_counting(
                        store.as_ref(),
                        &update,
                        &channels,
                        batch,
                        Utc::now(),
                        &planned,
                    )
                    .await?;
                }
                Ok::<_, crate::store::StoreError>(())
            }
            .await;
            tracing::info!(
                deliveries = planned.load(Ordering::Relaxed),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "planning finished"
            );
            let _ = planning_tx.send(false);
            result
        })
    };

    let queued: u64 = app
        .store
        .counts(None)
        .await?
        .values()
        .map(|c| c.unsettled())
        .sum();
    let bar = ProgressBar::with_draw_target(Some(queued), progress_target());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Settled>();
    let dispatcher: Arc<Dispatcher> = Arc::new(
        app.dispatcher()
            .report_to(settled_tx)
            .while_planning(planning_rx),
    );
    let progress = {
        let (bar, planned) = (bar.clone(), planned.clone());
        tokio::spawn(async move {
            let mut tally = Delivered::default();
            while let Some(settled) = settled_rx.recv().await {
                match settled.state {
                    DeliveryState::Sent => {
                        if tally.sent == 0 {
                            tracing::info!(
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "first delivery settled"
                            );
                        }
                        tally.sent += 1;
                    }
                    DeliveryState::Dead => tally.dead += 1,
                    _ => tally.skipped += 1,
                }
                bar.set_length(queued + planned.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "sent {} · dead {} · skipped {}",
                    tally.sent, tally.dead, tally.skipped
                ));
                bar.inc(1);
            }
            tally
        })
    };
    let result = dispatcher
        .run(Mode::UntilDrained { patience: PATIENCE }, stop.receiver())
        .await;
    // The dispatcher waits for planning to end unless it was stopped (or failed) first: then
    // planning stops too, between two of its writes. It resumes at the next dispatch.
    if stop.was_requested() || result.is_err() {
        planner.abort();
    }
    let planning = planner.await;
    let mut delivered = progress.await.unwrap_or_default();
    bar.finish_and_clear();
    match planning {
        Ok(planned) => planned?,
        Err(stopped) if stopped.is_cancelled() => {}
        Err(failed) => return Err(failed.into()),
    }
    delivered.left_for_later = result?;
    delivered.interrupted = stop.was_requested();
    if resumed > 0 {
        eprintln!("finished planning {resumed} update(s) interrupted earlier");
    }
    Ok(delivered)
}

/// Runs `crier serve`: the web server on `config.listen` and the dispatcher, until a stop
/// request. Then it stops accepting requests, lets the attempts in flight finish (leases held
/// ahead go back to the queue), and returns. `ready` hears the address it listens on.
pub async fn serve(
    app: Arc<App>,
    stop: &StopSignal,
    ready: impl FnOnce(std::net::SocketAddr),
) -> crate::Result<()> {
    let listener = tokio::net::TcpListener::bind(app.config.listen)
        .await
        .map_err(|e| crate::Error::user(format!("cannot listen on {}: {e}", app.config.listen)))?;
    let address = listener.local_addr()?;
    app.renderer.require(crate::web::pages::TEMPLATES)?;
    let (plans, mut to_plan) = mpsc::unbounded_channel::<Ulid>();
    let api = crate::web::api::Api::new(app.clone(), plans.clone())?;
    let status = Arc::new(match app.status_page() {
        Some((channel, shape)) => {
            crate::web::StatusCache::new(app.status.clone(), Some(channel), shape)
        }
        None => crate::web::StatusCache::new(app.status.clone(), None, Default::default()),
    });
    status.refresh().await?;

    // The watchdog keeps the promise of a next update: it alerts the comms lead, and the
    // page, which says when an update is late, is rendered again whenever a promise changes.
    let alerter = crate::watchdog::LeadAlerter::new(&app)?
        .map(|alerter| Arc::new(alerter) as Arc<dyn crate::watchdog::Alerter>);
    let watchdog = crate::watchdog::Watchdog::new(
        app.store.clone(),
        crate::clock::Clock::System,
        app.config.alerts.lead_time,
        alerter,
    );
    let mut promises = watchdog.watched();
    let promises_watched = watchdog.watched();
    let watching = tokio::spawn(watchdog.run());
    let promise_refresher = {
        let status = status.clone();
        tokio::spawn(async move {
            while promises.changed().await.is_ok() {
                if let Err(error) = status.refresh().await {
                    tracing::error!(%error, "cannot render the status page");
                }
            }
        })
    };

    // On a store other nodes share, an update accepted or published on any node reaches this
    // node's page within moments, not at its next restart.
    let shared_refresher = app.store.update_changes().map(|mut changes| {
        let status = status.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                if let Err(error) = status.refresh().await {
                    tracing::error!(%error, "cannot render the status page");
                }
            }
        })
    });

    let pruner = {
        let (store, retention) = (app.store.clone(), app.config.retention);
        tokio::spawn(async move {
            loop {
                if let Err(error) = prune(store.as_ref(), retention).await {
                    tracing::error!(%error, "cannot forget settled deliveries");
                }
                tokio::time::sleep(PRUNE_EVERY).await;
            }
        })
    };
    let orphaned = app.store.recover_orphaned(&app.owner, Utc::now()).await?;
    if orphaned > 0 {
        tracing::warn!(
            orphaned,
            "deliveries left in flight by an earlier run are queued again"
        );
    }
    // Updates accepted through the API are planned here, one after another, after those an
    // earlier run left unfinished.
    for id in app.store.unfinished_plans().await? {
        let _ = plans.send(id);
    }
    // The plans the sweeper below has put in the planner's queue and the planner has not
    // taken yet.
    let offered: Arc<Mutex<HashSet<Ulid>>> = Arc::default();
    let planner = {
        let (store, channels, batch) = (
            app.store.clone(),
            app.channels.clone(),
            app.config.plan_batch,
        );
        let plan_again = plans.clone();
        let offered = offered.clone();
        tokio::spawn(async move {
            while let Some(id) = to_plan.recv().await {
                offered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                // On a shared store another node may be planning it: then that node finishes
                // it, or, if it dies, the sweep below brings it back here.
                let claim = match store.claim_plan(id).await {
                    Ok(Some(claim)) => claim,
                    Ok(None) => continue,
                    Err(error) => {
                        tracing::warn!(update = %id, %error, "cannot claim the update's planning now; trying again");
                        let again = plan_again.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(PLAN_AGAIN_AFTER).await;
                            let _ = again.send(id);
                        });
                        continue;
                    }
                };
                let planned = match store.update(id).await {
                    Ok(update) => {
                        plan_update_counting(
                            store.as_ref(),
                            &update,
                            &channels,
                            batch,
                            Utc::now(),
                            &AtomicU64::new(0),
                        )
                        .await
                    }
                    Err(error) => Err(error),
                };
                match planned {
                    Ok(_) => {}
                    // A shared database that is away comes back: planning resumes from its
                    // cursor then, without waiting for a restart.
                    Err(error)
                        if error.kind() == crate::error::ErrorKind::Unavailable
                            && store.shared() =>
                    {
                        tracing::warn!(update = %id, %error, "cannot plan the update now; trying again");
                        let again = plan_again.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(PLAN_AGAIN_AFTER).await;
                            let _ = again.send(id);
                        });
                    }
                    // The plan stays unfinished in the store: the next start resumes it.
                    Err(error) => {
                        tracing::error!(update = %id, %error, "cannot plan the update; the next start resumes it");
                    }
                }
                drop(claim);
            }
        })
    };

    // On a shared store, plans left unfinished (their node died mid-plan) are offered to this
    // node's planner now and then; the claim makes sure one node at a time takes each.
    let plan_sweeper = app.store.shared().then(|| {
        let (store, plans, offered) = (app.store.clone(), plans.clone(), offered.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PLAN_SWEEP_EVERY).await;
                match store.unfinished_plans().await {
                    Ok(ids) => {
                        for id in ids {
                            // Once in the planner's queue is enough: a long plan must not
                            // pile up copies of every other.
                            let fresh = offered
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(id);
                            if fresh {
                                let _ = plans.send(id);
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot look for unfinished plans"),
                }
            }
        })
    });

    // The page is rendered again whenever its channel settles a delivery.
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Settled>();
    let refresher = {
        let status = status.clone();
        tokio::spawn(async move {
            while let Some(settled) = settled_rx.recv().await {
                if Some(settled.channel.as_str()) == status.channel()
                    && let Err(error) = status.refresh().await
                {
                    tracing::error!(%error, "cannot render the status page");
                }
            }
        })
    };
    let dispatcher = Arc::new(app.dispatcher().report_to(settled_tx));
    let dispatching = tokio::spawn(dispatcher.run(Mode::Forever, stop.receiver()));

    // The CLI finds the server here, and goes through its API instead of the locked store.
    let _announcement = crate::remote::Announcement::write(&app.config, address)?;
    ready(address);
    let mut stopped = stop.receiver();
    let pages = crate::web::pages::Pages {
        renderer: app.renderer.clone(),
        brand: app.composer.brand().clone(),
        links: app.composer.links().clone(),
        signer: app.composer.link_maker().signer().clone(),
    };
    let console = Arc::new(crate::web::console::Console::new(api.clone())?);
    let router = crate::web::router(crate::web::Shared {
        status,
        store: app.store.clone(),
        pages: Arc::new(pages),
        inbound: Arc::new(crate::web::inbound::Inbound::new(&app.config)),
        subscriptions: Arc::new(crate::web::subscribe::Subscriptions::new(&app)),
        api,
        promises: promises_watched,
        metrics: crate::web::prometheus::install(),
        console,
    });
    // Each request carries its client's address, which the limits on confirmations count.
    crate::web::listener::serve(
        listener,
        router,
        app.config.connections,
        app.config.trusted_proxies.clone(),
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        },
    )
    .await;
    let dispatched = dispatching.await?;
    planner.abort();
    let _ = planner.await;
    refresher.abort();
    if let Some(shared_refresher) = shared_refresher {
        shared_refresher.abort();
    }
    if let Some(plan_sweeper) = plan_sweeper {
        plan_sweeper.abort();
    }
    pruner.abort();
    watching.abort();
    promise_refresher.abort();
    dispatched?;
    Ok(())
}

fn progress_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// Listens for Ctrl-C (SIGINT) and, on Unix, SIGTERM from the moment it is installed, so a
/// stop asked for while the update is being stored or planned is honoured at the next clean
/// point instead of killing the process.
pub struct StopSignal {
    requested: watch::Receiver<bool>,
    listener: tokio::task::JoinHandle<()>,
}

impl StopSignal {
    pub fn install() -> crate::Result<Self> {
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

    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.requested.clone()
    }

    pub fn was_requested(&self) -> bool {
        *self.requested.borrow()
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        self.listener.abort();
    }
}
