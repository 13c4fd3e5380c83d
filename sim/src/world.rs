//! One simulated run: the lbs node (the real state machine, driven through
//! the same contract as the tokio runtime), its simulated disk, a simulated
//! connection to one client, virtual time, and chaos: crashes (process or
//! power), connection resets, disk faults. It ends with a quiet phase in
//! which faults stop and every block is read back (liveness and
//! durability).

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{ConnClosed, ConnId, DiskErrorKind, DiskOp, DiskOpId, Input, Node, Output};
use kivaloo::packet::PacketDecoder;
use kivaloo::Instant;
use kivaloo_nodes::lbs::{LbsConfig, LbsNode};

use crate::lbs_workload::LbsClient;
use crate::network::Pipe;
use crate::rng::{Concern, Stream};
use crate::scenario::{Drawn, Scenario};
use crate::storage::{DiskFaults, SimDisk};
use crate::time::{EventQueue, MS, SEC, US};
use crate::trace::Trace;

/// How long the quiet phase may take before the run fails for liveness.
pub const QUIET_PHASE_LIMIT_NS: u64 = 60 * SEC;
/// Virtual time after which a run that has not finished its workload fails.
pub const RUN_LIMIT_NS: u64 = 3600 * SEC;

/// What happens next.
enum Ev {
    /// A disk operation of incarnation `inc` completes (it is executed now).
    Disk { inc: u64, id: DiskOpId, op: DiskOp },
    /// Bytes reach the node on `conn`.
    ToNode { conn: ConnId, data: Bytes },
    /// Bytes reach the client on `conn`; `tainted` if the node emitted them
    /// after one of its fsyncs failed.
    ToClient { conn: ConnId, data: Bytes, tainted: bool },
    /// The node learns its bytes on `conn` were transmitted.
    Sent { conn: ConnId, len: u64 },
    /// The client learns the node closed `conn` (after its last bytes).
    ClosedByNode { conn: ConnId },
    /// The node's timer for incarnation `inc`.
    Timer { inc: u64 },
    /// The client may act.
    ClientTick,
    /// About every virtual ms (at random intervals, so that crashes land
    /// between any two events) while faults are on: maybe crash, maybe
    /// reset.
    Chaos,
    /// Start the node again.
    Restart,
    /// Hand the bytes held for the node over, in order.
    DeliverHeld { conn: ConnId },
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
    pub acked_blocks: u64,
    pub crashes: u64,
    pub power_losses: u64,
    pub resets: u64,
    pub node_exits: u64,
    pub damaged: bool,
    /// How often each hard path was reached (coverage probes): node events
    /// recognised in its log, and every disk fault injected.
    pub probes: BTreeMap<String, u64>,
}

/// Node log lines that mark a hard path, and the probe each counts for.
const LOG_PROBES: &[(&str, &str)] = &[
    ("discarding", "lbs: torn tail cut at recovery"),
    ("first write was torn", "lbs: torn new file removed at recovery"),
    ("rewriting a header", "lbs: torn header rewritten at recovery"),
    ("were freed", "lbs: freed file removed"),
    ("is corrupt", "lbs: corruption reported on GET"),
    ("failed:", "lbs: connection dropped on a disk error"),
];

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
            acked_blocks: 0,
            crashes: 0,
            power_losses: 0,
            resets: 0,
            node_exits: 0,
            damaged: false,
            probes: BTreeMap::new(),
        }
    }
}

struct Conn {
    id: ConnId,
    /// The node wants bytes (ReadInterest).
    node_reading: bool,
    /// Bytes for the node held while it does not read.
    held: VecDeque<Bytes>,
    to_node: Pipe,
    to_client: Pipe,
    client_decoder: PacketDecoder,
    /// The node closed it; the client will learn after the last bytes.
    node_closed: bool,
    /// Why the node closed it.
    close_reason: String,
}

