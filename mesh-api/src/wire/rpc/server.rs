//! The server side: accepting connections within their caps, reading
//! requests and running each through the [`Handler`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::{
    frame::{read_frame_rest, write_frames},
    *,
};

/// The authenticated peer of a server-side connection, handed to the [`Handler`].
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's TCP address.
    pub addr: SocketAddr,
    /// The certificate chain the peer presented, end-entity first, as
    /// verified by the server's TLS configuration; empty when the peer
    /// presented none (only possible if the configuration allows that).
    pub certs: Vec<CertificateDer<'static>>,
}

/// Serves the requests of one RPC service.
pub trait Handler: Send + Sync + 'static {
    /// What clients send.
    type Request: DeserializeOwned + Send + 'static;
    /// What the handler answers.
    type Response: Serialize + Send + 'static;

    /// Answers one request. Runs in its own task, concurrently with the other
    /// requests of the same connection; it is cancelled (dropped) if the
    /// connection closes or the server shuts down first.
    fn handle(&self, peer: Peer, request: Self::Request) -> impl Future<Output = Self::Response> + Send;
}

/// Where the server takes its TLS configuration from, read once per accepted
/// connection so a renewed certificate applies to the next connection.
#[derive(Debug, Clone)]
pub struct TlsSource {
    configs: watch::Receiver<Arc<ServerConfig>>,
}

impl TlsSource {
    /// Always the same configuration.
    pub(crate) fn fixed(config: Arc<ServerConfig>) -> Self {
        let (_sender, configs) = watch::channel(config);
        Self { configs }
    }

    /// Whatever configuration was last sent on the channel (the last one
    /// stays in force if the sender is dropped).
    pub(crate) fn watch(configs: watch::Receiver<Arc<ServerConfig>>) -> Self {
        Self { configs }
    }

    /// The configuration for a connection accepted now.
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.configs.borrow())
    }
}

impl From<Arc<ServerConfig>> for TlsSource {
    fn from(config: Arc<ServerConfig>) -> Self {
        Self::fixed(config)
    }
}

impl From<watch::Receiver<Arc<ServerConfig>>> for TlsSource {
    fn from(configs: watch::Receiver<Arc<ServerConfig>>) -> Self {
        Self::watch(configs)
    }
}

/// Server limits; [`Default`] gives the `DEFAULT_*` constants.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest request body accepted and response body sent, in bytes. A
    /// larger request closes its connection; a larger response is dropped
    /// with a logged error and its caller times out.
    pub max_frame: usize,
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Requests of one connection run at once; past that the server stops
    /// reading from that connection until one finishes.
    pub max_in_flight: usize,
    /// `max_frame` for a connection without a client certificate.
    pub anonymous_max_frame: usize,
    /// `max_in_flight` for a connection without a client certificate.
    pub anonymous_max_in_flight: usize,
    /// How long a frame may take to arrive once its first byte has.
    pub frame_timeout: Duration,
    /// How long a connection with a client certificate stays open with no
    /// request running and none beginning.
    pub idle_timeout: Duration,
    /// `idle_timeout` for a connection without a client certificate.
    pub anonymous_idle_timeout: Duration,
    /// Connections open at once, in all; more are closed at accept.
    pub max_connections: usize,
    /// Unauthenticated connections (handshaking, or without a client
    /// certificate) open at once, in all; more are closed at accept.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections open at once from one source address.
    pub max_unauthenticated_per_source: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            anonymous_max_frame: DEFAULT_ANONYMOUS_MAX_FRAME,
            anonymous_max_in_flight: DEFAULT_ANONYMOUS_MAX_IN_FLIGHT,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            idle_timeout: DEFAULT_IDLE,
            anonymous_idle_timeout: DEFAULT_ANONYMOUS_IDLE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
        }
    }
}

/// The connections a server has open, in all and unauthenticated ones in
/// all and per source address: what its caps are checked against. A
/// [`Slot`] is one connection's place, given back when it drops.
#[derive(Debug, Default)]
struct Connections {
    open: Mutex<ConnectionCounts>,
    refusals: Mutex<HashMap<&'static str, (std::time::Instant, u64)>>,
}

#[derive(Debug, Default)]
struct ConnectionCounts {
    total: usize,
    unauthenticated: usize,
    /// Unauthenticated connections per source address.
    by_source: HashMap<std::net::IpAddr, usize>,
}

/// One connection's place among a server's [`Connections`].
struct Slot {
    connections: Arc<Connections>,
    source: std::net::IpAddr,
    /// Counted as unauthenticated (until it presents a certificate).
    unauthenticated: bool,
}

