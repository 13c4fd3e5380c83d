//! The event loop that drives any node with tokio: it accepts connections
//! when the node says so, moves received bytes in and sent bytes out (on
//! accepted connections and on the node's upstream, if it has one), runs
//! disk operations on threads (see [`crate::disk`]) for a node that has a
//! directory, fires the node's timer, and returns when the node exits or a
//! signal arrives. It decides nothing about the protocol: that is the
//! node's job.

use std::collections::HashMap;
use std::path::Path;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use kivaloo::contract::{
    ConnClosed, ConnId, DiskError, DiskErrorKind, ExitReason, Input, Instant, LogLevel, Node, Output,
};

use crate::addr::{Listener, Stream};
use crate::conn::{ConnEvent, ConnHandle};
use crate::disk::DiskExecutor;

/// How long to wait before accepting again after accept failed.
pub const ACCEPT_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// A connection to the node's upstream (kvlds to its lbs), opened by the
/// daemon before the node is built. The event loop registers it as
/// [`ConnId::UPSTREAM`] before the node's first input.
pub struct Upstream {
    /// The connected stream.
    pub stream: Box<dyn Stream>,
    /// Who is at the other end, for logs, e.g. "lbs at /tmp/lbs.sock".
    pub peer: String,
}

/// How the event loop runs a node.
pub struct RunOptions {
    /// Name for log lines, e.g. "kivaloo-lbs".
    pub name: &'static str,
    /// Directory the node's disk operations refer to; `None` for a node
    /// that has no storage of its own (kvlds, mux). Such a node asking for
    /// a disk operation gets it back failed.
    pub data_dir: Option<std::path::PathBuf>,
    /// Reader threads for disk reads (`-n`); unused without `data_dir`.
    pub disk_readers: usize,
    /// The node's upstream connection, already open.
    pub upstream: Option<Upstream>,
    /// Exit once the first connection has closed (`-1`).
    pub exit_after_one_connection: bool,
    /// Called once, when the node first accepts connections.
    pub on_ready: Option<Box<dyn FnOnce()>>,
    /// The largest buffer one read from a connection may use (see
    /// [`crate::conn::next_read_chunk_bytes`]); [`crate::conn::READ_CHUNK_BYTES`] for
    /// reads of that size always.
    pub read_chunk_bytes_max: usize,
}

