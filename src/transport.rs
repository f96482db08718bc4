//! Connection limits of the gRPC port, below HTTP/2.
//!
//! hyper bounds what happens inside a connection (streams, header sizes, resets); nothing bounds
//! the connections themselves. [`LimitedIncoming`] accepts at most `server.max_connections` at
//! once (one more is answered with an HTTP/2 GOAWAY `ENHANCE_YOUR_CALM` and closed, which gRPC
//! clients report as `RESOURCE_EXHAUSTED` at once, so they can back off or try another replica
//! instead of waiting in the backlog), and gives each new connection
//! `server.handshake_timeout` to send the HTTP/2 connection preface, so sockets that connect and
//! then say nothing, or trickle a byte at a time, cannot hold the slots.
//!
//! With `server.tls` configured, the TLS handshake runs here too, on a task of its own per
//! connection (a slow client cannot hold up the accept loop): a connection holds its slot from
//! the moment it is accepted, and `server.handshake_timeout` covers the TLS handshake and the
//! HTTP/2 preface together. A connection over the limit gets its GOAWAY over TLS.
//!
//! Connections also have a maximum age (`server.max_connection_age`): tonic sends GOAWAY at that
//! age, so the client opens a new connection (through its balancer, perhaps to another replica)
//! for new calls, and an idle connection gives its slot back. Calls still open then get
//! `server.max_connection_age_grace`: [`ConnectionDeadlines`] tells the drain layer
//! ([`crate::drain`]) when to end them with `UNAVAILABLE`, and a connection still open a moment
//! after that is closed here.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::either::Either;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::TlsAcceptors;

/// Length of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`), the
/// first thing every gRPC client sends.
const PREFACE_LEN: usize = 24;
/// Refused connections being answered at once; beyond this they are just closed.
const REFUSALS_IN_FLIGHT: usize = 64;
/// How long a refused connection is given to read the GOAWAY.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// How long after its calls were ended for its age a connection may take to send their final
/// statuses and close by itself before it is cut.
const AGED_CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// Connection counts for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at once because `server.max_connections` were open.
    pub refused: Counter,
    /// Connections closed because they did not send the preface (or finish the TLS handshake)
    /// in time.
    pub handshake_timeouts: Counter,
    /// Connections closed because their TLS handshake failed.
    pub tls_handshake_failures: Counter,
    /// Connections cut because they were still open after their maximum age, its grace and a
    /// flush (a client that ignores GOAWAY and the end of its calls).
    pub aged_out_forced: Counter,
}

/// When the calls of each open connection must end because the connection outlived
/// `server.max_connection_age` and its grace, by the client's address (which names one
/// connection of the listener while it is open).
#[derive(Clone, Debug, Default)]
pub struct ConnectionDeadlines {
    by_peer: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
}

impl ConnectionDeadlines {
    /// The deadline of the open connection from `peer`, if it has one.
    pub fn of_peer(&self, peer: SocketAddr) -> Option<Instant> {
        self.lock().get(&peer).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        // The map holds plain values: one left by a panicking holder is still consistent.
        self.by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The maximum connection age and where the connections' deadlines are published.
#[derive(Clone, Debug)]
struct MaxAge {
    age: Duration,
    grace: Duration,
    deadlines: ConnectionDeadlines,
}

/// Accepted connections of the gRPC port, within the connection limits (see the module docs).
pub struct LimitedIncoming {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    handshake_timeout: Duration,
    metrics: ConnectionMetrics,
    tls: Option<TlsAcceptors>,
    /// TLS handshakes under way; each yields its connection or nothing.
    handshakes: JoinSet<Option<LimitedConnection>>,
    max_age: Option<MaxAge>,
}

impl LimitedIncoming {
    pub fn new(
        listener: TcpListener,
        max_connections: usize,
        handshake_timeout: Duration,
        metrics: ConnectionMetrics,
    ) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max_connections)),
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT)),
            handshake_timeout,
            metrics,
            tls: None,
            handshakes: JoinSet::new(),
            max_age: None,
        }
    }

    /// Gives every connection `age + grace` before its calls are ended (published in
    /// `deadlines`) and closes it soon after. The GOAWAY at `age` itself is tonic's
    /// (`Server::max_connection_age`), which must be set to the same `age`.
    #[must_use]
    pub fn with_max_age(
        mut self,
        age: Duration,
        grace: Duration,
        deadlines: ConnectionDeadlines,
    ) -> Self {
        self.max_age = Some(MaxAge {
            age,
            grace,
            deadlines,
        });
        self
    }

    /// Serves TLS on every connection, with the configuration current when it is accepted.
    pub fn with_tls(mut self, tls: Option<TlsAcceptors>) -> Self {
        self.tls = tls;
        self
    }
}

