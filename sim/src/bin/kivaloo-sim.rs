//! `kivaloo-sim`: replay one seed of a scenario with a readable trace, or
//! sweep many seeds of every scenario in a directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use kivaloo_sim::enumerate::{
    enumerate_sweep, parse_choices, show_choices, CrashPlan, CrashPoint, SweepPlan,
};
use kivaloo_sim::nightly::{nightly, NightlyConfig};
use kivaloo_sim::runner::{replay_command, run_seed_with, scenario_files, sweep};
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
        /// Force a power loss at a crash point, `<point>:<occurrence>`
        /// (points: mid-append, new-file-before-dir-sync, mid-cleaning,
        /// mid-free), as crash-state enumeration does.
        #[arg(long)]
        crash_at: Option<String>,
        /// The persisted state at that power loss: one option per decision,
        /// as `enumerate` prints them (`0.3.1`; default: everything kept).
        #[arg(long, default_value = "0")]
        crash_state: String,
    },
    /// The long sweep (a nightly job): rounds of fresh seeds over every
    /// scenario, and crash-state enumeration, until the time is up; every
    /// failure shrunk; a Markdown report rewritten after each round.
    Nightly {
        /// A directory of scenario files, or one scenario file.
        path: PathBuf,
        /// How long to run, in hours.
        #[arg(long)]
        hours: f64,
        /// The report; shrunk reproductions go in its directory.
        #[arg(long, default_value = "nightly-report.md")]
        report: PathBuf,
        /// The first seed (default: from the date, a million seeds a day,
        /// so that each night runs new ones; the report names them).
        #[arg(long)]
        first_seed: Option<u64>,
        /// Seeds per scenario per round.
        #[arg(long, default_value_t = 200)]
        seeds_per_round: u64,
        /// Of those, seeds whose crash points are enumerated.
        #[arg(long, default_value_t = 10)]
        enumerated_per_round: u64,
        /// The most states per enumerated crash.
        #[arg(long, default_value_t = 64)]
        bound: u64,
        /// The most runs one shrink may spend.
        #[arg(long, default_value_t = 600)]
        shrink_runs: u64,
        /// Threads (default: all cores).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Crash-state enumeration: for each seed, crash point and occurrence,
    /// run recovery and every oracle on each legal persisted state of the
    /// disk (all up to --bound, a stratified sample above).
    Enumerate {
        /// A directory of scenario files, or one scenario file.
        path: PathBuf,
        /// Seeds per scenario (default: each scenario's own count).
        #[arg(long)]
        seeds: Option<u64>,
        /// Crash points, comma-separated (default: all four).
        #[arg(long, default_value = "mid-append,new-file-before-dir-sync,mid-cleaning,mid-free")]
        points: String,
        /// Occurrences of each point to crash at, comma-separated.
        #[arg(long, default_value = "1,2,3,5,8")]
        occurrences: String,
        /// The most states per crash; above it, a stratified sample.
        #[arg(long, default_value_t = 64)]
        bound: u64,
        /// Threads (default: all cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Start no enumeration once one has failed.
        #[arg(long)]
        first_failure: bool,
        /// The first seed of each scenario.
        #[arg(long, default_value_t = 0)]
        first_seed: u64,
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
        /// The first seed of each scenario.
        #[arg(long, default_value_t = 0)]
        first_seed: u64,
        /// Start no run once one has failed.
        #[arg(long)]
        first_failure: bool,
        /// Fail if a family of scenarios swept (lbs, kvlds, full stack,
        /// space) never reached one of the probes it must
        /// (`sim/src/coverage.rs`), naming it.
        #[arg(long)]
        require_probes: bool,
    },
}

/// The plan of `--crash-at <point>:<occurrence> --crash-state <choices>`.
fn crash_plan(at: &str, state: &str) -> Result<CrashPlan, String> {
    let (point, occurrence) = at.split_once(':').unwrap_or((at, "1"));
    let point = CrashPoint::parse(point).ok_or_else(|| format!("no crash point {point:?}"))?;
    let occurrence = occurrence.parse().map_err(|_| format!("bad occurrence {occurrence:?}"))?;
    let choices = parse_choices(state).ok_or_else(|| format!("bad crash state {state:?}"))?;
    Ok(CrashPlan { point, occurrence, choices })
}

/// The scenario files at `path` (a directory's, or the file itself).
fn files_at(path: PathBuf) -> Result<Vec<PathBuf>, String> {
    if path.is_dir() {
        scenario_files(&path)
    } else {
        Ok(vec![path])
    }
}

