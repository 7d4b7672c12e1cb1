//! Node-to-node RPC: request/response over mutual TLS.
//!
//! A deliberately small framed protocol over `tokio-rustls` instead of gRPC:
//! no code generation, and every message size is under our control.
//!
//! # Wire format
//!
//! Each frame is a `u32` big-endian body length followed by the body. The
//! body is the MessagePack encoding (rmp-serde, structs as maps with field
//! names so that `#[serde(default)]` fields can be added compatibly) of the
//! tuple `(request_id: u64, payload)`. Requests and responses share the
//! format; a response carries the id of its request. Bodies larger than the
//! configured maximum ([`DEFAULT_MAX_FRAME`] unless changed) are refused in
//! both directions without allocating the claimed size; the connection that
//! carried one is closed.
//!
//! # Server
//!
//! [`serve`] accepts TLS connections, reads requests, runs each one in its own
//! task through a [`Handler`] and writes every response as soon as it is
//! ready, so responses can overtake each other (long-polls do not block the
//! connection). The server certificate comes from a [`TlsSource`], read for
//! every accepted connection, so it can be renewed without a restart.
//! Requests still running when their connection closes are cancelled.
//!
//! A peer is bounded before it is known: a connection counts as
//! unauthenticated from its accept until it presents a client certificate,
//! and those are capped in all and per source address (checked at accept,
//! before the TLS handshake costs anything); members' connections are
//! capped only in all, so nodes behind one address are not turned away. A
//! connection without a client certificate (only joins come from those)
//! may send frames of [`DEFAULT_ANONYMOUS_MAX_FRAME`] at most, a few at a
//! time, and is closed after [`DEFAULT_ANONYMOUS_IDLE`] without a request;
//! every frame must arrive whole within [`DEFAULT_FRAME_TIMEOUT`] of its
//! first byte, and members' connections close after [`DEFAULT_IDLE`]
//! without one. Refusals are logged, at most once per
//! [`REFUSAL_LOG_EVERY`] per kind.
//!
//! # Client
//!
//! [`RpcClient`] connects lazily, multiplexes concurrent calls over one TLS
//! connection and opens a new connection on the next call after the previous
//! one broke. It never retries a call by itself: whether a request may be
//! repeated is the caller's decision.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::api::msgpack::from_msgpack;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Largest frame body accepted or sent unless configured otherwise (64 MiB).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;
/// Largest request body from a peer without a client certificate: a join
/// request (a token, a CSR and a few names) is a few KiB.
pub const DEFAULT_ANONYMOUS_MAX_FRAME: usize = 64 * 1024;
/// Requests at once on a connection without a client certificate.
pub const DEFAULT_ANONYMOUS_MAX_IN_FLIGHT: usize = 4;
/// How long a frame may take to arrive once its first byte has.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection without a client certificate may wait between
/// requests with none running.
pub const DEFAULT_ANONYMOUS_IDLE: Duration = Duration::from_secs(10);
/// The same for members' connections (well above their heartbeat and
/// long-poll periods, so only abandoned connections close).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// Connections open at once, in all (a few per node: thousands of nodes).
pub const DEFAULT_MAX_CONNECTIONS: usize = 32_768;
/// Unauthenticated connections (in their TLS handshake, or without a
/// client certificate) open at once, in all.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 1024;
/// Unauthenticated connections open at once from one source address.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;
/// A kind of refusal is logged at most this often (with how many there were).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take, on either side, unless configured otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the TCP connection to be established unless configured otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many requests of one connection the server runs at once unless
/// configured otherwise; past that it stops reading from the connection.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Length of the frame header (the body length).
const HEADER_LEN: usize = 4;
/// Frame bodies are read in steps of at most this much, so a peer must send
/// the bytes before we allocate room for them.
const READ_STEP: usize = 1024 * 1024;
/// Frames waiting for a connection's writer.
const WRITE_QUEUE: usize = 128;
/// How long a closing connection waits to deliver its TLS close_notify.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Why an RPC failed.
///
/// `Clone` because one broken connection fails every call in flight on it
/// with the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The TCP connection to the peer could not be established (refused,
    /// unreachable, name not resolved, or no answer within the connect timeout).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The `host:port` the client tried.
        addr: String,
        /// What the operating system (or the connect timeout) said.
        #[source]
        source: Arc<io::Error>,
    },
    /// TLS failed: the handshake (e.g. a certificate the other side does not
    /// trust) or a TLS alert/record error later on. Carries rustls' message.
    #[error("TLS failure: {0}")]
    Tls(String),
    /// No response arrived within the call's timeout.
    #[error("the peer did not answer within the call timeout")]
    Timeout,
    /// The connection closed before the response arrived (the peer shut down
    /// or restarted, or dropped the connection).
    #[error("the connection to the peer closed before the response arrived")]
    Closed,
    /// A frame exceeded the size limit (the limit of the side that refused it).
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Size of the refused frame body, in bytes.
        size: usize,
        /// The limit in force, in bytes.
        max: usize,
    },
    /// A message could not be encoded to MessagePack.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A received message could not be decoded (e.g. the peer runs an
    /// incompatible version).
    #[error("cannot decode message: {0}")]
    Decode(String),
    /// Reading from or writing to the connection failed.
    #[error("connection error: {0}")]
    Io(#[source] Arc<io::Error>),
    /// No request began within the connection's idle timeout while none
    /// was running (server side).
    #[error("no request for {0:?}")]
    Idle(Duration),
    /// A frame began but did not arrive whole within the frame timeout
    /// (server side).
    #[error("a frame did not arrive whole within {0:?} of its first byte")]
    FrameTimeout(Duration),
}

