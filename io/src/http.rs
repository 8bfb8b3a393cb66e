//! HTTP/1.1 serving on a shard: hyper 1.x driven by glommio TCP sockets.
//!
//! Every shard binds the same address with SO_REUSEPORT (glommio sets it), so the kernel spreads
//! connections across shards and a request is handled start to finish on the shard that
//! accepted it. The service runs on the shard (`!Send` is fine).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use hyper::body::Incoming;
use hyper::rt::ReadBufCursor;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};

use crate::runtime::LocalSignal;

/// Limits for one shard's HTTP server.
#[derive(Clone, Debug)]
pub struct HttpServerConfig {
    /// Connections held open at once by this shard; more are closed at accept.
    pub connections_max: usize,
    /// How long shutdown waits for in-flight requests before dropping connections.
    pub shutdown_grace_ms: u64,
    /// A connection that has not sent a whole request head this long after it started one (or
    /// after its previous response, when idle) is closed. 0 disables the limit.
    pub header_read_timeout_ms: u64,
}

/// Binds `addr` with SO_REUSEPORT for this shard.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(io::Error::from)
}

/// Accepts connections until `shutdown` is raised, then asks every open connection to finish
/// its current request and waits for them, at most `shutdown_grace_ms`.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    config: HttpServerConfig,
    shutdown: LocalSignal,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let open = Rc::new(Cell::new(0usize));
    let all_closed = crate::runtime::LocalNotify::new();
    let header_read_timeout_ms = config.header_read_timeout_ms;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shutdown.wait().await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                tracing::warn!(%error, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= config.connections_max {
            tracing::warn!(
                connections_max = config.connections_max,
                "connection refused: too many open connections"
            );
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.set(open.get() + 1);
        let service = service.clone();
        let shutdown = shutdown.clone();
        let open = open.clone();
        let all_closed = all_closed.clone();
        glommio::spawn_local(async move {
            let mut builder = http1::Builder::new();
            builder.keep_alive(true);
            if header_read_timeout_ms > 0 {
                builder
                    .timer(ShardTimer)
                    .header_read_timeout(Duration::from_millis(header_read_timeout_ms));
            }
            let connection = builder.serve_connection(GlommioIo(stream), service);
            let mut connection = std::pin::pin!(connection);
            let finished =
                futures_lite::future::or(async { Some(connection.as_mut().await) }, async {
                    shutdown.wait().await;
                    None
                })
                .await;
            let result = match finished {
                Some(result) => result,
                None => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                if !error.is_incomplete_message() {
                    tracing::debug!(%error, "http connection ended with an error");
                }
            }
            open.set(open.get() - 1);
            all_closed.notify();
        })
        .detach();
    }
    let grace = glommio::timer::sleep(Duration::from_millis(config.shutdown_grace_ms));
    let mut grace = std::pin::pin!(grace);
    while open.get() > 0 {
        let closed = all_closed.notified();
        let done = futures_lite::future::or(
            async {
                closed.await;
                false
            },
            async {
                grace.as_mut().await;
                true
            },
        )
        .await;
        if done {
            tracing::warn!(
                open = open.get(),
                "shutdown grace expired with open connections"
            );
            break;
        }
    }
}

/// Adapts a glommio TCP stream to hyper's I/O traits.
struct GlommioIo(TcpStream);

impl hyper::rt::Read for GlommioIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: we only hand `AsyncRead` an initialised slice: the uninitialised tail of
        // hyper's buffer is zeroed first, and we advance by exactly the bytes read.
        let read = unsafe {
            let unfilled = buf.as_mut();
            std::ptr::write_bytes(unfilled.as_mut_ptr(), 0, unfilled.len());
            let slice =
                std::slice::from_raw_parts_mut(unfilled.as_mut_ptr().cast::<u8>(), unfilled.len());
            match Pin::new(&mut self.0).poll_read(cx, slice) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        };
        // SAFETY: `read` bytes were just written by the socket read.
        unsafe { buf.advance(read) };
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for GlommioIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// hyper's timer for connections served on a shard. hyper asks for `Send + Sync` sleeps while
/// glommio's timers belong to their thread, so a sleep is only an id and a deadline; its
/// glommio timer lives in a thread-local table, is created when the sleep is first polled
/// (a request head that arrives whole never arms one) and is dropped, which cancels it, with
/// the sleep. hyper polls and drops a connection's sleeps on the shard that owns it.
#[derive(Clone, Copy, Debug)]
struct ShardTimer;

impl hyper::rt::Timer for ShardTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let id = NEXT_SLEEP.with(|next| {
            let id = next.get();
            next.set(id + 1);
            id
        });
        Box::pin(ShardSleep { id, deadline })
    }
}

thread_local! {
    static NEXT_SLEEP: Cell<u64> = const { Cell::new(0) };
    static SLEEP_TIMERS: std::cell::RefCell<std::collections::HashMap<u64, glommio::timer::Timer>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

struct ShardSleep {
    id: u64,
    deadline: std::time::Instant,
}

impl std::future::Future for ShardSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let remaining = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if remaining.is_zero() {
            return Poll::Ready(());
        }
        SLEEP_TIMERS.with(|timers| {
            let mut timers = timers.borrow_mut();
            let timer = timers
                .entry(self.id)
                .or_insert_with(|| glommio::timer::Timer::new(remaining));
            Pin::new(timer).poll(cx).map(|_| ())
        })
    }
}

impl hyper::rt::Sleep for ShardSleep {}

impl Drop for ShardSleep {
    fn drop(&mut self) {
        // `try_with`: nothing to cancel if the thread is already tearing down its locals.
        let _ = SLEEP_TIMERS.try_with(|timers| timers.borrow_mut().remove(&self.id));
    }
}
