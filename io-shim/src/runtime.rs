//! The event loop that drives any node with tokio: it accepts connections
//! when the node says so, moves received bytes in and sent bytes out, runs
//! disk operations on threads (see [`crate::disk`]), fires the node's timer,
//! and returns when the node exits or a signal arrives. It decides nothing
//! about the protocol: that is the node's job.

use std::collections::HashMap;
use std::path::Path;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use kivaloo::contract::{ConnId, ExitReason, Input, Instant, LogLevel, Node, Output};

use crate::addr::Listener;
use crate::conn::{ConnEvent, ConnHandle};
use crate::disk::DiskExecutor;

/// How long to wait before accepting again after accept failed.
pub const ACCEPT_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

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
                        h.send(data);
                    }
                }
                Output::Close { conn, reason } => {
                    if let Some(h) = conns.remove(&conn) {
                        log(name, LogLevel::Warn, &format!("dropping {conn} ({}): {reason}", h.peer));
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
                    conns.insert(conn, ConnHandle::spawn(conn, stream, peer, event_tx.clone()));
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