impl Stream for LimitedIncoming {
    type Item = io::Result<LimitedConnection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Poll::Ready(Some(handshake)) = this.handshakes.poll_join_next(cx) {
                match handshake {
                    Ok(Some(connection)) => return Poll::Ready(Some(Ok(connection))),
                    // Counted by the handshake; its slot is free again.
                    Ok(None) => continue,
                    // One client's handshake must not take the port down with it.
                    Err(join_error) => {
                        if join_error.is_panic() {
                            tracing::error!("a TLS handshake panicked; closing its connection");
                        }
                        continue;
                    }
                }
            }
            let (stream, peer) = match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                // tonic logs accept errors and goes on accepting, as with its own TcpIncoming.
                Poll::Ready(Err(error)) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Ok(accepted)) => accepted,
            };
            let Ok(slot) = this.slots.clone().try_acquire_owned() else {
                this.metrics.refused.inc();
                tracing::warn!("server.max_connections reached; refusing a new connection");
                if let Ok(permit) = this.refusals.clone().try_acquire_owned() {
                    let tls = this.tls.as_ref().map(TlsAcceptors::current);
                    tokio::spawn(refuse(stream, tls, permit));
                }
                continue;
            };
            // Small messages (health checks, sends) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            // The age counts from the accept, TLS handshake included.
            let aged = this.max_age.as_ref().map(|max_age| {
                let calls_end = Instant::now() + max_age.age + max_age.grace;
                max_age.deadlines.lock().insert(peer, calls_end);
                AgedOut {
                    close: Box::pin(tokio::time::sleep_until(calls_end + AGED_CLOSE_FLUSH)),
                    deadlines: max_age.deadlines.clone(),
                    peer,
                    cut: false,
                }
            });
            let accepted = Accepted {
                connect_info: stream.connect_info(),
                slot,
                handshake_deadline: Instant::now() + this.handshake_timeout,
                metrics: this.metrics.clone(),
                aged,
            };
            match &this.tls {
                None => {
                    return Poll::Ready(Some(Ok(accepted.into_connection(Either::Left(stream)))));
                }
                Some(tls) => {
                    this.handshakes
                        .spawn(accepted.tls_handshake(tls.current(), stream));
                }
            }
        }
    }
}

/// A connection holding its slot, before its TLS handshake.
struct Accepted {
    connect_info: TcpConnectInfo,
    slot: OwnedSemaphorePermit,
    /// When the TLS handshake and the HTTP/2 preface must be done by.
    handshake_deadline: Instant,
    metrics: ConnectionMetrics,
    aged: Option<AgedOut>,
}

impl Accepted {
    async fn tls_handshake(
        self,
        acceptor: TlsAcceptor,
        stream: TcpStream,
    ) -> Option<LimitedConnection> {
        match tokio::time::timeout_at(self.handshake_deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Some(self.into_connection(Either::Right(Box::new(tls)))),
            Ok(Err(error)) => {
                self.metrics.tls_handshake_failures.inc();
                // Plaintext clients and port scanners land here: not worth a warning each.
                tracing::debug!(%error, peer = ?self.connect_info.remote_addr(), "TLS handshake failed");
                None
            }
            Err(_elapsed) => {
                self.metrics.handshake_timeouts.inc();
                None
            }
        }
    }

