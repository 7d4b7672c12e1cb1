//! Request/response RPC over mutual TLS: the transport of every node-to-node
//! call (Raft, join, heartbeats, forwarded API calls).
//!
//! A frame is a big-endian u32 length and a MessagePack body
//! `(request_id, payload)`. Calls on one connection are multiplexed: the
//! server handles each request on its own task and answers as soon as it
//! is done, so a slow call (a long poll, a snapshot chunk) never holds up a
//! heartbeat. Frames are bounded (default 64 MiB) and checked before any
//! allocation; large payloads such as snapshots travel in chunks well under
//! the bound. We use this small protocol instead of gRPC: no protoc, no
//! HTTP/2 stack, and message sizes under our control.

use std::{
    collections::HashMap,
    future::Future,
    marker::PhantomData,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rustls::{
    pki_types::{CertificateDer, ServerName},
    ClientConfig, ServerConfig,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The largest frame either side accepts.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No TCP connection to the peer.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The peer.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificate problems land here).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// No answer in time.
    #[error("no answer within the timeout")]
    Timeout,
    /// The connection closed before the answer came.
    #[error("the connection closed before the answer came")]
    Closed,
    /// A frame over the limit.
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The request could not be encoded.
    #[error("encoding: {0}")]
    Encode(String),
    /// The answer could not be decoded.
    #[error("decoding: {0}")]
    Decode(String),
    /// Reading or writing the connection failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// Who called: the TCP address and the certificate chain it presented
/// (empty when it presented none).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The caller's address.
    pub addr: SocketAddr,
    /// The caller's certificate chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
}

/// Serves one kind of request.
pub trait Handler: Send + Sync + 'static {
    /// What callers send.
    type Request: DeserializeOwned + Send + 'static;
    /// What the handler answers.
    type Response: Serialize + Send + 'static;
    /// Handles one request.
    fn handle(&self, peer: Peer, request: Self::Request) -> impl Future<Output = Self::Response> + Send;
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, RpcError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > max {
        return Err(RpcError::FrameTooLarge { size, max });
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

fn encode_frame<T: Serialize>(id: u64, payload: &T, max: usize) -> Result<Vec<u8>, RpcError> {
    let body = rmp_serde::to_vec(&(id, payload)).map_err(|e| RpcError::Encode(e.to_string()))?;
    if body.len() > max {
        return Err(RpcError::FrameTooLarge { size: body.len(), max });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Accepts connections until `shutdown` turns true. The server certificate
/// is read from `tls` for every new connection, so renewals take effect
/// without a restart.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    log::warn!("rpc: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.borrow().clone());
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, addr, acceptor, handler, shutdown).await {
                log::debug!("rpc: connection from {addr}: {e}");
            }
        });
    }
}

async fn serve_connection<H: Handler>(
    stream: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RpcError> {
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| RpcError::Timeout)?
        .map_err(|e| RpcError::Tls(e.to_string()))?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let peer = Peer { addr, certs };
    let (mut reader, mut writer) = tokio::io::split(tls);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let write_task = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let result = loop {
        let frame = tokio::select! {
            f = read_frame(&mut reader, DEFAULT_MAX_FRAME) => f,
            _ = shutdown.changed() => break Ok(()),
        };
        let body = match frame {
            Ok(Some(b)) => b,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let (id, request): (u64, H::Request) = match rmp_serde::from_slice(&body) {
            Ok(r) => r,
            Err(e) => break Err(RpcError::Decode(e.to_string())),
        };
        let handler = handler.clone();
        let peer = peer.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let response = handler.handle(peer, request).await;
            match encode_frame(id, &response, DEFAULT_MAX_FRAME) {
                Ok(frame) => {
                    let _ = tx.send(frame).await;
                }
                Err(e) => log::error!("rpc: cannot send the answer to request {id}: {e}"),
            }
        });
    };
    drop(tx);
    let _ = write_task.await;
    result
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, RpcError>>>>>;

struct Connection {
    frames: mpsc::Sender<Vec<u8>>,
    pending: Pending,
}

impl Connection {
    fn is_open(&self) -> bool {
        !self.frames.is_closed()
    }
}

struct ClientInner {
    addr: String,
    server_name: ServerName<'static>,
    tls: Mutex<Arc<ClientConfig>>,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    next_id: AtomicU64,
    max_frame: usize,
}

