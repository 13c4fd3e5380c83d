//! One component of the simulated chain (lbs, kvlds or mux): the node (the
//! real state machine, rebuilt from its configuration at each start), its
//! incarnation, its clock (which may run fast or slow) and timer, its disk
//! if it has one, and what it went through (crashes, exits, the node's own
//! probe counters summed over incarnations).

use std::collections::BTreeMap;

use kivaloo::contract::{Instant, Node};
use kivaloo_nodes::kvlds::{KvldsConfig, KvldsNode};
use kivaloo_nodes::lbs::{LbsConfig, LbsNode};
use kivaloo_nodes::mux::{MuxConfig, MuxNode};

use crate::storage::SimDisk;

/// Which node a component runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The block store: owns the simulated disk.
    Lbs,
    /// The B+tree: talks to the next component (lbs) through
    /// `ConnId::UPSTREAM`; no disk.
    Kvlds,
    /// The multiplexer: many clients onto one connection to the next
    /// component (kvlds); no disk.
    Mux,
}

impl Kind {
    /// The component's name in scenario files and traces.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lbs => "lbs",
            Kind::Kvlds => "kvlds",
            Kind::Mux => "mux",
        }
    }

    /// The kind a scenario's component name names.
    pub fn parse(name: &str) -> Option<Kind> {
        match name {
            "lbs" => Some(Kind::Lbs),
            "kvlds" => Some(Kind::Kvlds),
            "mux" => Some(Kind::Mux),
            _ => None,
        }
    }
}

/// How a component's node is built at each start.
#[derive(Debug, Clone)]
pub enum Config {
    Lbs(LbsConfig),
    Kvlds(KvldsConfig),
    Mux(MuxConfig),
}

/// A running node, typed, so that the world can read kvlds's probes and
/// cache bound.
pub enum Running {
    Lbs(Box<LbsNode>),
    Kvlds(Box<KvldsNode>),
    Mux(Box<MuxNode>),
}

impl Running {
    /// The node, through the contract.
    pub fn node(&mut self) -> &mut dyn Node {
        match self {
            Running::Lbs(n) => n.as_mut(),
            Running::Kvlds(n) => n.as_mut(),
            Running::Mux(n) => n.as_mut(),
        }
    }

    /// When the node next wants `Input::Timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Running::Lbs(n) => n.poll_timeout(),
            Running::Kvlds(n) => n.poll_timeout(),
            Running::Mux(n) => n.poll_timeout(),
        }
    }

    /// kvlds's count of its tree's pages (when cleaning is on and counted).
    pub fn kvlds_tree_pages(&self) -> Option<(u64, u64)> {
        match self {
            Running::Kvlds(n) => n.tree_pages().map(|p| (p, n.log_blocks())),
            _ => None,
        }
    }

    /// Whether kvlds is writing a commit that carries cleaned leaves.
    pub fn cleaning_in_flight(&self) -> bool {
        matches!(self, Running::Kvlds(n) if n.cleaning_in_flight())
    }

    /// The node's own probe counters, by name (kvlds's `KvldsProbes`,
    /// prefixed `kvlds.`, and mux's `MuxProbes`, prefixed `mux.`); lbs's
    /// are recognised in its log instead.
    pub fn probes(&self) -> Vec<(String, u64)> {
        let (prefix, debug) = match self {
            Running::Lbs(_) => return Vec::new(),
            Running::Kvlds(n) => ("kvlds", format!("{:?}", n.probes())),
            Running::Mux(n) => ("mux", format!("{:?}", n.probes())),
        };
        counters_of(&debug).into_iter().map(|(name, v)| (format!("{prefix}.{name}"), v)).collect()
    }
}