impl Connections {
    fn counts(&self) -> MutexGuard<'_, ConnectionCounts> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new (so unauthenticated) connection from `source`,
    /// unless a cap is reached.
    fn admit(self: &Arc<Self>, source: std::net::IpAddr, options: &ServerOptions) -> Result<Slot, &'static str> {
        let mut counts = self.counts();
        if counts.total >= options.max_connections {
            return Err("too many connections");
        }
        if counts.unauthenticated >= options.max_unauthenticated {
            return Err("too many unauthenticated connections");
        }
        let from_source = counts.by_source.entry(source).or_default();
        if *from_source >= options.max_unauthenticated_per_source {
            return Err("too many unauthenticated connections from one address");
        }
        *from_source += 1;
        counts.unauthenticated += 1;
        counts.total += 1;
        Ok(Slot {
            connections: Arc::clone(self),
            source,
            unauthenticated: true,
        })
    }

    /// Logs a refusal of `addr` for `why`, unless that kind was logged
    /// within [`REFUSAL_LOG_EVERY`]; then it is counted into the next line.
    fn refused(&self, addr: SocketAddr, why: &'static str) {
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        let (last, count) = refusals.entry(why).or_insert((now - REFUSAL_LOG_EVERY, 0));
        *count += 1;
        if now.duration_since(*last) >= REFUSAL_LOG_EVERY {
            log::warn!(
                "RPC server: closed a connection from {addr}: {why} ({count} refused for that since the last such line)"
            );
            *last = now;
            *count = 0;
        }
    }
}

impl ConnectionCounts {
    fn forget_unauthenticated(&mut self, source: std::net::IpAddr) {
        self.unauthenticated = self.unauthenticated.saturating_sub(1);
        if let Some(n) = self.by_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

impl Slot {
    /// The connection presented a client certificate: it no longer counts
    /// as unauthenticated.
    fn authenticated(&mut self) {
        if std::mem::take(&mut self.unauthenticated) {
            self.connections.counts().forget_unauthenticated(self.source);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.connections.counts();
        counts.total = counts.total.saturating_sub(1);
        if self.unauthenticated {
            counts.forget_unauthenticated(self.source);
        }
    }
}

/// Serves RPCs on `listener` with the default [`ServerOptions`] until
/// `shutdown` becomes `true` (or its sender is dropped).
///
/// See [`serve_with_options`].
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: TlsSource,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
) {
    serve_with_options(listener, tls, handler, shutdown, ServerOptions::default()).await
}

/// Serves RPCs on `listener` until `shutdown` becomes `true` (or its sender is
/// dropped).
///
/// Every accepted connection gets the TLS configuration current at that
/// moment and runs in its own task. On shutdown the listener is closed, every
/// connection is closed (running requests are cancelled, their callers see
/// [`RpcError::Closed`]) and only then does this function return, so the port
/// can be bound again right away.
pub async fn serve_with_options<H: Handler>(
    listener: TcpListener,
    tls: TlsSource,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
    options: ServerOptions,
) {
    let options = Arc::new(options);
    let open = Arc::new(Connections::default());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown_requested(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => match open.admit(addr.ip(), &options) {
                    Ok(slot) => {
                        connections.spawn(serve_connection(
                            tcp,
                            slot,
                            addr,
                            tls.current(),
                            Arc::clone(&handler),
                            shutdown.clone(),
                            Arc::clone(&options),
                        ));
                    }
                    Err(why) => {
                        drop(tcp);
                        open.refused(addr, why);
                    }
                },
                Err(error) => {
                    log::warn!("RPC server: cannot accept a connection: {error}");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = finished {
                    if error.is_panic() {
                        log::error!("RPC server: a connection task panicked: {error}");
                    }
                }
            }
        }
    }
    drop(listener);
    // Connections watch `shutdown` themselves and close cleanly; wait for
    // them, but not forever.
    let drained = tokio::time::timeout(CLOSE_TIMEOUT * 2, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.shutdown().await;
    }
}

/// Resolves once shutdown is requested: the value is `true` or the sender is gone.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped: nobody can ever ask again, so stop.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// One server-side connection: TLS handshake, then requests until the peer
/// closes, a frame is bad, or shutdown.
async fn serve_connection<H: Handler>(
    tcp: TcpStream,
    mut slot: Slot,
    addr: SocketAddr,
    config: Arc<ServerConfig>,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
    options: Arc<ServerOptions>,
) {
    if let Err(error) = tcp.set_nodelay(true) {
        log::debug!("RPC server: cannot set TCP_NODELAY for {addr}: {error}");
    }
    let handshake = tokio::select! {
        () = shutdown_requested(&mut shutdown) => return,
        handshake = tokio::time::timeout(options.handshake_timeout, TlsAcceptor::from(config).accept(tcp)) => handshake,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        // A bare TCP connect and close (port probe, health check): not worth a warning.
        Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
            log::debug!("RPC server: {addr} closed the connection during the TLS handshake");
            return;
        }
        Ok(Err(error)) => {
            log::warn!("RPC server: TLS handshake with {addr} failed: {error}");
            return;
        }
        Err(_) => {
            log::warn!(
                "RPC server: TLS handshake with {addr} did not complete within {:?}",
                options.handshake_timeout
            );
            return;
        }
    };
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let peer = Peer { addr, certs };
    if !peer.certs.is_empty() {
        slot.authenticated();
    }

