//! `kivaloo serve`: lbs, kvlds and mux in one process, joined by in-memory
//! byte streams instead of sockets, each node driven by the same event loop
//! (`runtime::run_node`) as the separate daemons. Clients reach the mux on
//! the listed sockets. SIGINT (Ctrl-C) or SIGTERM stops all three; what was
//! acknowledged is durable whatever the order in which they stop.

use std::path::PathBuf;

use kivaloo::contract::ExitReason;
use kivaloo::LogLevel;
use kivaloo_nodes::kvlds::{KvldsConfig, KvldsNode};
use kivaloo_nodes::lbs::{LbsConfig, LbsNode};
use kivaloo_nodes::mux::{MuxConfig, MuxNode};

use crate::addr::{Listener, SocketAddr, Stream};
use crate::dir_lock::DirLock;
use crate::runtime::{log, run_node, RunOptions, Upstream};

/// Bytes each direction of an in-memory connection buffers before the
/// writer waits for the reader (as a socket's buffer would).
pub const PIPE_BUFFER_BYTES: usize = 1 << 20;

/// What `kivaloo serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The store's directory (created if missing).
    pub data_dir: PathBuf,
    /// Where clients connect (the mux's sockets).
    pub listen: Vec<SocketAddr>,
    /// lbs block size, for a new store (an existing one keeps its own).
    pub block_size: u32,
    /// kvlds's page cache, in bytes.
    pub cache_bytes: Option<u64>,
    /// kvlds `-S`: storage cost over I/O cost, pacing background cleaning.
    pub storage_io_cost_ratio: f64,
    /// mux `-n`.
    pub connections_max: usize,
    /// lbs disk reader threads.
    pub disk_readers: usize,
    /// Called once every node is ready and the mux listens.
    pub on_ready: Option<fn(&ServeOptions)>,
}

/// A connected pair of in-memory byte streams.
fn pipe() -> (Box<dyn Stream>, Box<dyn Stream>) {
    let (a, b) = tokio::io::duplex(PIPE_BUFFER_BYTES);
    (Box::new(a), Box::new(b))
}

/// Runs the three nodes until one stops for good or a signal arrives.
/// Returns an orderly stop if a signal stopped any node (the others then
/// see their upstream or downstream close), else the first failure.
///
/// # Errors
/// The directory cannot be created, locked or used, or a socket cannot be
/// bound: a message for the operator.
pub async fn serve(opts: ServeOptions) -> Result<ExitReason, String> {
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", opts.data_dir.display()))?;
    let _lock = DirLock::acquire(&opts.data_dir)?;
    let mut listeners = Vec::new();
    for addr in &opts.listen {
        listeners.push(Listener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?);
    }

    // lbs <- kvlds: an in-process listener for lbs, with kvlds's end of the
    // pipe queued on it before either starts.
    let (lbs_listener, lbs_connector) = Listener::memory("lbs", 1);
    let (kvlds_up, lbs_side) = pipe();
    lbs_connector.send(lbs_side).await.map_err(|_| "the lbs listener closed".to_string())?;
    let (kvlds_listener, kvlds_connector) = Listener::memory("kvlds", 1);
    let (mux_up, kvlds_side) = pipe();
    kvlds_connector.send(kvlds_side).await.map_err(|_| "the kvlds listener closed".to_string())?;

    let lbs = run_node(
        LbsNode::new(LbsConfig::new(opts.block_size)),
        vec![lbs_listener],
        RunOptions {
            name: "lbs",
            data_dir: Some(opts.data_dir.clone()),
            disk_readers: opts.disk_readers,
            upstream: None,
            // Its one client is kvlds: when kvlds stops, so does lbs.
            exit_after_one_connection: true,
            // Reads from the in-memory pipe get at most what it buffers.
            read_chunk_bytes_max: PIPE_BUFFER_BYTES,
            on_ready: None,
        },
    );
    let kvlds = run_node(
        KvldsNode::new(KvldsConfig {
            cache_bytes_max: opts.cache_bytes,
            storage_io_cost_ratio: opts.storage_io_cost_ratio,
            ..KvldsConfig::default()
        }),
        vec![kvlds_listener],
        RunOptions {
            name: "kvlds",
            data_dir: None,
            disk_readers: 0,
            upstream: Some(Upstream { stream: kvlds_up, peer: "lbs (in process)".into() }),
            // Its one client is the mux: when the mux stops, so does kvlds.
            exit_after_one_connection: true,
            read_chunk_bytes_max: crate::conn::READ_CHUNK_BYTES,
            on_ready: None,
        },
    );
    let ready_opts = opts.clone();
    let mux = run_node(
        MuxNode::new(MuxConfig { connections_max: opts.connections_max }),
        listeners,
        RunOptions {
            name: "mux",
            data_dir: None,
            disk_readers: 0,
            upstream: Some(Upstream { stream: mux_up, peer: "kvlds (in process)".into() }),
            exit_after_one_connection: false,
            read_chunk_bytes_max: crate::conn::READ_CHUNK_BYTES,
            on_ready: Some(Box::new(move || {
                if let Some(ready) = ready_opts.on_ready {
                    ready(&ready_opts);
                }
            })),
        },
    );
    let (lbs_exit, kvlds_exit, mux_exit) = tokio::join!(lbs, kvlds, mux);
    // The pipes drop with the nodes that own them, so one node stopping
    // ends the others: lbs stopping closes kvlds's upstream, and kvlds the
    // mux's (each exits); the mux stopping ends kvlds's one connection,
    // and kvlds lbs's (each exits after its one connection).
    let exits = [("lbs", lbs_exit), ("kvlds", kvlds_exit), ("mux", mux_exit)];
    for (name, exit) in &exits {
        let level = if exit.failure { LogLevel::Warn } else { LogLevel::Info };
        log(name, level, &format!("stopped: {}", exit.message));
    }
    Ok(overall_exit(&exits))
}

/// What the three nodes' exits mean together: an orderly stop if a signal
/// stopped one of them (the others may then have seen a connection end
/// first); otherwise the first failure in stack order (lbs, kvlds, mux: a
/// failure below explains those above it), if any.
fn overall_exit(exits: &[(&str, ExitReason)]) -> ExitReason {
    if let Some((_, signalled)) =
        exits.iter().find(|(_, e)| !e.failure && e.message.starts_with("stopping on SIG"))
    {
        return signalled.clone();
    }
    match exits.iter().find(|(_, e)| e.failure) {
        Some((name, first)) => ExitReason { failure: true, message: format!("{name}: {}", first.message) },
        None => {
            exits.first().map_or(ExitReason { failure: false, message: "stopped".into() }, |(_, e)| e.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(failure: bool, message: &str) -> ExitReason {
        ExitReason { failure, message: message.into() }
    }

    #[test]
    fn a_signal_is_an_orderly_stop_and_otherwise_the_lowest_failure_wins() {
        let sig = overall_exit(&[
            ("lbs", exit(false, "stopping on SIGINT")),
            ("kvlds", exit(true, "the connection to lbs closed")),
            ("mux", exit(false, "stopping on SIGINT")),
        ]);
        assert!(!sig.failure);
        // kvlds found a corrupt page: lbs then stops after its one
        // connection (not a failure of its own), the mux after its upstream.
        let corrupt = overall_exit(&[
            ("lbs", exit(false, "exiting after one connection (-1)")),
            ("kvlds", exit(true, "page 7 is corrupt")),
            ("mux", exit(true, "the upstream connection closed")),
        ]);
        assert!(corrupt.failure);
        assert_eq!(corrupt.message, "kvlds: page 7 is corrupt");
    }
}
