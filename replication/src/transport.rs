//! The QUIC transport between cluster nodes: mutual TLS from the cluster CA, versioned and tagged
//! streams, one request/response calls and bulk streams, cached connections with back-off.
//!
//! Invariant: a stream is served only for a peer whose certificate names an admitted node of this
//! cluster, and every stream starts with `[protocol version u8][kind u8]`. Thread: everything
//! here runs on one tokio runtime (the control thread's), which must have I/O and time enabled.
//!
//! Wire format. The opener writes the two header bytes. The acceptor answers with one status
//! byte: [`STATUS_ACCEPTED`], or a refusal code followed by a UTF-8 message and the end of the
//! stream. After acceptance a call carries the request bytes up to the end of the stream and is
//! answered by `[0 ok | 1 error][body]` up to the end of the stream; a bulk stream belongs to its
//! handler. Raft calls, file fetches and WAL streams use separate connections to a peer (see
//! [`Lane`]), so a large transfer competes with heartbeats or WAL shipping neither for
//! flow-control credit nor in one congestion window.

pub mod raft_network;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::Connection;
use quinn::Endpoint;
use quinn::RecvStream;
use quinn::SendStream;
use quinn::VarInt;
use rustls::pki_types::CertificateDer;

use crate::raft_types::NodeId;
pub use tls::Admit;
pub use tls::ClusterTls;
pub use tls::TlsError;

/// The stream protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// The acceptor's answer to a header it serves.
pub const STATUS_ACCEPTED: u8 = 0;
const STATUS_BAD_VERSION: u8 = 1;
const STATUS_BAD_KIND: u8 = 2;
const STATUS_NO_HANDLER: u8 = 3;
const CALL_OK: u8 = 0;
const CALL_ERROR: u8 = 1;
/// Refusal messages are short; a longer one is cut.
const REFUSAL_BYTES_MAX: usize = 4096;
/// Application error codes of connection closes.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_REFUSED: u32 = 1;

/// What a stream carries; the second header byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    RaftAppend = 1,
    RaftVote = 2,
    RaftSnapshot = 3,
    /// A follower's proposal forwarded to the leader.
    RaftForward = 4,
    FileFetch = 5,
    /// One shard's WAL shipped to a peer (see `crate::wal_stream`).
    WalStream = 6,
    /// One page of a verification across peers (see `crate::verify`).
    Verify = 7,
    /// A question about a peer's copy of one file (anti-entropy, see `crate::antientropy`).
    FileCheck = 8,
}

impl StreamKind {
    pub fn from_u8(value: u8) -> Option<StreamKind> {
        Some(match value {
            1 => StreamKind::RaftAppend,
            2 => StreamKind::RaftVote,
            3 => StreamKind::RaftSnapshot,
            4 => StreamKind::RaftForward,
            5 => StreamKind::FileFetch,
            6 => StreamKind::WalStream,
            7 => StreamKind::Verify,
            8 => StreamKind::FileCheck,
            _ => return None,
        })
    }

    /// The connection a stream of this kind travels on.
    pub fn lane(self) -> Lane {
        match self {
            // Verify answers are pages of up to megabytes: they must not hold back Raft
            // heartbeats, nor the WAL acks that acknowledged writes wait for.
            StreamKind::FileFetch | StreamKind::Verify => Lane::Bulk,
            StreamKind::WalStream => Lane::Wal,
            _ => Lane::Control,
        }
    }
}

/// Each peer gets one outgoing connection per lane, so bulk data never queues in front of Raft
/// messages in one connection's flow-control and congestion windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Control,
    Bulk,
    /// WAL streams: acknowledged writes wait for them, so they must not queue behind a
    /// multi-gigabyte file fetch on `Bulk`, and their steady flow must not delay heartbeats on
    /// `Control`.
    Wal,
}

