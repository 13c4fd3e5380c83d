//! kvlds: the log-structured copy-on-write B+tree, served over one client
//! connection at a time and stored in lbs through [`ConnId::UPSTREAM`].
//! See `nodes/DESIGN.md` ("kvlds") for the page format, the commit path and
//! recovery.

use kivaloo::contract::{ConnId, Input, Instant, Node, Output};

/// How a kvlds node is configured (kivaloo's `kvlds` flags).
#[derive(Debug, Clone)]
pub struct KvldsConfig {
    /// `-C`: the page cache holds at most this many clean pages.
    pub cache_pages_max: Option<u64>,
    /// `-c`: the page cache holds at most this many bytes of pages (pages
    /// = bytes / block size). Ignored when `cache_pages_max` is set.
    pub cache_bytes_max: Option<u64>,
    /// `-k`: the longest key accepted; default by block size.
    pub key_len_max: Option<u32>,
    /// `-v`: the longest value accepted; default by block size.
    pub value_len_max: Option<u32>,
    /// `-w`: how long the first modifying request of a batch may wait for
    /// others to join it before the batch is written.
    pub commit_delay_ns: u64,
    /// `-g`: a batch is started at once when this many modifying requests
    /// are waiting, whatever `commit_delay_ns` says.
    pub commit_forced_requests: u64,
    /// Check the tree's structure (balance, key order, page sizes) and the
    /// cache bound after every commit, panicking on a violation (a bug in
    /// this code). On in tests and in the simulator.
    pub check_invariants: bool,
}

impl Default for KvldsConfig {
    fn default() -> Self {
        KvldsConfig {
            cache_pages_max: None,
            cache_bytes_max: None,
            key_len_max: None,
            value_len_max: None,
            commit_delay_ns: 0,
            commit_forced_requests: 4096,
            check_invariants: cfg!(debug_assertions),
        }
    }
}

/// Counters of the hard paths a node has been through, for the
/// simulator's coverage probes and for tests. They only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvldsProbes {
    /// Batches written (one APPEND each).
    pub commits: u64,
    /// Batches whose requests changed nothing, answered without an APPEND.
    pub empty_batches: u64,
    /// Pages split because they outgrew a block.
    pub splits: u64,
    /// Splits that reached the root, so the tree grew a level.
    pub root_splits: u64,
    /// Pairs of adjacent siblings merged.
    pub merges: u64,
    /// Roots with a single child replaced by that child (the tree shrank).
    pub deroots: u64,
    /// Clean pages evicted from the cache.
    pub evictions: u64,
    /// Pages read from lbs (at recovery, on a cache miss, or to merge).
    pub page_reads: u64,
    /// Requests that had to wait for a page to come from lbs.
    pub waits_for_pages: u64,
    /// Recoveries that found a store with no tree yet.
    pub recoveries_empty: u64,
    /// Recoveries that found a tree.
    pub recoveries_found_root: u64,
    /// Recoveries that passed over newer blocks that were not a complete
    /// commit before finding the root.
    pub recoveries_skipped_tail: u64,
    /// FREE requests sent to lbs.
    pub frees: u64,
}

/// The kvlds state machine. It is built with its upstream connection to
/// lbs already open ([`ConnId::UPSTREAM`]); it asks lbs for its parameters,
/// finds the newest valid root, and then accepts one client connection at a
/// time.
pub struct KvldsNode {
    config: KvldsConfig,
}

impl KvldsNode {
    /// A node that starts recovery at its first `poll_output`.
    pub fn new(config: KvldsConfig) -> Self {
        KvldsNode { config }
    }

    /// The hard-path counters so far.
    pub fn probes(&self) -> KvldsProbes {
        KvldsProbes::default()
    }

    /// Clean pages in the page cache now.
    pub fn cache_pages(&self) -> usize {
        0
    }

    /// The cache bound in pages (0 until the block size is known).
    pub fn cache_pages_max(&self) -> usize {
        let _ = &self.config;
        0
    }
}

impl Node for KvldsNode {
    fn handle_input(&mut self, _now: Instant, _input: Input) {}

    fn poll_output(&mut self) -> Option<Output> {
        None
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}
