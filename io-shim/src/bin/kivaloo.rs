//! `kivaloo`: the command line. `kivaloo serve` runs the whole store (lbs,
//! kvlds and mux) in one process; `kivaloo bench` runs kivaloo's benchmarks
//! against a store; the other subcommands are a client for people and
//! scripts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kivaloo::LogLevel;
use kivaloo_io_shim::addr::SocketAddr;
use kivaloo_io_shim::humansize::{parse_cost_ratio, parse_size_bytes};
use kivaloo_io_shim::runtime::{build_runtime, log};
use kivaloo_io_shim::serve::{serve, ServeOptions};
use kivaloo_nodes::kvlds::STORAGE_IO_COST_RATIO_DEFAULT;
use kivaloo_nodes::lbs::layout::{BLOCK_SIZE_MAX, BLOCK_SIZE_MIN};
use kivaloo_nodes::mux::CONNECTIONS_MAX_DEFAULT;

/// A durable key-value store, compatible with Tarsnap's kivaloo.
#[derive(Parser, Debug)]
#[command(name = "kivaloo", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the store (lbs, kvlds and mux in one process) until Ctrl-C.
    Serve(ServeArgs),
    /// Run one of kivaloo's benchmarks against a store.
    ///
    /// bulk-insert fills an empty store with the pairs; the other workloads expect the store to
    /// hold them already (run bulk-insert with the same --pairs first). Prints the result on
    /// stdout, the progress on stderr.
    Bench(kivaloo_io_shim::bench::BenchArgs),
    #[command(flatten)]
    Client(kivaloo_io_shim::cli::ClientCommand),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Directory holding the store (created if missing).
    #[arg(long, value_name = "DIR", default_value = "kivaloo-data")]
    data: PathBuf,
    /// Where clients connect: a unix socket path, host:port or [ip]:port.
    /// Repeat to listen on several.
    #[arg(long, value_name = "ADDR", default_values_t = ["kivaloo.sock".to_string()])]
    listen: Vec<String>,
    /// Block size in bytes for a new store (512 to 131072; 2048 and up
    /// allow 255-byte keys and values).
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    block_size: u32,
    /// kvlds's page cache (e.g. 64MB, 2G; powers of 1000). Default 128 MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_bytes)]
    cache: Option<u64>,
    /// Client connections served at once.
    #[arg(long, value_name = "N", default_value_t = CONNECTIONS_MAX_DEFAULT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Background cleaning's pace (kvlds -S): the cost of storing a GB for
    /// a month over the cost of 10^6 I/Os. Higher cleans more and keeps
    /// less garbage on disk; 0 turns cleaning off.
    #[arg(long, value_name = "RATIO", default_value_t = STORAGE_IO_COST_RATIO_DEFAULT,
          value_parser = parse_cost_ratio)]
    storage_cost: f64,
}

fn run_serve(args: ServeArgs) -> i32 {
    if !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&args.block_size) {
        log(
            "kivaloo",
            LogLevel::Error,
            &format!("block size {} is not in {BLOCK_SIZE_MIN}..={BLOCK_SIZE_MAX}", args.block_size),
        );
        return 2;
    }
    let opts = ServeOptions {
        data_dir: args.data,
        listen: args.listen.iter().map(|a| SocketAddr::parse(a)).collect(),
        block_size: args.block_size,
        cache_bytes: args.cache,
        storage_io_cost_ratio: args.storage_cost,
        connections_max: args.max_connections as usize,
        disk_readers: 16,
        on_ready: Some(|o| {
            let addrs: Vec<String> = o.listen.iter().map(|a| a.to_string()).collect();
            log(
                "kivaloo",
                LogLevel::Info,
                &format!("serving {} on {} (Ctrl-C stops)", o.data_dir.display(), addrs.join(", ")),
            );
        }),
    };
    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            log("kivaloo", LogLevel::Error, &format!("cannot start the runtime: {e}"));
            return 1;
        }
    };
    match rt.block_on(serve(opts)) {
        Ok(exit) if !exit.failure => {
            log("kivaloo", LogLevel::Info, &format!("stopped: {}", exit.message));
            0
        }
        Ok(exit) => {
            log("kivaloo", LogLevel::Error, &format!("exiting: {}", exit.message));
            1
        }
        Err(e) => {
            log("kivaloo", LogLevel::Error, &e);
            1
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let status = match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Bench(args) => kivaloo_io_shim::bench::run(&args),
        Command::Client(cmd) => kivaloo_io_shim::cli::run(cmd),
    };
    std::process::exit(status);
}
