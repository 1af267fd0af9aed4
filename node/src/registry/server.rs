//! The HTTP server of the registry API: accepts connections and serves the router on each, in
//! tasks it owns.
//!
//! Every connection runs in the server's `JoinSet`, and every task hyper starts for a
//! connection (HTTP/2 streams) in its `TaskTracker`, so the server knows what is still running
//! when it stops: on shutdown it stops accepting, asks each connection to finish its requests
//! in flight (HTTP/1 closes after the current response, HTTP/2 sends GOAWAY), waits for them
//! at most the grace period, and then aborts what is left. Nothing it started outlives
//! [`serve`].
//!
//! With a certificate it speaks HTTPS (rustls; HTTP/2 and HTTP/1.1 by ALPN), with a bounded TLS
//! handshake. Every request carries the client's address ([`ClientAddr`]) for access control
//! and the audit trail.
//!
//! What a client may hold is bounded ([`HttpLimits`]): connections in all and per client
//! address (past either, a connection gets a `503` with the registry's error body and is
//! closed), requests handled at once, and time. A connection without a request in flight is
//! closed after the idle timeout, or sooner once it has started sending a request whose headers
//! do not arrive within the header timeout (this also covers the first bytes, before hyper
//! knows the protocol); a request body that stalls is cut off.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access::ClientAddr;
use crate::config::HttpLimits;

/// File descriptors kept for everything but HTTP clients (peers, blob files, the index).
const RESERVED_FDS: u64 = 256;
/// Refusals (a `503` written to a connection past a limit, over HTTPS after a handshake) in
/// flight at once; past it a connection past a limit is closed without an answer.
const MAX_REFUSALS: usize = 64;
/// How long a refusal waits for the request it answers, and for the client to close.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a request waits for a slot when [`HttpLimits::max_requests`] are being handled.
const REQUEST_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// The answer to a connection past a limit: the registry's error body, and the connection closes.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
docker-distribution-api-version: registry/2.0\r\n\
content-length: 99\r\n\r\n\
{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"too many connections; try again later\",\"detail\":null}]}";
/// Pause after a failed `accept` (out of file descriptors, most often) before trying again, so
/// the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refusal over HTTPS may take in all: the handshake, the request, the `503`.
const TLS_REFUSAL_TIMEOUT: Duration = Duration::from_secs(3);
/// The admin socket's file name in the data directory: the CLI's way in, reachable by the
/// node's own user only (mode 0600). A request over it is the operator's.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// The HTTPS settings for a certificate chain and private key in PEM files.
pub fn tls_config(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, Box<dyn std::error::Error + Send + Sync>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()).into());
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Runs hyper's per-connection tasks (HTTP/2 streams) on a tracker the server owns.
#[derive(Clone)]
struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// Raises the soft limit on open files to the hard limit, and returns the soft limit now in
/// force (`None` if it cannot be read).
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Some(hard),
        Err(e) => {
            tracing::debug!(
                soft,
                hard,
                error = &e as &dyn std::error::Error,
                "could not raise the open files limit"
            );
            Some(soft)
        }
    }
}

/// The connection limit that fits `open_files` file descriptors: what is configured, but at
/// most half of what is left after a reserve for the rest of the node (and at least 16).
pub fn connection_limit(configured: usize, open_files: Option<u64>) -> usize {
    match open_files {
        None => configured,
        Some(n) => {
            let fit = (n.saturating_sub(RESERVED_FDS) / 2).max(16);
            configured.min(usize::try_from(fit).unwrap_or(usize::MAX))
        }
    }
}

/// Connection slots: in all and per client address.
#[derive(Debug)]
pub struct Slots {
    total: Arc<Semaphore>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    max_per_client: usize,
}

/// A connection's slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    client: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    /// Room for `total` connections, `per_client` from any one address.
    pub fn new(total: usize, per_client: usize) -> Arc<Slots> {
        Arc::new(Slots {
            total: Arc::new(Semaphore::new(total)),
            per_client: Mutex::new(HashMap::new()),
            max_per_client: per_client,
        })
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Single increments and decrements: a poisoned map is still consistent.
        self.per_client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a connection from `client`, if both limits allow one.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        let mut clients = self.clients();
        let held = clients.entry(client).or_insert(0);
        if *held >= self.max_per_client {
            if *held == 0 {
                clients.remove(&client);
            }
            return None;
        }
        *held += 1;
        Some(Slot {
            slots: self.clone(),
            client,
            _permit: permit,
        })
    }

    /// Connections open from `client`.
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.clients().get(&client).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut clients = self.slots.clients();
        if let Some(held) = clients.get_mut(&self.client) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

