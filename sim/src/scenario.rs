//! Scenarios as data: a TOML file names the components, the workload and
//! its size, a range for every fault probability, and how many seeds a
//! sweep runs. Each seed draws its own values inside the ranges (swarm
//! testing), from its own stream, so one scenario covers quiet and hostile
//! runs alike. The format is documented in `scenarios/README.md`.

use serde::{Deserialize, Serialize};

use crate::rng::{Concern, Stream};
use crate::storage::DiskFaults;

/// A range `[lo, hi]` a seed draws a value from.
pub type Range = [f64; 2];

/// One scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in reports.
    pub name: String,
    /// What the scenario attacks.
    pub description: String,
    /// The nodes under test, front (the one the clients talk to) first:
    /// `["lbs"]`, `["kvlds", "lbs"]` (client -> kvlds -> lbs -> disk) or
    /// `["mux", "kvlds", "lbs"]` (clients -> mux -> kvlds -> lbs -> disk).
    pub components: Vec<String>,
    /// Seeds a sweep runs (and `cargo test` runs a fraction of).
    pub seeds: u64,
    /// What the clients do.
    pub workload: WorkloadSpec,
    /// Fault probability ranges; a missing one is `[0, 0]` (never).
    #[serde(default)]
    pub faults: FaultRanges,
    /// A reproduction: the one seed this file replays, cut down by
    /// shrinking (`kivaloo-sim run <file>` runs it without `--seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
}

/// A reproduction of one failing seed, as shrinking leaves it: the seed,
/// and what of its run is kept. The workload's `requests` is cut in the
/// workload itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    /// The seed.
    pub seed: u64,
    /// Clients, at most what the seed draws (the mux's `-n` at most this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<u64>,
    /// The chaos faults (crashes, power losses, resets) carried out, by
    /// their number on the run's tape (`sim/src/tape.rs`); missing: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chaos_faults: Option<Vec<u64>>,
    /// The disk faults carried out, by number; missing: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_faults: Option<Vec<u64>>,
}

/// The workload part of a scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Which workload: `"lbs"` (with components `["lbs"]`) or `"kvlds"`
    /// (with components `["kvlds", "lbs"]`).
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
    /// kvlds: how many distinct keys the client uses (drawn per seed).
    #[serde(default = "default_keys")]
    pub keys: [u64; 2],
    /// kvlds `-C`: pages its cache holds (drawn per seed; small, so that
    /// pages are evicted and read back).
    #[serde(default = "default_cache_pages")]
    pub cache_pages: [u64; 2],
    /// kvlds `-w`: commit delay in microseconds (drawn per seed).
    #[serde(default)]
    pub commit_delay_us: [u64; 2],
    /// kvlds `-g`: modifying requests that force a commit (drawn per seed).
    #[serde(default = "default_commit_forced")]
    pub commit_forced: [u64; 2],
    /// kvlds workload: clients, each with its own connection (drawn per
    /// seed); more than one needs a mux in front (kvlds serves one
    /// connection at a time).
    #[serde(default = "default_clients")]
    pub clients: [u64; 2],
    /// mux `-n`, as a fraction of the clients drawn (rounded up, at least
    /// 1): below 1.0 some clients wait for others to leave.
    #[serde(default = "default_mux_connections")]
    pub mux_connections: [f64; 2],
    /// kvlds `-S` (storage cost over I/O cost, which paces background
    /// cleaning), drawn per seed: log-uniformly when both ends are above
    /// 0, else uniformly; `[0, 0]` (the default) turns cleaning off.
    /// Virtual runs last seconds, not months, so scenarios that clean use
    /// values far above a real store's.
    #[serde(default)]
    pub storage_cost: [f64; 2],
    /// kvlds workload: only SETs (and a few GETs) of the fixed key set,
    /// the steady update load the space oracle is stated for.
    #[serde(default)]
    pub updates_only: bool,
    /// kvlds workload: every RANGE asks for 1 MiB and up to 6 are in
    /// flight (the load that makes a mux hold a client back).
    #[serde(default)]
    pub big_ranges: bool,
    /// The space oracle: once half the requests are done, lbs's files
    /// must never hold more than this many times the bytes of the tree's
    /// pages (as lbs records), plus two files' worth (the oldest file is
    /// deleted only once all of it is free, the newest fills up). Needs
    /// cleaning on (`storage_cost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space_factor: Option<f64>,
}

fn default_clients() -> [u64; 2] {
    [1, 1]
}

fn default_mux_connections() -> [f64; 2] {
    [1.0, 1.0]
}

fn default_file_blocks() -> [u64; 2] {
    [4, 64]
}

fn default_keys() -> [u64; 2] {
    [8, 200]
}

fn default_cache_pages() -> [u64; 2] {
    [4, 64]
}

fn default_commit_forced() -> [u64; 2] {
    [4096, 4096]
}

