//! `kivaloo-mux`: many client connections onto one kvlds, with kivaloo's
//! flags. It connects to its target (`-t`) first, hands that connection to
//! the node as its upstream, and returns to the shell once the node has
//! the target's limits and listens on every source (`-s`).

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;

use clap::Parser;
use kivaloo::LogLevel;
use kivaloo_io_shim::addr::{connect, Listener, SocketAddr};
use kivaloo_io_shim::daemon::{daemonize, signal_ready, write_pidfile};
use kivaloo_io_shim::runtime::{build_runtime, log, run_node, RunOptions, Upstream};
use kivaloo_nodes::mux::{MuxConfig, MuxNode, CONNECTIONS_MAX_DEFAULT};

const NAME: &str = "kivaloo-mux";

/// The multiplexer of kivaloo: many clients onto one kvlds connection.
#[derive(Parser, Debug)]
#[command(name = NAME, version)]
struct Flags {
    /// The kvlds to forward to: a unix socket path, host:port or [ip]:port.
    #[arg(short = 't', value_name = "target socket")]
    target: String,
    /// A socket to listen on (repeat for several): a unix socket path,
    /// host:port or [ip]:port.
    #[arg(short = 's', value_name = "source socket", required = true)]
    sources: Vec<String>,
    /// Client connections served at once.
    #[arg(short = 'n', value_name = "max # connections", default_value_t = CONNECTIONS_MAX_DEFAULT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    connections_max: u32,
    /// Pidfile (default: <first source socket>.pid).
    #[arg(short = 'p', value_name = "pidfile")]
    pidfile: Option<PathBuf>,
    /// Exit after handling one connection.
    #[arg(short = '1')]
    one_connection: bool,
    /// Stay in the foreground (for service managers).
    #[arg(short = 'F')]
    foreground: bool,
}

/// Logs `message` as the reason of a failed exit and exits 1.
fn fail(message: &str) -> ! {
    log(NAME, LogLevel::Error, &format!("exiting: {message}"));
    std::process::exit(1);
}

fn main() {
    let flags = Flags::parse();
    let target = SocketAddr::parse(&flags.target);
    let sources: Vec<SocketAddr> = flags.sources.iter().map(|s| SocketAddr::parse(s)).collect();
    let pidfile = flags.pidfile.clone().unwrap_or_else(|| sources[0].default_pidfile());
    let cfg = MuxConfig { connections_max: flags.connections_max as usize };

    let role = daemonize(NAME, flags.foreground);
    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start the runtime: {e}")),
    };
    let pidfile_written = Rc::new(Cell::new(false));
    let exit = rt.block_on(async {
        let upstream = match connect(&target).await {
            Ok(stream) => Upstream { stream, peer: format!("kvlds at {target}") },
            Err(e) => fail(&format!("cannot connect to {target}: {e}")),
        };
        let mut listeners = Vec::new();
        for addr in &sources {
            match Listener::bind(addr).await {
                Ok(l) => listeners.push(l),
                Err(e) => fail(&format!("cannot listen on {addr}: {e}")),
            }
        }
        let ready_pidfile = pidfile.clone();
        let ready_written = pidfile_written.clone();
        let ready_addrs = sources.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
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
                log(NAME, LogLevel::Info, &format!("listening on {ready_addrs}"));
                signal_ready(role);
            })),
        };
        run_node(MuxNode::new(cfg), listeners, opts).await
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
