//! Accepting `crier serve`'s connections: at most so many at once (when full, the oldest
//! makes room for the newest), and so many from one client, each request's head read within a
//! deadline (also while a kept-alive connection waits for its next request), so clients that
//! open connections and send nothing, or trickle a header, cannot use up the file descriptors
//! and take `/healthz` down with them.

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

/// How many connections `crier serve` keeps, and how long a request may take to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once. One more asks the oldest to close (after the request it is
    /// answering, if any): a flood of idle connections cannot keep a new client out, and the
    /// descriptors never run out.
    pub total: usize,
    /// Connections open at once from one client address (an IPv6 client by its /64); trusted
    /// proxies, which carry many clients, are not counted.
    pub per_client: usize,
    /// How long a client may take to send a request's head, counted from when the connection
    /// starts waiting for it.
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            total: 8192,
            per_client: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// How long a stop waits for requests in flight before it closes their connections.
const DRAIN: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then lets the
/// requests in flight finish (at most [`DRAIN`]). Each request carries its peer's address as
/// [`ConnectInfo`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    trusted_proxies: Vec<ipnet::IpNet>,
    shutdown: impl Future<Output = ()>,
) {
    let open = Open::default();
    let clients = Clients::default();
    // HTTP/1.1 only: crier is served as plain HTTP behind a TLS proxy (or on loopback), and a
    // protocol sniffer would wait for a first byte with no deadline at all, which is exactly
    // what an idle client never sends.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, or a connection reset before it was taken: accepting
                    // goes on once it clears.
                    tracing::warn!(%error, "a connection could not be accepted");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let trusted = trusted_proxies.iter().any(|net| net.contains(&peer.ip()));
        let slot = if trusted {
            None
        } else {
            match clients.take(peer.ip(), limits.per_client) {
                Some(slot) => Some(slot),
                None => {
                    metrics::counter!("crier_connections_refused_total", "limit" => "per_client")
                        .increment(1);
                    continue;
                }
            }
        };
        if open.make_room(limits.total) {
            metrics::counter!("crier_connections_shed_total").increment(1);
        }
        let (id, close) = open.register();
        let service =
            router
                .clone()
                .map_request(move |request: hyper::Request<hyper::body::Incoming>| {
                    let mut request = request.map(axum::body::Body::new);
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                });
        let connection = builder
            .serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .with_upgrades();
        let open = open.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = close.notified() => {
                    // Asked to make room, or the server stops: the request being answered, if
                    // any, finishes first.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            // A timed-out or reset connection is the client's business, not an error of crier.
            if let Err(error) = ended {
                tracing::debug!(%error, "a connection ended");
            }
            open.forget(id);
            drop(slot);
        });
    }
    drop(listener);
    open.close_all();
    let drained = async {
        while !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(DRAIN, drained).await.is_err() {
        tracing::warn!("requests still in flight after {DRAIN:?} were cut off");
    }
}

/// The open connections, oldest first, each with the signal that asks it to close.
#[derive(Default, Clone)]
struct Open(Arc<Mutex<OpenList>>);

#[derive(Default)]
struct OpenList {
    next: u64,
    connections: VecDeque<(u64, Arc<Notify>)>,
}

impl Open {
    fn list(&self) -> std::sync::MutexGuard<'_, OpenList> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// With `most` open, asks the oldest to close; says whether it had to.
    fn make_room(&self, most: usize) -> bool {
        let mut list = self.list();
        let mut shed = false;
        while list.connections.len() >= most {
            if let Some((_, close)) = list.connections.pop_front() {
                // notify_one keeps the signal for a task that is not waiting yet.
                close.notify_one();
                shed = true;
            }
        }
        shed
    }

    fn register(&self) -> (u64, Arc<Notify>) {
        let mut list = self.list();
        let id = list.next;
        list.next += 1;
        let close = Arc::new(Notify::new());
        list.connections.push_back((id, close.clone()));
        (id, close)
    }

    fn forget(&self, id: u64) {
        let mut list = self.list();
        if let Some(at) = list.connections.iter().position(|(open, _)| *open == id) {
            list.connections.remove(at);
        }
    }

    fn close_all(&self) {
        for (_, close) in &self.list().connections {
            close.notify_one();
        }
    }

    fn is_empty(&self) -> bool {
        self.list().connections.is_empty()
    }
}

/// Connections open per client address.
#[derive(Default, Clone)]
struct Clients(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One connection counted against its client, until dropped.
struct ClientSlot {
    clients: Clients,
    client: IpAddr,
}

impl Clients {
    fn take(&self, address: IpAddr, most: usize) -> Option<ClientSlot> {
        let client = client_of(address);
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(client).or_default();
        if *count >= most {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            clients: self.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .clients
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// The client an address belongs to: an IPv4 address, or an IPv6 address's /64, which one
/// subscriber line usually holds whole.
fn client_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(
                segments[0],
                segments[1],
                segments[2],
                segments[3],
                0,
                0,
                0,
                0,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_list_asks_its_oldest_connection_to_close() {
        let open = Open::default();
        let (first, first_close) = open.register();
        let (_, second_close) = open.register();
        assert!(!open.make_room(3), "room left");
        assert!(open.make_room(2), "full: the oldest is asked to go");
        let _ = open.register();
        // The first was signalled, the second not.
        let signalled = |close: &Arc<Notify>| {
            let waiting = close.notified();
            let mut waiting = std::pin::pin!(waiting);
            waiting.as_mut().enable()
        };
        assert!(signalled(&first_close));
        assert!(!signalled(&second_close));
        open.forget(first);
        assert_eq!(open.list().connections.len(), 2);
    }

    #[test]
    fn a_client_holds_at_most_its_share_and_gets_it_back_when_a_connection_ends() {
        let clients = Clients::default();
        let ann: IpAddr = "203.0.113.7".parse().unwrap();
        let first = clients.take(ann, 2).expect("one");
        let _second = clients.take(ann, 2).expect("two");
        assert!(clients.take(ann, 2).is_none(), "a third is over the share");
        assert!(clients.take("203.0.113.8".parse().unwrap(), 2).is_some());
        drop(first);
        assert!(clients.take(ann, 2).is_some(), "a slot comes back");
        // One IPv6 /64 is one client.
        let a = clients.take("2001:db8::1".parse().unwrap(), 1);
        assert!(a.is_some());
        assert!(clients.take("2001:db8::2".parse().unwrap(), 1).is_none());
        assert!(
            clients
                .take("2001:db8:0:1::1".parse().unwrap(), 1)
                .is_some()
        );
    }
}
