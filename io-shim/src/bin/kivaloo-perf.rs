//! `kivaloo-perf`: the performance-monitoring proxy, with kivaloo's flags
//! (plus `-F` and `--version`; `-l` optional). It connects to its target
//! (`-t`: a kvlds, a mux or an lbs) first, hands that connection to the
//! node as its upstream, and returns to the shell once it listens (`-s`).
//! The node's report lines go to the `-l` file (appended, each prefixed
//! with the UTC time it was written) or, without `-l`, to stderr; a last
//! report of the partial interval is written when the daemon stops.
//!
//! Writing reports never stops the daemon or makes it panic: a line that
//! cannot be written to stderr (closed, or a pipe whose reader has gone) is
//! dropped; a write to the `-l` file that fails (disk full, I/O error) is
//! logged as a warning once, and the daemon goes on proxying and tries each
//! later line again (the lines that failed are lost; the next failure after
//! a success is logged again). The proxying matters more than the
//! statistics.
//!
//! With `-1`, the daemon exits as soon as its one client has closed its
//! connection, without waiting for the answers the target still owes (to
//! requests the client sent and did not wait for): its last report does
//! not count them. A client that waits for every answer before closing
//! loses nothing.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use clap::Parser;
use kivaloo::contract::{Input, Instant, Node, Output};
use kivaloo::LogLevel;
use kivaloo_io_shim::addr::{connect, Listener, SocketAddr};
use kivaloo_io_shim::daemon::{daemonize, signal_ready, write_pidfile};
use kivaloo_io_shim::runtime::{build_runtime, log, run_node, RunOptions, Upstream};
use kivaloo_nodes::perf::{PerfConfig, PerfNode, ReportLine, INTERVAL_NS_DEFAULT};

const NAME: &str = "kivaloo-perf";