/// A client of one peer; clones share the connection.
pub struct RpcClient<Req, Resp> {
    inner: Arc<ClientInner>,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> Clone for RpcClient<Req, Resp> {
    fn clone(&self) -> Self {
        RpcClient {
            inner: self.inner.clone(),
            _types: PhantomData,
        }
    }
}

impl<Req: Serialize, Resp: DeserializeOwned> RpcClient<Req, Resp> {
    /// A client of `addr` (HOST:PORT) that verifies the server as `server_name`.
    pub fn new(addr: String, tls: Arc<ClientConfig>, server_name: ServerName<'static>) -> Self {
        RpcClient {
            inner: Arc::new(ClientInner {
                addr,
                server_name,
                tls: Mutex::new(tls),
                conn: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
                max_frame: DEFAULT_MAX_FRAME,
            }),
            _types: PhantomData,
        }
    }

    /// Uses `tls` from the next connection on.
    pub fn set_tls(&self, tls: Arc<ClientConfig>) {
        *self.inner.tls.lock().expect("reason: never poisoned") = tls;
    }

    /// Sends `request` and waits up to `timeout` (connecting included).
    pub async fn call(&self, request: Req, timeout: Duration) -> Result<Resp, RpcError> {
        tokio::time::timeout(timeout, self.call_inner(request))
            .await
            .map_err(|_| RpcError::Timeout)?
    }

    async fn call_inner(&self, request: Req) -> Result<Resp, RpcError> {
        let conn = self.connection().await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(id, &request, self.inner.max_frame)?;
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().expect("reason: never poisoned").insert(id, tx);
        // Remove the entry however this call ends (timeout drops the future).
        struct Unregister(Pending, u64);
        impl Drop for Unregister {
            fn drop(&mut self) {
                self.0.lock().expect("reason: never poisoned").remove(&self.1);
            }
        }
        let _guard = Unregister(conn.pending.clone(), id);
        conn.frames.send(frame).await.map_err(|_| RpcError::Closed)?;
        let body = rx.await.map_err(|_| RpcError::Closed)??;
        let (_, response): (u64, Resp) = rmp_serde::from_slice(&body).map_err(|e| RpcError::Decode(e.to_string()))?;
        Ok(response)
    }

    async fn connection(&self) -> Result<Arc<Connection>, RpcError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.is_open()) {
            return Ok(c.clone());
        }
        let conn = Arc::new(self.connect().await?);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<Connection, RpcError> {
        let addr = self.inner.addr.clone();
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
            .await
            .map_err(|_| RpcError::Connect {
                addr: addr.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| RpcError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = self.inner.tls.lock().expect("reason: never poisoned").clone();
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(tls).connect(self.inner.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| RpcError::Tls("handshake timed out".into()))?
        .map_err(|e| RpcError::Tls(tls_message(&e)))?;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (frames, mut outgoing) = mpsc::channel::<Vec<u8>>(64);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let max = self.inner.max_frame;
        let read_pending = pending.clone();
        let (dead_tx, mut dead_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let error = loop {
                match read_frame(&mut reader, max).await {
                    Ok(Some(body)) => {
                        let id = match rmp_serde::from_slice::<(u64, serde::de::IgnoredAny)>(&body) {
                            Ok((id, _)) => id,
                            Err(e) => break RpcError::Decode(e.to_string()),
                        };
                        if let Some(tx) = read_pending.lock().expect("reason: never poisoned").remove(&id) {
                            let _ = tx.send(Ok(body));
                        }
                    }
                    Ok(None) => break RpcError::Closed,
                    Err(e) => break e,
                }
            };
            // Fail every call still waiting on this connection.
            let waiting: Vec<_> = read_pending.lock().expect("reason: never poisoned").drain().collect();
            let message = error.to_string();
            for (_, tx) in waiting {
                let _ = tx.send(Err(match &error {
                    RpcError::FrameTooLarge { size, max } => RpcError::FrameTooLarge { size: *size, max: *max },
                    RpcError::Closed => RpcError::Closed,
                    _ => RpcError::Io(std::io::Error::other(message.clone())),
                }));
            }
            let _ = dead_tx.send(());
        });
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    frame = outgoing.recv() => match frame {
                        Some(f) => if writer.write_all(&f).await.is_err() { break },
                        None => break,
                    },
                    _ = &mut dead_rx => break,
                }
            }
            // Dropping `outgoing` marks the connection closed for callers.
        });
        Ok(Connection { frames, pending })
    }
}

fn tls_message(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}
