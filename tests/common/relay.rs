//! A relay in front of a service that a test can cut and restore, to play a
//! service going away and coming back without touching the shared one: a
//! Unix socket in front of the Docker engine, or a TCP port in front of
//! Postgres. A relay can also *stall*: the service stops answering while
//! every connection stays open (a hung engine, a network partition).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where a relay forwards to.
#[derive(Clone, Debug)]
pub(crate) enum Upstream {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Where a relay listens.
#[derive(Clone, Debug)]
pub(crate) enum Front {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

pub(crate) struct Relay {
    front: Front,
    accept: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stalled: CancellationToken,
}

impl Relay {
    /// Listens on `front` (a TCP port of 0 picks a free one) and forwards
    /// every connection to `upstream`.
    pub(crate) async fn start(front: Front, upstream: Upstream) -> Relay {
        let connections = Arc::new(Mutex::new(Vec::new()));
        let conns = connections.clone();
        let stalled = CancellationToken::new();
        let stall = stalled.clone();
        let (front, accept) = match front {
            Front::Unix(path) => {
                let listener = UnixListener::bind(&path).expect("bind relay socket");
                let accept = tokio::spawn(async move {
                    while let Ok((client, _)) = listener.accept().await {
                        forward(client, upstream.clone(), &conns, &stall);
                    }
                });
                (Front::Unix(path), accept)
            }
            Front::Tcp(addr) => {
                let listener = TcpListener::bind(addr).await.expect("bind relay port");
                let addr = listener.local_addr().expect("relay address");
                let accept = tokio::spawn(async move {
                    while let Ok((client, _)) = listener.accept().await {
                        forward(client, upstream.clone(), &conns, &stall);
                    }
                });
                (Front::Tcp(addr), accept)
            }
        };
        Relay {
            front,
            accept,
            connections,
            stalled,
        }
    }

    /// From now on nothing passes in either direction, and nothing is
    /// closed: open connections stay open on both sides with their bytes
    /// undelivered, and new ones are accepted and never answered. Neither
    /// the client nor the service sees an error, only silence — a hung
    /// service, or a network that drops every packet.
    pub(crate) fn stall(&self) {
        self.stalled.cancel();
    }

    /// Where clients connect.
    pub(crate) fn front(&self) -> &Front {
        &self.front
    }

    /// Drops every relayed connection and stops listening, as a service
    /// restart or a network cut would. Returns where it listened, to start
    /// it again there.
    pub(crate) fn cut(self) -> Front {
        self.accept.abort();
        for connection in self.connections.lock().expect("lock").drain(..) {
            connection.abort();
        }
        if let Front::Unix(path) = &self.front {
            std::fs::remove_file(path).expect("remove relay socket");
        }
        self.front
    }
}

fn forward<C>(
    mut client: C,
    upstream: Upstream,
    connections: &Mutex<Vec<JoinHandle<()>>>,
    stalled: &CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stalled = stalled.clone();
    let relay = tokio::spawn(async move {
        if !stalled.is_cancelled() {
            match upstream {
                Upstream::Unix(path) => {
                    if let Ok(mut up) = UnixStream::connect(&path).await {
                        pipe(&mut client, &mut up, &stalled).await;
                        hold_if(&stalled, up).await;
                    }
                }
                Upstream::Tcp(addr) => {
                    if let Ok(mut up) = TcpStream::connect(addr).await {
                        pipe(&mut client, &mut up, &stalled).await;
                        hold_if(&stalled, up).await;
                    }
                }
            }
        }
        hold_if(&stalled, client).await;
    });
    connections.lock().expect("lock").push(relay);
}

/// Copies both ways until either side closes or the relay stalls.
async fn pipe<A, B>(a: &mut A, b: &mut B, stalled: &CancellationToken)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        _ = tokio::io::copy_bidirectional(a, b) => {}
        () = stalled.cancelled() => {}
    }
}

/// Once stalled, keeps `stream` open and silent until the relay is cut.
async fn hold_if<S: Send>(stalled: &CancellationToken, stream: S) {
    if stalled.is_cancelled() {
        std::future::pending::<()>().await;
    }
    drop(stream);
}

/// The Docker engine's socket.
pub(crate) fn engine_socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => PathBuf::from(&host["unix://".len()..]),
        _ => PathBuf::from("/var/run/docker.sock"),
    }
}

/// A Unix relay at `path` in front of the Docker engine.
pub(crate) async fn docker_relay(path: &Path) -> Relay {
    Relay::start(
        Front::Unix(path.to_path_buf()),
        Upstream::Unix(engine_socket()),
    )
    .await
}