    let (mut reader, mut writer) = tokio::io::split(stream);
    let (responses, mut outgoing) = mpsc::channel(WRITE_QUEUE);
    enum End {
        Read(Result<(), RpcError>),
        Write(io::Result<()>),
        Shutdown,
    }
    let end = tokio::select! {
        read = read_requests(&mut reader, &peer, &handler, responses, &options) => End::Read(read),
        write = write_frames(&mut writer, &mut outgoing) => End::Write(write),
        () = shutdown_requested(&mut shutdown) => End::Shutdown,
    };
    match end {
        End::Read(Ok(())) => log::debug!("RPC server: {addr} closed the connection"),
        End::Read(Err(error @ RpcError::Idle(_))) => {
            log::debug!("RPC server: closing the connection from {addr}: {error}")
        }
        End::Read(Err(error)) if peer.certs.is_empty() => {
            slot.connections
                .refused(addr, "a bad or slow frame without a client certificate");
            log::debug!("RPC server: closing the connection from {addr}: {error}");
        }
        End::Read(Err(error)) => log::warn!("RPC server: closing the connection from {addr}: {error}"),
        End::Write(Ok(())) => {}
        End::Write(Err(error)) => {
            log::warn!("RPC server: closing the connection from {addr}: cannot send: {error}")
        }
        End::Shutdown => {
            log::debug!("RPC server: closing the connection from {addr}: shutting down");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.shutdown()).await;
        }
    }
}

/// Reads requests and starts a task for each. Returns `Ok` when the peer
/// closes the connection, an error for a bad or late frame or an idle
/// connection. The tasks are cancelled when this future is dropped or
/// returns. A peer without a client certificate gets the anonymous limits.
async fn read_requests<H: Handler, R: AsyncRead + Unpin>(
    reader: &mut R,
    peer: &Peer,
    handler: &Arc<H>,
    responses: mpsc::Sender<Vec<u8>>,
    options: &ServerOptions,
) -> Result<(), RpcError> {
    let anonymous = peer.certs.is_empty();
    let (max_frame, max_in_flight, idle) = if anonymous {
        (
            options.anonymous_max_frame,
            options.anonymous_max_in_flight,
            options.anonymous_idle_timeout,
        )
    } else {
        (options.max_frame, options.max_in_flight, options.idle_timeout)
    };
    let mut running = JoinSet::new();
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    loop {
        let slot = Arc::clone(&slots).acquire_owned().await.map_err(|_| RpcError::Closed)?;
        // The next frame's first byte; the connection is idle when none
        // comes while nothing runs.
        let mut first = [0u8; 1];
        let started = loop {
            reap(&mut running, peer);
            match tokio::time::timeout(idle, reader.read(&mut first)).await {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => break first[0],
                Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(error)) => return Err(error.into()),
                Err(_) if running.is_empty() => return Err(RpcError::Idle(idle)),
                Err(_) => {}
            }
        };
        let body = tokio::time::timeout(options.frame_timeout, read_frame_rest(reader, started, max_frame))
            .await
            .map_err(|_| RpcError::FrameTimeout(options.frame_timeout))??;
        let (id, request) = decode_request::<H::Request>(&body)?;
        drop(body);
        let handler = Arc::clone(handler);
        let peer = peer.clone();
        let responses = responses.clone();
        let max_frame = options.max_frame;
        running.spawn(async move {
            let addr = peer.addr;
            let response = handler.handle(peer, request).await;
            match encode_frame(id, &response, max_frame) {
                // An error means the connection is closing; nobody to answer.
                Ok(frame) => drop(responses.send(frame).await),
                Err(error) => {
                    log::error!("RPC server: response to request {id} from {addr} not sent: {error}")
                }
            }
            drop(slot);
        });
    }
}

/// Collects the requests that finished, logging a handler's panic.
fn reap(running: &mut JoinSet<()>, peer: &Peer) {
    while let Some(finished) = running.try_join_next() {
        if let Err(error) = finished {
            if error.is_panic() {
                log::error!(
                    "RPC server: the handler panicked on a request from {}: {error}",
                    peer.addr
                );
            }
        }
    }
}
