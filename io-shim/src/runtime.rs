//! The event loop that drives any node with tokio: it accepts connections
//! when the node says so, moves received bytes in and sent bytes out, runs
//! disk operations on threads (see [`crate::disk`]), fires the node's timer,
//! and returns when the node exits or a signal arrives. It decides nothing
//! about the protocol: that is the node's job.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use kivaloo::contract::{ConnClosed, ConnId, ExitReason, Input, Instant, LogLevel, Node, Output};

use crate::addr::{Listener, Stream};
use crate::disk::DiskExecutor;

/// Bytes read from a socket at once.
pub const READ_CHUNK_BYTES: usize = 64 << 10;
/// Bytes queued for sending on one connection before the driver stops
/// reading from it until the peer catches up (transport flow control).
pub const SEND_QUEUE_BYTES_MAX: usize = 16 << 20;

/// How the event loop runs a node.
pub struct RunOptions {
    /// Name for log lines, e.g. "kivaloo-lbs".
    pub name: &'static str,
    /// Directory the node's disk operations refer to.
    pub data_dir: std::path::PathBuf,
    /// Reader threads for disk reads (`-n`).
    pub disk_readers: usize,
    /// Exit once the first connection has closed (`-1`).
    pub exit_after_one_connection: bool,
    /// Called once, when the node first accepts connections.
    pub on_ready: Option<Box<dyn FnOnce()>>,
}

/// Writes a log line to stderr.
pub fn log(name: &str, level: LogLevel, message: &str) {
    let tag = match level {
        LogLevel::Info => "info",
        LogLevel::Warn => "warning",
        LogLevel::Error => "error",
    };
    eprintln!("{name}: {tag}: {message}");
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    read_enabled: bool,
    queued_bytes: usize,
}

enum WriterMsg {
    Data(Bytes),
    Close,
}

struct ConnHandle {
    peer: String,
    writer: mpsc::UnboundedSender<WriterMsg>,
    flow: Arc<watch::Sender<Flow>>,
    reader: tokio::task::JoinHandle<()>,
}

enum ConnEvent {
    Received(ConnId, Bytes),
    Closed(ConnId, ConnClosed),
}

/// Runs `node` until it exits (its reason is returned) or SIGINT/SIGTERM
/// arrives (an orderly stop).
pub async fn run_node<N: Node>(mut node: N, listener: Listener, mut opts: RunOptions) -> ExitReason {
    let name = opts.name;
    let clock_origin = std::time::Instant::now();
    let now = move || Instant::from_nanos(clock_origin.elapsed().as_nanos() as u64);
    let (disk_tx, mut disk_rx) = mpsc::unbounded_channel();
    let disk = DiskExecutor::start(&opts.data_dir, opts.disk_readers, disk_tx);
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<ConnEvent>();
    let mut conns: HashMap<ConnId, ConnHandle> = HashMap::new();
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
                        let len = data.len();
                        h.flow.send_modify(|f| f.queued_bytes += len);
                        let _ = h.writer.send(WriterMsg::Data(data));
                    }
                }
                Output::Close { conn, reason } => {
                    if let Some(h) = conns.remove(&conn) {
                        log(name, LogLevel::Warn, &format!("dropping {conn} ({}): {reason}", h.peer));
                        h.reader.abort();
                        let _ = h.writer.send(WriterMsg::Close);
                    }
                }
                Output::ReadInterest { conn, enabled } => {
                    if let Some(h) = conns.get(&conn) {
                        h.flow.send_modify(|f| f.read_enabled = enabled);
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
                Output::Disk { id, op } => disk.submit(id, op),
                Output::Log { level, message } => log(name, level, &message),
                Output::Exit(reason) => return reason,
            }
        }
        if opts.exit_after_one_connection && served_a_connection && conns.is_empty() {
            return ExitReason { failure: false, message: "exiting after one connection (-1)".into() };
        }
        let wake_at = node
            .poll_timeout()
            .map(|t| tokio::time::Instant::from_std(clock_origin + std::time::Duration::from_nanos(t.nanos)));
        let accept_now = accepting && !(opts.exit_after_one_connection && served_a_connection);
        tokio::select! {
            Some((id, result)) = disk_rx.recv() => node.handle_input(now(), Input::Disk { id, result }),
            Some(event) = event_rx.recv() => match event {
                ConnEvent::Received(conn, data) => {
                    if conns.contains_key(&conn) {
                        node.handle_input(now(), Input::Received { conn, data });
                    }
                }
                ConnEvent::Closed(conn, reason) => {
                    if conns.remove(&conn).is_some() {
                        node.handle_input(now(), Input::Closed { conn, reason });
                    }
                }
            },
            accepted = listener.accept(), if accept_now => match accepted {
                Ok((stream, peer)) => {
                    let conn = ConnId(next_conn_id);
                    next_conn_id += 1;
                    served_a_connection = true;
                    conns.insert(conn, spawn_connection(conn, stream, peer, event_tx.clone()));
                    node.handle_input(now(), Input::Accepted { conn });
                }
                Err(e) => log(name, LogLevel::Warn, &format!("accept failed: {e}")),
            },
            _ = tokio::time::sleep_until(wake_at.unwrap_or_else(tokio::time::Instant::now)), if wake_at.is_some() => {
                node.handle_input(now(), Input::Timeout);
            }
            _ = sigterm.recv() => return ExitReason { failure: false, message: "stopping on SIGTERM".into() },
            _ = sigint.recv() => return ExitReason { failure: false, message: "stopping on SIGINT".into() },
        }
    }
}

fn spawn_connection(
    conn: ConnId,
    stream: Box<dyn Stream>,
    peer: String,
    events: mpsc::UnboundedSender<ConnEvent>,
) -> ConnHandle {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let flow = Arc::new(watch::channel(Flow { read_enabled: true, queued_bytes: 0 }).0);
    let mut flow_rx = flow.subscribe();
    let reader_events = events.clone();
    let reader = tokio::spawn(async move {
        loop {
            if flow_rx.wait_for(|f| f.read_enabled && f.queued_bytes <= SEND_QUEUE_BYTES_MAX).await.is_err() {
                return;
            }
            let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = reader_events.send(ConnEvent::Closed(conn, ConnClosed::PeerClosed));
                    return;
                }
                Ok(_) => {
                    if reader_events.send(ConnEvent::Received(conn, buf.freeze())).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = reader_events.send(ConnEvent::Closed(conn, ConnClosed::Failed(e.to_string())));
                    return;
                }
            }
        }
    });
    let (writer_tx, mut writer_rx) = mpsc::unbounded_channel::<WriterMsg>();
    let writer_flow = flow.clone();
    tokio::spawn(async move {
        while let Some(msg) = writer_rx.recv().await {
            match msg {
                WriterMsg::Data(data) => {
                    if let Err(e) = wr.write_all(&data).await {
                        let _ = events.send(ConnEvent::Closed(conn, ConnClosed::Failed(e.to_string())));
                        return;
                    }
                    writer_flow.send_modify(|f| f.queued_bytes -= data.len());
                }
                WriterMsg::Close => {
                    let _ = wr.shutdown().await;
                    return;
                }
            }
        }
    });
    ConnHandle { peer, writer: writer_tx, flow, reader }
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
