//! One simulated run: a chain of components, front first (`["lbs"]`,
//! `["kvlds", "lbs"]`: client -> kvlds -> lbs -> simulated disk, or
//! `["mux", "kvlds", "lbs"]` with many clients), each the real state
//! machine driven through the same contract as the tokio runtime;
//! simulated connections between each client and the front component and
//! between each component and the next (its `ConnId::UPSTREAM`); virtual
//! time; and chaos: crashes of any component (process or power),
//! connection resets, disk faults, time faults. When the workload is done
//! (or stalls), faults stop and a liveness phase follows (kvlds workloads):
//! every client must be served a fresh request and see everything it has
//! pending answered within `LIVENESS_LIMIT_NS`. Then a quiet phase: every
//! component restarts once more, and client 0 reads everything back
//! (durability).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{ConnClosed, ConnId, DiskErrorKind, DiskOp, DiskOpId, ExitReason, Input, Output};
use kivaloo::kvlds_proto::KvldsRequest;
use kivaloo::lbs_proto::LbsRequest;
use kivaloo::packet::PacketDecoder;
use kivaloo::Instant;
use kivaloo_nodes::kvlds::KvldsConfig;
use kivaloo_nodes::lbs::LbsConfig;
use kivaloo_nodes::mux::MuxConfig;

use crate::client::Client;
use crate::enumerate::{CrashPlan, CrashPoint, ForcedCrash};
use crate::kvlds_workload::KvldsClient;
use crate::lbs_workload::LbsClient;
use crate::link::{Dir, End, Link};
use crate::process::{Config, Kind, Proc};
use crate::rng::{Concern, Stream};
use crate::scenario::{Drawn, Scenario};
use crate::storage::{DiskFaults, SimDisk};
use crate::tape::{Cut, FaultNote, FaultTape, Source};
use crate::time::{EventQueue, MS, SEC, US};
use crate::trace::Trace;

/// How long the quiet phase may take before the run fails for liveness.
pub const QUIET_PHASE_LIMIT_NS: u64 = 60 * SEC;
/// Virtual time after which a run that has not finished its workload fails.
pub const RUN_LIMIT_NS: u64 = 3600 * SEC;
/// While faults are on, a client that has heard nothing for this long
/// (faults keep the store down, or it hangs) ends the workload: the quiet
/// phase follows, where liveness is required.
pub const STALL_LIMIT_NS: u64 = 120 * SEC;
/// How long a request may wait for its answer while its connection stays
/// up (a crash or reset ends the connection and makes it indeterminate):
/// far more than any commit, disk or network delay a scenario draws.
pub const ANSWER_LIMIT_NS: u64 = 30 * SEC;
/// A node whose upstream closed must exit within this much virtual time.
pub const UPSTREAM_EXIT_LIMIT_NS: u64 = SEC;
/// Once faults stop, every client must have been served a fresh request,
/// with nothing left pending, within this much virtual time (components
/// down at that moment restart and recover in it).
pub const LIVENESS_LIMIT_NS: u64 = 30 * SEC;

/// What happens next.
enum Ev {
    /// A disk operation of component `proc`'s incarnation `inc` completes
    /// (it is executed now).
    Disk { proc: usize, inc: u64, id: DiskOpId, op: DiskOp },
    /// Bytes reach the receiving end of `link` in `dir`; `tainted` if a
    /// node emitted them after one of its fsyncs failed.
    Arrive { link: u64, dir: Dir, data: Bytes, tainted: bool },
    /// The sender in `dir` learns its bytes were transmitted.
    Sent { link: u64, dir: Dir, len: u64 },
    /// The receiver in `dir` learns the sender closed (after its last
    /// bytes).
    Closed { link: u64, dir: Dir },
    /// Component `proc`'s timer, for incarnation `inc`.
    Timer { proc: usize, inc: u64 },
    /// The clients may act.
    ClientTick,
    /// About every virtual ms (at random intervals, so that crashes land
    /// between any two events) while faults are on: maybe crash, maybe
    /// reset.
    Chaos,
    /// Component `proc` may start again (once the next one accepts).
    Restart { proc: usize },
    /// Start component `proc` if it is due and the next one accepts.
    TryStart { proc: usize },
    /// Hand the bytes held for the receiver in `dir` over, in order.
    DeliverHeld { link: u64, dir: Dir },
    /// Component `proc`'s incarnation `inc` was told its upstream closed
    /// `UPSTREAM_EXIT_LIMIT_NS` ago: it must have exited.
    UpstreamExitDue { proc: usize, inc: u64 },
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub failure: Option<String>,
    pub trace_hash: u64,
    pub trace: Vec<String>,
    pub drawn: Drawn,
    pub virtual_ns: u64,
    pub requests: u64,
    /// Writes acknowledged: blocks (lbs) or modifying requests (kvlds).
    pub acked: u64,
    pub crashes: u64,
    pub power_losses: u64,
    pub resets: u64,
    pub node_exits: u64,
    /// The disk was damaged (bit rot, misdirected writes).
    pub damaged: bool,
    /// The run ended because the store reported damage (refused to start
    /// or to serve) after faults stopped: all a damaged store owes.
    pub corruption_reported: bool,
    /// How often each hard path was reached (coverage probes): node events
    /// recognised in lbs's log, kvlds's own counters, every disk fault
    /// injected, crashes.
    pub probes: BTreeMap<String, u64>,
    /// Space oracle scenarios: the most lbs's files held, over the bytes
    /// of the tree's pages as lbs records, once it was checked.
    pub space_ratio_max: Option<f64>,
    /// Every fault decided (chaos first, then the disk's), numbered per
    /// source, with whether the replay's cut kept it (`tape.rs`).
    pub fault_tape: Vec<FaultNote>,
    /// The power loss a crash plan forced, if the run reached its point.
    pub forced_crash: Option<ForcedCrash>,
}

/// lbs log lines that mark a hard path, and the probe each counts for.
const LOG_PROBES: &[(&str, &str)] = &[
    ("discarding", "lbs: torn tail cut at recovery"),
    ("first write was torn", "lbs: torn new file removed at recovery"),
    ("rewriting a header", "lbs: torn header rewritten at recovery"),
    ("were freed", "lbs: freed file removed"),
    ("is corrupt", "lbs: corruption reported on GET"),
    ("failed:", "lbs: connection dropped on a disk error"),
];

/// The message a panic carried.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

impl Outcome {
    /// The outcome of a run that panicked.
    pub fn panicked(seed: u64, drawn: Drawn, failure: String) -> Outcome {
        Outcome {
            seed,
            failure: Some(failure),
            trace_hash: 0,
            trace: Vec::new(),
            drawn,
            virtual_ns: 0,
            requests: 0,
            acked: 0,
            crashes: 0,
            power_losses: 0,
            resets: 0,
            node_exits: 0,
            damaged: false,
            corruption_reported: false,
            probes: BTreeMap::new(),
            space_ratio_max: None,
            fault_tape: Vec::new(),
            forced_crash: None,
        }
    }
}

