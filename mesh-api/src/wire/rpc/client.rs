//! The client side: one lazily opened TLS connection per peer, calls
//! multiplexed over it.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;

use super::{frame::write_frames, *};

/// Client settings; [`Default`] gives the `DEFAULT_*` constants.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Largest request body sent and response body accepted, in bytes.
    pub(crate) max_frame: usize,
    /// How long establishing the TCP connection may take.
    pub(crate) connect_timeout: Duration,
    /// How long the TLS handshake may take.
    pub(crate) handshake_timeout: Duration,
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
    pub(super) shared: Arc<ClientShared<Resp>>,
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
pub(super) struct ClientShared<Resp> {
    addr: String,
    server_name: ServerName<'static>,
    options: ClientOptions,
    next_id: AtomicU64,
    state: Mutex<ClientState<Resp>>,
    /// Held while connecting, so concurrent calls wait for one connection
    /// instead of each opening their own.
    connecting: tokio::sync::Mutex<()>,
}

pub(super) struct ClientState<Resp> {
    tls: Arc<ClientConfig>,
    /// Incremented by `set_tls`, so a connection opened with the previous
    /// configuration is not kept.
    tls_generation: u64,
    connection: Option<Arc<Connection<Resp>>>,
    /// Connection attempts completed so far, and how the last one failed:
    /// calls that queued behind a failed attempt share its error instead of
    /// each trying again.
    pub(super) connect_attempts: u64,
    last_connect_error: Option<RpcError>,
}

impl<Resp> ClientShared<Resp> {
    pub(super) fn state(&self) -> MutexGuard<'_, ClientState<Resp>> {
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
    pub(crate) fn with_options(
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

    /// Lets go of the current connection: calls in flight on it finish
    /// there, it closes once they have, and the next call connects anew.
    /// For a peer that sent us elsewhere, so an idle session does not hold
    /// a descriptor on both ends.
    pub fn release(&self) {
        self.shared.state().connection = None;
    }

    /// Whether a connection is currently open (it may still turn out to be
    /// dead when next used).
    #[cfg(test)]
    pub(crate) fn is_connected(&self) -> bool {
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