/// Limits and timings of the transport. All sizes are bytes.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest call request or response body.
    pub message_bytes_max: usize,
    /// Bound on establishing a connection (handshake included).
    pub connect_timeout: Duration,
    /// Bound on the opener sending the two header bytes of a stream, and on `open` hearing the
    /// acceptor's status.
    pub header_timeout: Duration,
    /// A connection that hears nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive pings, well below `idle_timeout`, so idle peers stay connected.
    pub keep_alive_interval: Duration,
    /// After a failed connect, calls to that peer fail at once for a delay that doubles from
    /// `backoff_min` up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Receive credit of one stream; sized for throughput of bulk streams.
    pub stream_window_bytes: u32,
    /// Receive credit of one connection over all its streams.
    pub connection_window_bytes: u32,
    /// Bytes a connection may have in flight unacknowledged.
    pub send_window_bytes: u64,
    /// Streams a peer may have open at once on one connection.
    pub streams_per_connection_max: u32,
    /// Receive and send buffer asked for the endpoint's UDP socket (see [`bind_udp`]).
    pub udp_buffer_bytes: usize,
}

impl Default for TransportConfig {
    fn default() -> TransportConfig {
        TransportConfig {
            message_bytes_max: 16 << 20,
            connect_timeout: Duration::from_secs(3),
            header_timeout: Duration::from_secs(5),
            // A killed peer sends nothing (loopback and most networks drop the ICMP a closed
            // port answers), so its connections end only at this timeout: short enough that
            // bulk streams and calls to a dead peer fail within seconds, long enough for a
            // busy two-core machine's scheduling stalls.
            idle_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 64 << 20,
            send_window_bytes: 64 << 20,
            streams_per_connection_max: 256,
            udp_buffer_bytes: UDP_BUFFER_BYTES,
        }
    }
}

impl TransportConfig {
    fn quinn(&self) -> Result<Arc<quinn::TransportConfig>, TransportError> {
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|e| TransportError::Config(format!("idle_timeout: {e}")))?;
        if self.keep_alive_interval >= self.idle_timeout {
            return Err(TransportError::Config(
                "keep_alive_interval must be below idle_timeout".to_owned(),
            ));
        }
        if self.message_bytes_max == 0 || self.backoff_min > self.backoff_max {
            return Err(TransportError::Config(
                "message_bytes_max must be positive and backoff_min at most backoff_max".to_owned(),
            ));
        }
        let mut config = quinn::TransportConfig::default();
        config
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive_interval))
            .stream_receive_window(VarInt::from_u32(self.stream_window_bytes))
            .receive_window(VarInt::from_u32(self.connection_window_bytes))
            .send_window(self.send_window_bytes)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.streams_per_connection_max))
            .max_concurrent_uni_streams(VarInt::from_u32(0));
        Ok(Arc::new(config))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("invalid transport config: {0}")]
    Config(String),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to node {target} at {addr}: {reason}")]
    Connect {
        target: NodeId,
        addr: SocketAddr,
        reason: String,
    },
    #[error(
        "node {target} is backing off after failed connects; next attempt in {retry_in_ms} ms"
    )]
    BackingOff { target: NodeId, retry_in_ms: u64 },
    #[error("connection to node {target} lost: {reason}")]
    Connection { target: NodeId, reason: String },
    #[error("{kind:?} to node {target} timed out after {timeout_ms} ms")]
    Timeout {
        target: NodeId,
        kind: StreamKind,
        timeout_ms: u64,
    },
    #[error("node {target} refused a {kind:?} stream (status {status}): {message}")]
    Refused {
        target: NodeId,
        kind: StreamKind,
        status: u8,
        message: String,
    },
    #[error("node {target} failed the {kind:?} call: {message}")]
    Remote {
        target: NodeId,
        kind: StreamKind,
        message: String,
    },
    #[error("{what} exceeds {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("malformed answer from node {target}: {reason}")]
    Protocol { target: NodeId, reason: String },
    #[error("the transport is shut down")]
    Shutdown,
}