/// Everything of one run.
pub struct World {
    q: EventQueue<Ev>,
    trace: Trace,
    drawn: Drawn,
    /// The chain, front (the client's server) first; each component but the
    /// last reaches the next as its upstream.
    procs: Vec<Proc>,
    /// Open connections by the server's connection id.
    links: BTreeMap<u64, Link>,
    next_conn: u64,
    /// Each client's connection to the front component, by slot.
    client_links: Vec<Option<u64>>,
    client: Client,
    time_rng: Stream,
    net_rng: Stream,
    disk_rng: Stream,
    crash_rng: Stream,
    /// Restart delays (apart from the crash stream, so that a crash cut
    /// by a replay shifts no later chaos).
    restart_rng: Stream,
    work_rng: Stream,
    /// Faults have stopped (the liveness phase, then the quiet phase).
    faults_off: bool,
    /// The liveness phase began at this virtual time (and is not over).
    liveness_since: Option<u64>,
    quiet: bool,
    quiet_since: u64,
    failure: Option<String>,
    /// A damaged store reported the damage in the quiet phase: done.
    ended_by_damage: bool,
    /// kvlds chain: the disk was damaged and a component reported it
    /// (lbs named a corrupt block, refused to start, or a component
    /// stopped serving for no other reason). The workload ends; if the
    /// store still does not serve after faults stop, so does the run.
    corruption_reported: bool,
    /// When the disk was first damaged (virtual ns).
    first_damage_ns: Option<u64>,
    /// kvlds's configured cache bound in pages (`-C`), 0 without kvlds.
    kvlds_cache_pages: u64,
    /// Disk errors lbs got over the whole run.
    lbs_disk_errors: u64,
    crashes: u64,
    power_losses: u64,
    resets: u64,
    node_exits: u64,
    client_connections: u64,
    upstream_connections: u64,
    /// When the client last heard from the store (virtual ns).
    last_progress_ns: u64,
    tick_scheduled: bool,
    /// The space oracle's factor, if the scenario states one.
    space_factor: Option<f64>,
    /// lbs's `file_len_min_bytes` and record length.
    file_len_min_bytes: u64,
    record_len_bytes: u64,
    space_ratio_max: Option<f64>,
    /// Damage records already mapped to blocks (lbs chain).
    damage_noted: usize,
    probes: BTreeMap<String, u64>,
    /// Numbers the chaos's faults; a replay's cut says which are carried out.
    chaos_tape: FaultTape,
    /// Crash-state enumeration: the power loss to force, and how often
    /// the run has reached its point.
    crash_plan: Option<CrashPlan>,
    crash_point_hits: u64,
    forced_crash: Option<ForcedCrash>,
    /// The lbs incarnation whose recovery cut a torn tail, until a kvlds
    /// found its root on it.
    torn_tail_cut_by_inc: Option<u64>,
}

impl World {
    /// A world for `scenario` and `seed`.
    pub fn new(scenario: &Scenario, seed: u64, keep_trace: bool) -> World {
        let drawn = scenario.draw(seed);
        let cut =
            |faults: Option<&Vec<u64>>| -> Cut { faults.map(|f| Arc::new(f.iter().copied().collect())) };
        let replay = scenario.replay.as_ref();
        let chaos_tape = FaultTape::new(Source::Chaos, cut(replay.and_then(|r| r.chaos_faults.as_ref())));
        let mut disk = SimDisk::new(drawn.disk.clone());
        *disk.tape_mut() = FaultTape::new(Source::Disk, cut(replay.and_then(|r| r.disk_faults.as_ref())));
        let mut disk = Some(disk);
        let kvlds_cache_pages = drawn.kvlds.as_ref().map_or(0, |k| k.cache_pages);
        let mut work_rng = Stream::new(seed, Concern::Workload);
        let rec = kivaloo_nodes::lbs::layout::record_len(drawn.block_size);
        let lbs_cfg = LbsConfig {
            file_len_min_bytes: drawn.file_blocks * rec,
            read_latency_ns: drawn.read_latency_us * US,
            ..LbsConfig::new(drawn.block_size)
        };
        let mut procs = Vec::new();
        for name in &scenario.components {
            let kind = Kind::parse(name).unwrap_or_else(|| panic!("unknown component {name:?}"));
            procs.push(match kind {
                Kind::Lbs => Proc::new(
                    kind,
                    Config::Lbs(lbs_cfg.clone()),
                    drawn.clock_rate,
                    drawn.timer_late_us,
                    disk.take(),
                ),
                Kind::Kvlds => {
                    let k = drawn.kvlds.as_ref().expect("a kvlds scenario draws kvlds's parameters");
                    let cfg = KvldsConfig {
                        cache_pages_max: Some(k.cache_pages),
                        commit_delay_ns: k.commit_delay_us * US,
                        commit_forced_requests: k.commit_forced_requests,
                        storage_io_cost_ratio: k.storage_cost,
                        check_invariants: true,
                        ..KvldsConfig::default()
                    };
                    Proc::new(kind, Config::Kvlds(cfg), k.clock_rate, k.timer_late_us, None)
                }
                Kind::Mux => {
                    let k = drawn.kvlds.as_ref().expect("a mux scenario draws kvlds's parameters");
                    let cfg = MuxConfig { connections_max: k.mux_connections_max as usize };
                    Proc::new(kind, Config::Mux(cfg), k.clock_rate, k.timer_late_us, None)
                }
            });
        }
        assert!(
            procs.last().is_some_and(|p| p.disk.is_some())
                && procs.iter().filter(|p| p.disk.is_some()).count() == 1,
            "the last component, and only it, owns the disk"
        );
        let w = &scenario.workload;
        let client = match w.kind.as_str() {
            "lbs" => Client::Lbs(LbsClient::new(drawn.block_size, drawn.in_flight, w.requests)),
            _ => {
                let keys = drawn.kvlds.as_ref().map_or(1, |k| k.keys);
                let clients = drawn.kvlds.as_ref().map_or(1, |k| k.clients) as usize;
                let mut c = KvldsClient::new(
                    drawn.block_size,
                    clients,
                    drawn.in_flight,
                    w.requests,
                    keys,
                    &mut work_rng,
                );
                if keep_trace {
                    c.keep_notes();
                }
                if w.updates_only {
                    c.updates_only();
                }
                if w.big_ranges {
                    c.big_ranges();
                }
                Client::Kvlds(c)
            }
        };
        let client_links = vec![None; client.clients()];
        World {
            q: EventQueue::default(),
            trace: Trace::new(keep_trace),
            drawn,
            procs,
            links: BTreeMap::new(),
            next_conn: 1,
            client_links,
            client,
            time_rng: Stream::new(seed, Concern::Time),
            net_rng: Stream::new(seed, Concern::Network),
            disk_rng: Stream::new(seed, Concern::Disk),
            crash_rng: Stream::new(seed, Concern::Crash),
            restart_rng: Stream::new(seed, Concern::Restart),
            work_rng,
            faults_off: false,
            liveness_since: None,
            quiet: false,
            quiet_since: 0,
            failure: None,
            ended_by_damage: false,
            corruption_reported: false,
            first_damage_ns: None,
            kvlds_cache_pages,
            lbs_disk_errors: 0,
            crashes: 0,
            power_losses: 0,
            resets: 0,
            node_exits: 0,
            client_connections: 0,
            upstream_connections: 0,
            last_progress_ns: 0,
            tick_scheduled: false,
            space_factor: w.space_factor,
            file_len_min_bytes: lbs_cfg.file_len_min_bytes,
            record_len_bytes: rec,
            space_ratio_max: None,
            damage_noted: 0,
            probes: BTreeMap::new(),
            chaos_tape,
            crash_plan: None,
            crash_point_hits: 0,
            forced_crash: None,
            torn_tail_cut_by_inc: None,
        }
    }

    /// kvlds (component `p`) accepts: if it found a root on an lbs whose
    /// recovery cut a torn tail, the probe for that path counts it.
    fn note_root_behind_torn_tail(&mut self, p: usize) {
        let Some(lbs) = self.procs.get(p + 1) else { return };
        if self.torn_tail_cut_by_inc != Some(lbs.inc) || lbs.node.is_none() {
            return;
        }
        let found_root = self.procs[p]
            .node
            .as_ref()
            .map(|n| n.probes())
            .unwrap_or_default()
            .iter()
            .any(|(name, n)| name == "kvlds.recoveries_found_root" && *n > 0);
        if found_root {
            self.torn_tail_cut_by_inc = None;
            self.probe("sim: kvlds found its root behind a torn tail lbs cut");
        }
    }

    /// Forces a power loss where `plan` says (crash-state enumeration).
    pub fn with_crash_plan(mut self, plan: CrashPlan) -> World {
        self.crash_plan = Some(plan);
        self
    }

    fn now(&self) -> u64 {
        self.q.now().nanos
    }

    /// Whether the chain is lbs alone (its client is the lbs client, whose
    /// oracle maps damage to blocks).
    fn lbs_only(&self) -> bool {
        self.procs.len() == 1
    }

    /// The disk (the last component's).
    fn disk(&self) -> &SimDisk {
        self.procs.last().and_then(|p| p.disk.as_ref()).expect("the last component owns the disk")
    }

    fn disk_damaged(&self) -> bool {
        !self.disk().damage().is_empty()
    }

