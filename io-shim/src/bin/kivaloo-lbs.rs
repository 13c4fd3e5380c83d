//! `kivaloo-lbs`: the log-structured block store daemon, with kivaloo's
//! flags.

use std::path::PathBuf;

use clap::Parser;
use kivaloo_io_shim::addr::{Listener, SocketAddr};
use kivaloo_io_shim::daemon::{daemonize, signal_ready, write_pidfile};
use kivaloo_io_shim::dir_lock::DirLock;
use kivaloo_io_shim::runtime::{build_runtime, check_data_dir, log, run_node, RunOptions};
use kivaloo_nodes::lbs::layout::{BLOCK_SIZE_MAX, BLOCK_SIZE_MIN};
use kivaloo_nodes::lbs::{LbsConfig, LbsNode, FILE_LEN_MIN_BYTES_DEFAULT};

const NAME: &str = "kivaloo-lbs";

/// The log-structured block store of kivaloo.
#[derive(Parser, Debug)]
#[command(name = NAME, version, about, disable_help_flag = false)]
struct Flags {
    /// Socket to listen on: a unix socket path, host:port or [ip]:port.
    #[arg(short = 's', value_name = "socket")]
    socket: String,
    /// Directory holding the store.
    #[arg(short = 'd', value_name = "dir")]
    dir: PathBuf,
    /// Block size in bytes (512 to 131072); fixed when the store is created.
    #[arg(short = 'b', value_name = "block size")]
    block_size: u32,
    /// Number of disk reader threads.
    #[arg(short = 'n', value_name = "readers", default_value_t = 16)]
    readers: usize,
    /// Pidfile (default: <socket>.pid).
    #[arg(short = 'p', value_name = "pidfile")]
    pidfile: Option<PathBuf>,
    /// Extra read latency in nanoseconds (for testing).
    #[arg(short = 'l', value_name = "latency ns", default_value_t = 0)]
    read_latency_ns: u64,
    /// Do not fsync (testing only: NOT durable).
    #[arg(short = 'L')]
    no_fsync: bool,
    /// Exit after handling one connection.
    #[arg(short = '1')]
    one_connection: bool,
    /// Stay in the foreground (for service managers).
    #[arg(short = 'F')]
    foreground: bool,
    /// Start a new file once the newest holds this many bytes (and more
    /// than a sixteenth of the live blocks). Space that FREE releases
    /// returns to the file system a whole file at a time, so smaller files
    /// give it back sooner, at the cost of more files (not a kivaloo flag).
    #[arg(long, value_name = "BYTES", default_value_t = FILE_LEN_MIN_BYTES_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    file_size_min: u64,
}

fn main() {
    let flags = Flags::parse();
    if !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&flags.block_size) {
        eprintln!(
            "{NAME}: error: block size {} is not in {BLOCK_SIZE_MIN}..={BLOCK_SIZE_MAX}",
            flags.block_size
        );
        std::process::exit(1);
    }
    if flags.readers == 0 || flags.readers > 1024 {
        eprintln!("{NAME}: error: -n {} is not in 1..=1024", flags.readers);
        std::process::exit(1);
    }
    if let Err(e) = check_data_dir(&flags.dir) {
        eprintln!("{NAME}: error: {e}");
        std::process::exit(1);
    }
    let role = daemonize(NAME, flags.foreground);
    let _lock = match DirLock::acquire(&flags.dir) {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("{NAME}: error: {e}");
            std::process::exit(1);
        }
    };
    let addr = SocketAddr::parse(&flags.socket);
    let pidfile = flags.pidfile.clone().unwrap_or_else(|| addr.default_pidfile());
    let cfg = LbsConfig {
        read_latency_ns: flags.read_latency_ns,
        fsync: !flags.no_fsync,
        file_len_min_bytes: flags.file_size_min,
        ..LbsConfig::new(flags.block_size)
    };

    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{NAME}: error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let exit = rt.block_on(async {
        let listener = match Listener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{NAME}: error: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        let ready_pidfile = pidfile.clone();
        let ready_addr = addr.to_string();
        let opts = RunOptions {
            name: NAME,
            data_dir: Some(flags.dir.clone()),
            disk_readers: flags.readers,
            upstream: None,
            exit_after_one_connection: flags.one_connection,
            read_chunk_bytes_max: kivaloo_io_shim::conn::BULK_READ_CHUNK_BYTES_MAX,
            on_ready: Some(Box::new(move || {
                if let Err(e) = write_pidfile(&ready_pidfile) {
                    log(NAME, kivaloo::LogLevel::Warn, &e);
                }
                log(NAME, kivaloo::LogLevel::Info, &format!("listening on {ready_addr}"));
                signal_ready(role);
            })),
        };
        run_node(LbsNode::new(cfg), vec![listener], opts).await
    });
    let _ = std::fs::remove_file(&pidfile);
    if exit.failure {
        log(NAME, kivaloo::LogLevel::Error, &format!("exiting: {}", exit.message));
        std::process::exit(1);
    }
    log(NAME, kivaloo::LogLevel::Info, &format!("exiting: {}", exit.message));
}