impl TransportError {
    /// Whether the peer could not be reached at all (as opposed to answering badly or slowly);
    /// Raft backs off from such peers.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. }
                | TransportError::BackingOff { .. }
                | TransportError::Connection { .. }
                | TransportError::Shutdown
                | TransportError::Refused {
                    status: STATUS_NO_HANDLER,
                    ..
                }
        )
    }
}

/// Serves accepted streams of one kind. The header and the acceptance status are already
/// exchanged; the handler owns both halves of the stream.
pub trait StreamHandler: Send + Sync + 'static {
    fn handle(
        &self,
        peer: NodeId,
        send: SendStream,
        recv: RecvStream,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Answers one request of a call kind. An `Err` reaches the caller as
/// [`TransportError::Remote`].
pub trait CallHandler: Send + Sync + 'static {
    fn call(
        &self,
        peer: NodeId,
        request: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>>;
}

#[derive(Clone)]
enum Handler {
    Stream(Arc<dyn StreamHandler>),
    Call(Arc<dyn CallHandler>),
}

/// One cached outgoing connection (or the memory of failing to make one).
#[derive(Default)]
struct Slot {
    connection: Option<Connection>,
    failures: u32,
    retry_at: Option<Instant>,
    /// The dial under way, if any. It runs as its own task so that a caller's timeout (a Raft
    /// heartbeat's is a fraction of the connect timeout) never cancels it: a dial to a dead
    /// peer runs to its end and starts the back-off, and calls in the meantime fail fast as
    /// unreachable instead of each starting a handshake that is cut short again.
    dialing: Option<tokio::sync::watch::Receiver<Option<Dialed>>>,
}

/// How a detached dial ended, for every caller waiting on it.
#[derive(Clone)]
enum Dialed {
    Connected(Connection),
    Failed { addr: SocketAddr, reason: String },
}

/// Outgoing connection slots by peer and lane; a slot's own lock serializes dialing.
type Slots = HashMap<(NodeId, Lane), Arc<tokio::sync::Mutex<Slot>>>;

struct Inner {
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    cluster_id: String,
    node_id: NodeId,
    admit: Admit,
    config: TransportConfig,
    handlers: Mutex<HashMap<StreamKind, Handler>>,
    slots: Mutex<Slots>,
    closed: AtomicBool,
}

/// A QUIC endpoint that accepts peers and dials them. Cheap to clone; all clones share it.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold no invariant a panicking holder could break half-way.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Transport {
    /// Binds a UDP endpoint at `addr` and starts accepting peers. Must be called inside a tokio
    /// runtime with I/O and time enabled; the accept loop runs on it.
    pub fn bind(
        addr: SocketAddr,
        tls: ClusterTls,
        admit: Admit,
        config: TransportConfig,
    ) -> Result<Transport, TransportError> {
        let transport_config = config.quinn()?;
        let server_crypto = QuicServerConfig::try_from(tls.server_config(admit.clone())?)
            .map_err(|e| TransportError::Config(format!("quic server tls: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport_config.clone());
        let client_crypto = QuicClientConfig::try_from(tls.client_config()?)
            .map_err(|e| TransportError::Config(format!("quic client tls: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport_config);
        let bind_error = |source| TransportError::Bind { addr, source };
        let socket = bind_udp(addr, config.udp_buffer_bytes).map_err(bind_error)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Config("no tokio runtime for quinn".to_owned()))?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        let inner = Arc::new(Inner {
            endpoint,
            client,
            cluster_id: tls.cluster_id.clone(),
            node_id: tls.node_id,
            admit,
            config,
            handlers: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(accept_loop(inner.clone()));
        tracing::info!(
            node_id = tls.node_id,
            addr = %inner.endpoint.local_addr().unwrap_or(addr),
            "transport listening"
        );
        Ok(Transport { inner })
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|e| TransportError::Config(format!("local address: {e}")))
    }

    /// Serves streams of `kind` with `handler` (replacing any earlier one).
    pub fn set_handler(&self, kind: StreamKind, handler: Arc<dyn StreamHandler>) {
        lock(&self.inner.handlers).insert(kind, Handler::Stream(handler));
    }

    /// Serves calls of `kind` with `handler` (replacing any earlier one).
    pub fn set_call_handler(&self, kind: StreamKind, handler: Arc<dyn CallHandler>) {
        lock(&self.inner.handlers).insert(kind, Handler::Call(handler));
    }

    /// One request and its response on a fresh stream of the cached control (or bulk)
    /// connection to `target`, all within `timeout`.
    pub async fn call(
        &self,
        target: NodeId,
        addr: SocketAddr,
        kind: StreamKind,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let limit = self.inner.config.message_bytes_max;
        if request.len() > limit {
            return Err(TransportError::TooLarge {
                what: "call request",
                limit,
            });
        }
        let exchange = async {
            let connection = self.connection(target, addr, kind.lane()).await?;
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| self.lost(target, e))?;
            let mut message = Vec::with_capacity(2 + request.len());
            message.extend_from_slice(&[PROTOCOL_VERSION, kind as u8]);
            message.extend_from_slice(&request);
            send.write_all(&message)
                .await
                .map_err(|e| self.lost(target, e))?;
            // Finishing fails only if the stream was already reset, which the read then reports.
            let _ = send.finish();
            // Status byte, result byte, body.
            let answer = recv.read_to_end(limit + 2).await.map_err(|e| match e {
                quinn::ReadToEndError::TooLong => TransportError::TooLarge {
                    what: "call response",
                    limit,
                },
                quinn::ReadToEndError::Read(e) => self.lost(target, e),
            })?;
            parse_answer(target, kind, answer)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                target,
                kind,
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// Opens a stream of `kind` to `target` for the caller's own protocol, and returns once the
    /// peer has accepted it.
    pub async fn open(
        &self,
        target: NodeId,
        addr: SocketAddr,
        kind: StreamKind,
    ) -> Result<(SendStream, RecvStream), TransportError> {
        let timeout = self.inner.config.connect_timeout + self.inner.config.header_timeout;
        let opening = async {
            let connection = self.connection(target, addr, kind.lane()).await?;
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| self.lost(target, e))?;
            send.write_all(&[PROTOCOL_VERSION, kind as u8])
                .await
                .map_err(|e| self.lost(target, e))?;
            let mut status = [0u8; 1];
            recv.read_exact(&mut status).await.map_err(|e| match e {
                quinn::ReadExactError::FinishedEarly(_) => TransportError::Protocol {
                    target,
                    reason: "stream ended before its status".to_owned(),
                },
                quinn::ReadExactError::ReadError(e) => self.lost(target, e),
            })?;
            if status[0] != STATUS_ACCEPTED {
                let message = recv
                    .read_to_end(REFUSAL_BYTES_MAX)
                    .await
                    .unwrap_or_default();
                return Err(TransportError::Refused {
                    target,
                    kind,
                    status: status[0],
                    message: String::from_utf8_lossy(&message).into_owned(),
                });
            }
            Ok((send, recv))
        };
        match tokio::time::timeout(timeout, opening).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                target,
                kind,
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// Closes every connection and stops accepting; later calls fail with `Shutdown`. Waits
    /// briefly for peers to hear the close, so they do not wait for an idle timeout.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
        tracing::info!(node_id = self.inner.node_id, "transport shut down");
    }

    fn lost(&self, target: NodeId, error: impl std::error::Error) -> TransportError {
        if self.inner.closed.load(Ordering::Acquire) {
            return TransportError::Shutdown;
        }
        TransportError::Connection {
            target,
            reason: error_chain(&error),
        }
    }

    /// The cached connection to `target` on `lane`, dialing a new one if there is none (or it
    /// closed, or the peer moved), unless the last dial failed recently. Concurrent callers
    /// share one dial.
    async fn connection(
        &self,
        target: NodeId,
        addr: SocketAddr,
        lane: Lane,
    ) -> Result<Connection, TransportError> {
        let slot = lock(&self.inner.slots)
            .entry((target, lane))
            .or_default()
            .clone();
        loop {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(TransportError::Shutdown);
            }
            let mut dialing = {
                let mut state = slot.lock().await;
                if let Some(connection) = &state.connection {
                    if connection.close_reason().is_none() && connection.remote_address() == addr {
                        return Ok(connection.clone());
                    }
                    state.connection = None;
                }
                match &state.dialing {
                    Some(dialing) => dialing.clone(),
                    None => {
                        let now = Instant::now();
                        if let Some(retry_at) = state.retry_at.filter(|at| *at > now) {
                            return Err(TransportError::BackingOff {
                                target,
                                retry_in_ms: (retry_at - now).as_millis() as u64,
                            });
                        }
                        let (done, dialing) = tokio::sync::watch::channel(None);
                        state.dialing = Some(dialing.clone());
                        tokio::spawn(self.clone().dial_into(slot.clone(), target, addr, done));
                        dialing
                    }
                }
            };
            let outcome = match dialing.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone(),
                // The dial task ended without a word: only at runtime shutdown.
                Err(_) => return Err(TransportError::Shutdown),
            };
            match outcome {
                Some(Dialed::Connected(connection)) if connection.remote_address() == addr => {
                    return Ok(connection)
                }
                // A dial to the peer's old address: look again (and dial the new one).
                Some(Dialed::Connected(_)) => continue,
                Some(Dialed::Failed { addr, reason }) => {
                    return Err(TransportError::Connect {
                        target,
                        addr,
                        reason,
                    })
                }
                None => unreachable!("waited for an outcome"),
            }
        }
    }

    /// Dials `target` and records the outcome in its slot: the connection, or a failure that
    /// doubles the back-off; then tells every caller waiting on it.
    async fn dial_into(
        self,
        slot: Arc<tokio::sync::Mutex<Slot>>,
        target: NodeId,
        addr: SocketAddr,
        done: tokio::sync::watch::Sender<Option<Dialed>>,
    ) {
        let result = self.dial(target, addr).await;
        let mut state = slot.lock().await;
        state.dialing = None;
        let outcome = match result {
            Ok(connection) => {
                if state.failures > 0 {
                    tracing::info!(target, %addr, failures = state.failures, "peer reachable again");
                }
                state.failures = 0;
                state.retry_at = None;
                state.connection = Some(connection.clone());
                Dialed::Connected(connection)
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                let config = &self.inner.config;
                let doubling = 1u32 << (state.failures - 1).min(16);
                let delay = config
                    .backoff_min
                    .saturating_mul(doubling)
                    .min(config.backoff_max);
                state.retry_at = Some(Instant::now() + delay);
                tracing::debug!(
                    target,
                    %addr,
                    failures = state.failures,
                    delay_ms = delay.as_millis() as u64,
                    %error,
                    "connect to peer failed"
                );
                let reason = match error {
                    TransportError::Connect { reason, .. } => reason,
                    other => other.to_string(),
                };
                Dialed::Failed { addr, reason }
            }
        };
        let _ = done.send(Some(outcome));
    }

    async fn dial(&self, target: NodeId, addr: SocketAddr) -> Result<Connection, TransportError> {
        let server_name = tls::node_name(&self.inner.cluster_id, target);
        let connect_error = |reason: String| TransportError::Connect {
            target,
            addr,
            reason,
        };
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client.clone(), addr, &server_name)
            .map_err(|e| connect_error(e.to_string()))?;
        match tokio::time::timeout(self.inner.config.connect_timeout, connecting).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(connect_error(error_chain(&e))),
            Err(_) => Err(connect_error(format!(
                "no handshake within {} ms",
                self.inner.config.connect_timeout.as_millis()
            ))),
        }
    }
}

/// Default of [`TransportConfig::udp_buffer_bytes`]. A bulk stream arrives in bursts of up to a
/// congestion window; the default receive buffer (about 200 KiB) overflows while the control
/// thread is busy, and every datagram the kernel drops makes the sender's congestion controller
/// back off. Raft messages share the socket and wait behind whatever the buffer holds, so it is
/// not made larger than needed: in the catch-up bench on loopback, 1 MiB cut the drops during a
/// catch-up to about a third and kept a Raft call's p99 near 10 ms, where 4 MiB kept dropping
/// and doubled the call's p50. The kernel grants at most `net.core.rmem_max` (`wmem_max`), which
/// is left to the operator.
const UDP_BUFFER_BYTES: usize = 1 << 20;

/// Binds the endpoint's UDP socket with buffers of `buffer_bytes` where the kernel allows them,
/// and logs what it granted.
fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // A refused size keeps the default: slower bulk transfers, not a node that cannot start.
    if let Err(error) = socket.set_recv_buffer_size(buffer_bytes) {
        tracing::warn!(%error, "udp receive buffer size refused");
    }
    if let Err(error) = socket.set_send_buffer_size(buffer_bytes) {
        tracing::warn!(%error, "udp send buffer size refused");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // Linux reports twice the size it granted (the other half is its bookkeeping).
    let granted = |size: std::io::Result<usize>| size.map(|s| s / 2).unwrap_or(0);
    let (receive, send) = (
        granted(socket.recv_buffer_size()),
        granted(socket.send_buffer_size()),
    );
    if receive < buffer_bytes || send < buffer_bytes {
        tracing::info!(
            requested_bytes = buffer_bytes,
            receive_bytes = receive,
            send_bytes = send,
            "udp socket buffers capped by net.core.rmem_max / wmem_max"
        );
    } else {
        tracing::debug!(
            receive_bytes = receive,
            send_bytes = send,
            "udp socket buffers"
        );
    }
    Ok(socket.into())
}

/// An error with its sources, since quinn's stream errors say only "connection lost" and keep
/// the reason (a refused certificate, a peer shutting down) in their source.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn parse_answer(
    target: NodeId,
    kind: StreamKind,
    mut answer: Vec<u8>,
) -> Result<Vec<u8>, TransportError> {
    let protocol = |reason: &str| TransportError::Protocol {
        target,
        reason: reason.to_owned(),
    };
    let status = *answer.first().ok_or_else(|| protocol("empty answer"))?;
    if status != STATUS_ACCEPTED {
        answer.truncate(REFUSAL_BYTES_MAX);
        return Err(TransportError::Refused {
            target,
            kind,
            status,
            message: String::from_utf8_lossy(&answer[1..]).into_owned(),
        });
    }
    match answer.get(1) {
        Some(&CALL_OK) => {
            answer.drain(..2);
            Ok(answer)
        }
        Some(&CALL_ERROR) => Err(TransportError::Remote {
            target,
            kind,
            message: String::from_utf8_lossy(&answer[2..]).into_owned(),
        }),
        Some(_) => Err(protocol("unknown call result byte")),
        None => Err(protocol("answer ended before its result byte")),
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        tokio::spawn(serve_connection(inner.clone(), incoming));
    }
    tracing::debug!(node_id = inner.node_id, "accept loop ended");
}

/// The node id named by the peer certificate of an established connection.
fn connection_peer(connection: &Connection, cluster_id: &str) -> Result<NodeId, String> {
    let identity = connection
        .peer_identity()
        .ok_or_else(|| "no peer certificate".to_owned())?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "peer identity is not a certificate chain".to_owned())?;
    let leaf = chain
        .first()
        .ok_or_else(|| "empty peer certificate chain".to_owned())?;
    tls::peer_node_id(leaf, cluster_id).map_err(|e| e.to_string())
}

