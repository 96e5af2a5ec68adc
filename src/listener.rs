//! The API's HTTP listener: the accept loop, the limits every connection lives under, and the
//! graceful stop.
//!
//! Why not `axum::serve`: it gives hyper no timer, which silently turns off hyper's timeout
//! for reading a request's headers, and it accepts connections without limit. Anyone who can
//! reach the port could then hold connections open for ever (a few header bytes now and
//! then), each with up to ~400 KiB of buffered headers, until courier runs out of file
//! descriptors — and with them the sockets its deliveries need.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a connection may take to send a request's headers, counted from when it is
/// ready for one, by default (`server.header_timeout`): it bounds both a client that
/// trickles its headers and a keep-alive connection left idle (longer than the idle timeout
/// of common clients' pools, so that courier is rarely the side that closes a pooled
/// connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections served at once by default (`server.max_connections`); the next waits in the
/// kernel's accept queue until one closes. Well under the file descriptors a deployment
/// allows (the example unit: 65,536), so that deliveries and the database always have theirs.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How many connections the kernel may hold ready for the accept loop (capped by the
/// system's `net.core.somaxconn`): a crowd of producers connecting at once, or connections
/// waiting for a slot under `server.max_connections`, wait there instead of having their
/// connection attempts dropped and retried seconds later.
const BACKLOG: u32 = 4096;

/// Binds the API's listening socket.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's and tokio's own bind do: a restart can listen again at once on the port of
    // the courier before it, whose connections may linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Raises this process's soft limit on open files to its hard limit (as a server should, and
/// as Go's runtime does for its programs); the soft limit now in force, if it can be read.
pub fn raise_open_files() -> Option<u64> {
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // Refused (an unlimited hard limit is beyond the kernel's own cap): as it was.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(lim.rlim_max);
            }
        }
        Some(lim.rlim_cur)
    }
}

/// How many connections (and, counted apart, as many channel WebSockets) fit under an
/// open-file limit of `open_files` with room left for what deliveries, the database, the
/// journal and the watchers need: [`reserve`].
pub fn connections_within(open_files: u64) -> usize {
    (open_files.saturating_sub(reserve(open_files)) / 2).max(1) as usize
}

/// The open files kept from connections: a quarter of the limit, at least 256 but never more
/// than half (a limit of 256, some systems' default, still serves 64 connections).
fn reserve(open_files: u64) -> u64 {
    (open_files / 4).max(256).min(open_files / 2)
}

/// How many delivery attempts (a socket each) fit in the room [`connections_within`] leaves
/// under an open-file limit of `open_files`, beside the database, the journal and the
/// watchers: half of it.
pub fn attempts_within(open_files: u64) -> usize {
    (reserve(open_files) / 2).max(1) as usize
}

/// The most a connection's read buffer holds, which bounds a request's headers (a larger
/// head is answered `431`; what one read brings in may go somewhat past it, so the bound
/// is on memory rather than exact); bodies stream through it whatever their size.
const MAX_READ_BUFFER: usize = 64 * 1024;

/// Serves `router` on `listener` until `stop` is cancelled; then stops accepting, lets every
/// connection finish the request it is serving, and returns once they have closed. At most
/// `max_connections` are open at once. Each new connection gets the header timeout
/// `header_timeout` gives at that moment (so a reload applies to the next connections).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    max_connections: usize,
    header_timeout: impl Fn() -> Duration,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: waiting lets some close, where retrying at
                    // once would spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        // Replies go out as soon as they are written, not held back for the producer's
        // acknowledgement of the last one (Nagle's algorithm).
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        let timeout = header_timeout();
        connections.spawn(async move {
            let _permit = permit;
            // HTTP/1 only: its header timer runs from the connection's first poll, before
            // any byte comes. (Detecting HTTP/2 first would wait for bytes without a limit,
            // and HTTP/2 has no header timeout: either would let a silent client hold its
            // connection for good.) Producers, operators and browsers all speak HTTP/1.1.
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(MAX_READ_BUFFER)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_and_attempts_leave_room_under_the_open_file_limit() {
        for (limit, connections, attempts) in [
            (256, 64, 64),
            (600, 172, 128),
            (1024, 384, 128),
            (65_536, 24_576, 8_192),
        ] {
            assert_eq!(connections_within(limit), connections, "{limit}");
            assert_eq!(attempts_within(limit), attempts, "{limit}");
            assert!(2 * connections as u64 + attempts as u64 <= limit, "{limit}");
        }
    }
}
