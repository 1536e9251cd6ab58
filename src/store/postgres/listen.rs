//! Hearing other nodes: one connection of its own that `LISTEN`s on the store's channels and
//! ticks a watch for each notification, reconnecting (and ticking once, since anything may
//! have happened meanwhile) after the database comes back.

use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

/// How long to wait before connecting again after losing the database.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Listens on each channel, ticking its watch, until the task is aborted.
pub(super) fn spawn(
    config: tokio_postgres::Config,
    place: String,
    channels: &[(&'static str, watch::Sender<u64>)],
) -> tokio::task::JoinHandle<()> {
    let channels = channels.to_vec();
    tokio::spawn(async move {
        let mut lost = false;
        loop {
            match listen(&config, &channels, lost).await {
                Ok(()) => tracing::warn!(store = %place, "the notification connection closed"),
                Err(e) => tracing::warn!(
                    store = %place,
                    error = %e,
                    "cannot listen for other nodes' changes; trying again"
                ),
            }
            lost = true;
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    })
}

async fn listen(
    config: &tokio_postgres::Config,
    channels: &[(&'static str, watch::Sender<u64>)],
    tick_at_start: bool,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (heard, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled for the LISTEN below to be answered, so it runs apart.
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    if heard.send(notification.channel().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let statements: String = channels
        .iter()
        .map(|(channel, _)| format!("LISTEN {channel};"))
        .collect();
    client.batch_execute(&statements).await?;
    if tick_at_start {
        for (_, watch) in channels {
            watch.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
    while let Some(channel) = notifications.recv().await {
        if let Some((_, watch)) = channels.iter().find(|(name, _)| *name == channel) {
            watch.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}
