//! `kivaloo-sim`: replay one seed of a scenario with a readable trace, or
//! sweep many seeds of every scenario in a directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use kivaloo_sim::runner::{replay_command, run_seed, scenario_files, sweep};
use kivaloo_sim::scenario::Scenario;
use kivaloo_sim::shrink::shrink;

#[derive(Parser)]
#[command(name = "kivaloo-sim", version, about = "The deterministic simulator of kivaloo")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one seed of one scenario (a shrunk reproduction's file runs its
    /// own seed).
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// The seed (default: the file's `[replay]` seed).
        #[arg(long)]
        seed: Option<u64>,
        /// Print the readable trace of the run.
        #[arg(long)]
        trace: bool,
        /// If the seed fails, shrink it: fewer requests, clients and faults,
        /// and later faults, failing the same oracle; write the smallest
        /// reproduction as a scenario file and print how to run it.
        #[arg(long)]
        shrink: bool,
        /// Most runs shrinking may spend.
        #[arg(long, default_value_t = 600)]
        shrink_runs: u64,
        /// Where to write the shrunk scenario (default:
        /// `<name>-seed-<N>-shrunk.toml` in the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run many seeds of every scenario in a directory (or one file).
    Sweep {
        /// A directory of scenario files, or one scenario file.
        path: PathBuf,
        /// Seeds per scenario (default: each scenario's own count).
        #[arg(long)]
        seeds: Option<u64>,
        /// Threads (default: all cores).
        #[arg(long)]
        jobs: Option<usize>,
    },
}

/// Shrinks the failing `seed`, writes the reproduction and prints it.
fn report_shrunk(scenario: &Scenario, seed: u64, runs_max: u64, out: Option<PathBuf>) {
    println!("shrinking (at most {runs_max} runs)...");
    let started = Instant::now();
    let shrunk = match shrink(scenario, seed, runs_max, &mut |line| println!("  {line}")) {
        Ok(s) => s,
        Err(e) => {
            println!("cannot shrink: {e}");
            return;
        }
    };
    let (b, a) = (shrunk.before, shrunk.after);
    println!(
        "shrunk in {} runs ({:.1} s): requests {} -> {}, clients {} -> {}, faults {} -> {}",
        shrunk.runs,
        started.elapsed().as_secs_f64(),
        b.requests,
        a.requests,
        b.clients,
        a.clients,
        b.faults,
        a.faults
    );
    for note in shrunk.outcome.fault_tape.iter().filter(|n| n.kept) {
        println!(
            "  fault kept: {:?} #{} at {:.6} s: {}",
            note.source,
            note.index,
            note.at_ns as f64 / 1e9,
            note.what
        );
    }
    println!(
        "fails the same oracle ({}): {}",
        shrunk.oracle,
        shrunk.outcome.failure.as_deref().unwrap_or("?")
    );
    let mut reproduction = shrunk.scenario;
    reproduction.name = format!("{}-seed-{seed}-shrunk", scenario.name);
    reproduction.description =
        format!("{} (seed {seed}, shrunk: it fails the {} oracle)", scenario.description, shrunk.oracle);
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{}.toml", reproduction.name)));
    let text = reproduction.to_toml();
    if let Err(e) = std::fs::write(&path, &text) {
        println!("cannot write {}: {e}", path.display());
    }
    println!("reproduce: cargo run --release -p kivaloo-sim -- run {} --trace", path.display());
    println!("scenario file {} (a regression: put it in scenarios/regressions/):", path.display());
    print!("{text}");
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { scenario: path, seed, trace, shrink: shrink_it, shrink_runs, out } => {
            let scenario = match Scenario::load(&path) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("kivaloo-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let Some(seed) = seed.or(scenario.replay.as_ref().map(|r| r.seed)) else {
                eprintln!("kivaloo-sim: {}: no --seed, and the file has no [replay] seed", path.display());
                return ExitCode::from(2);
            };
            let started = Instant::now();
            let outcome = run_seed(&scenario, seed, trace);
            for line in &outcome.trace {
                println!("{line}");
            }
            println!("scenario {} seed {seed}", scenario.name);
            println!("drawn: {:?}", outcome.drawn);
            println!(
                "{} requests, {} writes acknowledged, {} crashes ({} power losses), {} resets, {} exits, \
                 {:.3} s virtual, {:.3} s real, trace hash {:016x}",
                outcome.requests,
                outcome.acked,
                outcome.crashes,
                outcome.power_losses,
                outcome.resets,
                outcome.node_exits,
                outcome.virtual_ns as f64 / 1e9,
                started.elapsed().as_secs_f64(),
                outcome.trace_hash
            );
            if outcome.corruption_reported {
                println!("the damaged store reported the damage after faults stopped: the run ends there");
            }
            match outcome.failure {
                None => {
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Some(f) => {
                    println!("FAILED: {f}");
                    println!("replay: {}", replay_command(&path, seed));
                    if shrink_it {
                        report_shrunk(&scenario, seed, shrink_runs, out);
                    }
                    ExitCode::FAILURE
                }
            }
        }
        Command::Sweep { path, seeds, jobs } => {
            let files = if path.is_dir() {
                match scenario_files(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("kivaloo-sim: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                vec![path]
            };
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            // A panicking run is reported as that seed's failure (with its
            // message); the default hook's backtrace would only be noise.
            std::panic::set_hook(Box::new(|_| {}));
            let started = Instant::now();
            let report = match sweep(&files, seeds, jobs) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("kivaloo-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let secs = started.elapsed().as_secs_f64();
            for f in &report.failures {
                println!("{f}");
            }
            println!("coverage probes (summed over the sweep):");
            for (name, n) in &report.probes {
                println!("  {n:>10}  {name}");
            }
            if let Some(ratio) = report.space_ratio_max {
                println!("space oracle: lbs held at most {ratio:.2} times the tree's pages");
            }
            println!(
                "{} runs of {} scenarios: {} simulated requests, {} crashes ({} power losses), {} ended by \
                 reported damage, in {secs:.2} s ({:.0} requests/s on {jobs} threads); {} failed",
                report.runs,
                files.len(),
                report.requests,
                report.crashes,
                report.power_losses,
                report.ended_by_damage,
                report.requests as f64 / secs,
                report.failures.len()
            );
            if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