impl From<io::Error> for RpcError {
    /// Errors from a TLS stream carry rustls' own error when TLS is at fault;
    /// those become [`RpcError::Tls`] so the message reaches the operator.
    fn from(error: io::Error) -> Self {
        let is_tls = error
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
        if is_tls {
            RpcError::Tls(error.to_string())
        } else {
            RpcError::Io(Arc::new(error))
        }
    }
}

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
    pub fn fixed(config: Arc<ServerConfig>) -> Self {
        let (_sender, configs) = watch::channel(config);
        Self { configs }
    }

    /// Whatever configuration was last sent on the channel (the last one
    /// stays in force if the sender is dropped).
    pub fn watch(configs: watch::Receiver<Arc<ServerConfig>>) -> Self {
        Self { configs }
    }

    /// The configuration for a connection accepted now.
    pub fn current(&self) -> Arc<ServerConfig> {
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

/// Writes queued frames until the queue closes, flushing whenever it runs empty.
async fn write_frames<W: AsyncWrite + Unpin>(writer: &mut W, queue: &mut mpsc::Receiver<Vec<u8>>) -> io::Result<()> {
    while let Some(frame) = queue.recv().await {
        writer.write_all(&frame).await?;
        while let Ok(frame) = queue.try_recv() {
            writer.write_all(&frame).await?;
        }
        writer.flush().await?;
    }
    Ok(())
}

/// Encodes `(id, payload)` as a complete frame, header included.
pub fn encode_frame<T: Serialize>(id: u64, payload: &T, max_frame: usize) -> Result<Vec<u8>, RpcError> {
    let mut frame = vec![0; HEADER_LEN];
    rmp_serde::encode::write_named(&mut frame, &(id, payload)).map_err(|error| RpcError::Encode(error.to_string()))?;
    let size = frame.len() - HEADER_LEN;
    let too_large = RpcError::FrameTooLarge { size, max: max_frame };
    if size > max_frame {
        return Err(too_large);
    }
    let length = u32::try_from(size).map_err(|_| too_large)?;
    frame[..HEADER_LEN].copy_from_slice(&length.to_be_bytes());
    Ok(frame)
}

/// Decodes a request frame's body as the server does: a bad body is an
/// error that closes the connection.
pub fn decode_request<Req: DeserializeOwned>(body: &[u8]) -> Result<(u64, Req), RpcError> {
    from_msgpack(body).map_err(|error| RpcError::Decode(format!("request: {error}")))
}

/// Decodes a response frame's body as the client does: a body whose id can
/// be read fails only that call (the inner error); one without a readable
/// id is an error that breaks the connection.
pub fn decode_response<Resp: DeserializeOwned>(body: &[u8]) -> Result<(u64, Result<Resp, RpcError>), RpcError> {
    match from_msgpack::<(u64, Resp)>(body) {
        Ok((id, response)) => Ok((id, Ok(response))),
        Err(error) => {
            // The framing is intact: fail only this call, if we can tell which.
            let (id, IgnoredAny) =
                from_msgpack::<(u64, IgnoredAny)>(body).map_err(|_| RpcError::Decode(format!("response: {error}")))?;
            Ok((id, Err(RpcError::Decode(format!("response to request {id}: {error}")))))
        }
    }
}

/// Reads one frame body. `Ok(None)` when the peer closed the connection
/// between frames (with or without a TLS close_notify).
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max_frame: usize) -> Result<Option<Vec<u8>>, RpcError> {
    let mut first = [0u8; 1];
    match reader.read(&mut first).await {
        Ok(0) => Ok(None),
        Ok(_) => read_frame_rest(reader, first[0], max_frame).await.map(Some),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Reads the rest of a frame whose header's first byte is `first`; its body.
async fn read_frame_rest<R: AsyncRead + Unpin>(
    reader: &mut R,
    first: u8,
    max_frame: usize,
) -> Result<Vec<u8>, RpcError> {
    let mut header = [0u8; HEADER_LEN];
    header[0] = first;
    reader.read_exact(&mut header[1..]).await.map_err(|error| {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a frame header").into()
        } else {
            RpcError::from(error)
        }
    })?;
    let size = u32::from_be_bytes(header) as usize;
    if size > max_frame {
        return Err(RpcError::FrameTooLarge { size, max: max_frame });
    }
    // Grow with what actually arrives, never to the claimed size up front.
    let mut body = Vec::with_capacity(size.min(READ_STEP));
    while body.len() < size {
        let start = body.len();
        let step = (size - start).min(READ_STEP);
        if body.capacity() < start + step {
            let target = size.min((body.capacity() * 2).max(start + step));
            body.reserve_exact(target - start);
        }
        body.resize(start + step, 0);
        reader.read_exact(&mut body[start..]).await?;
    }
    Ok(body)
}

/// Client settings; [`Default`] gives the `DEFAULT_*` constants.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Largest request body sent and response body accepted, in bytes.
    pub max_frame: usize,
    /// How long establishing the TCP connection may take.
    pub connect_timeout: Duration,
    /// How long the TLS handshake may take.
    pub handshake_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// A client for one peer's RPC service. Cheap to clone; clones share the
/// connection.
///
/// Calls are multiplexed over one TLS connection, opened by the first call
/// and replaced by the next call after it breaks. Calls in flight on a
/// connection that breaks fail (with [`RpcError::Closed`], [`RpcError::Io`],
/// [`RpcError::Tls`] or [`RpcError::FrameTooLarge`], whichever broke it).
pub struct RpcClient<Req, Resp> {
    shared: Arc<ClientShared<Resp>>,
    _request: PhantomData<fn(Req)>,
}

impl<Req, Resp> Clone for RpcClient<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            _request: PhantomData,
        }
    }
}

impl<Req, Resp> fmt::Debug for RpcClient<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcClient")
            .field("addr", &self.shared.addr)
            .field("server_name", &self.shared.server_name)
            .finish_non_exhaustive()
    }
}

/// What the clones of one client share.
struct ClientShared<Resp> {
    addr: String,
    server_name: ServerName<'static>,
    options: ClientOptions,
    next_id: AtomicU64,
    state: Mutex<ClientState<Resp>>,
    /// Held while connecting, so concurrent calls wait for one connection
    /// instead of each opening their own.
    connecting: tokio::sync::Mutex<()>,
}