/// Ranges of every fault probability. Rates "per ms" are per millisecond of
/// virtual time; the disk ones are per operation.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
    /// What the seed drew for kvlds, when the scenario runs it.
    pub kvlds: Option<KvldsDrawn>,
}

/// What one seed drew for kvlds and its client.
#[derive(Debug, Clone, PartialEq)]
pub struct KvldsDrawn {
    /// Distinct keys the client uses.
    pub keys: u64,
    /// kvlds `-C`.
    pub cache_pages: u64,
    /// kvlds `-w`, in microseconds.
    pub commit_delay_us: u64,
    /// kvlds `-g`.
    pub commit_forced_requests: u64,
    /// kvlds's own clock rate (lbs has `Drawn::clock_rate`).
    pub clock_rate: f64,
    /// How late kvlds's timer may fire, in microseconds.
    pub timer_late_us: u64,
    /// Clients, each with its own connection.
    pub clients: u64,
    /// mux `-n` (when a mux runs).
    pub mux_connections_max: u64,
    /// kvlds `-S`.
    pub storage_cost: f64,
}

impl Scenario {
    /// Parses a scenario file's text.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        let components: Vec<&str> = s.components.iter().map(String::as_str).collect();
        match (components.as_slice(), s.workload.kind.as_str()) {
            (["lbs"], "lbs") | (["kvlds", "lbs"], "kvlds") | (["mux", "kvlds", "lbs"], "kvlds") => {}
            _ => {
                return Err(format!(
                    "unsupported components {:?} / workload {:?} (this simulator runs [\"lbs\"] with the \
                     lbs workload, or [\"kvlds\", \"lbs\"] or [\"mux\", \"kvlds\", \"lbs\"] with the kvlds \
                     workload)",
                    s.components, s.workload.kind
                ))
            }
        }
        if s.workload.clients[0] == 0 || (s.workload.clients[1] > 1 && components[0] != "mux") {
            return Err("clients must be at least 1, and more than 1 only with a mux in front".into());
        }
        if s.workload.block_sizes.is_empty() || s.workload.in_flight[0] == 0 {
            return Err("workload needs block sizes and at least one request in flight".into());
        }
        if s.workload.space_factor.is_some()
            && (s.workload.kind != "kvlds" || s.workload.storage_cost[0] <= 0.0)
        {
            return Err("space_factor needs a kvlds workload with cleaning on (storage_cost above 0)".into());
        }
        if s.workload.storage_cost.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return Err("storage_cost must be finite and not negative".into());
        }
        if s.workload.kind == "kvlds" && (s.workload.keys[0] == 0 || s.workload.cache_pages[0] == 0) {
            return Err("a kvlds workload needs at least one key and one cache page".into());
        }
        Ok(s)
    }

    /// The scenario as a file's text (what `parse` reads back).
    ///
    /// # Panics
    /// Never: every field is representable in TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a scenario is representable in TOML")
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
        // kvlds's draws come after every lbs one, so lbs scenarios draw as
        // they did before kvlds ran here.
        let kvlds = (w.kind == "kvlds").then(|| {
            let mut r = |x: [u64; 2]| rng.range(x[0], x[1].max(x[0]));
            let keys = r(w.keys);
            let cache_pages = r(w.cache_pages);
            let commit_delay_us = r(w.commit_delay_us);
            let commit_forced_requests = r(w.commit_forced).max(1);
            let mut d = |r: Range| rng.f64_in(r[0].min(r[1]), r[0].max(r[1]));
            let clock_rate = match f.clock_rate {
                [0.0, 0.0] => 1.0,
                r => d(r).max(0.01),
            };
            let timer_late_us = d(f.timer_late_us) as u64;
            // Drawn last, so that adding them kept the earlier draws.
            let clients = rng.range(w.clients[0], w.clients[1].max(w.clients[0])).max(1);
            let [lo, hi] = w.mux_connections;
            let fraction = rng.f64_in(lo.min(hi), lo.max(hi));
            let mux_connections_max = ((clients as f64 * fraction).ceil() as u64).max(1);
            let [lo, hi] =
                [w.storage_cost[0].min(w.storage_cost[1]), w.storage_cost[0].max(w.storage_cost[1])];
            let storage_cost =
                if lo > 0.0 { rng.f64_in(lo.ln(), hi.ln()).exp().clamp(lo, hi) } else { rng.f64_in(lo, hi) };
            KvldsDrawn {
                keys,
                cache_pages,
                commit_delay_us,
                commit_forced_requests,
                clock_rate,
                timer_late_us,
                clients,
                mux_connections_max,
                storage_cost,
            }
        });
        let mut kvlds = kvlds;
        if let (Some(k), Some(clients)) = (kvlds.as_mut(), self.replay.as_ref().and_then(|r| r.clients)) {
            k.clients = clients.clamp(1, k.clients);
            k.mux_connections_max = k.mux_connections_max.min(k.clients);
        }
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
            kvlds,
        }
    }
}
