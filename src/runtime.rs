//! Running the dispatcher for a command: the stop signal (Ctrl-C, SIGTERM) and delivering what
//! is queued with a progress bar. `send`, `dispatch` and `retry` use it; `serve` will too.

use crate::app::App;
use crate::delivery::DeliveryState;
use crate::dispatch::{Dispatcher, Mode, Settled};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long `send` and `dispatch` wait for a retry before leaving it for a later
/// `crier dispatch`: they hold the store while they wait.
pub const PATIENCE: Duration = Duration::from_secs(60);

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
pub async fn deliver_queued(app: &App, stop: &StopSignal) -> crate::Result<Delivered> {
    let recovered = app.recover().await?;
    if recovered.orphaned > 0 {
        eprintln!(
            "{} deliveries left in flight by an earlier run are queued again",
            recovered.orphaned
        );
    }
    if recovered.planned > 0 {
        eprintln!(
            "finished planning interrupted earlier: {} deliveries queued",
            recovered.planned
        );
    }
    let total: u64 = app
        .store
        .counts(None)
        .await?
        .values()
        .map(|c| c.unsettled())
        .sum();
    let bar = ProgressBar::with_draw_target(Some(total), progress_target());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Settled>();
    let dispatcher: Arc<Dispatcher> = Arc::new(app.dispatcher().report_to(settled_tx));
    let progress = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut tally = Delivered::default();
            while let Some(settled) = settled_rx.recv().await {
                match settled.state {
                    DeliveryState::Sent => tally.sent += 1,
                    DeliveryState::Dead => tally.dead += 1,
                    _ => tally.skipped += 1,
                }
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
    let mut delivered = progress.await.unwrap_or_default();
    bar.finish_and_clear();
    delivered.left_for_later = result?;
    delivered.interrupted = stop.was_requested();
    Ok(delivered)
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