struct ClientState<Resp> {
    tls: Arc<ClientConfig>,
    /// Incremented by `set_tls`, so a connection opened with the previous
    /// configuration is not kept.
    tls_generation: u64,
    connection: Option<Arc<Connection<Resp>>>,
    /// Connection attempts completed so far, and how the last one failed:
    /// calls that queued behind a failed attempt share its error instead of
    /// each trying again.
    connect_attempts: u64,
    last_connect_error: Option<RpcError>,
}

impl<Resp> ClientShared<Resp> {
    fn state(&self) -> MutexGuard<'_, ClientState<Resp>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One client-side TLS connection. Dropping the last reference closes it.
struct Connection<Resp> {
    /// Encoded frames for the writer.
    frames: mpsc::Sender<Vec<u8>>,
    calls: Arc<Calls<Resp>>,
    /// Wakes the connection task to reset the connection.
    abort: Arc<tokio::sync::Notify>,
}

type Reply<Resp> = oneshot::Sender<Result<Resp, RpcError>>;

/// The calls waiting for a response on one connection.
struct Calls<Resp> {
    state: Mutex<CallsState<Resp>>,
}

enum CallsState<Resp> {
    Open(HashMap<u64, Reply<Resp>>),
    /// The connection broke with this error; no new calls.
    Broken(RpcError),
}

impl<Resp> Calls<Resp> {
    fn lock(&self) -> MutexGuard<'_, CallsState<Resp>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_open(&self) -> bool {
        matches!(*self.lock(), CallsState::Open(_))
    }

    /// Registers call `id`; its reply comes through the receiver.
    fn register(&self, id: u64) -> Result<oneshot::Receiver<Result<Resp, RpcError>>, RpcError> {
        match &mut *self.lock() {
            CallsState::Open(waiting) => {
                let (reply, receiver) = oneshot::channel();
                waiting.insert(id, reply);
                Ok(receiver)
            }
            CallsState::Broken(error) => Err(error.clone()),
        }
    }

    /// Takes the reply channel of call `id`, if it is still waiting.
    fn take(&self, id: u64) -> Option<Reply<Resp>> {
        match &mut *self.lock() {
            CallsState::Open(waiting) => waiting.remove(&id),
            CallsState::Broken(_) => None,
        }
    }

    /// Marks the connection broken and fails every waiting call with `error`.
    fn break_with(&self, error: RpcError) {
        let previous = std::mem::replace(&mut *self.lock(), CallsState::Broken(error.clone()));
        if let CallsState::Open(waiting) = previous {
            for (_, reply) in waiting {
                // The caller may have given up already.
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Forgets a call when its caller stops waiting (timeout or cancellation),
/// so a late response is dropped.
struct CallGuard<'a, Resp> {
    calls: &'a Calls<Resp>,
    id: u64,
}

impl<Resp> Drop for CallGuard<'_, Resp> {
    fn drop(&mut self) {
        drop(self.calls.take(self.id));
    }
}

impl<Req, Resp> RpcClient<Req, Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned + Send + 'static,
{
    /// A client for the server at `addr` (`host:port`, resolved at each
    /// connection) whose certificate must be valid for `server_name`, with
    /// the default [`ClientOptions`]. Does not connect yet.
    pub fn new(addr: String, tls: Arc<ClientConfig>, server_name: ServerName<'static>) -> Self {
        Self::with_options(addr, tls, server_name, ClientOptions::default())
    }

    /// Like [`RpcClient::new`], with explicit options.
    pub fn with_options(
        addr: String,
        tls: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        options: ClientOptions,
    ) -> Self {
        Self {
            shared: Arc::new(ClientShared {
                addr,
                server_name,
                options,
                next_id: AtomicU64::new(1),
                state: Mutex::new(ClientState {
                    tls,
                    tls_generation: 0,
                    connection: None,
                    connect_attempts: 0,
                    last_connect_error: None,
                }),
                connecting: tokio::sync::Mutex::new(()),
            }),
            _request: PhantomData,
        }
    }

    /// The `host:port` this client calls.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// Uses `tls` for connections opened from now on (after a certificate
    /// renewal). The current connection is released: calls in flight on it
    /// finish there, the next call opens a new connection.
    pub fn set_tls(&self, tls: Arc<ClientConfig>) {
        let mut state = self.shared.state();
        state.tls = tls;
        state.tls_generation += 1;
        state.connection = None;
    }

    /// Lets go of the current connection: calls in flight on it finish
    /// there, it closes once they have, and the next call connects anew.
    /// For a peer that sent us elsewhere, so an idle session does not hold
    /// a descriptor on both ends.
    pub fn release(&self) {
        self.shared.state().connection = None;
    }

    /// Whether a connection is currently open (it may still turn out to be
    /// dead when next used). For status displays and tests.
    pub fn is_connected(&self) -> bool {
        self.shared
            .state()
            .connection
            .as_ref()
            .is_some_and(|connection| connection.calls.is_open())
    }

    /// Sends `request` and waits for its response, at most `timeout` in all
    /// (connecting included).
    ///
    /// After [`RpcError::Timeout`] the request may or may not have been
    /// handled; its late response is discarded and the connection stays up.
    pub async fn call(&self, request: Req, timeout: Duration) -> Result<Resp, RpcError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(id, &request, self.shared.options.max_frame)?;
        drop(request);
        let used = Mutex::new(None);
        match tokio::time::timeout(timeout, self.send_and_wait(id, frame, &used)).await {
            Ok(result) => result,
            Err(_) => {
                // The request may still sit in a send buffer (a partitioned
                // peer, say). Reset the connection so it is never delivered
                // after the caller was told it failed.
                let connection = used.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(connection) = connection {
                    self.abort(&connection);
                }
                Err(RpcError::Timeout)
            }
        }
    }

    /// Resets `connection` (abortive close: unsent bytes are dropped) and
    /// forgets it, so the next call reconnects.
    fn abort(&self, connection: &Arc<Connection<Resp>>) {
        connection.abort.notify_one();
        let mut state = self.shared.state();
        if state.connection.as_ref().is_some_and(|c| Arc::ptr_eq(c, connection)) {
            state.connection = None;
        }
    }

    async fn send_and_wait(
        &self,
        id: u64,
        frame: Vec<u8>,
        used: &Mutex<Option<Arc<Connection<Resp>>>>,
    ) -> Result<Resp, RpcError> {
        let connection = self.connection().await?;
        *used.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&connection));
        let reply = connection.calls.register(id)?;
        let _guard = CallGuard {
            calls: &connection.calls,
            id,
        };
        // If the writer is gone the connection broke after we registered, and
        // the reply channel carries the reason.
        let _ = connection.frames.send(frame).await;
        reply.await.unwrap_or(Err(RpcError::Closed))
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<Arc<Connection<Resp>>, RpcError> {
        if let Some(connection) = self.open_connection() {
            return Ok(connection);
        }
        let attempts_before = self.shared.state().connect_attempts;
        let _connecting = self.shared.connecting.lock().await;
        if let Some(connection) = self.open_connection() {
            return Ok(connection);
        }
        let (tls, generation) = {
            let state = self.shared.state();
            if state.connect_attempts != attempts_before {
                if let Some(error) = &state.last_connect_error {
                    return Err(error.clone());
                }
            }
            (Arc::clone(&state.tls), state.tls_generation)
        };
        let connected = self.connect(tls).await;
        let mut state = self.shared.state();
        state.connect_attempts += 1;
        state.last_connect_error = connected.as_ref().err().cloned();
        let connection = Arc::new(connected?);
        if state.tls_generation == generation {
            state.connection = Some(Arc::clone(&connection));
        }
        // Otherwise the configuration changed meanwhile: this connection only
        // serves the current call.
        Ok(connection)
    }