/// Answers a connection past a limit with a `503` and closes it: reads what the client sent
/// (so closing does not reset the connection before the answer is read), writes the answer,
/// and waits a moment for the client to close.
async fn refuse(mut stream: TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, stream.read(&mut sink)).await;
    if tokio::time::timeout(REFUSAL_TIMEOUT, stream.write_all(REFUSAL))
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// [`refuse`] over HTTPS: completes the handshake (without it the client reads no answer) and
/// answers every request on the connection with the same `503`, in HTTP/1.1 or HTTP/2 as ALPN
/// chose, for at most [`TLS_REFUSAL_TIMEOUT`] in all. [`MAX_REFUSALS`] bounds the handshakes a
/// flood of connections can cost.
async fn refuse_tls(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    builder: auto::Builder<TrackedExecutor>,
) {
    let _ = tokio::time::timeout(TLS_REFUSAL_TIMEOUT, async move {
        let Ok(stream) = acceptor.accept(stream).await else {
            return;
        };
        let refuse = hyper::service::service_fn(|request: axum::http::Request<_>| async move {
            let mut response = axum::response::IntoResponse::into_response(
                super::error::RegistryError::Unavailable("too many connections; try again later"),
            );
            if request.version() < axum::http::Version::HTTP_2 {
                response.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(response)
        });
        let _ = builder.serve_connection(TokioIo::new(stream), refuse).await;
    })
    .await;
}

/// Serves `router` on `listener` until `shutdown` fires; then lets requests in flight finish
/// for at most `grace` and aborts the rest. Returns once every task it started has ended.
///
/// Raises the process's open files limit to its hard limit and keeps the connection limit
/// below it.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
    grace: Duration,
    limits: HttpLimits,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let streams = TaskTracker::new();
    let mut builder = auto::Builder::new(TrackedExecutor(streams.clone()));
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let open_files = raise_open_files_limit();
    let max_connections = connection_limit(limits.max_connections, open_files);
    if max_connections < limits.max_connections {
        tracing::warn!(
            configured = limits.max_connections,
            open_files,
            max_connections,
            "the open files limit lowers the HTTP connection limit"
        );
    }
    let slots = Slots::new(max_connections, limits.max_connections_per_client);
    let shared = Arc::new(Shared {
        requests: Arc::new(Semaphore::new(limits.max_requests)),
        timeouts: Timeouts::of(&limits),
    });
    let mut connections = JoinSet::new();
    let mut refusals = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = slots.admit(peer.ip()) else {
                        tracing::debug!(%peer, "refusing an HTTP connection past the connection limits");
                        if refusals.len() < MAX_REFUSALS {
                            match &tls {
                                None => refusals.spawn(refuse(stream)),
                                Some(acceptor) => refusals.spawn(refuse_tls(
                                    stream,
                                    acceptor.clone(),
                                    builder.clone(),
                                )),
                            };
                        }
                        continue;
                    };
                    let connection = serve_connection(
                        &builder,
                        stream,
                        tls.clone(),
                        peer,
                        &router,
                        shutdown.clone(),
                        shared.clone(),
                    );
                    connections.spawn(async move {
                        connection.await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = &e as &dyn std::error::Error, "accepting an HTTP connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            Some(_) = refusals.join_next(), if !refusals.is_empty() => {}
        }
    }
    // No new connection from here on.
    drop(listener);
    refusals.shutdown().await;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "HTTP requests still running after the shutdown grace period; cutting them off"
        );
        connections.shutdown().await;
    }
    // The connections are gone, so their streams are ending; they get what remains of the
    // grace period, at least a moment.
    streams.close();
    if tokio::time::timeout(grace.max(Duration::from_millis(100)), streams.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP/2 streams still running after their connections closed");
    }
}

/// What every connection of a server shares: the request slots and the timeouts.
struct Shared {
    requests: Arc<Semaphore>,
    timeouts: Timeouts,
}

/// The timeouts a connection is held to.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    body: Duration,
    send: Duration,
    idle: Duration,
}

impl Timeouts {
    fn of(limits: &HttpLimits) -> Timeouts {
        Timeouts {
            header: limits.header_read_timeout,
            body: limits.body_read_timeout,
            send: limits.send_timeout,
            idle: limits.idle_timeout,
        }
    }
}

