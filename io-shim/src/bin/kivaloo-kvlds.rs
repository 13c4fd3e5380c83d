//! `kivaloo-kvlds`: the key-value store daemon, with kivaloo's flags. It
//! connects to its lbs (`-l`) first, hands that connection to the node as
//! its upstream, and returns to the shell once the node has recovered the
//! tree and listens (`-s`).

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;

use clap::Parser;
use kivaloo::LogLevel;
use kivaloo_io_shim::addr::{connect_upstream, Listener, SocketAddr};

use kivaloo_io_shim::daemon::{daemonize, signal_ready, write_pidfile};
use kivaloo_io_shim::humansize::{parse_cost_ratio, parse_size_bytes};
use kivaloo_io_shim::runtime::{build_runtime, log, run_node, RunOptions, Upstream};
use kivaloo_nodes::kvlds::{KvldsConfig, KvldsNode};

/// jemalloc rather than the system's malloc: see the workspace manifest.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const NAME: &str = "kivaloo-kvlds";

/// The longest `-w` accepted, in seconds: far beyond any sensible commit
/// delay, and it keeps the delay in nanoseconds well inside a u64.
const COMMIT_DELAY_S_MAX: f64 = 3600.0;

/// The key-value store of kivaloo: a B+tree stored in an lbs.
#[derive(Parser, Debug)]
#[command(name = NAME, version)]
struct Flags {
    /// Socket to listen on: a unix socket path, host:port or [ip]:port.
    #[arg(short = 's', value_name = "socket")]
    socket: String,
    /// The lbs to store the tree in: a unix socket path, host:port or
    /// [ip]:port.
    #[arg(short = 'l', value_name = "lbs socket")]
    lbs_socket: String,
    /// Page cache size in pages.
    #[arg(short = 'C', value_name = "npages", conflicts_with = "cache_bytes")]
    cache_pages: Option<u64>,
    /// Page cache size in bytes (e.g. 1000000, 64MB, 2G; powers of 1000).
    #[arg(short = 'c', value_name = "pagemem", value_parser = parse_size_bytes)]
    cache_bytes: Option<u64>,
    /// Longest key accepted (default by block size: 64, 128 or 255).
    #[arg(short = 'k', value_name = "max key", value_parser = clap::value_parser!(u32).range(0..=255))]
    key_len_max: Option<u32>,
    /// Longest value accepted (default by block size: 96, 192 or 255).
    #[arg(short = 'v', value_name = "max value", value_parser = clap::value_parser!(u32).range(0..=255))]
    value_len_max: Option<u32>,
    /// Pidfile (default: <socket>.pid).
    #[arg(short = 'p', value_name = "pidfile")]
    pidfile: Option<PathBuf>,
    /// Cost of a GB-month of storage over the cost of 10^6 I/Os, which
    /// paces background cleaning (0 turns it off; default 1.0).
    #[arg(short = 'S', value_name = "storage:I/O cost", value_parser = parse_cost_ratio)]
    storage_io_cost_ratio: Option<f64>,
    /// How long, in seconds, a modifying request may wait for others to
    /// join its commit.
    #[arg(short = 'w', value_name = "commit delay s", value_parser = parse_commit_delay_ns)]
    commit_delay_ns: Option<u64>,
    /// Commit at once when this many modifying requests are waiting.
    #[arg(short = 'g', value_name = "min forced commit", value_parser = clap::value_parser!(u64).range(1..))]
    commit_forced_requests: Option<u64>,
    /// Exit after handling one connection.
    #[arg(short = '1')]
    one_connection: bool,
    /// Stay in the foreground (for service managers).
    #[arg(short = 'F')]
    foreground: bool,
}

/// `-w`: seconds (a float) to nanoseconds.
fn parse_commit_delay_ns(s: &str) -> Result<u64, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.0..=COMMIT_DELAY_S_MAX).contains(&secs) => Ok((secs * 1e9).round() as u64),
        _ => Err(format!("{s:?} is not a number of seconds in 0..={COMMIT_DELAY_S_MAX}")),
    }
}

/// Logs `message` as the reason of a failed exit and exits 1.
fn fail(message: &str) -> ! {
    log(NAME, LogLevel::Error, &format!("exiting: {message}"));
    std::process::exit(1);
}

fn main() {
    let flags = Flags::parse();
    let addr = SocketAddr::parse(&flags.socket);
    let lbs_addr = SocketAddr::parse(&flags.lbs_socket);
    let pidfile = flags.pidfile.clone().unwrap_or_else(|| addr.default_pidfile());
    let defaults = KvldsConfig::default();
    let cfg = KvldsConfig {
        cache_pages_max: flags.cache_pages,
        cache_bytes_max: flags.cache_bytes,
        key_len_max: flags.key_len_max,
        value_len_max: flags.value_len_max,
        commit_delay_ns: flags.commit_delay_ns.unwrap_or(defaults.commit_delay_ns),
        commit_forced_requests: flags.commit_forced_requests.unwrap_or(defaults.commit_forced_requests),
        storage_io_cost_ratio: flags.storage_io_cost_ratio.unwrap_or(defaults.storage_io_cost_ratio),
        check_invariants: false,
    };

    let role = daemonize(NAME, flags.foreground);
    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start the runtime: {e}")),
    };
    let pidfile_written = Rc::new(Cell::new(false));
    let exit = rt.block_on(async {
        let upstream = match connect_upstream(&lbs_addr).await {
            Ok(stream) => Upstream { stream, peer: format!("lbs at {lbs_addr}") },
            Err(e) => fail(&format!("cannot connect to lbs at {lbs_addr}: {e}")),
        };
        let listener = match Listener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => fail(&format!("cannot listen on {addr}: {e}")),
        };
        log(NAME, LogLevel::Info, &format!("connected to lbs at {lbs_addr}; recovering the tree"));
        let ready_pidfile = pidfile.clone();
        let ready_written = pidfile_written.clone();
        let ready_addr = addr.to_string();
        let opts = RunOptions {
            name: NAME,
            data_dir: None,
            disk_readers: 0,
            upstream: Some(upstream),
            exit_after_one_connection: flags.one_connection,
            read_chunk_bytes_max: kivaloo_io_shim::conn::READ_CHUNK_BYTES,
            on_ready: Some(Box::new(move || {
                match write_pidfile(&ready_pidfile) {
                    Ok(()) => ready_written.set(true),
                    Err(e) => log(NAME, LogLevel::Warn, &e),
                }
                log(NAME, LogLevel::Info, &format!("listening on {ready_addr}"));
                signal_ready(role);
            })),
        };
        run_node(KvldsNode::new(cfg), vec![listener], opts).await
    });
    // A node that stopped before it was ready never wrote the pidfile; a
    // file at that path belongs to someone else.
    if pidfile_written.get() {
        let _ = std::fs::remove_file(&pidfile);
    }
    if exit.failure {
        fail(&exit.message);
    }
    log(NAME, LogLevel::Info, &format!("exiting: {}", exit.message));
}