    fn open_connection(&self) -> Option<Arc<Connection<Resp>>> {
        self.shared
            .state()
            .connection
            .as_ref()
            .filter(|connection| connection.calls.is_open())
            .cloned()
    }

    async fn connect(&self, tls: Arc<ClientConfig>) -> Result<Connection<Resp>, RpcError> {
        let shared = &self.shared;
        let addr = &shared.addr;
        let options = &shared.options;
        let connect_error = |source: io::Error| RpcError::Connect {
            addr: addr.clone(),
            source: Arc::new(source),
        };
        let tcp = match tokio::time::timeout(options.connect_timeout, TcpStream::connect(addr.as_str())).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => return Err(connect_error(error)),
            Err(_) => {
                return Err(connect_error(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", options.connect_timeout),
                )))
            }
        };
        if let Err(error) = tcp.set_nodelay(true) {
            log::debug!("RPC client: cannot set TCP_NODELAY for {addr}: {error}");
        }
        // Closing resets the connection and drops what was not sent yet, so
        // an abandoned request is never delivered late.
        if let Err(error) = tcp.set_zero_linger() {
            log::debug!("RPC client: cannot set SO_LINGER 0 for {addr}: {error}");
        }
        let name = shared.server_name.to_str();
        let handshake = TlsConnector::from(tls).connect(shared.server_name.clone(), tcp);
        let stream = match tokio::time::timeout(options.handshake_timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                return Err(RpcError::Tls(format!(
                    "TLS handshake with {addr} (expecting a certificate for {name}) failed: {error}"
                )))
            }
            Err(_) => {
                return Err(RpcError::Tls(format!(
                    "TLS handshake with {addr} did not complete within {:?}",
                    options.handshake_timeout
                )))
            }
        };
        log::debug!("RPC client: connected to {addr}");
        let (frames, queue) = mpsc::channel(WRITE_QUEUE);
        let calls = Arc::new(Calls {
            state: Mutex::new(CallsState::Open(HashMap::new())),
        });
        let abort = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(run_client_connection(
            stream,
            queue,
            Arc::clone(&calls),
            addr.clone(),
            options.max_frame,
            Arc::clone(&abort),
        ));
        Ok(Connection { frames, calls, abort })
    }
}

/// Drives one client connection: writes queued requests, dispatches
/// responses, and fails the waiting calls when the connection ends. Ends
/// when the connection breaks or the last handle to it is dropped.
async fn run_client_connection<Resp: DeserializeOwned, S: AsyncRead + AsyncWrite>(
    stream: S,
    mut queue: mpsc::Receiver<Vec<u8>>,
    calls: Arc<Calls<Resp>>,
    addr: String,
    max_frame: usize,
    abort: Arc<tokio::sync::Notify>,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    enum End {
        Read(Result<(), RpcError>),
        Write(io::Result<()>),
        Aborted,
    }
    let end = tokio::select! {
        read = read_responses(&mut reader, &calls, max_frame) => End::Read(read),
        write = write_frames(&mut writer, &mut queue) => End::Write(write),
        () = abort.notified() => End::Aborted,
    };
    let error = match end {
        End::Aborted => {
            log::debug!("RPC client: reset the connection to {addr} after a call timed out");
            RpcError::Closed
        }
        End::Read(Ok(())) => {
            log::debug!("RPC client: {addr} closed the connection");
            RpcError::Closed
        }
        End::Write(Ok(())) => {
            // Every handle is gone: close politely.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer.shutdown()).await;
            RpcError::Closed
        }
        End::Read(Err(error)) => error,
        End::Write(Err(error)) => error.into(),
    };
    let error = match error {
        RpcError::Tls(message) => RpcError::Tls(format!("connection to {addr}: {message}")),
        other => other,
    };
    if !matches!(error, RpcError::Closed) {
        log::warn!("RPC client: connection to {addr} broke: {error}");
    }
    calls.break_with(error);
}