/// Everything of one run.
pub struct World {
    q: EventQueue<Ev>,
    trace: Trace,
    drawn: Drawn,
    /// Builds the node for each (re)start: any `Node` runs here.
    make_node: Box<dyn Fn() -> Box<dyn Node>>,
    node: Option<Box<dyn Node>>,
    time_rng: Stream,
    /// Incarnation of the node: events of earlier ones are ignored.
    inc: u64,
    /// This incarnation's fsync failed (it must acknowledge nothing more).
    fsync_failed: bool,
    /// This incarnation got a disk error (an exit is then legitimate).
    disk_errors: u64,
    accepting: bool,
    timer_at: Option<u64>,
    disk: SimDisk,
    conn: Option<Conn>,
    next_conn: u64,
    client: LbsClient,
    net_rng: Stream,
    disk_rng: Stream,
    crash_rng: Stream,
    work_rng: Stream,
    quiet: bool,
    quiet_since: u64,
    failure: Option<String>,
    /// A damaged store reported the damage in the quiet phase: done.
    finished_by_damage: bool,
    crashes: u64,
    power_losses: u64,
    resets: u64,
    node_exits: u64,
    tick_scheduled: bool,
    /// Damage records already mapped to blocks.
    damage_noted: usize,
    probes: BTreeMap<String, u64>,
    restart_pending: bool,
    /// This incarnation finished recovery and accepted connections.
    served: bool,
}

impl World {
    /// A world for `scenario` and `seed`.
    pub fn new(scenario: &Scenario, seed: u64, keep_trace: bool) -> World {
        let drawn = scenario.draw(seed);
        let rec = kivaloo_nodes::lbs::layout::record_len(drawn.block_size);
        let lbs_cfg = LbsConfig {
            file_len_min_bytes: drawn.file_blocks * rec,
            read_latency_ns: drawn.read_latency_us * US,
            ..LbsConfig::new(drawn.block_size)
        };
        let make_node: Box<dyn Fn() -> Box<dyn Node>> =
            Box::new(move || Box::new(LbsNode::new(lbs_cfg.clone())));
        let client = LbsClient::new(drawn.block_size, drawn.in_flight, scenario.workload.requests);
        World {
            q: EventQueue::default(),
            trace: Trace::new(keep_trace),
            disk: SimDisk::new(drawn.disk.clone()),
            drawn,
            make_node,
            node: None,
            time_rng: Stream::new(seed, Concern::Time),
            inc: 0,
            fsync_failed: false,
            disk_errors: 0,
            accepting: false,
            timer_at: None,
            conn: None,
            next_conn: 1,
            client,
            net_rng: Stream::new(seed, Concern::Network),
            disk_rng: Stream::new(seed, Concern::Disk),
            crash_rng: Stream::new(seed, Concern::Crash),
            work_rng: Stream::new(seed, Concern::Workload),
            quiet: false,
            quiet_since: 0,
            failure: None,
            finished_by_damage: false,
            crashes: 0,
            power_losses: 0,
            resets: 0,
            node_exits: 0,
            tick_scheduled: false,
            damage_noted: 0,
            probes: BTreeMap::new(),
            restart_pending: false,
            served: false,
        }
    }