/// The `name: number` fields of a struct's derived `Debug` text
/// (`Name { a: 1, b: 2 }`), so that every counter a node adds to its
/// probes is counted without a list here to keep up to date. Fields that
/// are not numbers are skipped.
pub fn counters_of(debug: &str) -> Vec<(String, u64)> {
    let inner = debug.split_once('{').map_or("", |(_, rest)| rest.trim_end().trim_end_matches('}'));
    inner
        .split(',')
        .filter_map(|field| {
            let (name, value) = field.split_once(':')?;
            Some((name.trim().to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// One component of the chain and its life so far.
pub struct Proc {
    pub kind: Kind,
    config: Config,
    /// The running node; `None` while it is down.
    pub node: Option<Running>,
    /// Incarnation: bumped at each start and each death, so that events
    /// meant for an earlier incarnation (disk completions, timers) are
    /// dropped.
    pub inc: u64,
    /// This incarnation has accepted connections (finished recovery).
    pub served: bool,
    /// The node wants connections now.
    pub accepting: bool,
    /// This incarnation's fsync failed: bytes it sends from now on are
    /// marked (lbs must acknowledge nothing after that).
    pub fsync_failed: bool,
    /// Disk errors this incarnation got (an exit is then legitimate).
    pub disk_errors: u64,
    /// When the node's timer is armed (virtual ns).
    pub timer_at: Option<u64>,
    /// A restart is scheduled.
    pub restart_pending: bool,
    /// The restart is due: start as soon as the next component accepts.
    pub want_start: bool,
    /// The link this incarnation reaches its upstream through.
    pub upstream: Option<u64>,
    /// This incarnation was told its upstream closed.
    pub upstream_closed: bool,
    /// lbs disk errors in the whole run when this incarnation started (a
    /// kvlds exit after a later one may be explained by it).
    pub lbs_disk_errors_at_start: u64,
    /// How fast this component's clock runs against virtual time.
    pub clock_rate: f64,
    /// How late its timer may fire, in microseconds.
    pub timer_late_us: u64,
    /// Its directory (lbs).
    pub disk: Option<SimDisk>,
    pub starts: u64,
    pub crashes: u64,
    pub exits: u64,
    /// The node's probe counters of incarnations that ended.
    past_probes: BTreeMap<String, u64>,
}

impl Proc {
    /// A component, down until started.
    pub fn new(
        kind: Kind,
        config: Config,
        clock_rate: f64,
        timer_late_us: u64,
        disk: Option<SimDisk>,
    ) -> Proc {
        Proc {
            kind,
            config,
            node: None,
            inc: 0,
            served: false,
            accepting: false,
            fsync_failed: false,
            disk_errors: 0,
            timer_at: None,
            restart_pending: false,
            want_start: true,
            upstream: None,
            upstream_closed: false,
            lbs_disk_errors_at_start: 0,
            clock_rate,
            timer_late_us,
            disk,
            starts: 0,
            crashes: 0,
            exits: 0,
            past_probes: BTreeMap::new(),
        }
    }

    /// The component's name.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Builds a fresh node from the configuration (a start: recovery runs
    /// on what survived).
    pub fn build(&mut self) {
        self.starts += 1;
        self.node = Some(match &self.config {
            Config::Lbs(c) => Running::Lbs(Box::new(LbsNode::new(c.clone()))),
            Config::Kvlds(c) => Running::Kvlds(Box::new(KvldsNode::new(c.clone()))),
            Config::Mux(c) => Running::Mux(Box::new(MuxNode::new(c.clone()))),
        });
    }

    /// Drops the node (it crashed or exited), keeping its probe counts.
    pub fn kill(&mut self) {
        if let Some(node) = self.node.take() {
            for (name, v) in node.probes() {
                *self.past_probes.entry(name).or_default() += v;
            }
        }
    }

    /// The node's probe counters over every incarnation so far.
    pub fn probes(&self) -> BTreeMap<String, u64> {
        let mut all = self.past_probes.clone();
        for (name, v) in self.node.as_ref().map(Running::probes).unwrap_or_default() {
            *all.entry(name).or_default() += v;
        }
        all
    }

    /// The node's clock at virtual time `virtual_ns`: it may run fast or
    /// slow, never backwards.
    pub fn clock(&self, virtual_ns: u64) -> Instant {
        Instant::from_nanos((virtual_ns as f64 * self.clock_rate) as u64)
    }

    /// The first virtual time, not before `now_ns`, at which the node's
    /// clock reads `node_ns`.
    pub fn virtual_at(&self, now_ns: u64, node_ns: u64) -> u64 {
        let mut v = ((node_ns as f64 / self.clock_rate).ceil() as u64).max(now_ns);
        // Float rounding may leave the node's clock a nanosecond short at v.
        while ((v as f64 * self.clock_rate) as u64) < node_ns {
            v += 1;
        }
        v
    }

    /// kvlds's cache size and bound, when it runs.
    pub fn cache_pages(&self) -> Option<(usize, usize)> {
        match &self.node {
            Some(Running::Kvlds(n)) => Some((n.cache_pages(), n.cache_pages_max())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_come_from_the_derived_debug_text() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct P {
            commits: u64,
            root_splits: u64,
            name: &'static str,
        }
        let text = format!("{:?}", P { commits: 3, root_splits: 0, name: "x" });
        assert_eq!(counters_of(&text), vec![("commits".to_string(), 3), ("root_splits".to_string(), 0)]);
        let probes = counters_of(&format!("{:?}", kivaloo_nodes::kvlds::KvldsProbes::default()));
        assert!(probes.iter().any(|(n, _)| n == "root_splits"), "{probes:?}");
        assert!(probes.iter().any(|(n, _)| n == "recoveries_found_root"), "{probes:?}");
    }
}