/// Dispatches responses to their calls until the connection ends.
async fn read_responses<Resp: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    calls: &Calls<Resp>,
    max_frame: usize,
) -> Result<(), RpcError> {
    while let Some(body) = read_frame(reader, max_frame).await? {
        let (id, result) = decode_response::<Resp>(&body)?;
        match calls.take(id) {
            // The caller may have given up in the meantime.
            Some(reply) => drop(reply.send(result)),
            None => log::debug!("RPC client: dropping the response to request {id}: nobody waits for it"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashSet;
    use std::time::Instant;

    use rand::Rng;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use serde::Deserialize;
    use tokio::task::JoinHandle;

    #[test]
    fn a_deeply_nested_request_is_refused_without_exhausting_the_stack() {
        use crate::api::messages::{LogQuery, Origin, PeerRequest};
        let nest = |levels: usize| {
            let mut request = PeerRequest::ReadLogs(LogQuery {
                tasks: vec![],
                tail: None,
            });
            for _ in 0..levels {
                request = PeerRequest::Forwarded {
                    origin: Origin {
                        identity: None,
                        operator: None,
                        serial: String::new(),
                        ip: [192, 0, 2, 1].into(),
                    },
                    request: Box::new(request),
                };
            }
            rmp_serde::to_vec(&(1u64, &request)).unwrap()
        };
        // On a thread with the runtime's 2 MiB stack: 400 levels (10 KB)
        // aborted the process before the bound.
        let decoded = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let deep = nest(400);
                assert!(deep.len() < DEFAULT_ANONYMOUS_MAX_FRAME);
                let refused = decode_request::<PeerRequest>(&deep).map(|_| ()).unwrap_err();
                // One forward is all a real request has.
                let once = decode_request::<PeerRequest>(&nest(1)).map(|_| ());
                (refused.to_string(), once)
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert!(decoded.0.contains("depth"), "{}", decoded.0);
        assert!(decoded.1.is_ok(), "{:?}", decoded.1);
    }

    #[test]
    fn a_whole_cluster_state_fits_the_nesting_bound() {
        use crate::{api::store::Command, manager::state::tests::initialised};
        let mut state = initialised();
        let service = crate::manager::orchestrator::tests_support::service(7);
        state.services.insert(7, service);
        let command = Command::Restore { state: Box::new(state) };
        let bytes = rmp_serde::to_vec(&(1u64, &command)).unwrap();
        let (_, back): (u64, Command) = from_msgpack(&bytes).expect("within the bound");
        assert_eq!(back, command);
    }

    /// Every test finishes within this, or fails.
    const TEST_BOUND: Duration = Duration::from_secs(10);
    const CALL: Duration = Duration::from_secs(3);

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A test CA with a server certificate for "mesh-manager" and a client certificate.
    struct Pki {
        ca: CertificateDer<'static>,
        server: (CertificateDer<'static>, KeyPair),
        client: (CertificateDer<'static>, KeyPair),
    }

    impl Pki {
        fn new() -> Self {
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
            let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
                let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
                params.extended_key_usages = vec![usage];
                let key = KeyPair::generate().unwrap();
                let cert = params.signed_by(&key, &ca).unwrap();
                (cert.der().clone(), key)
            };
            Self {
                server: leaf("mesh-manager", ExtendedKeyUsagePurpose::ServerAuth),
                client: leaf("node-1", ExtendedKeyUsagePurpose::ClientAuth),
                ca: ca.der().clone(),
            }
        }

        fn roots(&self) -> Arc<RootCertStore> {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            Arc::new(roots)
        }

        fn server_config(&self, allow_unauthenticated: bool) -> Arc<ServerConfig> {
            let mut verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider());
            if allow_unauthenticated {
                verifier = verifier.allow_unauthenticated();
            }
            let config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier.build().unwrap())
                .with_single_cert(vec![self.server.0.clone()], key_der(&self.server.1))
                .unwrap();
            Arc::new(config)
        }

        /// A client config trusting `trusted`'s CA, presenting this PKI's client cert if `with_cert`.
        fn client_config(&self, trusted: &Pki, with_cert: bool) -> Arc<ClientConfig> {
            let builder = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(trusted.roots());
            let config = if with_cert {
                builder
                    .with_client_auth_cert(vec![self.client.0.clone()], key_der(&self.client.1))
                    .unwrap()
            } else {
                builder.with_no_client_auth()
            };
            Arc::new(config)
        }
    }

    fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
    }

    fn server_name() -> ServerName<'static> {
        ServerName::try_from("mesh-manager".to_string()).unwrap()
    }

    #[derive(Debug, Serialize, Deserialize)]
    enum Request {
        Echo(String),
        Sleep { millis: u64, value: u64 },
        PeerCerts,
        Big(usize),
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Response {
        Echo(String),
        Value(u64),
        Certs(Vec<Vec<u8>>),
        Big(Vec<u8>),
    }

    #[derive(Default)]
    struct TestHandler {
        peers: Mutex<HashSet<SocketAddr>>,
    }

    impl Handler for TestHandler {
        type Request = Request;
        type Response = Response;

        async fn handle(&self, peer: Peer, request: Request) -> Response {
            self.peers.lock().unwrap().insert(peer.addr);
            match request {
                Request::Echo(text) => Response::Echo(text),
                Request::Sleep { millis, value } => {
                    tokio::time::sleep(Duration::from_millis(millis)).await;
                    Response::Value(value)
                }
                Request::PeerCerts => Response::Certs(peer.certs.iter().map(|c| c.to_vec()).collect()),
                Request::Big(size) => Response::Big(vec![7; size]),
            }
        }
    }

    struct TestServer {
        addr: SocketAddr,
        handler: Arc<TestHandler>,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    impl TestServer {
        async fn start(tls: impl Into<TlsSource>, bind: SocketAddr) -> Self {
            Self::start_with(tls, bind, ServerOptions::default()).await
        }

        async fn start_with(tls: impl Into<TlsSource>, bind: SocketAddr, options: ServerOptions) -> Self {
            let listener = TcpListener::bind(bind).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let handler = Arc::new(TestHandler::default());
            let (stop, shutdown) = watch::channel(false);
            let task = tokio::spawn(serve_with_options(
                listener,
                tls.into(),
                Arc::clone(&handler),
                shutdown,
                options,
            ));
            Self {
                addr,
                handler,
                stop,
                task,
            }
        }

        async fn stop(self) {
            self.stop.send(true).unwrap();
            self.task.await.unwrap();
        }

        fn client(&self, tls: Arc<ClientConfig>) -> RpcClient<Request, Response> {
            RpcClient::new(self.addr.to_string(), tls, server_name())
        }
    }

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    async fn bounded(test: impl Future<Output = ()>) {
        tokio::time::timeout(TEST_BOUND, test)
            .await
            .expect("test took too long");
    }

    /// A TLS connection to `server` that speaks no RPC by itself.
    async fn raw(server: &TestServer, tls: Arc<ClientConfig>) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        TlsConnector::from(tls).connect(server_name(), tcp).await.unwrap()
    }

    /// Whether the server closes `stream` (EOF or an error) within `within`.
    async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    fn tight() -> ServerOptions {
        ServerOptions {
            anonymous_max_frame: 1024,
            frame_timeout: Duration::from_millis(300),
            anonymous_idle_timeout: Duration::from_millis(300),
            ..ServerOptions::default()
        }
    }

    #[tokio::test]
    async fn a_peer_without_a_certificate_gets_small_frames_and_is_closed_when_idle() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start_with(pki.server_config(true), local(), tight()).await;
            let anonymous = server.client(pki.client_config(&pki, false));
            let small = anonymous.call(Request::Echo("join".into()), CALL).await.unwrap();
            assert_eq!(small, Response::Echo("join".into()));
            let big = anonymous.call(Request::Echo("x".repeat(2048)), CALL).await;
            assert!(matches!(big, Err(RpcError::Closed)), "{big:?}");
            // A member may send as much as members may.
            let member = server.client(pki.client_config(&pki, true));
            let echoed = member.call(Request::Echo("x".repeat(2048)), CALL).await.unwrap();
            assert_eq!(echoed, Response::Echo("x".repeat(2048)));
            // Said nothing: closed once idle; a member's connection stays.
            let mut silent = raw(&server, pki.client_config(&pki, false)).await;
            assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
            let mut quiet_member = raw(&server, pki.client_config(&pki, true)).await;
            assert!(!closed_within(&mut quiet_member, Duration::from_millis(600)).await);
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_frame_that_trickles_in_is_closed_at_the_frame_timeout() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start_with(pki.server_config(true), local(), tight()).await;
            for with_cert in [false, true] {
                let mut stream = raw(&server, pki.client_config(&pki, with_cert)).await;
                // A header for 1000 bytes, then 10 of them, then nothing.
                stream.write_all(&1000u32.to_be_bytes()).await.unwrap();
                stream.write_all(&[0; 10]).await.unwrap();
                stream.flush().await.unwrap();
                assert!(
                    closed_within(&mut stream, Duration::from_secs(3)).await,
                    "with a certificate: {with_cert}"
                );
            }
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn connections_past_the_caps_are_closed_and_the_places_come_back() {
        bounded(async {
            let pki = Pki::new();
            let options = ServerOptions {
                max_unauthenticated_per_source: 3,
                max_connections: 5,
                ..ServerOptions::default()
            };
            let server = TestServer::start_with(pki.server_config(true), local(), options).await;
            let addr = server.addr;
            // A TCP connection that never starts its handshake, and
            // whether the server closed it at once.
            let open = || async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                let closed = closed_within(&mut tcp, Duration::from_millis(300)).await;
                (tcp, closed)
            };
            // Three unauthenticated per address: one without a certificate
            // and two still handshaking; a fourth is closed at accept.
            let anonymous = raw(&server, pki.client_config(&pki, false)).await;
            let (first, closed) = open().await;
            assert!(!closed);
            let (second, closed) = open().await;
            assert!(!closed);
            let (_, closed) = open().await;
            assert!(closed, "a fourth unauthenticated connection from one address");
            drop((first, second));
            // Members stop counting once they present their certificate:
            // three of them fit beside the one without.
            let mut members = Vec::new();
            for _ in 0..3 {
                members.push(raw(&server, pki.client_config(&pki, true)).await);
            }
            // Five in all: a sixth is closed, whoever it is.
            let (fifth, closed) = open().await;
            assert!(!closed);
            let (_, closed) = open().await;
            assert!(closed, "a sixth connection in all");
            // Places are given back when connections close.
            drop((anonymous, fifth, members));
            tokio::time::sleep(Duration::from_millis(200)).await;
            let client = server.client(pki.client_config(&pki, false));
            let echo = client.call(Request::Echo("again".into()), CALL).await.unwrap();
            assert_eq!(echo, Response::Echo("again".into()));
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn round_trip_and_peer_certificates() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start(pki.server_config(true), local()).await;

            let client = server.client(pki.client_config(&pki, true));
            let echo = client.call(Request::Echo("hello".into()), CALL).await.unwrap();
            assert_eq!(echo, Response::Echo("hello".into()));
            let certs = client.call(Request::PeerCerts, CALL).await.unwrap();
            assert_eq!(certs, Response::Certs(vec![pki.client.0.to_vec()]));

            let anonymous = server.client(pki.client_config(&pki, false));
            let certs = anonymous.call(Request::PeerCerts, CALL).await.unwrap();
            assert_eq!(certs, Response::Certs(vec![]));
            server.stop().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_one_connection_and_complete_out_of_order() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start(pki.server_config(false), local()).await;
            let client = server.client(pki.client_config(&pki, true));
            let mut rng = rand::thread_rng();
            let calls = (0..100u64).map(|value| {
                let client = client.clone();
                let millis = rng.gen_range(0..50);
                async move { (value, client.call(Request::Sleep { millis, value }, CALL).await) }
            });
            for (value, result) in futures::future::join_all(calls).await {
                assert_eq!(result.unwrap(), Response::Value(value));
            }
            assert_eq!(server.handler.peers.lock().unwrap().len(), 1, "one connection");
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn reconnects_after_server_restart() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start(pki.server_config(false), local()).await;
            let addr = server.addr;
            let client = server.client(pki.client_config(&pki, true));
            assert_eq!(
                client.call(Request::Echo("a".into()), CALL).await.unwrap(),
                Response::Echo("a".into())
            );

            // A call in flight when the server goes away fails promptly.
            let slow = tokio::spawn({
                let client = client.clone();
                async move {
                    client
                        .call(
                            Request::Sleep {
                                millis: 5_000,
                                value: 1,
                            },
                            CALL,
                        )
                        .await
                }
            });
            while server.handler.peers.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.stop().await;
            let failed = slow.await.unwrap();
            assert!(matches!(failed, Err(RpcError::Closed | RpcError::Io(_))), "{failed:?}");
            assert!(!client.is_connected());

            let down = client.call(Request::Echo("b".into()), CALL).await;
            assert!(matches!(down, Err(RpcError::Connect { .. })), "{down:?}");

            let server = TestServer::start(pki.server_config(false), addr).await;
            assert_eq!(
                client.call(Request::Echo("c".into()), CALL).await.unwrap(),
                Response::Echo("c".into())
            );
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn notices_an_idle_connection_closed_by_the_server() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start(pki.server_config(false), local()).await;
            let addr = server.addr;
            let client = server.client(pki.client_config(&pki, true));
            assert_eq!(
                client.call(Request::Echo("a".into()), CALL).await.unwrap(),
                Response::Echo("a".into())
            );
            assert!(client.is_connected());
            server.stop().await;
            while client.is_connected() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let server = TestServer::start(pki.server_config(false), addr).await;
            assert_eq!(
                client.call(Request::Echo("b".into()), CALL).await.unwrap(),
                Response::Echo("b".into())
            );
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_released_connection_finishes_its_calls_and_the_next_call_reconnects() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start(pki.server_config(false), local()).await;
            let client = server.client(pki.client_config(&pki, true));
            let slow = tokio::spawn({
                let client = client.clone();
                async move { client.call(Request::Sleep { millis: 200, value: 7 }, CALL).await }
            });
            while server.handler.peers.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.release();
            assert!(!client.is_connected());
            assert!(
                slow.await.unwrap().is_ok(),
                "a call in flight finishes on the released connection"
            );
            assert_eq!(
                client.call(Request::Echo("a".into()), CALL).await.unwrap(),
                Response::Echo("a".into())
            );
            assert_eq!(server.handler.peers.lock().unwrap().len(), 2, "a new connection");
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn concurrent_calls_share_a_connect_failure() {
        bounded(async {
            let pki = Pki::new();
            let listener = TcpListener::bind(local()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            let client: RpcClient<Request, Response> =
                RpcClient::new(addr.to_string(), pki.client_config(&pki, true), server_name());
            let calls = (0..20).map(|_| client.call(Request::PeerCerts, CALL));
            for result in futures::future::join_all(calls).await {
                assert!(matches!(result, Err(RpcError::Connect { .. })), "{result:?}");
            }
            assert!(client.shared.state().connect_attempts < 20);
        })
        .await;
    }

    #[tokio::test]
    async fn connect_error_is_fast() {
        bounded(async {
            let pki = Pki::new();
            let listener = TcpListener::bind(local()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            let client: RpcClient<Request, Response> =
                RpcClient::new(addr.to_string(), pki.client_config(&pki, true), server_name());
            let started = Instant::now();
            let result = client.call(Request::Echo("x".into()), CALL).await;
            assert!(started.elapsed() < Duration::from_secs(1));
            match result {
                Err(error @ RpcError::Connect { .. }) => {
                    assert!(error.to_string().contains(&addr.to_string()), "{error}")
                }
                other => panic!("expected a connect error, got {other:?}"),
            }
        })
        .await;
    }

    #[tokio::test]
    async fn timeout_leaves_the_client_usable() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start(pki.server_config(false), local()).await;
            let client = server.client(pki.client_config(&pki, true));
            let slow = client
                .call(Request::Sleep { millis: 400, value: 1 }, Duration::from_millis(100))
                .await;
            assert!(matches!(slow, Err(RpcError::Timeout)), "{slow:?}");
            assert_eq!(
                client.call(Request::Echo("x".into()), CALL).await.unwrap(),
                Response::Echo("x".into())
            );
            // The timed-out call's connection was reset (so nothing it queued
            // can arrive late) and the client carried on over a new one.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let fast = client.call(Request::Sleep { millis: 0, value: 2 }, CALL).await;
            assert_eq!(fast.unwrap(), Response::Value(2));
            assert_eq!(
                server.handler.peers.lock().unwrap().len(),
                2,
                "a fresh connection after the timeout"
            );
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_and_the_client_recovers() {
        bounded(async {
            let pki = Pki::new();
            let options = ServerOptions {
                max_frame: 8 * 1024,
                ..ServerOptions::default()
            };
            let server = TestServer::start_with(pki.server_config(false), local(), options).await;
            let client: RpcClient<Request, Response> = RpcClient::with_options(
                server.addr.to_string(),
                pki.client_config(&pki, true),
                server_name(),
                ClientOptions {
                    max_frame: 1024,
                    ..ClientOptions::default()
                },
            );

            // Response larger than the client accepts: the connection is dropped.
            let big = client.call(Request::Big(4096), CALL).await;
            assert!(
                matches!(big, Err(RpcError::FrameTooLarge { size, max: 1024 }) if size > 4096),
                "{big:?}"
            );
            assert_eq!(
                client.call(Request::Echo("x".into()), CALL).await.unwrap(),
                Response::Echo("x".into())
            );

            // Request larger than the client sends: refused before sending.
            let big = client.call(Request::Echo("y".repeat(2000)), CALL).await;
            assert!(matches!(big, Err(RpcError::FrameTooLarge { max: 1024, .. })), "{big:?}");
            assert!(client.is_connected());

            // Request larger than the server accepts: it closes the connection.
            let generous: RpcClient<Request, Response> = server.client(pki.client_config(&pki, true));
            let big = generous.call(Request::Echo("z".repeat(10_000)), CALL).await;
            assert!(matches!(big, Err(RpcError::Closed | RpcError::Io(_))), "{big:?}");
            assert_eq!(
                generous.call(Request::Echo("z".into()), CALL).await.unwrap(),
                Response::Echo("z".into())
            );
            server.stop().await;
        })
        .await;
    }

    /// Opens a TLS connection, writes `bytes`, and waits for the server to close it.
    async fn send_raw(addr: SocketAddr, tls: Arc<ClientConfig>, bytes: &[u8]) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut stream = TlsConnector::from(tls).connect(server_name(), tcp).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        stream.flush().await.unwrap();
        let mut sink = Vec::new();
        // Closed cleanly or not, the read ends.
        let _ = stream.read_to_end(&mut sink).await;
        assert!(sink.is_empty(), "the server answered garbage with {sink:?}");
    }

    #[tokio::test]
    async fn garbage_closes_only_its_own_connection() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start(pki.server_config(false), local()).await;
            let client = server.client(pki.client_config(&pki, true));
            let pending = tokio::spawn({
                let client = client.clone();
                async move { client.call(Request::Sleep { millis: 300, value: 9 }, CALL).await }
            });
            let tls = pki.client_config(&pki, true);
            // A length of 4 GiB.
            send_raw(server.addr, Arc::clone(&tls), &[0xff, 0xff, 0xff, 0xff]).await;
            // A plausible length, then bytes that are not MessagePack of (u64, Request).
            send_raw(
                server.addr,
                Arc::clone(&tls),
                &[0, 0, 0, 5, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1],
            )
            .await;
            // A well-formed frame of the wrong shape.
            let mut wrong = encode_frame(1, &("not", "a request"), DEFAULT_MAX_FRAME).unwrap();
            send_raw(server.addr, Arc::clone(&tls), &wrong).await;
            // A truncated frame, then the client goes away.
            wrong.truncate(6);
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            let mut stream = TlsConnector::from(tls).connect(server_name(), tcp).await.unwrap();
            stream.write_all(&wrong).await.unwrap();
            drop(stream);
            // Not TLS at all.
            let mut plain = TcpStream::connect(server.addr).await.unwrap();
            plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let mut sink = Vec::new();
            let _ = plain.read_to_end(&mut sink).await;

            assert_eq!(pending.await.unwrap().unwrap(), Response::Value(9));
            assert_eq!(
                client.call(Request::Echo("x".into()), CALL).await.unwrap(),
                Response::Echo("x".into())
            );
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn untrusted_server_certificate_is_a_tls_error() {
        bounded(async {
            let pki = Pki::new();
            let other = Pki::new();
            let server = TestServer::start(pki.server_config(false), local()).await;
            let client = server.client(pki.client_config(&other, true));
            match client.call(Request::Echo("x".into()), CALL).await {
                Err(RpcError::Tls(message)) => {
                    assert!(message.contains("certificate"), "{message}")
                }
                other => panic!("expected a TLS error, got {other:?}"),
            }
            // After a fix of the configuration, the next call works.
            client.set_tls(pki.client_config(&pki, true));
            assert_eq!(
                client.call(Request::Echo("x".into()), CALL).await.unwrap(),
                Response::Echo("x".into())
            );
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn missing_client_certificate_is_a_tls_error() {
        bounded(async {
            let pki = Pki::new();
            let server = TestServer::start(pki.server_config(false), local()).await;
            let client = server.client(pki.client_config(&pki, false));
            match client.call(Request::Echo("x".into()), CALL).await {
                Err(RpcError::Tls(message)) => {
                    assert!(message.to_lowercase().contains("certificate"), "{message}")
                }
                other => panic!("expected a TLS error, got {other:?}"),
            }
            server.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn server_certificate_swaps_at_runtime() {
        bounded(async {
            let old = Pki::new();
            let new = Pki::new();
            let (configs, source) = watch::channel(old.server_config(false));
            let server = TestServer::start(TlsSource::watch(source), local()).await;
            let client = server.client(new.client_config(&new, true));
            let refused = client.call(Request::Echo("x".into()), CALL).await;
            assert!(matches!(refused, Err(RpcError::Tls(_))), "{refused:?}");

            configs.send(new.server_config(false)).unwrap();
            assert_eq!(
                client.call(Request::Echo("x".into()), CALL).await.unwrap(),
                Response::Echo("x".into())
            );
            server.stop().await;
        })
        .await;
    }

    #[test]
    fn frames_round_trip_and_refuse_oversized_lengths() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let frame = encode_frame(42, &Request::Echo("hi".into()), 1024).unwrap();
            let body = read_frame(&mut &frame[..], 1024).await.unwrap().unwrap();
            let (id, request): (u64, Request) = rmp_serde::from_slice(&body).unwrap();
            assert_eq!(id, 42);
            assert!(matches!(request, Request::Echo(text) if text == "hi"));

            // A header claiming 4 GiB is refused without reading (or allocating) it.
            let huge = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
            let refused = read_frame(&mut &huge[..], DEFAULT_MAX_FRAME).await;
            assert!(matches!(
                refused,
                Err(RpcError::FrameTooLarge {
                    size: 0xffff_ffff,
                    max: DEFAULT_MAX_FRAME
                })
            ));
            // Truncated body, truncated header, clean end.
            let truncated = read_frame(&mut &frame[..frame.len() - 1], 1024).await;
            assert!(matches!(truncated, Err(RpcError::Io(_))), "{truncated:?}");
            assert!(matches!(read_frame(&mut &frame[..2], 1024).await, Err(RpcError::Io(_))));
            assert!(read_frame(&mut &[][..], 1024).await.unwrap().is_none());
        });
    }
}