/// Serves one connection (after its TLS handshake, with a certificate) until the client closes
/// it, it fails, it stays idle too long, or `shutdown` fires (then it finishes the requests in
/// flight, gracefully).
fn serve_connection(
    builder: &auto::Builder<TrackedExecutor>,
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    peer: SocketAddr,
    router: &Router,
    shutdown: CancellationToken,
    shared: Arc<Shared>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let builder = builder.clone();
    let activity = Arc::new(Activity::new());
    let timeouts = shared.timeouts;
    let service = WithClient {
        router: router.clone(),
        peer: Some(peer),
        limits: Some(Limited {
            activity: activity.clone(),
            shared,
        }),
    };
    async move {
        let watch = Some((activity.clone(), timeouts));
        let result = match tls {
            None => {
                let io = TokioIo::new(Watched::new(stream, activity, timeouts.send));
                run(&builder, io, service, &shutdown, watch).await
            }
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                match handshake {
                    Ok(Ok(stream)) => {
                        let io = TokioIo::new(Watched::new(stream, activity, timeouts.send));
                        run(&builder, io, service, &shutdown, watch).await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = &e as &dyn std::error::Error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = &*e as &dyn std::error::Error, "HTTP connection ended with an error");
        }
    }
}

/// What a connection has in flight and when it last had nothing, for its idle and header
/// timeouts. Times are milliseconds since `start`.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Requests handed to the router whose responses are not yet sent.
    in_flight: AtomicUsize,
    /// When the connection last became idle (no request in flight).
    idle_since: AtomicU64,
    /// When the first byte arrived since it became idle ([`NO_BYTE`]: none yet).
    first_byte: AtomicU64,
}

/// [`Activity::first_byte`] when no byte arrived since the connection became idle.
const NO_BYTE: u64 = u64::MAX;

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(NO_BYTE),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes arrived from the client.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.first_byte.load(Ordering::Relaxed) == NO_BYTE
        {
            self.first_byte.store(self.now(), Ordering::Relaxed);
        }
    }

    /// A request reached the router; its response holds the guard until it is sent.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection is to be closed unless a request starts first, from idleness and
    /// `timeouts`; `None` while a request is in flight.
    fn deadline(&self, timeouts: Timeouts) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = Duration::from_millis;
        let idle = ms(self.idle_since.load(Ordering::Relaxed)).saturating_add(timeouts.idle);
        let deadline = match self.first_byte.load(Ordering::Relaxed) {
            NO_BYTE => idle,
            first => idle.min(ms(first).saturating_add(timeouts.header)),
        };
        Some(self.start + deadline)
    }
}

/// A request in flight on a connection; dropped when its response is sent (or abandoned).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.first_byte.store(NO_BYTE, Ordering::Relaxed);
            activity.idle_since.store(activity.now(), Ordering::Relaxed);
        }
    }
}

/// A connection's byte stream, telling its [`Activity`] when bytes arrive, and failing with
/// [`SendStalled`] once the client has taken none of what the node sends for `send_timeout`
/// (a client that asks for a blob and never reads it would otherwise hold its connection, its
/// request slot and the blob's file for good).
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    send_timeout: Duration,
    /// Started when a write could not proceed; cleared when one does.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The client read nothing of what the node sent for the send timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client read nothing for {0:?}")]
pub struct SendStalled(Duration);

impl<S> Watched<S> {
    fn new(inner: S, activity: Arc<Activity>, send_timeout: Duration) -> Watched<S> {
        Watched {
            inner,
            activity,
            send_timeout,
            stalled: None,
        }
    }