    fn probe(&mut self, name: &str) {
        *self.probes.entry(name.to_string()).or_default() += 1;
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            let now = self.q.now();
            self.trace.event(now, "FAILURE", &[], || why.clone());
            self.failure = Some(why);
        }
    }

    /// The store reported damage after faults stopped: the run ends here.
    fn end_by_damage(&mut self, why: &str) {
        if !self.ended_by_damage {
            let now = self.q.now();
            self.trace.event(now, "damage-end", &[], || format!("the damaged store reported it: {why}"));
            self.ended_by_damage = true;
        }
    }

    /// Runs to the end and reports. A panic (in a node or in the
    /// simulator) is the run's failure; the report still has the run's
    /// fault tape, forced crash and probes up to it.
    pub fn run(mut self, seed: u64) -> Outcome {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_events()));
        if let Err(panic) = ran {
            self.fail(format!("panicked: {}", panic_message(panic.as_ref())));
        }
        self.report(seed)
    }

    /// The event loop, until the run is verified, ends or fails.
    fn run_events(&mut self) {
        for p in (0..self.procs.len()).rev() {
            self.try_start(p);
        }
        self.q.after(MS, Ev::Chaos);
        while self.failure.is_none() {
            if self.client.verified() || self.ended_by_damage {
                break;
            }
            if self.now() > RUN_LIMIT_NS {
                self.fail(format!("the workload did not finish in {} s of virtual time", RUN_LIMIT_NS / SEC));
                break;
            }
            if self.quiet && self.now() - self.quiet_since > QUIET_PHASE_LIMIT_NS {
                let state = self.describe_state();
                self.fail(format!(
                    "liveness: faults stopped {} s ago and the final check has not finished: {state}",
                    QUIET_PHASE_LIMIT_NS / SEC,
                ));
                break;
            }
            let Some(ev) = self.q.pop() else {
                let state = self.describe_state();
                self.fail(format!("nothing left to happen, but the run is not finished: {state}"));
                break;
            };
            self.handle(ev);
            if let Some(since) = self.liveness_since {
                if self.client.liveness_done() {
                    self.probe("sim: liveness phases passed");
                    self.begin_quiet_phase(
                        "every client was served after faults stopped; restart and read back",
                    );
                } else if self.corruption_reported {
                    self.begin_quiet_phase("the store reported damage; restart and read back");
                } else if self.now() - since > LIVENESS_LIMIT_NS {
                    let (clients, state) = (self.client.liveness_state(), self.describe_state());
                    self.fail(format!(
                        "liveness: faults stopped {} s ago and not every client has been served: {clients}; {state}",
                        LIVENESS_LIMIT_NS / SEC
                    ));
                    break;
                }
            } else if !self.faults_off {
                if self.client.workload_done() {
                    self.stop_faults("the workload is done; faults stop");
                } else if self.corruption_reported {
                    self.begin_quiet_phase("the store reported damage; faults stop; restart and read back");
                } else if let Some(sent) = self
                    .client
                    .oldest_pending_ns()
                    .filter(|&sent| self.now().saturating_sub(sent) > ANSWER_LIMIT_NS)
                {
                    let state = self.describe_state();
                    self.fail(format!(
                        "liveness: a request sent at {sent} ns has had no answer for {} s while its \
                         connection and kvlds stayed up: {state}",
                        ANSWER_LIMIT_NS / SEC
                    ));
                    break;
                } else if self.now().saturating_sub(self.last_progress_ns) > STALL_LIMIT_NS {
                    self.probe("sim: workload stalled");
                    self.stop_faults("no response for a long time; faults stop");
                }
            }
        }
        if self.failure.is_none() {
            if let Client::Kvlds(c) = &self.client {
                if let Err(e) = c.final_check(self.first_damage_ns) {
                    self.fail(e);
                }
            }
        }
    }

    /// The run's outcome.
    fn report(mut self, seed: u64) -> Outcome {
        let mut probes = std::mem::take(&mut self.probes);
        for p in &self.procs {
            if let Some(disk) = &p.disk {
                for (name, n) in disk.fault_counts().pairs() {
                    *probes.entry(format!("disk: {name}")).or_default() += n;
                }
            }
            for (name, n) in p.probes() {
                *probes.entry(name).or_default() += n;
            }
            *probes.entry(format!("sim: {} crashes", p.name())).or_default() += p.crashes;
            *probes.entry(format!("sim: {} exits", p.name())).or_default() += p.exits;
        }
        probes.insert("sim: crashes".into(), self.crashes);
        probes.insert("sim: power losses".into(), self.power_losses);
        probes.insert("sim: connection resets".into(), self.resets);
        probes.insert("sim: client reconnections".into(), self.client_connections.saturating_sub(1));
        if self.procs.len() > 1 {
            probes.insert("sim: upstream reconnections".into(), self.upstream_connections.saturating_sub(1));
        }
        if self.ended_by_damage {
            probes.insert("sim: runs ended with damage reported".into(), 1);
        }
        let damaged = match &self.client {
            Client::Lbs(c) => c.damaged,
            Client::Kvlds(_) => self.disk_damaged(),
        };
        let mut fault_tape = self.chaos_tape.notes().to_vec();
        fault_tape.extend_from_slice(self.disk().tape().notes());
        Outcome {
            forced_crash: self.forced_crash,
            fault_tape,
            probes,
            seed,
            failure: self.failure,
            trace_hash: self.trace.hash(),
            trace: self.trace.lines().to_vec(),
            drawn: self.drawn,
            virtual_ns: self.q.now().nanos,
            requests: self.client.requests(),
            acked: self.client.acked(),
            crashes: self.crashes,
            power_losses: self.power_losses,
            resets: self.resets,
            node_exits: self.node_exits,
            damaged,
            corruption_reported: self.ended_by_damage,
            space_ratio_max: self.space_ratio_max,
        }
    }

    /// The space oracle (scenarios with `space_factor`): once the workload
    /// is half done, and until faults stop, lbs's files hold at most the
    /// factor times the tree's pages (as lbs records) plus two files.
    fn check_space(&mut self) {
        let Some(factor) = self.space_factor else { return };
        if self.faults_off {
            return;
        }
        let Client::Kvlds(c) = &self.client else { return };
        if c.stats.requests * 2 < c.budget() {
            return;
        }
        let Some((tree_pages, log_blocks)) =
            self.procs.iter().find_map(|p| p.node.as_ref().and_then(|n| n.kvlds_tree_pages()))
        else {
            return;
        };
        let stored = self.disk().stored_bytes();
        let live = tree_pages * self.record_len_bytes;
        let ratio = stored as f64 / live.max(1) as f64;
        self.space_ratio_max = Some(self.space_ratio_max.map_or(ratio, |m| m.max(ratio)));
        let allowed = factor * live as f64 + 2.0 * self.file_len_min_bytes as f64;
        if stored as f64 > allowed {
            self.fail(format!(
                "space: lbs holds {stored} bytes for a tree of {tree_pages} pages ({live} bytes as records; \
                 kvlds's log spans {log_blocks} blocks): \
                 {ratio:.2} times, above the {factor} times (plus two files of {} bytes) allowed",
                self.file_len_min_bytes
            ));
        }
    }

    /// Where a stuck run stands: requests in flight, each component's state
    /// and each connection's.
    fn describe_state(&self) -> String {
        let connected = self.client_links.iter().filter(|l| l.is_some()).count();
        let mut parts = vec![format!(
            "{} client requests in flight, {connected} of {} clients connected",
            self.client.in_flight(),
            self.client_links.len()
        )];
        for p in &self.procs {
            let timer = p.node.as_ref().and_then(|n| n.poll_timeout()).map(|t| t.nanos);
            parts.push(format!(
                "{} {} (accepting {}, timer {timer:?})",
                p.name(),
                if p.node.is_some() { "up" } else { "down" },
                p.accepting
            ));
        }
        for l in self.links.values() {
            for dir in [Dir::ToServer, Dir::ToRequester] {
                let h = l.half(dir);
                parts.push(format!(
                    "{} {dir:?}: reading {}, {} pieces held, sender closed {}, receiver gone {}",
                    l.id,
                    h.reading,
                    h.held.len(),
                    h.sender_closed,
                    h.receiver_gone
                ));
            }
        }
        parts.join("; ")
    }

    /// Faults stop (no more crashes, resets or disk faults) and the
    /// liveness phase begins, if the workload has one; otherwise the quiet
    /// phase.
    fn stop_faults(&mut self, why: &str) {
        self.faults_off = true;
        for p in &mut self.procs {
            if let Some(disk) = &mut p.disk {
                disk.set_faults(DiskFaults::default());
            }
        }
        if self.client.start_liveness() {
            let now = self.q.now();
            self.trace.event(now, "liveness", &[], || format!("{why}; every client must be served"));
            self.liveness_since = Some(now.nanos);
            self.schedule_tick(0);
        } else {
            self.begin_quiet_phase(why);
        }
    }

    /// Faults stop (if they had not); every component is crashed once more
    /// (the one with the disk by a power loss, so that recovery is checked
    /// too) and restarted, and client 0 reads everything back.
    fn begin_quiet_phase(&mut self, why: &str) {
        self.faults_off = true;
        self.liveness_since = None;
        self.quiet = true;
        self.quiet_since = self.now();
        let now = self.q.now();
        self.trace.event(now, "quiet", &[], || why.to_string());
        for p in &mut self.procs {
            if let Some(disk) = &mut p.disk {
                disk.set_faults(DiskFaults::default());
            }
        }
        for slot in 0..self.client_links.len() {
            if let Some(key) = self.client_links[slot].take() {
                self.links.remove(&key);
                self.client.on_disconnected(slot);
            }
        }
        for p in 0..self.procs.len() {
            let power = self.procs[p].disk.is_some();
            self.crash(p, power);
        }
        let now = self.now();
        self.client.effects_end_now(now);
        self.client.start_verify();
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Disk { proc, inc, id, op } => self.disk_op(proc, inc, id, op),
            Ev::Arrive { link, dir, data, tainted } => self.arrive(link, dir, data, tainted),
            Ev::Sent { link, dir, len } => {
                let Some(l) = self.links.get(&link) else { return };
                if l.half(dir).sender_closed {
                    return;
                }
                let sender = l.sender(dir);
                if let End::Proc(p) = sender {
                    let conn = l.conn_seen_by(sender);
                    if self.end_alive(l, sender) {
                        self.input(p, Input::Sent { conn, len_bytes: len });
                    }
                }
            }
            Ev::Closed { link, dir } => self.closed(link, dir),
            Ev::Timer { proc, inc } => {
                let p = &mut self.procs[proc];
                if inc != p.inc {
                    return;
                }
                p.timer_at = None;
                let due = p.node.as_ref().and_then(|n| n.poll_timeout());
                if due.is_some_and(|t| t <= p.clock(self.q.now().nanos)) {
                    *self.probes.entry("sim: node timers fired".into()).or_default() += 1;
                    self.input(proc, Input::Timeout);
                } else if due.is_some() {
                    self.drain(proc); // re-arm for the rounding of the clock rate
                }
            }
            Ev::ClientTick => {
                self.tick_scheduled = false;
                self.client_tick();
            }
            Ev::Chaos => self.chaos(),
            Ev::DeliverHeld { link, dir } => {
                while let Some((r, conn, data)) = self.next_held(link, dir) {
                    self.input(r, Input::Received { conn, data });
                }
            }
            Ev::Restart { proc } => {
                let p = &mut self.procs[proc];
                p.restart_pending = false;
                p.want_start = true;
                self.try_start(proc);
            }
            Ev::TryStart { proc } => self.try_start(proc),
            Ev::UpstreamExitDue { proc, inc } => {
                let p = &self.procs[proc];
                if p.inc == inc && p.node.is_some() {
                    let name = p.name();
                    self.fail(format!(
                        "{name} kept running {} ms after its upstream closed (it must exit)",
                        UPSTREAM_EXIT_LIMIT_NS / MS
                    ));
                }
            }
        }
    }

    /// The next piece held for the receiver of `dir` on `link`, with the
    /// receiving component and its name for the connection, if it reads now.
    fn next_held(&mut self, link: u64, dir: Dir) -> Option<(usize, ConnId, Bytes)> {
        let l = self.links.get_mut(&link)?;
        let receiver = l.receiver(dir);
        let End::Proc(r) = receiver else { return None };
        let conn = l.conn_seen_by(receiver);
        let h = l.half_mut(dir);
        if h.receiver_gone || !h.reading {
            return None;
        }
        Some((r, conn, h.held.pop_front()?))
    }

    /// Executes a disk operation of component `p` and hands it the result.
    fn disk_op(&mut self, p: usize, inc: u64, id: DiskOpId, op: DiskOp) {
        let pr = &mut self.procs[p];
        if inc != pr.inc || pr.node.is_none() {
            return;
        }
        let Some(disk) = pr.disk.as_mut() else { return };
        disk.tape_mut().now_ns = self.q.now().nanos;
        let result = disk.execute(&op, &mut self.disk_rng);
        let name = pr.name();
        if let Err(e) = &result {
            pr.disk_errors += 1;
            self.lbs_disk_errors += 1;
            if matches!(op, DiskOp::SyncFile { .. }) && e.kind == DiskErrorKind::Io {
                pr.fsync_failed = true;
            }
        }
        self.note_first_damage();
        let now = self.q.now();
        let failed = result.is_err();
        self.trace.event(now, "disk", &[p as u64, id.0, failed as u64], || {
            format!("{name}: {} -> {:?}", op.verb(), result.as_ref().map(|d| d.describe()))
        });
        if !failed && self.at_crash_point(&op) {
            return self.forced_power_loss();
        }
        self.input(p, Input::Disk { id, result });
    }

    /// Whether the disk operation just done (successfully) is the crash
    /// plan's point, at its occurrence.
    fn at_crash_point(&mut self, op: &DiskOp) -> bool {
        let Some(plan) = &self.crash_plan else { return false };
        if self.forced_crash.is_some() || self.quiet {
            return false;
        }
        let here = match (plan.point, op) {
            (CrashPoint::MidAppend, DiskOp::Write { .. }) => true,
            (CrashPoint::NewFileBeforeDirSync, _) => self.disk().synced_file_not_yet_in_durable_dir(),
            (CrashPoint::MidCleaning, DiskOp::Write { .. }) => {
                self.procs.iter().any(|q| q.node.as_ref().is_some_and(|n| n.cleaning_in_flight()))
            }
            (CrashPoint::MidFree, _) => self.disk().removal_not_yet_durable(),
            _ => false,
        };
        if here {
            self.crash_point_hits += 1;
        }
        here && self.crash_point_hits == plan.occurrence
    }

    /// The crash plan's power loss: every component dies at once (the
    /// disk's owner last, its disk keeping what the plan's choices say),
    /// and faults stop; the run goes on to its liveness and quiet phases.
    fn forced_power_loss(&mut self) {
        let plan = self.crash_plan.clone().expect("a crash plan");
        let now = self.q.now();
        self.trace.event(now, "forced", &[], || {
            format!("power loss forced at {} #{} (enumeration)", plan.point, plan.occurrence)
        });
        let (mut arities, mut taken) = (Vec::new(), Vec::new());
        for p in 0..self.procs.len() {
            if self.procs[p].disk.is_some() {
                self.procs[p].kill();
                self.procs[p].crashes += 1;
                self.crashes += 1;
                self.power_losses += 1;
                let disk = self.procs[p].disk.as_mut().expect("the disk");
                let mut i = 0;
                disk.crash_choosing(
                    &mut |options| {
                        let c = plan.choices.get(i).copied().unwrap_or(0).min(options - 1);
                        i += 1;
                        arities.push(options);
                        taken.push(c);
                        c
                    },
                    &mut self.disk_rng,
                );
                self.node_gone(p);
            } else if self.procs[p].node.is_some() {
                self.crash(p, false);
            }
        }
        let name = plan.point.name();
        self.forced_crash = Some(ForcedCrash { at_ns: now.nanos, arities, taken });
        self.stop_faults(&format!("power loss forced at {name}; faults stop"));
    }

    /// Remembers when the disk was first damaged.
    fn note_first_damage(&mut self) {
        if self.first_damage_ns.is_none() && self.disk_damaged() {
            self.first_damage_ns = Some(self.now());
            let now = self.q.now();
            self.trace.event(now, "damage", &[], || "the disk is damaged from now on".into());
        }
    }

    /// Whether `end` of `l` is still the incarnation the link belongs to.
    fn end_alive(&self, l: &Link, end: End) -> bool {
        match end {
            End::Client => true,
            End::Proc(p) => self.procs[p].node.is_some() && self.procs[p].inc == l.inc_of(end),
        }
    }

    /// Bytes reach the receiver of `dir` on `link`.
    fn arrive(&mut self, link: u64, dir: Dir, data: Bytes, tainted: bool) {
        let Some(l) = self.links.get_mut(&link) else { return };
        let receiver = l.receiver(dir);
        match receiver {
            End::Client => self.deliver_to_client(link, data, tainted),
            End::Proc(r) => {
                let conn = l.conn_seen_by(receiver);
                let h = l.half_mut(dir);
                if h.receiver_gone {
                    return;
                }
                if !h.reading || !h.held.is_empty() {
                    h.held.push_back(data);
                    return;
                }
                self.input(r, Input::Received { conn, data });
            }
        }
    }

    /// The receiver of `dir` on `link` learns that the sender closed; the
    /// link is gone.
    fn closed(&mut self, link: u64, dir: Dir) {
        let Some(l) = self.links.remove(&link) else { return };
        let receiver = l.receiver(dir);
        let now = self.q.now();
        let h = l.half(dir);
        let reason = h.close_reason.clone();
        let sender_died = h.sender_died;
        match receiver {
            End::Client => {
                let Some(slot) = self.slot_of(link) else { return };
                self.client_links[slot] = None;
                self.trace.event(now, "closed", &[link], || {
                    format!("client {slot}: {} closed by {}: {reason}", l.id, self.procs[l.server].name())
                });
                self.judge_client_link_closed(&l, &reason, sender_died);
                self.client.on_disconnected(slot);
                self.schedule_tick(MS);
            }
            End::Proc(r) => {
                if h.receiver_gone || !self.end_alive(&l, receiver) {
                    return;
                }
                let conn = l.conn_seen_by(receiver);
                let name = self.procs[r].name();
                self.trace.event(now, "closed", &[link], || {
                    let peer = match l.sender(dir) {
                        End::Proc(i) => self.procs[i].name(),
                        End::Client => "the client",
                    };
                    format!("{name}: {} closed by {peer}: {reason}", conn_label(conn, l.id))
                });
                if conn == ConnId::UPSTREAM {
                    let server_name = self.procs[l.server].name();
                    if !sender_died && self.procs[l.server].inc == l.server_inc {
                        // The upstream dropped this component on purpose (it
                        // did not die): for lbs, a disk error or damage must
                        // explain it; kvlds drops a connection only for a
                        // malformed or over-limit request, which the mux
                        // never forwards, so nothing explains that.
                        let explained = self.procs[l.server].kind == Kind::Lbs
                            && (self.procs[l.server].disk_errors > 0 || self.disk_damaged());
                        if !explained {
                            self.fail(format!(
                                "{server_name} dropped {name}'s connection without a disk fault to explain it: \
                                 {reason}"
                            ));
                        }
                    }
                    let pr = &mut self.procs[r];
                    pr.upstream = None;
                    pr.upstream_closed = true;
                    let inc = pr.inc;
                    self.q.after(UPSTREAM_EXIT_LIMIT_NS, Ev::UpstreamExitDue { proc: r, inc });
                }
                self.input(r, Input::Closed { conn, reason: ConnClosed::PeerClosed });
            }
        }
    }

    /// The front component closed the client's connection (on purpose, or
    /// by dying): legitimate or not.
    fn judge_client_link_closed(&mut self, l: &Link, reason: &str, sender_died: bool) {
        let died = sender_died || self.procs[l.server].inc != l.server_inc;
        if self.lbs_only() {
            if self.quiet {
                let damaged = matches!(&self.client, Client::Lbs(c) if c.damage_touches_live());
                if damaged {
                    // Damage reported, not returned: that is all a damaged
                    // store owes.
                    self.end_by_damage(reason);
                } else {
                    self.fail(format!("the node dropped the connection after faults stopped: {reason}"));
                }
            }
            return;
        }
        let name = self.procs[l.server].name();
        if self.quiet {
            if self.corruption_reported {
                self.end_by_damage(reason);
            } else {
                self.fail(format!("{name} dropped the client's connection after faults stopped: {reason}"));
            }
        } else if !died {
            // kvlds and the mux drop a client only for a malformed or
            // over-limit request (or the mux, one that does not read its
            // answers), which these clients never send (or do): damage
            // explains none of it.
            self.fail(format!(
                "{name} dropped the client's connection without a fault to explain it: {reason}"
            ));
        }
    }

    /// kvlds chain: a component reported damage that the disk really has.
    fn report_corruption(&mut self, what: &str) {
        if !self.corruption_reported {
            self.corruption_reported = true;
            let now = self.q.now();
            self.trace.event(now, "corruption", &[], || format!("reported: {what}"));
            self.probe("sim: damage reported");
        }
    }

    /// The client whose connection `link` is.
    fn slot_of(&self, link: u64) -> Option<usize> {
        self.client_links.iter().position(|l| *l == Some(link))
    }

    fn chaos(&mut self) {
        if self.faults_off {
            return;
        }
        self.chaos_tape.now_ns = self.now();
        // The crash stream draws the same values every tick, whatever is up
        // (a victim is picked among those alive by the same draw): so a
        // fault cut by a replay moves no other chaos fault in time.
        let crash = self.crash_rng.chance(self.drawn.crash_per_ms);
        let (victim_draw, power_draw) = if crash {
            (self.crash_rng.u64(), self.crash_rng.chance(self.drawn.power_loss))
        } else {
            (0, false)
        };
        // Every decision is numbered on the tape, whether or not anything
        // is up to suffer it, so that the numbers do not depend on the
        // state either.
        let alive: Vec<usize> = (0..self.procs.len()).filter(|p| self.procs[*p].node.is_some()).collect();
        if crash {
            let victim = (!alive.is_empty()).then(|| alive[(victim_draw % alive.len() as u64) as usize]);
            // A process crash keeps the page cache; a power loss takes the
            // machine of the component that owns the disk.
            let power = victim.is_some_and(|v| self.procs[v].disk.is_some()) && power_draw;
            let what = match victim {
                None => "crash (nothing up)",
                Some(_) if power => "power loss",
                Some(_) => "crash",
            };
            if let (true, Some(victim)) = (self.chaos_tape.admit(what), victim) {
                self.crash(victim, power);
            }
        }
        let reset = self.crash_rng.chance(self.drawn.reset_per_ms);
        let slot_draw = if reset { self.crash_rng.u64() } else { 0 };
        let connected: Vec<usize> =
            (0..self.client_links.len()).filter(|s| self.client_links[*s].is_some()).collect();
        if reset {
            let slot =
                (!connected.is_empty()).then(|| connected[(slot_draw % connected.len() as u64) as usize]);
            let what = if slot.is_some() { "connection reset" } else { "connection reset (none connected)" };
            if let (true, Some(slot)) = (self.chaos_tape.admit(what), slot) {
                self.resets += 1;
                self.disconnect_client(slot, ConnClosed::Failed("connection reset".into()));
            }
        }
        self.q.after(self.crash_rng.range(1, 2 * MS), Ev::Chaos);
    }

    /// Client `slot`'s connection ends on the client's side: reset (a
    /// fault) or closed (the client leaves); the server learns at once.
    fn disconnect_client(&mut self, slot: usize, reason: ConnClosed) {
        let Some(key) = self.client_links[slot].take() else { return };
        let Some(l) = self.links.remove(&key) else { return };
        let now = self.q.now();
        self.trace.event(now, "disconnect", &[key], || format!("client {slot}: {} {reason:?}", l.id));
        self.client.on_disconnected(slot);
        let server = End::Proc(l.server);
        if !l.to_server.receiver_gone && self.end_alive(&l, server) {
            self.input(l.server, Input::Closed { conn: l.id, reason });
        }
        self.schedule_tick(MS);
    }

    /// Component `p` dies (a power loss of its disk too if `power`); it
    /// restarts later.
    fn crash(&mut self, p: usize, power: bool) {
        let now = self.q.now();
        if self.procs.iter().any(|q| q.node.as_ref().is_some_and(|n| n.cleaning_in_flight())) {
            *self.probes.entry("sim: crashes during a cleaning commit".into()).or_default() += 1;
        }
        if self.procs[p].node.is_some() {
            self.procs[p].kill();
            self.procs[p].crashes += 1;
            self.crashes += 1;
        }
        let name = self.procs[p].name();
        self.trace.event(now, "crash", &[p as u64, power as u64], || {
            if power {
                format!("{name}: power loss")
            } else {
                format!("{name}: process crash")
            }
        });
        if power {
            self.power_losses += 1;
            if let Some(disk) = self.procs[p].disk.as_mut() {
                disk.tape_mut().now_ns = now.nanos;
                disk.crash(&mut self.disk_rng);
            }
            self.note_first_damage();
        }
        self.node_gone(p);
    }

    /// Component `p`'s node is gone (crashed or exited): what it sent still
    /// reaches its peers (it was in the kernel's socket buffers), then they
    /// learn its connections closed; it restarts later.
    fn node_gone(&mut self, p: usize) {
        let pr = &mut self.procs[p];
        pr.inc += 1;
        pr.accepting = false;
        pr.timer_at = None;
        pr.upstream = None;
        pr.upstream_closed = false;
        let now = self.now();
        let me = End::Proc(p);
        let mut closes = Vec::new();
        for (key, l) in self.links.iter_mut() {
            for dir in [Dir::ToServer, Dir::ToRequester] {
                let (sender, receiver) = (l.sender(dir), l.receiver(dir));
                let h = l.half_mut(dir);
                if sender == me && !h.sender_closed {
                    h.sender_closed = true;
                    h.sender_died = true;
                    h.close_reason = "the node died".into();
                    closes.push((h.pipe.last_arrival_ns().max(now) + 1, *key, dir));
                }
                if receiver == me {
                    h.receiver_gone = true;
                    h.held.clear();
                }
            }
        }
        for (at, link, dir) in closes {
            self.q.at(Instant::from_nanos(at), Ev::Closed { link, dir });
        }
        let pr = &mut self.procs[p];
        pr.want_start = false;
        if !pr.restart_pending {
            pr.restart_pending = true;
            let delay = self.restart_rng.range(MS, 20 * MS);
            self.q.after(delay, Ev::Restart { proc: p });
        }
    }

    /// Starts component `p` if its restart is due, it is down, and the next
    /// component (its upstream) is up and accepting.
    fn try_start(&mut self, p: usize) {
        let pr = &self.procs[p];
        if pr.node.is_some() || !pr.want_start || pr.restart_pending {
            return;
        }
        if let Some(up) = self.procs.get(p + 1) {
            if up.node.is_none() || !up.accepting {
                return; // started when it accepts
            }
        }
        self.start(p);
    }

    fn start(&mut self, p: usize) {
        let lbs_disk_errors = self.lbs_disk_errors;
        let pr = &mut self.procs[p];
        pr.want_start = false;
        pr.inc += 1;
        pr.served = false;
        pr.fsync_failed = false;
        pr.disk_errors = 0;
        pr.upstream_closed = false;
        pr.lbs_disk_errors_at_start = lbs_disk_errors;
        let (inc, name) = (pr.inc, pr.name());
        let now = self.q.now();
        let start = self.procs[p].starts + 1;
        self.trace.event(now, "start", &[p as u64, inc], || format!("{name} starts (start {start})"));
        if p + 1 < self.procs.len() {
            // The driver opens the upstream connection before it builds the
            // node (the contract's `ConnId::UPSTREAM`).
            let up = p + 1;
            let id = ConnId(self.next_conn);
            self.next_conn += 1;
            self.upstream_connections += 1;
            let up_name = self.procs[up].name();
            self.trace.event(now, "connect", &[id.0], || format!("{name} -> {up_name}: {id}"));
            let up_inc = self.procs[up].inc;
            self.links.insert(id.0, Link::new(id, up, up_inc, End::Proc(p), inc));
            self.procs[p].upstream = Some(id.0);
            self.input(up, Input::Accepted { conn: id });
        }
        self.procs[p].build();
        self.drain(p);
    }

    fn input(&mut self, p: usize, input: Input) {
        let now = self.procs[p].clock(self.now());
        let Some(node) = self.procs[p].node.as_mut() else { return };
        node.node().handle_input(now, input);
        self.drain(p);
    }

    /// The link and direction component `p` sends on when it names `conn`.
    fn resolve(&self, p: usize, conn: ConnId) -> Option<(u64, Dir)> {
        if conn == ConnId::UPSTREAM {
            return self.procs[p].upstream.map(|k| (k, Dir::ToServer));
        }
        let l = self.links.get(&conn.0)?;
        (l.server == p && l.server_inc == self.procs[p].inc).then_some((conn.0, Dir::ToRequester))
    }

    /// Acts on everything component `p` wants done.
    fn drain(&mut self, p: usize) {
        loop {
            let Some(node) = self.procs[p].node.as_mut() else { return };
            let Some(out) = node.node().poll_output() else { break };
            let now = self.q.now();
            let name = self.procs[p].name();
            match out {
                Output::Send { conn, data } => self.node_sends(p, conn, data),
                Output::Close { conn, reason } => self.node_closes(p, conn, reason),
                Output::ReadInterest { conn, enabled } => {
                    let Some((key, out_dir)) = self.resolve(p, conn) else { continue };
                    let in_dir = out_dir.reverse();
                    let Some(l) = self.links.get_mut(&key) else { continue };
                    let h = l.half_mut(in_dir);
                    h.reading = enabled;
                    self.trace.event(now, "read-interest", &[p as u64, conn.0, enabled as u64], || {
                        format!("{name}: {} reading {enabled}", conn_label(conn, ConnId(key)))
                    });
                    if enabled && !h.held.is_empty() {
                        // Hand over what was held, in order, now.
                        self.q.after(0, Ev::DeliverHeld { link: key, dir: in_dir });
                    }
                }
                Output::Accepting(on) => {
                    let pr = &mut self.procs[p];
                    pr.accepting = on;
                    pr.served |= on;
                    if on && pr.kind == Kind::Kvlds {
                        self.note_root_behind_torn_tail(p);
                    }
                    if on {
                        if p == 0 {
                            self.schedule_tick(0);
                        } else {
                            self.q.after(0, Ev::TryStart { proc: p - 1 });
                        }
                    }
                }
                Output::Disk { id, op } => {
                    if self.procs[p].disk.is_none() {
                        self.fail(format!(
                            "{name} asked for a disk operation ({}) but has no disk",
                            op.verb()
                        ));
                        continue;
                    }
                    let [lo, hi] = self.drawn.disk_latency_us;
                    // Syncs wait for the device: they take longer, which
                    // leaves crashes a window with unsynced writes.
                    let sync = matches!(op, DiskOp::SyncFile { .. } | DiskOp::SyncDir);
                    let delay = self.disk_rng.range(lo, hi) * US * if sync { 8 } else { 1 } + 1;
                    let inc = self.procs[p].inc;
                    self.q.after(delay, Ev::Disk { proc: p, inc, id, op });
                }
                Output::Log { message, .. } => {
                    if self.procs[p].kind == Kind::Lbs {
                        if message.contains("discarding") {
                            self.torn_tail_cut_by_inc = Some(self.procs[p].inc);
                        }
                        for (needle, probe) in LOG_PROBES {
                            if message.contains(needle) {
                                *self.probes.entry(probe.to_string()).or_default() += 1;
                            }
                        }
                        if !self.lbs_only() && message.contains("is corrupt") && self.disk_damaged() {
                            self.report_corruption(&message);
                        }
                    }
                    self.trace.event(now, "log", &[p as u64], || format!("{name}: {message}"));
                }
                Output::Exit(reason) => {
                    self.node_exits += 1;
                    self.procs[p].exits += 1;
                    self.trace.event(now, "exit", &[p as u64], || format!("{name}: {}", reason.message));
                    match self.procs[p].kind {
                        Kind::Lbs => self.lbs_exited(p, reason),
                        Kind::Kvlds => self.kvlds_exited(p, reason),
                        Kind::Mux => self.mux_exited(p, reason),
                    }
                    return;
                }
            }
        }
        self.arm_timer(p);
        if let Some((pages, max)) = self.procs[p].cache_pages() {
            // The node's own bound must be the one configured (0 until it
            // knows its block size), and hold.
            let configured = self.kvlds_cache_pages.max(1) as usize;
            if max != 0 && max != configured {
                self.fail(format!(
                    "kvlds's cache bound is {max} pages, but it was configured with {configured}"
                ));
            } else if pages > configured {
                self.fail(format!("kvlds's cache holds {pages} pages, over its bound of {configured}"));
            }
        }
    }

    /// The node's timer, which fires late by up to the component's lateness.
    fn arm_timer(&mut self, p: usize) {
        let now = self.now();
        let pr = &self.procs[p];
        let due = pr.node.as_ref().and_then(|n| n.poll_timeout()).map(|t| pr.virtual_at(now, t.nanos));
        if let Some(due) = due {
            if pr.timer_at.is_none_or(|t| due < t) {
                let late = self.time_rng.below(pr.timer_late_us + 1) * US;
                let inc = pr.inc;
                self.procs[p].timer_at = Some(due);
                self.q.at(Instant::from_nanos(due + late), Ev::Timer { proc: p, inc });
            }
        }
    }

    /// lbs stopped: legitimate only after a disk error of its own
    /// incarnation, or over damage.
    fn lbs_exited(&mut self, p: usize, reason: ExitReason) {
        let served = self.procs[p].served;
        let probe = if !served {
            "lbs: refused to start"
        } else if reason.message.contains("fsync") {
            "lbs: stopped after a failed fsync"
        } else {
            "lbs: stopped on another disk error"
        };
        self.probe(probe);
        // With lbs alone the client knows which blocks hold acknowledged
        // data; behind kvlds, any damage may be what it found.
        let damaged = if self.lbs_only() {
            self.note_damage();
            matches!(&self.client, Client::Lbs(c) if c.damage_touches_live())
        } else {
            self.disk_damaged()
        };
        let disk_errors = self.procs[p].disk_errors;
        if damaged && !self.lbs_only() && (disk_errors == 0 || !served || self.quiet) {
            self.report_corruption(&reason.message);
        }
        self.procs[p].kill();
        if disk_errors == 0 && !damaged {
            self.fail(format!("lbs exited without a disk fault to explain it: {}", reason.message));
        } else if self.quiet && !damaged {
            self.fail(format!("lbs did not come up after faults stopped: {}", reason.message));
        } else if self.quiet {
            // A damaged store that refuses to start has reported the
            // damage: all it owes.
            self.end_by_damage(&reason.message);
        } else if !served && damaged && self.lbs_only() {
            // Faults stop; if it still refuses without them, the run ends
            // there (above).
            self.node_gone(p);
            self.begin_quiet_phase("the store refused to start over damage; faults stop");
            return;
        }
        self.node_gone(p);
    }

    /// kvlds stopped: normal once its upstream closed; otherwise only over
    /// damage, or after an lbs disk error.
    fn kvlds_exited(&mut self, p: usize, reason: ExitReason) {
        let pr = &self.procs[p];
        let (upstream_closed, lbs_errors_since) =
            (pr.upstream_closed, self.lbs_disk_errors > pr.lbs_disk_errors_at_start);
        self.procs[p].kill();
        if upstream_closed {
            self.probe("kvlds: exited after its upstream closed");
            if self.quiet {
                if self.corruption_reported {
                    self.end_by_damage(&reason.message);
                } else {
                    self.fail(format!(
                        "kvlds exited after faults stopped (its upstream closed): {}",
                        reason.message
                    ));
                }
            }
        } else if self.disk_damaged() {
            self.probe("kvlds: exited over damage");
            self.report_corruption(&reason.message);
            if self.quiet {
                self.end_by_damage(&reason.message);
            }
        } else if lbs_errors_since && !self.quiet {
            self.probe("kvlds: exited after an lbs disk error");
        } else {
            self.fail(format!("kvlds exited without a fault to explain it: {}", reason.message));
        }
        self.node_gone(p);
    }

    /// mux stopped: only once its upstream (kvlds) closed.
    fn mux_exited(&mut self, p: usize, reason: ExitReason) {
        let upstream_closed = self.procs[p].upstream_closed;
        self.procs[p].kill();
        if !upstream_closed {
            self.fail(format!("mux exited, but its upstream had not closed: {}", reason.message));
        } else {
            self.probe("mux: exited after its upstream closed");
            if self.quiet {
                if self.corruption_reported {
                    self.end_by_damage(&reason.message);
                } else {
                    self.fail(format!(
                        "mux exited after faults stopped (its upstream closed): {}",
                        reason.message
                    ));
                }
            }
        }
        self.node_gone(p);
    }

    /// Component `p`'s bytes go towards the peer on `conn`, split at random
    /// points, each piece after a random latency but in order.
    fn node_sends(&mut self, p: usize, conn: ConnId, data: Bytes) {
        let tainted = self.procs[p].fsync_failed;
        let now = self.now();
        let Some((key, dir)) = self.resolve(p, conn) else { return };
        let Some(l) = self.links.get_mut(&key) else { return };
        if l.half(dir).sender_closed {
            return;
        }
        let len = data.len() as u64;
        if let End::Proc(_) = l.requester {
            // Between two nodes: show the messages in a kept trace.
            let name = |end: End| match end {
                End::Proc(i) => self.procs[i].name(),
                End::Client => "client",
            };
            let (from, to) = (name(l.sender(dir)), name(l.receiver(dir)));
            let lbs = self.procs[l.server].kind == Kind::Lbs;
            let h = l.half_mut(dir);
            let wire = data.clone();
            self.trace.event(self.q.now(), "wire", &[key, len], || {
                describe_wire(&mut h.tap, dir, &wire, from, to, lbs)
            });
        }
        let h = l.half_mut(dir);
        for (at, piece) in h.pipe.send(&mut self.net_rng, now, self.drawn.net_latency_us, data) {
            self.q.at(Instant::from_nanos(at), Ev::Arrive { link: key, dir, data: piece, tainted });
        }
        let at = h.pipe.last_arrival_ns();
        self.q.at(Instant::from_nanos(at), Ev::Sent { link: key, dir, len });
    }

    /// Component `p` closes `conn`: its peer learns after the last bytes.
    fn node_closes(&mut self, p: usize, conn: ConnId, reason: String) {
        let now = self.q.now();
        let name = self.procs[p].name();
        let Some((key, dir)) = self.resolve(p, conn) else { return };
        self.trace.event(now, "node-close", &[p as u64, conn.0], || {
            format!("{name}: closes {}: {reason}", conn_label(conn, ConnId(key)))
        });
        let Some(l) = self.links.get_mut(&key) else { return };
        let h = l.half_mut(dir);
        if !h.sender_closed {
            h.sender_closed = true;
            h.close_reason = reason;
            let at = h.pipe.last_arrival_ns().max(now.nanos) + 1;
            self.q.at(Instant::from_nanos(at), Ev::Closed { link: key, dir });
        }
        let back = l.half_mut(dir.reverse());
        back.receiver_gone = true;
        back.held.clear();
        if conn == ConnId::UPSTREAM {
            self.procs[p].upstream = None;
        }
    }

    fn deliver_to_client(&mut self, link: u64, data: Bytes, tainted: bool) {
        let Some(slot) = self.slot_of(link) else { return };
        let Some(l) = self.links.get_mut(&link) else { return };
        let conn = l.id;
        l.decoder.push(&data);
        let mut packets = Vec::new();
        loop {
            match l.decoder.next_packet() {
                Ok(Some(p)) => packets.push(p),
                Ok(None) => break,
                Err(e) => return self.fail(format!("the node sent a malformed packet: {e}")),
            }
        }
        for packet in packets {
            let now = self.q.now();
            self.last_progress_ns = now.nanos;
            let id = packet.id;
            let result = self.client.on_packet(slot, packet, tainted, now.nanos);
            let note = self.client.take_response_note();
            self.trace.event(now, "response", &[id], || match note {
                Some(note) => format!("client {slot}: {conn} response {id:#x}: {note}"),
                None => format!("client {slot}: {conn} response {id:#x}"),
            });
            if let Err(e) = result {
                return self.fail(e);
            }
        }
        self.schedule_tick(0);
    }

    /// Maps the disk's damage to the lbs blocks whose records it touched
    /// (a damaged header: every block of the file). lbs alone only: its
    /// client holds the block-level oracle.
    fn note_damage(&mut self) {
        use crate::storage::Damage;
        use kivaloo_nodes::lbs::layout::{parse_file_name, record_len, FILE_HEADER_LEN};
        let Some(disk) = self.procs.last().and_then(|p| p.disk.as_ref()) else { return };
        let Client::Lbs(client) = &mut self.client else { return };
        let rec = record_len(self.drawn.block_size);
        let mut firsts: Vec<u64> = disk.names().iter().filter_map(|n| parse_file_name(n)).collect();
        let mut ranges = Vec::new();
        let seen = self.damage_noted;
        self.damage_noted = disk.damage().len();
        for d in &disk.damage()[seen..] {
            let (file, spans) = match d {
                Damage::BitRot { file, offset } => (file, vec![(*offset, 1)]),
                Damage::Misdirected { file, intended_offset, landed_offset, len } => {
                    let mut v = vec![(*intended_offset, *len)];
                    v.extend(landed_offset.map(|o| (o, *len)));
                    (file, v)
                }
            };
            let Some(first) = parse_file_name(file) else { continue };
            firsts.push(first);
            ranges.push((first, spans));
        }
        firsts.sort();
        for (first, spans) in ranges {
            for (off, len) in spans {
                if off < FILE_HEADER_LEN {
                    let end = firsts.iter().copied().find(|f| *f > first).unwrap_or(first + 65536);
                    client.damaged_blocks.extend(first..end);
                    continue;
                }
                let lo = first + (off - FILE_HEADER_LEN) / rec;
                let hi = first + (off + len.max(1) - 1 - FILE_HEADER_LEN) / rec;
                client.damaged_blocks.extend(lo..=hi);
            }
        }
    }

    fn schedule_tick(&mut self, delay: u64) {
        if !self.tick_scheduled {
            self.tick_scheduled = true;
            self.q.after(delay, Ev::ClientTick);
        }
    }

    fn client_tick(&mut self) {
        self.check_space();
        if self.lbs_only() {
            let damaged = self.disk_damaged();
            if let Client::Lbs(c) = &mut self.client {
                c.damaged = damaged;
            }
            self.note_damage();
        }
        let n = self.client_links.len();
        if self.liveness_since.is_some() && !self.procs[0].accepting {
            // At the mux's limit, a client that is through the liveness
            // phase leaves to make room for one that is not connected.
            let waiting = (0..n).any(|s| self.client_links[s].is_none() && !self.client.liveness_done_for(s));
            let leaver =
                (0..n).find(|s| self.client_links[*s].is_some() && self.client.liveness_done_for(*s));
            if let (true, Some(slot)) = (waiting, leaver) {
                self.probe("sim: clients left to make room at the mux's limit");
                self.disconnect_client(slot, ConnClosed::PeerClosed);
            }
        }
        // A different client goes first each time (fair use of the budget).
        let first = if n > 1 { self.work_rng.below(n as u64) as usize } else { 0 };
        for i in 0..n {
            let slot = (first + i) % n;
            if self.quiet && slot != 0 {
                continue; // the read-back is client 0's
            }
            self.client_acts(slot);
        }
    }

    /// Client `slot` connects if it is not connected and the front
    /// component accepts, then sends what it wants to.
    fn client_acts(&mut self, slot: usize) {
        let mut out = BytesMut::new();
        let now = self.q.now();
        if self.client_links[slot].is_none() {
            let front = &self.procs[0];
            if !front.accepting || front.node.is_none() {
                return;
            }
            let id = ConnId(self.next_conn);
            self.next_conn += 1;
            self.client_connections += 1;
            self.last_progress_ns = now.nanos;
            let name = front.name();
            let n = self.client_connections;
            self.trace.event(now, "connect", &[id.0], || {
                format!("client {slot} -> {name}: {id} (connection {n} of the run)")
            });
            self.links.insert(id.0, Link::new(id, 0, front.inc, End::Client, 0));
            self.client_links[slot] = Some(id.0);
            self.input(0, Input::Accepted { conn: id });
            if self.client_links[slot].is_none() {
                return;
            }
            self.client.on_connected(slot, &mut out);
        }
        self.client.issue(slot, &mut self.work_rng, now.nanos, &mut out);
        for id in self.client.take_issued() {
            let client = &self.client;
            self.trace.event(now, "request", &[id], || {
                format!("client {slot}: {}", client.describe_request(slot, id))
            });
        }
        if !out.is_empty() {
            let (len, in_flight) = (out.len() as u64, self.client.in_flight() as u64);
            self.trace.event(now, "client-send", &[len, in_flight], || {
                format!("client {slot}: {len} bytes of requests, {in_flight} in flight in all")
            });
            self.client_sends(slot, out.freeze());
        }
    }

    /// Client `slot`'s bytes go towards the front component, split and
    /// delayed, in order.
    fn client_sends(&mut self, slot: usize, data: Bytes) {
        let now = self.now();
        let Some(key) = self.client_links[slot] else { return };
        let Some(l) = self.links.get_mut(&key) else { return };
        for (at, piece) in l.to_server.pipe.send(&mut self.net_rng, now, self.drawn.net_latency_us, data) {
            self.q.at(
                Instant::from_nanos(at),
                Ev::Arrive { link: key, dir: Dir::ToServer, data: piece, tainted: false },
            );
        }
    }
}

