//! Scenarios as data: a TOML file names the components, the workload and
//! its size, a range for every fault probability, and how many seeds a
//! sweep runs. Each seed draws its own values inside the ranges (swarm
//! testing), from its own stream, so one scenario covers quiet and hostile
//! runs alike. The format is documented in `scenarios/README.md`.

use serde::Deserialize;

use crate::rng::{Concern, Stream};
use crate::storage::DiskFaults;

/// A range `[lo, hi]` a seed draws a value from.
pub type Range = [f64; 2];

/// One scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in reports.
    pub name: String,
    /// What the scenario attacks.
    pub description: String,
    /// The nodes under test (for now: `["lbs"]`).
    pub components: Vec<String>,
    /// Seeds a sweep runs (and `cargo test` runs a fraction of).
    pub seeds: u64,
    /// What the clients do.
    pub workload: WorkloadSpec,
    /// Fault probability ranges; a missing one is `[0, 0]` (never).
    #[serde(default)]
    pub faults: FaultRanges,
}

/// The workload part of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Which workload: `"lbs"`.
    pub kind: String,
    /// Requests the client issues before the final check.
    pub requests: u64,
    /// Requests in flight at once, drawn per seed in this range.
    pub in_flight: [u64; 2],
    /// Block sizes a seed picks from.
    pub block_sizes: Vec<u32>,
    /// lbs starts a new file after this many blocks (drawn per seed), so
    /// small runs still roll files over and FREE still removes them.
    #[serde(default = "default_file_blocks")]
    pub file_blocks: [u64; 2],
}

fn default_file_blocks() -> [u64; 2] {
    [4, 64]
}

/// Ranges of every fault probability. Rates "per ms" are per millisecond of
/// virtual time; the disk ones are per operation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultRanges {
    /// Chance per virtual ms that the node crashes.
    pub crash_per_ms: Range,
    /// Of those crashes, the fraction that are power losses (unsynced data
    /// at risk) rather than a process dying (page cache kept).
    pub power_loss: Range,
    /// Chance per virtual ms that the client's connection is reset.
    pub reset_per_ms: Range,
    pub read_eio: Range,
    pub write_eio: Range,
    pub fsync_eio: Range,
    pub dir_sync_eio: Range,
    pub enospc: Range,
    pub short_read: Range,
    pub short_write: Range,
    pub misdirected_write: Range,
    pub bit_rot: Range,
    pub torn_write: Range,
    /// Disk capacity in MiB (disk full); `[0, 0]` means unlimited.
    pub capacity_mib: Range,
    /// One-way network latency in microseconds.
    pub net_latency_us: Range,
    /// Disk operation latency in microseconds.
    pub disk_latency_us: Range,
    /// How fast the node's clock runs against virtual time (1.0: exactly).
    pub clock_rate: Range,
    /// How late a node's timer may fire, in microseconds.
    pub timer_late_us: Range,
    /// lbs's `-l`: latency added to every GET response, in microseconds
    /// (exercises the node's timers).
    pub read_latency_us: Range,
}

/// What one seed drew from a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    pub block_size: u32,
    pub in_flight: u64,
    pub file_blocks: u64,
    pub crash_per_ms: f64,
    pub power_loss: f64,
    pub reset_per_ms: f64,
    pub disk: DiskFaults,
    pub net_latency_us: [u64; 2],
    pub disk_latency_us: [u64; 2],
    pub clock_rate: f64,
    pub timer_late_us: u64,
    pub read_latency_us: u64,
}

impl Scenario {
    /// Parses a scenario file's text.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        if s.components != ["lbs"] || s.workload.kind != "lbs" {
            return Err(format!(
                "unsupported components {:?} / workload {:?} (this simulator runs lbs)",
                s.components, s.workload.kind
            ));
        }
        if s.workload.block_sizes.is_empty() || s.workload.in_flight[0] == 0 {
            return Err("workload needs block sizes and at least one request in flight".into());
        }
        Ok(s)
    }

    /// Reads and parses a scenario file.
    ///
    /// # Errors
    /// The file cannot be read or parsed.
    pub fn load(path: &std::path::Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Scenario::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The values seed `seed` draws (from its swarm stream).
    pub fn draw(&self, seed: u64) -> Drawn {
        let mut rng = Stream::new(seed, Concern::Swarm);
        let f = &self.faults;
        let mut d = |r: Range| rng.f64_in(r[0].min(r[1]), r[0].max(r[1]));
        let crash_per_ms = d(f.crash_per_ms);
        let power_loss = d(f.power_loss);
        let reset_per_ms = d(f.reset_per_ms);
        let disk = DiskFaults {
            read_eio: d(f.read_eio),
            write_eio: d(f.write_eio),
            fsync_eio: d(f.fsync_eio),
            dir_sync_eio: d(f.dir_sync_eio),
            enospc: d(f.enospc),
            short_read: d(f.short_read),
            short_write: d(f.short_write),
            misdirected_write: d(f.misdirected_write),
            bit_rot: d(f.bit_rot),
            torn_write: d(f.torn_write),
            capacity_bytes: {
                let mib = d(f.capacity_mib);
                (mib > 0.0).then_some((mib * 1048576.0) as u64)
            },
        };
        let net = [f.net_latency_us[0] as u64, f.net_latency_us[1].max(f.net_latency_us[0]) as u64];
        let dsk = [f.disk_latency_us[0] as u64, f.disk_latency_us[1].max(f.disk_latency_us[0]) as u64];
        let w = &self.workload;
        let block_size = w.block_sizes[rng.below(w.block_sizes.len() as u64) as usize];
        let in_flight = rng.range(w.in_flight[0], w.in_flight[1].max(w.in_flight[0]));
        let file_blocks = rng.range(w.file_blocks[0].max(1), w.file_blocks[1].max(w.file_blocks[0]).max(1));
        // Drawn last, so that adding them kept the earlier draws of every seed.
        let mut d = |r: Range| rng.f64_in(r[0].min(r[1]), r[0].max(r[1]));
        let clock_rate = match f.clock_rate {
            [0.0, 0.0] => 1.0,
            r => d(r).max(0.01),
        };
        let timer_late_us = d(f.timer_late_us) as u64;
        let read_latency_us = d(f.read_latency_us) as u64;
        Drawn {
            block_size,
            in_flight,
            file_blocks,
            crash_per_ms,
            power_loss,
            reset_per_ms,
            disk,
            net_latency_us: net,
            disk_latency_us: dsk,
            clock_rate,
            timer_late_us,
            read_latency_us,
        }
    }
}