    /// `polled`, a write's outcome, unless it has been pending for the send timeout.
    fn within_send_timeout<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                SendStalled(timeout),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.within_send_timeout(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.within_send_timeout(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.within_send_timeout(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.within_send_timeout(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The request body failed: no bytes arrived for the body read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: no bytes for {0:?}")]
pub struct BodyStalled(Duration);

/// A request body that fails with [`BodyStalled`] when no frame arrives within `timeout`
/// while it is being read.
struct StallTimeout<B> {
    inner: B,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> hyper::body::Body for StallTimeout<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            // The next wait starts afresh.
            this.sleep = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyStalled(timeout).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
struct Tracked {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The limits a TCP connection's requests are held to.
#[derive(Clone)]
struct Limited {
    activity: Arc<Activity>,
    shared: Arc<Shared>,
}

/// The router, with every request told which client it came from (`None`: the admin socket),
/// and, on the TCP listener, held to the server's limits.
#[derive(Clone)]
struct WithClient {
    router: Router,
    peer: Option<SocketAddr>,
    limits: Option<Limited>,
}

impl hyper::service::Service<axum::http::Request<hyper::body::Incoming>> for WithClient {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, mut request: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(ClientAddr(peer));
        }
        let router = self.router.clone();
        let Some(limits) = self.limits.clone() else {
            return Box::pin(tower::ServiceExt::oneshot(router, request));
        };
        let in_flight = limits.activity.begin();
        Box::pin(async move {
            let requests = limits.shared.requests.clone();
            let permit = match requests.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => tokio::time::timeout(REQUEST_QUEUE_WAIT, requests.acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok),
            };
            let Some(_permit) = permit else {
                let busy = super::error::RegistryError::Unavailable(
                    "too many requests in flight; try again later",
                );
                return Ok(axum::response::IntoResponse::into_response(busy));
            };
            let timeout = limits.shared.timeouts.body;
            let request = request.map(|body| {
                axum::body::Body::new(StallTimeout {
                    inner: body,
                    timeout,
                    sleep: None,
                })
            });
            let response = tower::ServiceExt::oneshot(router, request).await?;
            Ok(response.map(|body| {
                axum::body::Body::new(Tracked {
                    inner: body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// Serves the admin socket at `path` (created mode 0600, removed when the server stops) until
/// `shutdown` fires; connections in flight get `grace`.
pub async fn serve_admin(
    path: std::path::PathBuf,
    router: Router,
    shutdown: CancellationToken,
    grace: Duration,
) {
    // A socket left by a node that crashed: nothing listens on it any more (the data directory
    // is this node's, sled's lock says so).
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "cannot open the admin socket; the CLI cannot reach this node");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "restricting the admin socket"
            );
        }
    }
    let builder = auto::Builder::new(TrackedExecutor(TaskTracker::new()));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (builder, shutdown) = (builder.clone(), shutdown.clone());
                    let service = WithClient { router: router.clone(), peer: None, limits: None };
                    connections.spawn(async move {
                        let _ = run(&builder, TokioIo::new(stream), service, &shutdown, None).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = &e as &dyn std::error::Error, "accepting an admin connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    if tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.shutdown().await;
    }
}

/// Drives one connection's HTTP, stopping gracefully when `shutdown` fires. With `watch`, the
/// connection is closed once it has been idle, or sending request headers, for too long.
async fn run<I>(
    builder: &auto::Builder<TrackedExecutor>,
    io: I,
    service: WithClient,
    shutdown: &CancellationToken,
    watch: Option<(Arc<Activity>, Timeouts)>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    loop {
        // While a request is in flight, look again after an idle timeout.
        let next_check = watch.as_ref().map(|(activity, timeouts)| {
            activity
                .deadline(*timeouts)
                .unwrap_or_else(|| Instant::now() + timeouts.idle)
        });
        tokio::select! {
            result = connection.as_mut() => return result,
            () = shutdown.cancelled() => break,
            () = sleep_until(next_check) => {
                let expired = watch.as_ref().is_some_and(|(activity, timeouts)| {
                    activity.deadline(*timeouts).is_some_and(|d| d <= Instant::now())
                });
                if expired {
                    // Nothing in flight: closing loses no request.
                    tracing::debug!("closing an idle HTTP connection");
                    return Ok(());
                }
            }
        }
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_fits_open_files() {
        assert_eq!(connection_limit(4096, None), 4096);
        assert_eq!(connection_limit(4096, Some(1024)), 384);
        assert_eq!(connection_limit(100, Some(1024)), 100);
        assert_eq!(connection_limit(4096, Some(1 << 20)), 4096);
        assert_eq!(connection_limit(4096, Some(10)), 16);
    }

    #[test]
    fn slots_bound_all_and_per_client() {
        let slots = Slots::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let a1 = slots.admit(a).expect("first");
        let a2 = slots.admit(a).expect("second");
        assert!(slots.admit(a).is_none(), "per-client limit");
        let b1 = slots.admit(b).expect("another client");
        assert!(slots.admit(b).is_none(), "total limit");
        drop(a1);
        assert_eq!(slots.held_by(a), 1);
        let _b2 = slots.admit(b).expect("a slot came back");
        drop((a2, b1));
        assert_eq!(slots.held_by(a), 0);
        assert!(slots.clients().get(&a).is_none(), "no entry left behind");
    }

    #[test]
    fn refusal_is_a_registry_error() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["errors"][0]["code"], "UNAVAILABLE");
    }

    #[test]
    fn idle_and_header_deadlines() {
        let t = Timeouts {
            header: Duration::from_secs(5),
            body: Duration::from_secs(60),
            send: Duration::from_secs(60),
            idle: Duration::from_secs(30),
        };
        let a = Arc::new(Activity::new());
        assert_eq!(a.deadline(t), Some(a.start + Duration::from_secs(30)));
        // The first byte of a request, at 2 s: its headers have 5 s more.
        a.bytes_read();
        a.first_byte.store(2000, Ordering::Relaxed);
        assert_eq!(a.deadline(t), Some(a.start + Duration::from_secs(7)));
        a.bytes_read();
        assert_eq!(a.first_byte.load(Ordering::Relaxed), 2000, "only the first");
        let r = a.begin();
        assert_eq!(a.deadline(t), None, "a request in flight");
        drop(r);
        // Idle again from now, with no byte of a next request.
        let d = a.deadline(t).expect("a deadline");
        assert!(d >= a.start + Duration::from_secs(30));
        assert_eq!(a.first_byte.load(Ordering::Relaxed), NO_BYTE);
    }
}