    fn now(&self) -> u64 {
        self.q.now().nanos
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            let now = self.q.now();
            self.trace.event(now, "FAILURE", &[], || why.clone());
            self.failure = Some(why);
        }
    }

    /// Runs to the end and reports.
    pub fn run(mut self, seed: u64) -> Outcome {
        self.start_node();
        self.q.after(MS, Ev::Chaos);
        while self.failure.is_none() {
            if self.client.verified() || self.finished_by_damage {
                break;
            }
            if self.now() > RUN_LIMIT_NS {
                self.fail(format!("the workload did not finish in {} s of virtual time", RUN_LIMIT_NS / SEC));
                break;
            }
            if self.quiet && self.now() - self.quiet_since > QUIET_PHASE_LIMIT_NS {
                self.fail(format!(
                    "liveness: faults stopped {} s ago and the final check has not finished",
                    QUIET_PHASE_LIMIT_NS / SEC
                ));
                break;
            }
            let Some(ev) = self.q.pop() else {
                self.fail("nothing left to happen, but the run is not finished".into());
                break;
            };
            self.handle(ev);
            if !self.quiet && self.client.workload_done() {
                self.begin_quiet_phase();
            }
        }
        let mut probes = self.probes;
        for (name, n) in self.disk.fault_counts().pairs() {
            *probes.entry(format!("disk: {name}")).or_default() += n;
        }
        probes.insert("sim: crashes".into(), self.crashes);
        probes.insert("sim: power losses".into(), self.power_losses);
        probes.insert("sim: connection resets".into(), self.resets);
        Outcome {
            probes,
            seed,
            failure: self.failure,
            trace_hash: self.trace.hash(),
            trace: self.trace.lines().to_vec(),
            drawn: self.drawn,
            virtual_ns: self.q.now().nanos,
            requests: self.client.stats.requests,
            acked_blocks: self.client.stats.acked_blocks,
            crashes: self.crashes,
            power_losses: self.power_losses,
            resets: self.resets,
            node_exits: self.node_exits,
            damaged: self.client.damaged,
        }
    }

    /// Faults stop; the node is restarted (a last crash, so that recovery is
    /// checked too) and every block is read back.
    fn begin_quiet_phase(&mut self) {
        self.quiet = true;
        self.quiet_since = self.now();
        let now = self.q.now();
        self.trace.event(now, "quiet", &[], || "faults stop; restart and read everything back".into());
        self.disk.set_faults(DiskFaults::default());
        if self.conn.take().is_some() {
            self.client.on_disconnected();
        }
        self.crash(true);
        self.client.start_verify();
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Disk { inc, id, op } => {
                if inc != self.inc || self.node.is_none() {
                    return;
                }
                let result = self.disk.execute(&op, &mut self.disk_rng);
                let now = self.q.now();
                let failed = result.is_err();
                self.trace.event(now, "disk", &[id.0, failed as u64], || {
                    format!("{} -> {:?}", op.verb(), result.as_ref().map(|d| d.describe()))
                });
                if let Err(e) = &result {
                    self.disk_errors += 1;
                    if matches!(op, DiskOp::SyncFile { .. }) && e.kind == DiskErrorKind::Io {
                        self.fsync_failed = true;
                    }
                }
                self.input(Input::Disk { id, result });
            }
            Ev::ToNode { conn, data } => {
                let Some(c) = self.conn.as_mut().filter(|c| c.id == conn && !c.node_closed) else { return };
                if !c.node_reading || !c.held.is_empty() {
                    c.held.push_back(data);
                    return;
                }
                self.input(Input::Received { conn, data });
            }
            Ev::Sent { conn, len } => {
                if self.conn.as_ref().is_some_and(|c| c.id == conn && !c.node_closed) {
                    self.input(Input::Sent { conn, len_bytes: len });
                }
            }
            Ev::ToClient { conn, data, tainted } => self.deliver_to_client(conn, data, tainted),
            Ev::ClosedByNode { conn } => {
                if self.conn.as_ref().is_some_and(|c| c.id == conn) {
                    let now = self.q.now();
                    self.trace
                        .event(now, "client-closed", &[conn.0], || format!("{conn} closed by the node"));
                    let reason = self.conn.take().map(|c| c.close_reason).unwrap_or_default();
                    if self.quiet {
                        if self.client.damage_touches_live() {
                            // Damage reported, not returned: that is all a
                            // damaged store owes.
                            self.finished_by_damage = true;
                        } else {
                            self.fail(format!(
                                "the node dropped the connection after faults stopped: {reason}"
                            ));
                        }
                    }
                    self.client.on_disconnected();
                    self.schedule_tick(MS);
                }
            }
            Ev::Timer { inc } => {
                if inc != self.inc {
                    return;
                }
                self.timer_at = None;
                let due = self.node.as_ref().and_then(|n| n.poll_timeout());
                if due.is_some_and(|t| t <= self.node_now()) {
                    *self.probes.entry("sim: node timers fired".into()).or_default() += 1;
                    self.input(Input::Timeout);
                } else if due.is_some() {
                    self.drain(); // re-arm for the rounding of the clock rate
                }
            }
            Ev::ClientTick => {
                self.tick_scheduled = false;
                self.client_tick();
            }
            Ev::Chaos => self.chaos(),
            Ev::DeliverHeld { conn } => {
                while let Some(data) = self
                    .conn
                    .as_mut()
                    .filter(|c| c.id == conn && !c.node_closed && c.node_reading)
                    .and_then(|c| c.held.pop_front())
                {
                    self.input(Input::Received { conn, data });
                }
            }
            Ev::Restart => {
                self.restart_pending = false;
                if self.node.is_none() {
                    self.start_node();
                }
            }
        }
    }

    fn chaos(&mut self) {
        if self.quiet {
            return;
        }
        if self.node.is_some() && self.crash_rng.chance(self.drawn.crash_per_ms) {
            let power = self.crash_rng.chance(self.drawn.power_loss);
            self.crash(power);
        }
        if self.conn.is_some() && self.crash_rng.chance(self.drawn.reset_per_ms) {
            self.reset_connection();
        }
        self.q.after(self.crash_rng.range(1, 2 * MS), Ev::Chaos);
    }

    fn reset_connection(&mut self) {
        let Some(c) = self.conn.take() else { return };
        self.resets += 1;
        let now = self.q.now();
        self.trace.event(now, "reset", &[c.id.0], || format!("{} reset", c.id));
        self.client.on_disconnected();
        if !c.node_closed {
            self.input(Input::Closed { conn: c.id, reason: ConnClosed::Failed("connection reset".into()) });
        }
        self.schedule_tick(MS);
    }

    /// The node dies (a power loss too if `power`); it restarts later.
    fn crash(&mut self, power: bool) {
        let now = self.q.now();
        if self.node.take().is_some() {
            self.crashes += 1;
        }
        self.trace.event(now, "crash", &[power as u64], || {
            if power {
                "power loss".into()
            } else {
                "process crash".into()
            }
        });
        if power {
            self.power_losses += 1;
            self.disk.crash(&mut self.disk_rng);
        }
        self.after_node_gone();
    }

    fn after_node_gone(&mut self) {
        self.inc += 1;
        self.accepting = false;
        self.timer_at = None;
        // What the node already sent is in the kernel's socket buffer: it
        // still reaches the client (an ack made before dying is an ack).
        let now = self.now();
        if let Some(c) = self.conn.as_mut().filter(|c| !c.node_closed) {
            c.node_closed = true;
            c.close_reason = "the node died".into();
            let (conn, at) = (c.id, c.to_client.last_arrival_ns().max(now) + 1);
            self.q.at(Instant::from_nanos(at), Ev::ClosedByNode { conn });
        }
        if !self.restart_pending {
            self.restart_pending = true;
            let delay = self.crash_rng.range(MS, 20 * MS);
            self.q.after(delay, Ev::Restart);
        }
    }

    fn start_node(&mut self) {
        self.inc += 1;
        self.served = false;
        let now = self.q.now();
        self.trace.event(now, "start", &[self.inc], || format!("lbs incarnation {}", self.inc));
        self.fsync_failed = false;
        self.disk_errors = 0;
        self.node = Some((self.make_node)());
        self.drain();
    }

    /// The node's clock: virtual time at the seed's clock rate (a node's
    /// clock may run fast or slow; it never goes backwards).
    fn node_now(&self) -> Instant {
        Instant::from_nanos((self.now() as f64 * self.drawn.clock_rate) as u64)
    }

    /// Virtual time at which the node's clock reads `node_ns`.
    fn virtual_at(&self, node_ns: u64) -> u64 {
        let mut v = ((node_ns as f64 / self.drawn.clock_rate).ceil() as u64).max(self.now());
        // Float rounding may leave the node's clock a nanosecond short at v.
        while ((v as f64 * self.drawn.clock_rate) as u64) < node_ns {
            v += 1;
        }
        v
    }

    fn input(&mut self, input: Input) {
        let now = self.node_now();
        let Some(node) = self.node.as_mut() else { return };
        node.handle_input(now, input);
        self.drain();
    }

    /// Acts on everything the node wants done.
    fn drain(&mut self) {
        loop {
            let Some(node) = self.node.as_mut() else { return };
            let Some(out) = node.poll_output() else { break };
            let now = self.q.now();
            match out {
                Output::Send { conn, data } => self.node_sends(conn, data),
                Output::Close { conn, reason } => {
                    self.trace.event(now, "node-close", &[conn.0], || format!("{conn}: {reason}"));
                    if let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) {
                        c.node_closed = true;
                        c.close_reason = reason;
                        let at = c.to_client.last_arrival_ns().max(now.nanos) + 1;
                        self.q.at(Instant::from_nanos(at), Ev::ClosedByNode { conn });
                    }
                }
                Output::ReadInterest { conn, enabled } => {
                    if let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) {
                        c.node_reading = enabled;
                        if enabled {
                            // Hand over what was held, in order, now.
                            if !c.held.is_empty() {
                                self.q.after(0, Ev::DeliverHeld { conn });
                            }
                        }
                    }
                }
                Output::Accepting(on) => {
                    self.accepting = on;
                    self.served |= on;
                    if on {
                        self.schedule_tick(0);
                    }
                }
                Output::Disk { id, op } => {
                    let [lo, hi] = self.drawn.disk_latency_us;
                    // Syncs wait for the device: they take longer, which
                    // leaves crashes a window with unsynced writes.
                    let sync = matches!(op, DiskOp::SyncFile { .. } | DiskOp::SyncDir);
                    let delay = self.disk_rng.range(lo, hi) * US * if sync { 8 } else { 1 } + 1;
                    let inc = self.inc;
                    self.q.after(delay, Ev::Disk { inc, id, op });
                }
                Output::Log { message, .. } => {
                    for (needle, probe) in LOG_PROBES {
                        if message.contains(needle) {
                            *self.probes.entry(probe.to_string()).or_default() += 1;
                        }
                    }
                    self.trace.event(now, "log", &[], || message);
                }
                Output::Exit(reason) => {
                    self.node_exits += 1;
                    let probe = if !self.served {
                        "lbs: refused to start"
                    } else if reason.message.contains("fsync") {
                        "lbs: stopped after a failed fsync"
                    } else {
                        "lbs: stopped on another disk error"
                    };
                    *self.probes.entry(probe.to_string()).or_default() += 1;
                    self.trace.event(now, "exit", &[], || reason.message.clone());
                    // An exit is legitimate after a disk error of this
                    // incarnation, or when damage touched blocks the store
                    // holds; otherwise the node stopped for no reason the
                    // fault model gave.
                    self.note_damage();
                    let damaged = self.client.damage_touches_live();
                    let refused = !self.served;
                    if self.disk_errors == 0 && !damaged {
                        self.fail(format!(
                            "lbs exited without a disk fault to explain it: {}",
                            reason.message
                        ));
                    } else if self.quiet && !damaged {
                        self.fail(format!("lbs did not come up after faults stopped: {}", reason.message));
                    } else if self.quiet {
                        // A damaged store that refuses to start has reported
                        // the damage: all it owes.
                        self.finished_by_damage = true;
                    } else if refused && damaged {
                        // Faults stop; if it still refuses without them, the
                        // run ends there (above).
                        self.node = None;
                        self.after_node_gone();
                        self.begin_quiet_phase();
                        return;
                    }
                    self.node = None;
                    self.after_node_gone();
                    return;
                }
            }
        }
        // The node's timer, which fires late by up to the seed's lateness.
        let due = self.node.as_ref().and_then(|n| n.poll_timeout()).map(|t| self.virtual_at(t.nanos));
        if let Some(due) = due {
            if self.timer_at.is_none_or(|t| due < t) {
                self.timer_at = Some(due);
                let inc = self.inc;
                let late = self.time_rng.below(self.drawn.timer_late_us + 1) * US;
                self.q.at(Instant::from_nanos(due + late), Ev::Timer { inc });
            }
        }
    }

    /// The node's bytes go towards the client, split at random points,
    /// each piece after a random latency but in order.
    fn node_sends(&mut self, conn: ConnId, data: Bytes) {
        let tainted = self.fsync_failed;
        let now = self.now();
        let Some(c) = self.conn.as_mut().filter(|c| c.id == conn && !c.node_closed) else { return };
        let len = data.len() as u64;
        for (at, piece) in c.to_client.send(&mut self.net_rng, now, self.drawn.net_latency_us, data) {
            self.q.at(Instant::from_nanos(at), Ev::ToClient { conn, data: piece, tainted });
        }
        let at = c.to_client.last_arrival_ns();
        self.q.at(Instant::from_nanos(at), Ev::Sent { conn, len });
    }

    fn deliver_to_client(&mut self, conn: ConnId, data: Bytes, tainted: bool) {
        let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) else { return };
        c.client_decoder.push(&data);
        let mut packets = Vec::new();
        loop {
            match c.client_decoder.next_packet() {
                Ok(Some(p)) => packets.push(p),
                Ok(None) => break,
                Err(e) => return self.fail(format!("the node sent a malformed packet: {e}")),
            }
        }
        for packet in packets {
            let now = self.q.now();
            self.trace.event(now, "response", &[packet.id], || format!("{conn} response {:#x}", packet.id));
            if let Err(e) = self.client.on_packet(packet, tainted) {
                return self.fail(e);
            }
        }
        self.schedule_tick(0);
    }

    /// Maps the disk's damage to the lbs blocks whose records it touched
    /// (a damaged header: every block of the file).
    fn note_damage(&mut self) {
        use crate::storage::Damage;
        use kivaloo_nodes::lbs::layout::{parse_file_name, record_len, FILE_HEADER_LEN};
        let rec = record_len(self.drawn.block_size);
        let mut firsts: Vec<u64> = self.disk.names().iter().filter_map(|n| parse_file_name(n)).collect();
        let mut ranges = Vec::new();
        let seen = self.damage_noted;
        self.damage_noted = self.disk.damage().len();
        for d in &self.disk.damage()[seen..] {
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
                    self.client.damaged_blocks.extend(first..end);
                    continue;
                }
                let lo = first + (off - FILE_HEADER_LEN) / rec;
                let hi = first + (off + len.max(1) - 1 - FILE_HEADER_LEN) / rec;
                self.client.damaged_blocks.extend(lo..=hi);
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
        self.client.damaged = !self.disk.damage().is_empty();
        self.note_damage();
        let mut out = BytesMut::new();
        if self.conn.is_none() {
            if !self.accepting || self.node.is_none() {
                return;
            }
            let id = ConnId(self.next_conn);
            self.next_conn += 1;
            let now = self.q.now();
            self.trace.event(now, "connect", &[id.0], || format!("{id}"));
            self.conn = Some(Conn {
                id,
                node_reading: true,
                held: VecDeque::new(),
                to_node: Pipe::default(),
                to_client: Pipe::default(),
                client_decoder: PacketDecoder::new(),
                node_closed: false,
                close_reason: String::new(),
            });
            self.input(Input::Accepted { conn: id });
            if self.conn.is_none() {
                return;
            }
            self.client.on_connected(&mut out);
        } else {
            self.client.issue(&mut self.work_rng, &mut out);
        }
        if !out.is_empty() {
            let now = self.q.now();
            let (len, in_flight) = (out.len() as u64, self.client.in_flight() as u64);
            self.trace.event(now, "client-send", &[len, in_flight], || {
                format!("{len} bytes of requests, {in_flight} in flight")
            });
            self.client_sends(out.freeze());
        }
    }

    /// The client's bytes go towards the node, split and delayed, in order.
    fn client_sends(&mut self, data: Bytes) {
        let now = self.now();
        let Some(c) = self.conn.as_mut() else { return };
        let conn = c.id;
        for (at, piece) in c.to_node.send(&mut self.net_rng, now, self.drawn.net_latency_us, data) {
            self.q.at(Instant::from_nanos(at), Ev::ToNode { conn, data: piece });
        }
    }
}