/// Runs `kivaloo-sim enumerate`.
fn enumerate_command(
    path: PathBuf,
    first_seed: u64,
    seeds: Option<u64>,
    (points, occurrences, bound, first_failure): (&str, &str, u64, bool),
    jobs: usize,
) -> Result<bool, String> {
    let files = files_at(path)?;
    let points: Vec<CrashPoint> = points
        .split(',')
        .map(|p| CrashPoint::parse(p.trim()).ok_or_else(|| format!("no crash point {p:?}")))
        .collect::<Result<_, _>>()?;
    let occurrences: Vec<u64> = occurrences
        .split(',')
        .map(|o| o.trim().parse().map_err(|_| format!("bad occurrence {o:?}")))
        .collect::<Result<_, _>>()?;
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let plan =
        SweepPlan { points: &points, occurrences: &occurrences, bound, stop_at_first_failure: first_failure };
    let sweep = enumerate_sweep(&files, first_seed, seeds, &plan, jobs)?;
    let secs = started.elapsed().as_secs_f64();
    for (path, seed, e) in &sweep.failures {
        for (choices, failure) in &e.failures {
            let at = format!("{}:{}", e.point, e.occurrence);
            println!(
                "FAILED: {} seed {seed} crash at {at} state {}: {failure}",
                path.display(),
                show_choices(choices)
            );
            println!(
                "  replay: cargo run --release -p kivaloo-sim -- run {} --seed {seed} --crash-at {at} --crash-state {} --trace",
                path.display(),
                show_choices(choices)
            );
        }
    }
    println!("crash point                 tried  reached  exhaustive  states run  most legal states");
    let mut states = 0;
    for (point, t) in &sweep.points {
        states += t.states_run;
        println!(
            "{:<26} {:>6} {:>8} {:>11} {:>11} {:>18}",
            point.name(),
            t.tried,
            t.reached,
            t.exhaustive,
            t.states_run,
            t.states_legal_max
        );
    }
    println!(
        "{states} crash states of {} scenarios: {} simulated requests in {secs:.2} s ({:.0} requests/s on {jobs} \
         threads); {} enumerations failed",
        files.len(),
        sweep.requests,
        sweep.requests as f64 / secs,
        sweep.failures.len()
    );
    Ok(sweep.failures.is_empty())
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
        Command::Run {
            scenario: path,
            seed,
            trace,
            shrink: shrink_it,
            shrink_runs,
            out,
            crash_at,
            crash_state,
        } => {
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
            let plan = match crash_at.as_deref().map(|at| crash_plan(at, &crash_state)).transpose() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("kivaloo-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            if plan.is_some() && shrink_it {
                eprintln!("kivaloo-sim: --shrink does not take --crash-at");
                return ExitCode::from(2);
            }
            let started = Instant::now();
            let outcome = run_seed_with(&scenario, seed, trace, plan.as_ref());
            if let Some(plan) = &plan {
                match &outcome.forced_crash {
                    Some(f) => println!(
                        "power loss forced at {} #{} at {:.6} s: options {:?}, taken {}",
                        plan.point,
                        plan.occurrence,
                        f.at_ns as f64 / 1e9,
                        f.arities,
                        show_choices(&f.taken)
                    ),
                    None => println!("the run never reached {} #{}", plan.point, plan.occurrence),
                }
            }
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
        Command::Nightly {
            path,
            hours,
            report,
            first_seed,
            seeds_per_round,
            enumerated_per_round,
            bound,
            shrink_runs,
            jobs,
        } => {
            let files = match files_at(path) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("kivaloo-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            if !(hours.is_finite() && hours >= 0.0) {
                eprintln!("kivaloo-sim: --hours must be a number of hours");
                return ExitCode::from(2);
            }
            let first_seed = first_seed.unwrap_or_else(|| {
                let days = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() / 86_400);
                days * 1_000_000
            });
            let cfg = NightlyConfig {
                files,
                report,
                duration: std::time::Duration::from_secs_f64(hours * 3600.0),
                first_seed,
                seeds_per_round,
                enumerated_per_round: enumerated_per_round.min(seeds_per_round),
                bound,
                jobs: jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                shrink_runs,
            };
            std::panic::set_hook(Box::new(|_| {}));
            println!("long sweep from seed {first_seed} for {hours} h; report: {}", cfg.report.display());
            match nightly(&cfg, &mut |line| println!("{line}")) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => {
                    println!("failures found: see {}", cfg.report.display());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("kivaloo-sim: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Enumerate { path, seeds, points, occurrences, bound, jobs, first_failure, first_seed } => {
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let plan = (&points[..], &occurrences[..], bound, first_failure);
            match enumerate_command(path, first_seed, seeds, plan, jobs) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("kivaloo-sim: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Sweep { path, seeds, jobs, first_seed, first_failure, require_probes } => {
            let files = match files_at(path) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("kivaloo-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            // A panicking run is reported as that seed's failure (with its
            // message); the default hook's backtrace would only be noise.
            std::panic::set_hook(Box::new(|_| {}));
            let started = Instant::now();
            let report = match sweep(&files, first_seed, seeds, jobs, first_failure) {
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
            let unreached = if require_probes { report.unreached() } else { Vec::new() };
            for (family, probe) in &unreached {
                println!("UNREACHED: the {} scenarios never reached the probe {probe:?}", family.name());
            }
            let seeds_text = match seeds {
                Some(n) => format!("seeds {first_seed}..{} of each", first_seed + n),
                None => "each one's own seeds".into(),
            };
            println!(
                "{} runs of {} scenarios ({seeds_text}): {} simulated requests, {} crashes ({} power losses), \
                 {} ended by reported damage, in {secs:.2} s ({:.0} requests/s on {jobs} threads); {} failed",
                report.runs,
                files.len(),
                report.requests,
                report.crashes,
                report.power_losses,
                report.ended_by_damage,
                report.requests as f64 / secs,
                report.failures.len()
            );
            if report.failures.is_empty() && unreached.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