    fn into_connection(self, stream: ServedStream) -> LimitedConnection {
        self.metrics.open.inc();
        LimitedConnection {
            stream,
            connect_info: self.connect_info,
            _slot: self.slot,
            preface_left: PREFACE_LEN,
            handshake_deadline: Some(Box::pin(tokio::time::sleep_until(self.handshake_deadline))),
            metrics: self.metrics,
            aged: self.aged,
        }
    }
}

/// A connection's byte stream: plain TCP, or TLS over it once the handshake is done.
type ServedStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Answers a connection over the limit with the server preface and a GOAWAY
/// (`ENHANCE_YOUR_CALM`, no stream processed), then closes it. Its bytes are read and dropped
/// meanwhile: closing a socket with unread input resets it, and the reset could destroy the
/// GOAWAY before the client reads it.
async fn refuse(stream: TcpStream, tls: Option<TlsAcceptor>, _permit: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        match tls {
            None => send_goaway(stream).await,
            Some(acceptor) => send_goaway(acceptor.accept(stream).await?).await,
        }
    })
    .await;
}

async fn send_goaway(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DEBUG: &[u8] = b"server.max_connections reached";
    let mut frames = Vec::with_capacity(9 + 9 + 8 + DEBUG.len());
    // SETTINGS, empty: the server connection preface.
    frames.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    // GOAWAY: last stream 0, error ENHANCE_YOUR_CALM (0xb), a reason for the client's logs.
    let length = u32::try_from(8 + DEBUG.len()).expect("a short frame");
    frames.extend_from_slice(&length.to_be_bytes()[1..]);
    frames.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0xb]);
    frames.extend_from_slice(DEBUG);
    stream.write_all(&frames).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 1024];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

/// One accepted connection; its slot is released when hyper drops it.
pub struct LimitedConnection {
    stream: ServedStream,
    connect_info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
    /// Preface bytes still to arrive before the handshake deadline is lifted.
    preface_left: usize,
    handshake_deadline: Option<Pin<Box<Sleep>>>,
    metrics: ConnectionMetrics,
    /// Set with a maximum connection age: when the connection is cut at the latest.
    aged: Option<AgedOut>,
}

/// The end of a connection past its maximum age and grace; its published deadline goes with it
/// (also when its TLS handshake fails).
struct AgedOut {
    close: Pin<Box<Sleep>>,
    deadlines: ConnectionDeadlines,
    peer: SocketAddr,
    /// Whether the connection has been cut (and counted).
    cut: bool,
}

impl Drop for AgedOut {
    fn drop(&mut self) {
        self.deadlines.lock().remove(&self.peer);
    }
}

impl Drop for LimitedConnection {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.connect_info.clone()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper always has a read pending, so this is where an aged connection is cut (its
        // calls were ended at the grace deadline; one that still has not closed is stuck).
        if let Some(aged) = &mut this.aged
            && aged.close.as_mut().poll(cx).is_ready()
        {
            if !aged.cut {
                aged.cut = true;
                this.metrics.aged_out_forced.inc();
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection outlived server.max_connection_age and its grace",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = &mut this.handshake_deadline {
            if let Poll::Ready(Ok(())) = polled {
                let read = buf.filled().len() - before;
                this.preface_left = this.preface_left.saturating_sub(read);
                if this.preface_left == 0 || read == 0 {
                    this.handshake_deadline = None;
                }
                return polled;
            }
            if polled.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                this.handshake_deadline = None;
                this.metrics.handshake_timeouts.inc();
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not send the HTTP/2 preface within server.handshake_timeout",
                )));
            }
        }
        polled
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
