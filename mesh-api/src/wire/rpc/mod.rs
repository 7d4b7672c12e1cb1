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

use std::io;
use std::sync::Arc;
use std::time::Duration;

mod client;
mod frame;
mod server;

pub use client::{ClientOptions, RpcClient};
pub use frame::{decode_request, decode_response, encode_frame, read_frame};
pub use server::{serve, serve_with_options, Handler, Peer, ServerOptions, TlsSource};

/// Largest frame body accepted or sent unless configured otherwise (64 MiB).
pub(crate) const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;
/// Largest request body from a peer without a client certificate: a join
/// request (a token, a CSR and a few names) is a few KiB.
pub const DEFAULT_ANONYMOUS_MAX_FRAME: usize = 64 * 1024;
/// Requests at once on a connection without a client certificate.
pub(crate) const DEFAULT_ANONYMOUS_MAX_IN_FLIGHT: usize = 4;
/// How long a frame may take to arrive once its first byte has.
pub(crate) const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection without a client certificate may wait between
/// requests with none running.
pub(crate) const DEFAULT_ANONYMOUS_IDLE: Duration = Duration::from_secs(10);
/// The same for members' connections (well above their heartbeat and
/// long-poll periods, so only abandoned connections close).
pub(crate) const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// Connections open at once, in all (a few per node: thousands of nodes).
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 32_768;
/// Unauthenticated connections (in their TLS handshake, or without a
/// client certificate) open at once, in all.
pub(crate) const DEFAULT_MAX_UNAUTHENTICATED: usize = 1024;
/// Unauthenticated connections open at once from one source address.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;
/// A kind of refusal is logged at most this often (with how many there were).
pub(crate) const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take, on either side, unless configured otherwise.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the TCP connection to be established unless configured otherwise.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many requests of one connection the server runs at once unless
/// configured otherwise; past that it stops reading from the connection.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

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

#[cfg(test)]
mod tests {
    use super::*;

    use std::future::Future;

    use std::net::SocketAddr;

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, ServerConfig};

    use serde::Serialize;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use tokio_rustls::TlsConnector;

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
