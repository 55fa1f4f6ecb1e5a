//! A relay in front of a service that a test can cut and restore, to play a
//! service going away and coming back without touching the shared one: a
//! Unix socket in front of the Docker engine, or a TCP port in front of
//! Postgres.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// Where a relay forwards to.
#[derive(Clone, Debug)]
pub enum Upstream {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Where a relay listens.
#[derive(Clone, Debug)]
pub enum Front {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

pub struct Relay {
    front: Front,
    accept: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    /// Listens on `front` (a TCP port of 0 picks a free one) and forwards
    /// every connection to `upstream`.
    pub async fn start(front: Front, upstream: Upstream) -> Relay {
        let connections = Arc::new(Mutex::new(Vec::new()));
        let conns = connections.clone();
        let (front, accept) = match front {
            Front::Unix(path) => {
                let listener = UnixListener::bind(&path).expect("bind relay socket");
                let accept = tokio::spawn(async move {
                    while let Ok((client, _)) = listener.accept().await {
                        forward(client, upstream.clone(), &conns);
                    }
                });
                (Front::Unix(path), accept)
            }
            Front::Tcp(addr) => {
                let listener = TcpListener::bind(addr).await.expect("bind relay port");
                let addr = listener.local_addr().expect("relay address");
                let accept = tokio::spawn(async move {
                    while let Ok((client, _)) = listener.accept().await {
                        forward(client, upstream.clone(), &conns);
                    }
                });
                (Front::Tcp(addr), accept)
            }
        };
        Relay {
            front,
            accept,
            connections,
        }
    }

    /// Where clients connect.
    pub fn front(&self) -> &Front {
        &self.front
    }

    /// Drops every relayed connection and stops listening, as a service
    /// restart or a network cut would. Returns where it listened, to start
    /// it again there.
    pub fn cut(self) -> Front {
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

fn forward<C>(mut client: C, upstream: Upstream, connections: &Mutex<Vec<JoinHandle<()>>>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let relay = tokio::spawn(async move {
        match upstream {
            Upstream::Unix(path) => {
                if let Ok(mut up) = UnixStream::connect(&path).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            }
            Upstream::Tcp(addr) => {
                if let Ok(mut up) = TcpStream::connect(addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            }
        }
    });
    connections.lock().expect("lock").push(relay);
}

/// The Docker engine's socket.
pub fn engine_socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => PathBuf::from(&host["unix://".len()..]),
        _ => PathBuf::from("/var/run/docker.sock"),
    }
}

/// A Unix relay at `path` in front of the Docker engine.
pub async fn docker_relay(path: &Path) -> Relay {
    Relay::start(
        Front::Unix(path.to_path_buf()),
        Upstream::Unix(engine_socket()),
    )
    .await
}