async fn serve_connection(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%remote, %error, "incoming connection failed its handshake");
            return;
        }
    };
    // The TLS verifier already refused unnamed and unadmitted peers; checking again here keeps
    // the stream handlers safe should the TLS configuration ever change.
    let peer = match connection_peer(&connection, &inner.cluster_id) {
        Ok(peer) if (inner.admit)(peer) => peer,
        outcome => {
            tracing::warn!(%remote, ?outcome, "refusing connection from unadmitted peer");
            connection.close(VarInt::from_u32(CLOSE_REFUSED), b"not admitted");
            return;
        }
    };
    tracing::debug!(peer, %remote, "peer connected");
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(inner.clone(), peer, send, recv));
            }
            Err(error) => {
                tracing::debug!(peer, %remote, %error, "peer connection closed");
                return;
            }
        }
    }
}

async fn refuse(mut send: SendStream, status: u8, message: &str) {
    let mut frame = vec![status];
    frame.extend_from_slice(message.as_bytes());
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
}

async fn serve_stream(inner: Arc<Inner>, peer: NodeId, mut send: SendStream, mut recv: RecvStream) {
    let mut header = [0u8; 2];
    match tokio::time::timeout(inner.config.header_timeout, recv.read_exact(&mut header)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(peer, %error, "stream ended before its header");
            return;
        }
        Err(_) => {
            tracing::debug!(peer, "stream header timed out");
            return;
        }
    }
    if header[0] != PROTOCOL_VERSION {
        tracing::warn!(
            peer,
            version = header[0],
            "refusing stream of unknown protocol version"
        );
        let message = format!("unsupported protocol version {}", header[0]);
        return refuse(send, STATUS_BAD_VERSION, &message).await;
    }
    let Some(kind) = StreamKind::from_u8(header[1]) else {
        tracing::warn!(peer, kind = header[1], "refusing stream of unknown kind");
        let message = format!("unknown stream kind {}", header[1]);
        return refuse(send, STATUS_BAD_KIND, &message).await;
    };
    let handler = lock(&inner.handlers).get(&kind).cloned();
    let Some(handler) = handler else {
        tracing::debug!(peer, ?kind, "no handler for stream kind");
        let message = format!("no handler for {kind:?} on this node yet");
        return refuse(send, STATUS_NO_HANDLER, &message).await;
    };
    match handler {
        Handler::Stream(handler) => {
            if send.write_all(&[STATUS_ACCEPTED]).await.is_err() {
                return;
            }
            handler.handle(peer, send, recv).await;
        }
        Handler::Call(handler) => {
            let limit = inner.config.message_bytes_max;
            let request = match recv.read_to_end(limit).await {
                Ok(request) => request,
                Err(error) => {
                    tracing::debug!(peer, ?kind, %error, "call request not read");
                    let message = format!("request not read: {error}");
                    let mut frame = vec![STATUS_ACCEPTED, CALL_ERROR];
                    frame.extend_from_slice(message.as_bytes());
                    let _ = send.write_all(&frame).await;
                    let _ = send.finish();
                    return;
                }
            };
            let (result, mut body) = match handler.call(peer, request).await {
                Ok(body) if body.len() <= limit => (CALL_OK, body),
                Ok(body) => (
                    CALL_ERROR,
                    format!("response of {} bytes exceeds {limit}", body.len()).into_bytes(),
                ),
                Err(message) => (CALL_ERROR, message.into_bytes()),
            };
            let mut frame = Vec::with_capacity(2 + body.len());
            frame.extend_from_slice(&[STATUS_ACCEPTED, result]);
            frame.append(&mut body);
            if let Err(error) = send.write_all(&frame).await {
                tracing::debug!(peer, ?kind, %error, "call response not sent");
                return;
            }
            let _ = send.finish();
        }
    }
}