/// The performance monitor of kivaloo: a proxy between one client and a
/// kvlds, mux or lbs that reports, per request type, how many requests
/// completed and how long they took (mean, median, p99, max).
#[derive(Parser, Debug)]
#[command(name = NAME, version)]
struct Flags {
    /// The server to forward to (kvlds, mux or lbs): a unix socket path,
    /// host:port or [ip]:port.
    #[arg(short = 't', value_name = "target socket")]
    target: String,
    /// A socket to listen on (repeat for several; still one client at a
    /// time): a unix socket path, host:port or [ip]:port.
    #[arg(short = 's', value_name = "source socket", required = true)]
    sources: Vec<String>,
    /// File the statistics are appended to (default: stderr). A failed
    /// write is logged once (until a write succeeds again), and the daemon
    /// goes on; the lines not written are lost.
    #[arg(short = 'l', value_name = "logfile")]
    logfile: Option<PathBuf>,
    /// Seconds between reports.
    #[arg(short = 'w', value_name = "secs", default_value_t = (INTERVAL_NS_DEFAULT / 1_000_000_000) as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    interval_secs: u32,
    /// Pidfile (default: <first source socket>.pid).
    #[arg(short = 'p', value_name = "pidfile")]
    pidfile: Option<PathBuf>,
    /// Exit after handling one connection: once the client closes it,
    /// without waiting for answers the target still owes (the last report
    /// does not count them).
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

/// `-l`, opened for appending (created if missing).
fn open_stats_file(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open the statistics file {}: {e}", path.display()))
}

/// `unix_s` as UTC `YYYY-MM-DDTHH:MM:SSZ` (days to civil date: Howard
/// Hinnant's algorithm).
fn utc_timestamp(unix_s: u64) -> String {
    let (days, secs) = ((unix_s / 86_400) as i64, unix_s % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// Where report lines go.
enum StatsSink {
    /// Through the daemon's log, to stderr.
    Stderr,
    /// Appended to the `-l` file; `failing` while writes fail (said once
    /// per failing streak; the daemon goes on, the lines are lost).
    File { path: PathBuf, file: File, failing: bool },
}

impl StatsSink {
    fn write(&mut self, line: &ReportLine) {
        match self {
            StatsSink::Stderr => log(NAME, LogLevel::Info, &line.to_string()),
            StatsSink::File { path, file, failing } => {
                let unix_s = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                // One write per line, so that lines stay whole in a file
                // others append to as well.
                let text = format!("{} {line}\n", utc_timestamp(unix_s));
                match file.write_all(text.as_bytes()) {
                    Ok(()) => *failing = false,
                    Err(e) => {
                        if !*failing {
                            let message = format!("cannot write statistics to {}: {e}", path.display());
                            log(NAME, LogLevel::Warn, &message);
                        }
                        *failing = true;
                    }
                }
            }
        }
    }
}

/// The node and where its reports go: after every input the report lines
/// the node queued are written out.
struct Reporting {
    node: PerfNode,
    sink: StatsSink,
    /// The `now` of the last input, so that the last report's instant is
    /// never before it.
    last_now: Instant,
}

impl Reporting {
    fn drain_reports(&mut self) {
        while let Some(line) = self.node.poll_report() {
            self.sink.write(&line);
        }
    }

    /// Reports the partial interval once the event loop has returned;
    /// `started` is (within microseconds) the event loop's clock origin.
    fn finish(&mut self, started: std::time::Instant) {
        let now = Instant::from_nanos(started.elapsed().as_nanos() as u64).max(self.last_now);
        self.node.finish(now);
        self.drain_reports();
    }
}

/// Borrowed, so that the daemon still has the node when the event loop
/// returns (to write the last report).
impl Node for &mut Reporting {
    fn handle_input(&mut self, now: Instant, input: Input) {
        self.last_now = self.last_now.max(now);
        self.node.handle_input(now, input);
        self.drain_reports();
    }

    fn poll_output(&mut self) -> Option<Output> {
        self.node.poll_output()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.node.poll_timeout()
    }
}

fn main() {
    let flags = Flags::parse();
    let target = SocketAddr::parse(&flags.target);
    let sources: Vec<SocketAddr> = flags.sources.iter().map(|s| SocketAddr::parse(s)).collect();
    let pidfile = flags.pidfile.clone().unwrap_or_else(|| sources[0].default_pidfile());
    let interval_ns = u64::from(flags.interval_secs) * 1_000_000_000;
    // Check -l before returning to the shell, so that a bad path is an
    // error the operator sees at once.
    if let Some(path) = &flags.logfile {
        if let Err(e) = open_stats_file(path) {
            fail(&e);
        }
    }

    let role = daemonize(NAME, flags.foreground);
    let sink = match &flags.logfile {
        Some(path) => match open_stats_file(path) {
            Ok(file) => StatsSink::File { path: path.clone(), file, failing: false },
            Err(e) => fail(&e),
        },
        None => StatsSink::Stderr,
    };
    let stats_to = match &flags.logfile {
        Some(path) => path.display().to_string(),
        None => "stderr".to_string(),
    };
    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start the runtime: {e}")),
    };
    let pidfile_written = Rc::new(Cell::new(false));
    let exit = rt.block_on(async {
        let upstream = match connect(&target).await {
            Ok(stream) => Upstream { stream, peer: format!("target at {target}") },
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
        let secs = flags.interval_secs;
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
                log(
                    NAME,
                    LogLevel::Info,
                    &format!("listening on {ready_addrs}; statistics every {secs} s to {stats_to}"),
                );
                signal_ready(role);
            })),
        };
        // The event loop's clock starts at 0 when it starts: so does the
        // node's first interval.
        let mut reporting = Reporting {
            node: PerfNode::new(PerfConfig { interval_ns }, Instant::from_nanos(0)),
            sink,
            last_now: Instant::from_nanos(0),
        };
        let started = std::time::Instant::now();
        let exit = run_node(&mut reporting, listeners, opts).await;
        reporting.finish(started);
        exit
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

#[cfg(test)]
mod tests {
    use super::utc_timestamp;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(utc_timestamp(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