/// Writes a log line to stderr (one write of the whole line). A line that
/// cannot be written (stderr closed, or a pipe whose reader has gone:
/// EPIPE) is dropped: logging never panics or stops a daemon.
pub fn log(name: &str, level: LogLevel, message: &str) {
    use std::io::Write as _;
    let tag = match level {
        LogLevel::Info => "info",
        LogLevel::Warn => "warning",
        LogLevel::Error => "error",
    };
    let line = format!("{name}: {tag}: {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// How logs name a connection: the upstream by name, others by number.
fn conn_label(conn: ConnId) -> String {
    if conn == ConnId::UPSTREAM {
        "the upstream connection".to_string()
    } else {
        conn.to_string()
    }
}

/// Runs `node` until it exits (its reason is returned) or SIGINT/SIGTERM
/// arrives (an orderly stop). The upstream in `opts`, if any, is open from
/// the node's first input; if it ends, the node gets [`Input::Closed`] for
/// [`ConnId::UPSTREAM`] and is expected to exit. The upstream never counts
/// as a client connection (for `-1`).
pub async fn run_node<N: Node>(mut node: N, listeners: Vec<Listener>, mut opts: RunOptions) -> ExitReason {
    let name = opts.name;
    let clock_origin = std::time::Instant::now();
    let now = move || Instant::from_nanos(clock_origin.elapsed().as_nanos() as u64);
    let (disk_tx, mut disk_rx) = mpsc::unbounded_channel();
    let disk =
        opts.data_dir.as_deref().map(|dir| DiskExecutor::start(dir, opts.disk_readers, disk_tx.clone()));
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<ConnEvent>();
    let mut conns: HashMap<ConnId, ConnHandle> = HashMap::new();
    if let Some(up) = opts.upstream.take() {
        conns.insert(
            ConnId::UPSTREAM,
            ConnHandle::spawn(
                ConnId::UPSTREAM,
                up.stream,
                up.peer,
                event_tx.clone(),
                opts.read_chunk_bytes_max,
            ),
        );
    }
    let mut next_conn_id = 0u64;
    let mut accepting = false;
    let mut served_a_connection = false;
    let (Ok(mut sigterm), Ok(mut sigint)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return ExitReason { failure: true, message: "cannot install signal handlers".into() };
    };

    loop {
        while let Some(output) = node.poll_output() {
            match output {
                Output::Send { conn, data } => {
                    if let Some(h) = conns.get(&conn) {
                        h.send(data);
                    }
                }
                Output::Close { conn, reason } => {
                    if let Some(h) = conns.remove(&conn) {
                        let label = conn_label(conn);
                        log(name, LogLevel::Warn, &format!("dropping {label} ({}): {reason}", h.peer));
                        h.close();
                    }
                }
                Output::ReadInterest { conn, enabled } => {
                    if let Some(h) = conns.get(&conn) {
                        h.set_read_enabled(enabled);
                    }
                }
                Output::Accepting(on) => {
                    accepting = on;
                    if on {
                        if let Some(ready) = opts.on_ready.take() {
                            ready();
                        }
                    }
                }
                Output::Disk { id, op } => match &disk {
                    Some(disk) => disk.submit(id, op),
                    None => {
                        // A programmer error in the node; answer it as a
                        // failed operation (on the channel, not re-entering
                        // the node here) so that the node decides.
                        let message = format!("{} asked of a node that has no data directory", op.verb());
                        log(name, LogLevel::Error, &message);
                        let error = DiskError { kind: DiskErrorKind::Io, message };
                        let _ = disk_tx.send((id, Err(error)));
                    }
                },
                Output::Log { level, message } => log(name, level, &message),
                Output::Exit(reason) => return reason,
            }
        }
        let client_conns = conns.len() - usize::from(conns.contains_key(&ConnId::UPSTREAM));
        if opts.exit_after_one_connection && served_a_connection && client_conns == 0 {
            return ExitReason { failure: false, message: "exiting after one connection (-1)".into() };
        }
        let wake_at = node
            .poll_timeout()
            .map(|t| tokio::time::Instant::from_std(clock_origin + std::time::Duration::from_nanos(t.nanos)));
        let accept_now =
            accepting && !listeners.is_empty() && !(opts.exit_after_one_connection && served_a_connection);
        // One accept on every listener; the first to complete wins (the
        // others are cancelled, which tokio's accept allows).
        let accept_any = async {
            let accepts = listeners.iter().map(|l| Box::pin(l.accept()));
            futures::future::select_all(accepts).await.0
        };
        tokio::select! {
            Some((id, result)) = disk_rx.recv() => {
                node.handle_input(now(), Input::Disk { id, result });
                // Take every completion already there before acting on the
                // outputs, so that their responses leave in one write.
                while let Ok((id, result)) = disk_rx.try_recv() {
                    node.handle_input(now(), Input::Disk { id, result });
                }
            }
            Some(event) = event_rx.recv() => match event {
                ConnEvent::Received(conn, data) => {
                    if let Some(h) = conns.get(&conn) {
                        h.chunk_delivered();
                        node.handle_input(now(), Input::Received { conn, data });
                    }
                }
                ConnEvent::Sent(conn, len_bytes) => {
                    if conns.contains_key(&conn) {
                        node.handle_input(now(), Input::Sent { conn, len_bytes });
                    }
                }
                ConnEvent::Closed(conn, reason) => {
                    if let Some(h) = conns.remove(&conn) {
                        if conn == ConnId::UPSTREAM {
                            let why = match &reason {
                                ConnClosed::PeerClosed => "closed by the peer".to_string(),
                                ConnClosed::Failed(e) => format!("failed: {e}"),
                            };
                            log(name, LogLevel::Warn, &format!("the upstream connection ({}) {why}", h.peer));
                        }
                        node.handle_input(now(), Input::Closed { conn, reason });
                    }
                }
            },
            accepted = accept_any, if accept_now => match accepted {
                Ok((stream, peer)) => {
                    let conn = ConnId(next_conn_id);
                    next_conn_id += 1;
                    served_a_connection = true;
                    conns.insert(conn, ConnHandle::spawn(conn, stream, peer, event_tx.clone(), opts.read_chunk_bytes_max));
                    node.handle_input(now(), Input::Accepted { conn });
                }
                Err(e) => {
                    // E.g. out of file descriptors: say so, and do not spin.
                    log(name, LogLevel::Warn, &format!("accept failed: {e}; retrying in {ACCEPT_RETRY_DELAY:?}"));
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
            _ = tokio::time::sleep_until(wake_at.unwrap_or_else(tokio::time::Instant::now)), if wake_at.is_some() => {
                node.handle_input(now(), Input::Timeout);
            }
            _ = sigterm.recv() => return ExitReason { failure: false, message: "stopping on SIGTERM".into() },
            _ = sigint.recv() => return ExitReason { failure: false, message: "stopping on SIGINT".into() },
        }
    }
}

/// Builds the single-threaded tokio runtime every daemon runs on.
///
/// # Errors
/// If the runtime cannot be created.
pub fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Checks that `dir` is a directory the daemon can use.
///
/// # Errors
/// A message for the operator.
pub fn check_data_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(e) => Err(format!("cannot use {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    //! The event loop with an upstream and without a data directory, driven
    //! by a small echo node over real unix sockets.

    use super::*;
    use crate::addr::SocketAddr;
    use bytes::Bytes;
    use kivaloo::contract::{DiskOp, DiskOpId};
    use std::collections::VecDeque;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Says "hello" upstream at its first poll, then accepts clients;
    /// forwards client bytes upstream and upstream bytes to its client;
    /// on a client's "disk" asks for a disk operation and reports the
    /// result upstream; exits when the upstream closes.
    #[derive(Default)]
    struct Relay {
        started: bool,
        client: Option<ConnId>,
        out: VecDeque<Output>,
        inputs: Vec<Input>,
    }

    impl Node for Relay {
        fn handle_input(&mut self, _now: Instant, input: Input) {
            self.inputs.push(input.clone());
            match input {
                Input::Accepted { conn } => self.client = Some(conn),
                Input::Received { conn: ConnId::UPSTREAM, data } => {
                    if let Some(c) = self.client {
                        self.out.push_back(Output::Send { conn: c, data });
                    }
                }
                Input::Received { data, .. } if &data[..] == b"disk" => self.out.push_back(Output::Disk {
                    id: DiskOpId(7),
                    op: DiskOp::Open { name: "x".into(), create: true },
                }),
                Input::Received { data, .. } => {
                    self.out.push_back(Output::Send { conn: ConnId::UPSTREAM, data });
                }
                Input::Disk { id, result } => {
                    let report = format!("disk {} {}", id.0, if result.is_err() { "failed" } else { "done" });
                    self.out.push_back(Output::Send { conn: ConnId::UPSTREAM, data: Bytes::from(report) });
                }
                Input::Closed { conn: ConnId::UPSTREAM, .. } => {
                    self.out.push_back(Output::Exit(ExitReason {
                        failure: true,
                        message: "the upstream went away".into(),
                    }))
                }
                Input::Closed { .. } => self.client = None,
                Input::Sent { .. } | Input::Timeout => {}
            }
        }

        fn poll_output(&mut self) -> Option<Output> {
            if !self.started {
                self.started = true;
                self.out
                    .push_back(Output::Send { conn: ConnId::UPSTREAM, data: Bytes::from_static(b"hello") });
                self.out.push_back(Output::Accepting(true));
            }
            self.out.pop_front()
        }

        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
    }

    async fn read_exactly(s: &mut tokio::net::UnixStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .expect("bytes in time")
            .expect("read");
        buf
    }

    async fn setup(
        exit_after_one_connection: bool,
    ) -> (tempfile::TempDir, std::path::PathBuf, Listener, tokio::net::UnixStream, RunOptions) {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("node.sock");
        let listener = Listener::bind(&SocketAddr::Unix(sock.clone())).await.unwrap();
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let opts = RunOptions {
            name: "test",
            data_dir: None,
            disk_readers: 1,
            upstream: Some(Upstream { stream: Box::new(ours), peer: "test upstream".into() }),
            exit_after_one_connection,
            read_chunk_bytes_max: crate::conn::READ_CHUNK_BYTES,
            on_ready: None,
        };
        (tmp, sock, listener, theirs, opts)
    }

    #[tokio::test]
    async fn the_upstream_is_open_before_the_first_input_and_its_end_reaches_the_node() {
        let (_tmp, sock, listener, mut upstream, opts) = setup(false).await;
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let node = tokio::task::spawn_local(run_node(Relay::default(), vec![listener], opts));
                assert_eq!(read_exactly(&mut upstream, 5).await, b"hello");
                let mut client = tokio::net::UnixStream::connect(&sock).await.unwrap();
                client.write_all(b"ping").await.unwrap();
                assert_eq!(read_exactly(&mut upstream, 4).await, b"ping");
                upstream.write_all(b"pong").await.unwrap();
                assert_eq!(read_exactly(&mut client, 4).await, b"pong");
                // No data directory: a disk operation comes back failed.
                client.write_all(b"disk").await.unwrap();
                assert_eq!(read_exactly(&mut upstream, 13).await, b"disk 7 failed");
                drop(upstream);
                let exit = tokio::time::timeout(std::time::Duration::from_secs(10), node)
                    .await
                    .expect("the node exits when its upstream closes")
                    .unwrap();
                assert_eq!(exit, ExitReason { failure: true, message: "the upstream went away".into() });
            })
            .await;
    }

    #[tokio::test]
    async fn dash_1_counts_clients_not_the_upstream() {
        let (_tmp, sock, listener, mut upstream, opts) = setup(true).await;
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let node = tokio::task::spawn_local(run_node(Relay::default(), vec![listener], opts));
                assert_eq!(read_exactly(&mut upstream, 5).await, b"hello");
                let mut client = tokio::net::UnixStream::connect(&sock).await.unwrap();
                client.write_all(b"x").await.unwrap();
                assert_eq!(read_exactly(&mut upstream, 1).await, b"x");
                drop(client);
                let exit = tokio::time::timeout(std::time::Duration::from_secs(10), node)
                    .await
                    .expect("-1 exits after the client, with the upstream still open")
                    .unwrap();
                assert!(!exit.failure && exit.message.contains("-1"), "{exit:?}");
            })
            .await;
    }
}