/// The messages in `data`, sent from `from` to `to` in `dir` between two
/// nodes, readable (requests decoded, as lbs's if `lbs` is the server, else
/// as kvlds's; responses by id and status). `tap` holds a message split
/// across sends.
fn describe_wire(tap: &mut PacketDecoder, dir: Dir, data: &Bytes, from: &str, to: &str, lbs: bool) -> String {
    tap.push(data);
    let mut parts = Vec::new();
    while let Ok(Some(packet)) = tap.next_packet() {
        let (id, len) = (packet.id, packet.record.len());
        parts.push(match dir {
            Dir::ToServer if !lbs => match KvldsRequest::decode(packet.record) {
                Ok(r) => format!("{id:#x} {:?}", r.kind()),
                Err(e) => format!("{id:#x} undecodable ({e})"),
            },
            Dir::ToServer => match LbsRequest::decode(packet.record) {
                Ok(LbsRequest::Get { block }) => format!("{id:#x} GET {block}"),
                Ok(LbsRequest::Append { count, start, .. }) => format!("{id:#x} APPEND {count} at {start}"),
                Ok(LbsRequest::Free { keep_from }) => format!("{id:#x} FREE below {keep_from}"),
                Ok(r) => format!("{id:#x} {:?}", r.kind()),
                Err(e) => format!("{id:#x} undecodable ({e})"),
            },
            Dir::ToRequester => {
                let status = packet.record.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                match status {
                    Some(status) => format!("{id:#x} status {status}, {len} bytes"),
                    None => format!("{id:#x} {len} bytes"),
                }
            }
        });
    }
    let what =
        if parts.is_empty() { format!("{} bytes (part of a message)", data.len()) } else { parts.join(", ") };
    format!("{from} -> {to}: {what}")
}

/// How a trace names a connection: the upstream by its id on the server's
/// side too.
fn conn_label(conn: ConnId, id: ConnId) -> String {
    if conn == ConnId::UPSTREAM {
        format!("upstream {id}")
    } else {
        conn.to_string()
    }
}
