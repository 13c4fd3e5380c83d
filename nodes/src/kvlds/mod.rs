//! kvlds: the log-structured copy-on-write B+tree, served over one client
//! connection at a time and stored in lbs through [`ConnId::UPSTREAM`].
//! See `nodes/DESIGN.md` ("kvlds") for the page format, the commit path and
//! recovery.
//!
//! In short: reads (GET, RANGE) run on the last committed tree, through a
//! bounded page cache, many at once, each waiting only for the pages it
//! needs. Modifying requests queue up and are applied in arrival order, a
//! batch at a time, to a copy-on-write dirty tree on top of the committed
//! one; the batch is rebalanced, written with one APPEND (the root last),
//! and its requests are answered only once lbs has acknowledged that APPEND
//! (so after its fsync). Then the new root becomes the committed tree.

mod block_index;
mod cache;
pub mod clean;
pub mod page;
mod read;
mod recovery;
mod tree;

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{ConnClosed, ConnId, ExitReason, Input, Instant, LogLevel, Node, Output};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse, REQUEST_RECORD_LEN_MAX};
use kivaloo::lbs_proto::{encode_append_with, LbsRequest, LbsRequestKind, LbsResponse, NO_LAST_BLOCK};
use kivaloo::packet::PacketDecoder;

use cache::PageCache;
use clean::{Census, CensusStep, Pacing};
use page::{PageView, PAGE_HEADER_LEN};
use read::{Descent, RangeScan};
use recovery::{Scan, ScanStep};
use tree::{DirtyTree, RootRef, Stall};

/// Requests of the client connection in progress at once (queued, in a
/// batch, or reading). At the bound the node stops reading from the
/// connection (kivaloo's bound too).
pub const PENDING_REQUESTS_MAX: usize = 4096;
/// Response bytes sent to the client and not yet reported written
/// (`Input::Sent`). At the bound the node stops handling its requests.
pub const UNSENT_BYTES_MAX: u64 = 16 << 20;
/// The least the client connection's packet decoder allocates at a time:
/// one allocation serves hundreds of requests instead of one per read.
/// Requests waiting for their commit keep their buffer alive. Typically
/// that is a few buffers (the requests of one commit arrive together); at
/// worst, each of [`PENDING_REQUESTS_MAX`] requests pins a buffer of its
/// own, 256 MiB (as each pinned the buffer of its read before).
const CLIENT_DECODER_GROW_BYTES: usize = 64 << 10;
/// The most a RANGE returns, whatever byte budget it asks for (its `next`
/// tells the client where to go on).
pub const RANGE_BYTES_MAX: usize = 1 << 20;
/// The most page data one commit writes (one APPEND). A batch stops taking
/// requests when its estimated size reaches this; lbs takes up to 64 MiB.
pub const COMMIT_BYTES_MAX: usize = 16 << 20;
/// Pages read ahead for queued modifying requests at once, at most (and at
/// most a quarter of the cache).
pub const PREFETCH_PAGES_MAX: usize = 256;
/// Queued modifying requests looked at for read-ahead each time.
const PREFETCH_SCAN_MAX: usize = 512;
/// Block sizes lbs may report (PROTOCOL.md: 512 to 131072 bytes).
pub const BLOCK_SIZE_MIN: u32 = 512;
/// See [`BLOCK_SIZE_MIN`].
pub const BLOCK_SIZE_MAX: u32 = 131_072;
/// Block numbers lbs reports must stay below this (2^62), so that no
/// arithmetic on them can overflow.
pub const BLOCK_NUMBER_MAX: u64 = 1 << 62;
/// Default page cache size when neither `-C` nor `-c` is given.
pub const CACHE_BYTES_DEFAULT: u64 = 128 << 20;
/// Default `-S` (kivaloo's): storing a GB for a month costs as much as
/// 10^6 I/Os.
pub const STORAGE_IO_COST_RATIO_DEFAULT: f64 = 1.0;

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
    /// `-S`: the cost of storing a GB for a month over the cost of 10^6
    /// I/Os, which paces background cleaning (see [`clean`]); 0 turns
    /// cleaning off.
    pub storage_io_cost_ratio: f64,
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
            storage_io_cost_ratio: STORAGE_IO_COST_RATIO_DEFAULT,
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
    /// Merges that propagated up a level: two internal siblings merged, at
    /// least one of which had just lost a child to a merge below (in the
    /// same rebalance). In this tree internal pages shrink only that way;
    /// there is no minimum fill, a merge is decided by the pair fitting 2/3
    /// of a block (`tree.rs`, `merge_pass`).
    pub merge_cascades: u64,
    /// Roots with a single child replaced by that child (the tree shrank).
    pub deroots: u64,
    /// Clean pages evicted from the cache.
    pub evictions: u64,
    /// Pages read from lbs (at recovery, on a cache miss, or to merge).
    pub page_reads: u64,
    /// Requests that had to wait for a page to come from lbs.
    pub waits_for_pages: u64,
    /// Pages read back from lbs (a valid page arriving) while a commit's
    /// APPEND was in flight, that the cache had evicted earlier: among its
    /// last 1024 evictions (`cache::EVICTED_RECORD_MAX`; an older eviction
    /// is not counted).
    pub reloads_during_commit: u64,
    /// Modifying requests that arrived while a commit's APPEND was in
    /// flight, so that they wait for the next batch.
    pub writes_waiting_for_next_batch: u64,
    /// Batches started on top of a commit whose APPEND was in flight
    /// (pipelined commits).
    pub batches_on_unsynced_commit: u64,
    /// Answers of requests that changed nothing in a batch built on a
    /// commit in flight, held until that commit was durable.
    pub answers_held_for_commit_below: u64,
    /// GETs and RANGEs that finished on a tree whose root a commit had
    /// replaced while they waited for a page (their snapshot kept its
    /// blocks from being FREEd).
    pub reads_finished_on_old_root: u64,
    /// RANGE answers that stopped at their byte budget (rather than at
    /// `end` or past the last key), `next` just after their last pair.
    pub range_answers_cut_by_budget: u64,
    /// Recoveries that found a store with no tree yet.
    pub recoveries_empty: u64,
    /// Recoveries that found a tree.
    pub recoveries_found_root: u64,
    /// Recoveries that passed over newer blocks that were not a complete
    /// commit before finding the root.
    pub recoveries_skipped_tail: u64,
    /// FREE requests sent to lbs.
    pub frees: u64,
    /// Leaves copied into a commit by the cleaner.
    pub leaves_cleaned: u64,
    /// Commits that carried cleaned leaves.
    pub cleaning_commits: u64,
    /// Commits of cleaned leaves alone (no client request waited).
    pub cleaning_only_commits: u64,
    /// Pages read for cleaning.
    pub cleaning_reads: u64,
    /// Censuses of the tree after recovery completed.
    pub censuses: u64,
}

/// The key and value limits for `block_size`: kivaloo's defaults (512+:
/// 64/96, 1024+: 128/192, 2048+: 255/255) unless given.
///
/// # Errors
/// A message for the operator when the limits cannot work with the block
/// size: a longest key and value pair must fit in a third of a page's
/// space for entries, and so must a separator entry of an internal page.
pub fn key_value_limits(
    block_size: usize,
    key_len_max: Option<u32>,
    value_len_max: Option<u32>,
) -> Result<(usize, usize), String> {
    let (k_default, v_default) = match block_size {
        2048.. => (255, 255),
        1024.. => (128, 192),
        512.. => (64, 96),
        _ => return Err(format!("block size {block_size} is below the 512 bytes kvlds needs")),
    };
    let k = key_len_max.map_or(k_default, |k| k as usize);
    let v = value_len_max.map_or(v_default, |v| v as usize);
    if k > 255 || v > 255 {
        return Err(format!("keys and values are at most 255 bytes (asked for {k} and {v})"));
    }
    let room = block_size - PAGE_HEADER_LEN;
    if 3 * page::pair_len(&vec![0; k], &vec![0; v]) > room || 3 * (1 + k + page::CHILD_REF_LEN) > room {
        return Err(format!(
            "a {k}-byte key and a {v}-byte value do not fit a third of a {block_size}-byte page \
             ({} bytes for entries); use smaller -k/-v or larger blocks",
            room
        ));
    }
    Ok((k, v))
}

/// What the node is doing.
enum Phase {
    /// Waiting for lbs's PARAMS2 answer.
    Params,
    /// Looking for the newest valid root.
    Recovering(Box<Scan>),
    /// Counting the tree's pages (for cleaning) before serving.
    Counting(Box<Census>),
    /// Serving clients.
    Serving,
    /// Exited; inputs are ignored.
    Stopped,
}

/// An lbs request waiting for its answer.
enum UpRequest {
    Params2,
    /// A page read (for readers, a batch, read-ahead, or recovery).
    Get {
        block: u64,
    },
    Append,
    Free,
}

/// Who waits for a page being read.
#[derive(Default)]
struct Load {
    readers: Vec<u64>,
    batch: bool,
    prefetch: bool,
    recovery: bool,
    census: bool,
    cleaning: bool,
    /// For a cleaning read: the committed root when it was asked for. If
    /// that is still the committed root when the page comes, the page is
    /// part of the tree and must be there.
    cleaning_root: Option<u64>,
}

/// The client connection.
struct Client {
    conn: ConnId,
    /// Byte budgets of the RANGEs in progress: answer bytes they may still
    /// produce, counted against `UNSENT_BYTES_MAX` with what is unsent.
    range_bytes_reserved: u64,
    /// Numbers connections, so answers for a closed one are dropped.
    generation: u64,
    decoder: PacketDecoder,
    pending: usize,
    unsent_bytes: u64,
    reading: bool,
    out: BytesMut,
}

/// A read in progress.
struct ReadOp {
    generation: u64,
    req_id: u64,
    /// The oldest block of the tree it reads (nothing below may be freed
    /// while it runs).
    snapshot_oldest_block: u64,
    /// The root block of the tree it reads.
    snapshot_root_block: u64,
    /// For a RANGE: the answer bytes reserved for it.
    reserved_bytes: u64,
    kind: ReadKind,
}

enum ReadKind {
    Get { key: Bytes, descent: Descent },
    Range(Box<RangeScan>),
}

/// A modifying request waiting for a batch.
struct QueuedWrite {
    generation: u64,
    req_id: u64,
    request: KvldsRequest,
    arrived: Instant,
    /// Read-ahead: `Some(block)` while the first uncached page of its path
    /// is being read; `ReadAhead::Done` once its whole path was cached.
    read_ahead: ReadAhead,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadAhead {
    NotYet,
    Reading(u64),
    Done,
}

/// The batch being built or written.
struct Batch {
    tree: DirtyTree,
    /// (connection generation, request id, answer) in application order.
    answers: Vec<(u64, u64, bool)>,
    /// Set once the APPEND is sent: the pages, and the new root.
    writing: Option<(Vec<Rc<PageView>>, RootRef)>,
    rebalancing: bool,
    /// Clean pages the batch replaced (dropped from the cache once it commits).
    superseded: Vec<u64>,
    /// Whether the cleaner has had its turn in this batch.
    cleaning_done: bool,
    /// Leaves the cleaner copied in.
    leaves_cleaned: u64,
    /// Pages below this block count as cleaned when the batch replaces
    /// them (the cleaning threshold when it started).
    clean_below: u64,
    /// Whether the batch took any client request.
    took_requests: bool,
}

/// The kvlds state machine. It is built with its upstream connection to
/// lbs already open ([`ConnId::UPSTREAM`]); it asks lbs for its parameters,
/// finds the newest valid root, and then accepts one client connection at a
/// time.
pub struct KvldsNode {
    config: KvldsConfig,
    now: Instant,
    outputs: VecDeque<Output>,
    phase: Phase,
    block_size: usize,
    key_len_max: usize,
    value_len_max: usize,
    cache: PageCache,
    committed: Option<RootRef>,
    next_block: u64,
    freed_below: u64,
    up_decoder: PacketDecoder,
    up_next_id: u64,
    up_pending: BTreeMap<u64, UpRequest>,
    up_out: BytesMut,
    loads: BTreeMap<u64, Load>,
    prefetches: usize,
    client: Option<Client>,
    generations: u64,
    reads: BTreeMap<u64, ReadOp>,
    next_read: u64,
    queue: VecDeque<QueuedWrite>,
    /// The batch being built: on top of the commit being written if there
    /// is one, taking modifying requests as they come until that commit is
    /// durable (then it is rebalanced and sent).
    batch: Option<Batch>,
    /// The batch whose APPEND was sent and not yet answered (at most one:
    /// kivaloo's lbs refuses an APPEND while it writes another).
    sent: Option<Batch>,
    probes: KvldsProbes,
    pacing: Pacing,
    /// Pages in the committed tree (`None` until counted after recovery,
    /// and while cleaning is off).
    tree_pages: Option<u64>,
    /// Pages being read for cleaning.
    cleaning_reads: usize,
    /// Whether cleaning found leaves in the cache for a batch of its own.
    cleaning_ready: bool,
    /// When the cleaner next looks at its debt if nothing else happens.
    clean_tick_due: Instant,
    /// Set when a commit of cleaning alone was not worth it, to the next
    /// block then: the cleaner sets no timer until a commit moves it.
    cleaning_idle_at: Option<u64>,
    /// The census found the tree damaged: nothing is FREEd.
    frees_disabled: bool,
}

impl KvldsNode {
    /// A node whose first output asks lbs for its parameters.
    pub fn new(config: KvldsConfig) -> Self {
        let mut node = KvldsNode {
            config,
            now: Instant::default(),
            outputs: VecDeque::new(),
            phase: Phase::Params,
            block_size: 0,
            key_len_max: 0,
            value_len_max: 0,
            cache: PageCache::new(1),
            committed: None,
            next_block: 0,
            freed_below: 0,
            up_decoder: PacketDecoder::with_record_len_max(64),
            up_next_id: 0,
            up_pending: BTreeMap::new(),
            up_out: BytesMut::new(),
            loads: BTreeMap::new(),
            prefetches: 0,
            client: None,
            generations: 0,
            reads: BTreeMap::new(),
            next_read: 0,
            queue: VecDeque::new(),
            batch: None,
            sent: None,
            probes: KvldsProbes::default(),
            pacing: Pacing::new(0.0),
            tree_pages: None,
            cleaning_reads: 0,
            cleaning_ready: false,
            clean_tick_due: Instant::default(),
            cleaning_idle_at: None,
            frees_disabled: false,
        };
        node.upstream(LbsRequest::Params2, UpRequest::Params2);
        node.flush();
        node
    }

    /// The hard-path counters so far.
    pub fn probes(&self) -> KvldsProbes {
        let mut p = self.probes;
        p.evictions = self.cache.evictions();
        p
    }

    /// Whether a commit carrying cleaned leaves is being written (for the
    /// simulator's coverage of crashes in the middle of cleaning).
    pub fn cleaning_in_flight(&self) -> bool {
        self.sent.as_ref().is_some_and(|b| b.leaves_cleaned > 0)
    }

    /// The tree the next batch builds on: the commit being written if there
    /// is one (its pages are in the cache until it is durable), else the
    /// committed tree.
    fn tip(&self) -> Option<RootRef> {
        self.sent.as_ref().and_then(|b| b.writing.as_ref()).map(|(_, root)| *root).or(self.committed)
    }

    /// Whether a batch's APPEND has been sent and not yet answered.
    fn commit_in_flight(&self) -> bool {
        self.sent.is_some()
    }

    /// Pages in the committed tree, once counted (`None` while cleaning is
    /// off or before the census after recovery).
    pub fn tree_pages(&self) -> Option<u64> {
        self.tree_pages
    }

    /// Clean pages in the page cache now.
    pub fn cache_pages(&self) -> usize {
        self.cache.len()
    }

    /// The cache bound in pages (0 until the block size is known).
    pub fn cache_pages_max(&self) -> usize {
        if self.block_size == 0 {
            0
        } else {
            self.cache.pages_max()
        }
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.outputs.push_back(Output::Log { level, message: format!("kvlds: {message}") });
    }

    /// Stops the node: every further input is ignored.
    fn exit(&mut self, message: String) {
        if matches!(self.phase, Phase::Stopped) {
            return;
        }
        self.phase = Phase::Stopped;
        self.log(LogLevel::Error, message.clone());
        self.outputs
            .push_back(Output::Exit(ExitReason { failure: true, message: format!("kvlds: {message}") }));
    }

    fn stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    fn upstream(&mut self, request: LbsRequest, waiting: UpRequest) {
        self.upstream_with(waiting, |id, out| request.encode(id, out));
    }

    /// Sends lbs the request that `encode` encodes with the ID it is given.
    fn upstream_with(&mut self, waiting: UpRequest, encode: impl FnOnce(u64, &mut BytesMut)) {
        let id = self.up_next_id;
        self.up_next_id += 1;
        encode(id, &mut self.up_out);
        self.up_pending.insert(id, waiting);
    }

    /// Sends what was encoded for lbs and the client, in one piece each.
    fn flush(&mut self) {
        if !self.up_out.is_empty() {
            self.outputs
                .push_back(Output::Send { conn: ConnId::UPSTREAM, data: self.up_out.split().freeze() });
        }
        if let Some(c) = &mut self.client {
            if !c.out.is_empty() {
                let data = c.out.split().freeze();
                c.unsent_bytes += data.len() as u64;
                self.outputs.push_back(Output::Send { conn: c.conn, data });
            }
        }
    }

    // ---- pages from lbs ----

    /// Asks lbs for `block` unless it is already being read.
    fn load(&mut self, block: u64, who: impl FnOnce(&mut Load)) {
        let fresh = !self.loads.contains_key(&block);
        who(self.loads.entry(block).or_default());
        if fresh {
            self.upstream(LbsRequest::Get { block }, UpRequest::Get { block });
        }
    }

    fn page_arrived(&mut self, block: u64, data: Option<Bytes>) {
        let load = self.loads.remove(&block).unwrap_or_default();
        if load.prefetch {
            self.prefetches -= 1;
        }
        if load.cleaning {
            self.cleaning_reads -= 1;
        }
        if load.recovery {
            if let Phase::Recovering(scan) = &mut self.phase {
                scan.arrived(block, data);
                return self.recover();
            }
            // A read-ahead of the scan that arrived after the root was
            // found: reads and the batch may have joined it.
        }
        // Readers of a client that left are gone from `reads`.
        let cleaning_needed = load.cleaning
            && load.cleaning_root.is_some()
            && load.cleaning_root == self.committed.map(|r| r.child.block);
        let needed =
            load.readers.iter().any(|id| self.reads.contains_key(id)) || load.batch || cleaning_needed;
        let counting = load.census && matches!(self.phase, Phase::Counting(_));
        let Some(data) = data else {
            if counting && !needed {
                return self.census_failed(block, "lbs does not have it".into());
            }
            if needed {
                return self.exit(format!("block {block} is part of the tree, but lbs does not have it"));
            }
            // Read-ahead of a block that was freed meanwhile: nobody needs it.
            return;
        };
        // The cache keeps the page: in a buffer of its own, not one shared
        // with the rest of what was received (which it would keep alive).
        let page = match page::parse(Bytes::copy_from_slice(&data), block, self.block_size) {
            Ok(p) => Rc::new(p),
            Err(e) if needed => {
                return self.exit(format!("block {block} is part of the tree but corrupt: {e}"))
            }
            Err(e) if counting => return self.census_failed(block, e.to_string()),
            Err(e) => {
                return self
                    .log(LogLevel::Warn, format!("block {block}, read ahead, is not a valid page: {e}"));
            }
        };
        self.probes.page_reads += 1;
        if self.commit_in_flight() && self.cache.evicted_recently(block) {
            self.probes.reloads_during_commit += 1;
        }
        self.cache.insert(page.clone());
        if load.census {
            if let Phase::Counting(census) = &mut self.phase {
                if let Err(stall) = census.arrived(&page) {
                    return match stall {
                        Stall::Corrupt { block, why } => self.census_failed(block, why),
                        Stall::NeedPage(block) => {
                            self.exit(format!("the census needed block {block} unasked"))
                        }
                    };
                }
                return self.count_tree();
            }
        }
        if load.cleaning {
            self.probes.cleaning_reads += 1;
            if self.pacing.owed() > 0 {
                self.cache.pin(block);
            }
        }
        for id in load.readers {
            self.continue_read(id);
            if self.stopped() {
                return;
            }
        }
        if load.batch {
            self.run_batch();
        } else if load.prefetch {
            self.prefetch();
        }
    }

    fn stalled_on_corruption(&mut self, stall: Stall) {
        match stall {
            Stall::Corrupt { block, why } => self.exit(format!("block {block} is corrupt: {why}")),
            Stall::NeedPage(block) => self.exit(format!("block {block} was needed where none may be")),
        }
    }

    // ---- recovery ----

    fn recover(&mut self) {
        loop {
            let Phase::Recovering(scan) = &mut self.phase else { return };
            match scan.step() {
                ScanStep::Read(blocks) => {
                    for block in blocks {
                        self.load(block, |l| l.recovery = true);
                    }
                    return;
                }
                ScanStep::Wait => return,
                ScanStep::Log(message) => self.log(LogLevel::Warn, message),
                ScanStep::Failed(message) => return self.exit(message),
                ScanStep::Found(found) => {
                    let next_block = scan.next_block();
                    match found {
                        None => {
                            self.probes.recoveries_empty += 1;
                            self.log(LogLevel::Info, format!("no tree in lbs yet; next block {next_block}"));
                        }
                        Some((root, skipped)) => {
                            self.probes.recoveries_found_root += 1;
                            if skipped {
                                self.probes.recoveries_skipped_tail += 1;
                            }
                            self.log(
                                LogLevel::Info,
                                format!(
                                    "root at block {} (level {}); next block {next_block}",
                                    root.block, root.level
                                ),
                            );
                            let r = RootRef { child: root.child_ref(), level: root.level };
                            self.committed = Some(r);
                            self.cache.insert(root);
                        }
                    }
                    self.next_block = next_block;
                    if self.pacing.enabled() {
                        self.phase = Phase::Counting(Box::new(Census::new(self.committed)));
                        return self.count_tree();
                    }
                    return self.start_serving();
                }
            }
        }
    }

    /// Moves the census of the tree on; serves once it is done.
    fn count_tree(&mut self) {
        let Phase::Counting(census) = &mut self.phase else { return };
        match census.step(&mut self.cache) {
            Ok(CensusStep::Read(blocks)) => {
                for block in blocks {
                    self.load(block, |l| l.census = true);
                }
            }
            Ok(CensusStep::Wait) => {}
            Ok(CensusStep::Done(pages)) => {
                self.probes.censuses += 1;
                self.log(LogLevel::Info, format!("the tree has {pages} pages; cleaning is on"));
                self.tree_pages = Some(pages);
                self.start_serving();
            }
            Err(Stall::Corrupt { block, why }) => self.census_failed(block, why),
            Err(Stall::NeedPage(block)) => self.exit(format!("the census needed block {block} unasked")),
        }
    }

    /// The census met a page of the tree that is missing or corrupt. The
    /// rest of the tree may still be read (and dumped): serve, with
    /// cleaning off and nothing FREEd (the tree's own records of its
    /// oldest blocks are in doubt); a request that reaches the page stops
    /// the node then.
    fn census_failed(&mut self, block: u64, why: String) {
        self.log(
            LogLevel::Error,
            format!("block {block} of the tree is bad ({why}); serving with cleaning off and nothing freed"),
        );
        self.frees_disabled = true;
        self.start_serving();
    }

    fn start_serving(&mut self) {
        self.phase = Phase::Serving;
        self.clean_tick_due = self.now.after_ns(clean::CLEAN_TICK_NS);
        if let Some(n) = self.tree_pages {
            // The cleaner's accounts start now.
            self.pacing.accrue(self.now, self.log_blocks(), n);
        }
        self.maybe_free();
        self.outputs.push_back(Output::Accepting(true));
    }

    fn params_arrived(&mut self, block_size: u32, next_block: u64, last_block: u64) {
        if !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&block_size) {
            return self
                .exit(format!("lbs block size {block_size} is outside {BLOCK_SIZE_MIN}..={BLOCK_SIZE_MAX}"));
        }
        if next_block >= BLOCK_NUMBER_MAX || (last_block != NO_LAST_BLOCK && last_block >= next_block) {
            return self
                .exit(format!("lbs reports impossible block numbers: next {next_block}, last {last_block}"));
        }
        let block_size = block_size as usize;
        let (k, v) = match key_value_limits(block_size, self.config.key_len_max, self.config.value_len_max) {
            Ok(kv) => kv,
            Err(e) => return self.exit(format!("cannot start: {e}")),
        };
        self.block_size = block_size;
        self.pacing =
            Pacing::new(clean::cleans_per_garbage_block_per_s(self.config.storage_io_cost_ratio, block_size));
        self.key_len_max = k;
        self.value_len_max = v;
        let pages = match (self.config.cache_pages_max, self.config.cache_bytes_max) {
            (Some(p), _) => p,
            (None, Some(b)) => b / block_size as u64,
            (None, None) => CACHE_BYTES_DEFAULT / block_size as u64,
        };
        self.cache = PageCache::new(pages.clamp(1, usize::MAX as u64) as usize);
        self.up_decoder = PacketDecoder::with_record_len_max(block_size + 64);
        self.phase = Phase::Recovering(Box::new(Scan::new(block_size, next_block, last_block)));
        self.recover();
    }

    // ---- the client ----

    fn accept(&mut self, conn: ConnId) {
        if self.client.is_some() || !matches!(self.phase, Phase::Serving) {
            self.outputs
                .push_back(Output::Close { conn, reason: "kvlds: serves one connection at a time".into() });
            return;
        }
        self.generations += 1;
        self.client = Some(Client {
            conn,
            generation: self.generations,
            decoder: PacketDecoder::with_record_len_max(REQUEST_RECORD_LEN_MAX)
                .with_grow_bytes_min(CLIENT_DECODER_GROW_BYTES),
            pending: 0,
            range_bytes_reserved: 0,
            unsent_bytes: 0,
            reading: true,
            out: BytesMut::new(),
        });
        self.outputs.push_back(Output::Accepting(false));
    }

    /// Forgets the client: its queued requests and reads are dropped; the
    /// answers of requests already in a batch will be dropped too (their
    /// changes are still committed).
    fn forget_client(&mut self) {
        let Some(c) = self.client.take() else { return };
        self.queue.retain(|w| w.generation != c.generation);
        self.reads.retain(|_, r| r.generation != c.generation);
        if matches!(self.phase, Phase::Serving) {
            self.outputs.push_back(Output::Accepting(true));
        }
    }

    fn drop_client(&mut self, reason: String) {
        if let Some(c) = &mut self.client {
            let conn = c.conn;
            if !c.out.is_empty() {
                let data = c.out.split().freeze();
                self.outputs.push_back(Output::Send { conn, data });
            }
            self.outputs.push_back(Output::Close { conn, reason: format!("kvlds: {reason}") });
        }
        self.forget_client();
    }

    fn answer(&mut self, generation: u64, req_id: u64, response: &KvldsResponse) {
        if let Some(c) = &mut self.client {
            if c.generation == generation {
                response.encode(req_id, &mut c.out);
                c.pending -= 1;
            }
        }
    }

    /// Handles whole requests while the connection's bounds allow, and turns
    /// reading off or on accordingly.
    fn process_requests(&mut self) {
        loop {
            if self.stopped() {
                return;
            }
            let Some(c) = &mut self.client else { return };
            let answer_bytes = c.unsent_bytes + c.out.len() as u64 + c.range_bytes_reserved;
            if c.pending >= PENDING_REQUESTS_MAX || answer_bytes >= UNSENT_BYTES_MAX {
                if c.reading {
                    c.reading = false;
                    self.outputs.push_back(Output::ReadInterest { conn: c.conn, enabled: false });
                }
                return;
            }
            if !c.reading {
                c.reading = true;
                self.outputs.push_back(Output::ReadInterest { conn: c.conn, enabled: true });
            }
            let packet = match c.decoder.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => return self.drop_client(format!("bad packet: {e}")),
            };
            let request = match KvldsRequest::decode(packet.record) {
                Ok(r) => r,
                Err(e) => return self.drop_client(format!("bad request {:#x}: {e}", packet.id)),
            };
            let generation = c.generation;
            c.pending += 1;
            self.request(generation, packet.id, request);
        }
    }

    fn request(&mut self, generation: u64, req_id: u64, request: KvldsRequest) {
        match request {
            KvldsRequest::Params => self.answer(
                generation,
                req_id,
                &KvldsResponse::Params {
                    max_key_len: self.key_len_max as u32,
                    max_value_len: self.value_len_max as u32,
                },
            ),
            KvldsRequest::Get { key } => {
                let Some(root) = self.committed.filter(|_| key.len() <= self.key_len_max) else {
                    return self.answer(generation, req_id, &KvldsResponse::Get(None));
                };
                self.start_read(
                    generation,
                    req_id,
                    root,
                    ReadKind::Get { key, descent: Descent::from_root(root) },
                );
            }
            KvldsRequest::Range { max_bytes, start, end } => {
                // No tree, or start >= end: nothing, and every key below
                // `end` was (vacuously) returned.
                let Some(root) = self.committed.filter(|_| end.is_empty() || start < end) else {
                    return self.answer(
                        generation,
                        req_id,
                        &KvldsResponse::Range { next: end, pairs: Vec::new() },
                    );
                };
                let budget = (max_bytes as usize).min(RANGE_BYTES_MAX);
                self.start_read(
                    generation,
                    req_id,
                    root,
                    ReadKind::Range(Box::new(RangeScan::new(root, start, end, budget))),
                );
            }
            write => {
                if let Some(why) = write.over_limits(self.key_len_max, self.value_len_max) {
                    return self.drop_client(format!("request {req_id:#x}: {why}"));
                }
                if self.commit_in_flight() {
                    self.probes.writes_waiting_for_next_batch += 1;
                }
                self.queue.push_back(QueuedWrite {
                    generation,
                    req_id,
                    request: write,
                    arrived: self.now,
                    read_ahead: ReadAhead::NotYet,
                });
                self.maybe_start_batch();
            }
        }
    }

    // ---- reads ----

    fn start_read(&mut self, generation: u64, req_id: u64, root: RootRef, kind: ReadKind) {
        let id = self.next_read;
        self.next_read += 1;
        let reserved_bytes = match &kind {
            // Pairs, their count and `next`, with room for the one pair a
            // RANGE returns whatever its budget.
            ReadKind::Range(scan) => scan.budget_bytes() as u64 + 2 * 512 + 8,
            ReadKind::Get { .. } => 0,
        };
        if let Some(c) = &mut self.client {
            c.range_bytes_reserved += reserved_bytes;
        }
        let snapshot_oldest_block = root.child.oldest_block;
        let snapshot_root_block = root.child.block;
        let op =
            ReadOp { generation, req_id, snapshot_oldest_block, snapshot_root_block, reserved_bytes, kind };
        self.run_read(id, op);
    }

    /// Continues read `id` once a page it waited for has come.
    fn continue_read(&mut self, id: u64) {
        let Some(op) = self.reads.remove(&id) else { return };
        self.run_read(id, op);
    }

    /// Runs read `id` as far as the cache allows: answers it, or files it
    /// in `reads` to wait for the page it needs (a read the cache answers
    /// at once never enters `reads`).
    fn run_read(&mut self, id: u64, mut op: ReadOp) {
        let outcome = match &mut op.kind {
            ReadKind::Get { key, descent } => {
                read::get(&mut self.cache, descent, key).map(KvldsResponse::Get)
            }
            ReadKind::Range(scan) => scan.run(&mut self.cache).map(|next| {
                if scan.cut_by_budget {
                    self.probes.range_answers_cut_by_budget += 1;
                }
                KvldsResponse::Range { next, pairs: std::mem::take(&mut scan.pairs) }
            }),
        };
        match outcome {
            Ok(response) => {
                if self.committed.is_some_and(|r| r.child.block != op.snapshot_root_block) {
                    self.probes.reads_finished_on_old_root += 1;
                }
                if let Some(c) = self.client.as_mut().filter(|c| c.generation == op.generation) {
                    c.range_bytes_reserved -= op.reserved_bytes;
                }
                self.answer(op.generation, op.req_id, &response);
            }
            Err(Stall::NeedPage(block)) => {
                self.probes.waits_for_pages += 1;
                self.reads.insert(id, op);
                self.load(block, |l| l.readers.push(id));
            }
            Err(Stall::Corrupt { block, why }) => self.exit(format!("block {block} is corrupt: {why}")),
        }
    }

    // ---- writes ----

    /// Starts a batch when modifying requests are due (`-w`, `-g`), or
    /// when none waits and the cleaner has leaves ready.
    fn maybe_start_batch(&mut self) {
        if !matches!(self.phase, Phase::Serving) {
            return;
        }
        if let Some(batch) = &self.batch {
            // An open batch (the commit below it is being written) takes
            // what came since.
            if self.sent.is_some() && !batch.rebalancing && !self.queue.is_empty() {
                self.run_batch();
            }
            return;
        }
        match self.queue.front() {
            Some(first) => {
                let due = first.arrived.after_ns(self.config.commit_delay_ns);
                if (self.queue.len() as u64) < self.config.commit_forced_requests && self.now < due {
                    return;
                }
            }
            None if self.cleaning_ready => {}
            None => return,
        }
        self.cleaning_ready = false;
        if self.sent.is_some() {
            self.probes.batches_on_unsynced_commit += 1;
        }
        self.batch = Some(Batch {
            tree: DirtyTree::new(self.tip(), self.block_size),
            answers: Vec::new(),
            writing: None,
            rebalancing: false,
            superseded: Vec::new(),
            cleaning_done: false,
            leaves_cleaned: 0,
            clean_below: self.clean_threshold(),
            took_requests: false,
        });
        self.run_batch();
    }

    /// Whether the batch has taken all the requests one commit may carry
    /// (an estimate that errs high: every byte added may need a third of a
    /// page, and splits may reach the root).
    fn batch_full(&self, tree: &DirtyTree) -> bool {
        let pages = tree.dirty_nodes()
            + 3 * tree.bytes_added / self.block_size
            + 2 * (usize::from(tree.root_level()) + 2);
        pages * self.block_size >= COMMIT_BYTES_MAX
    }

    /// Moves the batch on as far as it can: applies queued requests, then
    /// rebalances, then sends the APPEND. Stalls wait for a page.
    fn run_batch(&mut self) {
        let Some(mut batch) = self.batch.take() else { return };
        if !batch.rebalancing {
            while let Some(w) = self.queue.front() {
                if self.batch_full(&batch.tree) {
                    break;
                }
                match batch.tree.apply(&w.request, &mut self.cache) {
                    Ok(done) => {
                        batch.answers.push((w.generation, w.req_id, done));
                        batch.took_requests = true;
                        self.queue.pop_front();
                    }
                    Err(stall) => return self.batch_stalled(batch, stall),
                }
            }
            if !batch.tree.modified && !batch.answers.is_empty() {
                // Nothing changed: every answer rests on the tree below
                // alone, whatever cleaning adds later. If that is the
                // commit being written, they go out once it is durable.
                self.probes.empty_batches += 1;
                let answers = std::mem::take(&mut batch.answers);
                match &mut self.sent {
                    Some(sent) => {
                        self.probes.answers_held_for_commit_below += answers.len() as u64;
                        sent.answers.extend(answers);
                    }
                    None => {
                        for (generation, req_id, done) in answers {
                            self.answer(generation, req_id, &KvldsResponse::Done(done));
                        }
                    }
                }
            }
            if self.sent.is_some() {
                // Open until the commit below is durable.
                self.batch = Some(batch);
                return;
            }
            if !batch.cleaning_done {
                batch.cleaning_done = true;
                if !self.clean_into(&mut batch) {
                    return;
                }
            }
            if !batch.tree.modified {
                return self.maybe_start_batch();
            }
            batch.rebalancing = true;
        }
        if let Err(stall) = batch.tree.rebalance(&mut self.cache) {
            return self.batch_stalled(batch, stall);
        }
        if self.config.check_invariants {
            batch.tree.check_invariants();
        }
        let counts = batch.tree.counts;
        self.probes.splits += counts.splits;
        self.probes.root_splits += counts.root_splits;
        self.probes.merges += counts.merges;
        self.probes.merge_cascades += counts.merge_cascades;
        self.probes.deroots += counts.deroots;
        batch.superseded = std::mem::take(&mut batch.tree.superseded);
        let tree = std::mem::replace(&mut batch.tree, DirtyTree::new(None, self.block_size));
        let commit = tree.into_pages(self.next_block);
        let count = commit.pages.len();
        let mut pages = Vec::with_capacity(count);
        for p in &commit.pages {
            let view = p.view(self.block_size);
            if !view.keys_ascending() {
                // Only pages corrupt in a way their checks could not see
                // can lead here: nothing of this batch is written.
                return self.exit(format!("page {} of the commit has keys out of order", p.block()));
            }
            if self.config.check_invariants {
                // What goes to lbs validates as the page it was built from.
                let block = p.block();
                let back = page::parse(Bytes::copy_from_slice(view.bytes()), block, self.block_size);
                let back =
                    back.unwrap_or_else(|e| panic!("page {block} of the commit does not validate: {e}"));
                assert_eq!(back.to_page(), p.to_page(), "page {block} does not round-trip");
                assert_eq!(
                    back.child_ref(),
                    view.child_ref(),
                    "page {block}: the view's length or oldest block"
                );
            }
            pages.push(Rc::new(view));
        }
        // The pages go straight into the packet for lbs.
        let (start, block_size) = (self.next_block, self.block_size);
        self.upstream_with(UpRequest::Append, |id, up_out| {
            up_out.reserve(count * block_size + 64);
            encode_append_with(id, count as u32, start, up_out, |out| {
                for view in &pages {
                    out.extend_from_slice(view.bytes());
                }
            });
        });
        self.cache.hold_unsynced(&pages);
        batch.writing = Some((pages, commit.root));
        self.sent = Some(batch);
    }

    // ---- cleaning ----

    /// Blocks from the oldest the committed tree reaches to the newest.
    pub fn log_blocks(&self) -> u64 {
        self.committed.map_or(0, |r| self.next_block.saturating_sub(r.child.oldest_block))
    }

    /// Whether the cache can pin a leaf and the pages above it (half the
    /// cache may be pinned). If not, cleaning happens only within client
    /// batches, with the pages they bring, and sets no timer: reading pages
    /// that evict each other would never end.
    fn cleaning_can_pin_a_path(&self) -> bool {
        self.committed.is_some_and(|r| self.cache.pages_max() / 2 > usize::from(r.level))
    }

    /// Leaves below this block are old enough to clean (0 while cleaning
    /// is off): [`clean::clean_threshold`].
    fn clean_threshold(&self) -> u64 {
        self.tree_pages.map_or(0, |n| clean::clean_threshold(self.next_block, n))
    }

    /// The cleaner's turn in a batch, after its client requests: copies in
    /// the oldest leaves owed that are in the cache. False if the node
    /// stopped (corruption found).
    fn clean_into(&mut self, batch: &mut Batch) -> bool {
        let (Some(tree_pages), Some(root)) = (self.tree_pages, self.committed) else { return true };
        self.pacing.accrue(self.now, self.log_blocks(), tree_pages);
        let want = self.pacing.owed();
        if want == 0 {
            self.cache.unpin_all();
            return true;
        }
        let sel = match clean::oldest_leaves(
            &mut self.cache,
            root,
            batch.clean_below,
            want,
            clean::CLEAN_READS_MAX,
        ) {
            Ok(sel) => sel,
            Err(stall) => {
                self.stalled_on_corruption(stall);
                return false;
            }
        };
        for (key, block) in &sel.leaves {
            if self.batch_full(&batch.tree) {
                break;
            }
            match batch.tree.touch(key, *block, &mut self.cache) {
                Ok(true) => batch.leaves_cleaned += 1,
                Ok(false) => {}
                Err(stall) => {
                    self.stalled_on_corruption(stall);
                    return false;
                }
            }
        }
        self.cache.unpin_all();
        self.read_for_cleaning(&sel.missing);
        true
    }

    /// Between batches (after each commit, and on the cleaner's timer):
    /// brings the debt up to date, pins the oldest leaves found in the
    /// cache (and the pages above them) for the next batch, reads those
    /// that are not, and starts a batch of cleaning alone when no client
    /// request waits. A page read for cleaning is pinned when it comes and
    /// waits for the next of these: looking again at once, in a small
    /// cache, could evict what the last read brought and read it again, for
    /// ever.
    fn clean_step(&mut self) {
        if !matches!(self.phase, Phase::Serving) {
            return;
        }
        let (Some(tree_pages), Some(root)) = (self.tree_pages, self.committed) else { return };
        if !self.cleaning_can_pin_a_path() {
            return;
        }
        self.clean_tick_due = self.now.after_ns(clean::CLEAN_TICK_NS);
        self.pacing.accrue(self.now, self.log_blocks(), tree_pages);
        self.cache.unpin_all();
        let want = self.pacing.owed();
        if want == 0 {
            return;
        }
        let threshold = self.clean_threshold();
        let sel = match clean::oldest_leaves(&mut self.cache, root, threshold, want, clean::CLEAN_READS_MAX) {
            Ok(sel) => sel,
            Err(stall) => return self.stalled_on_corruption(stall),
        };
        // The pages above the leaves first: without them a leaf cannot be
        // reached.
        for &block in sel.internal.iter().chain(sel.leaves.iter().map(|(_, b)| b)) {
            self.cache.pin(block);
        }
        // A commit of its own rewrites the pages above its leaves too: it
        // waits until enough is owed for that to be worth it.
        let alone = want >= clean::cleaning_alone_min(tree_pages);
        // Moving these few leaves would not shrink the log: leave them to
        // client commits, and set no timer until one comes. (With leaves
        // still being read, a partial group may go, but only while the log
        // is past the threshold by as much again: else a cache smaller
        // than the tree would move a few leaves at a time for ever.)
        let slack = tree_pages / 8 + clean::GARBAGE_BLOCKS_MIN;
        let far_behind = root.child.oldest_block < threshold.saturating_sub(slack);
        if alone
            && !sel.worth_a_commit_alone(root.child.oldest_block)
            && (sel.missing.is_empty() || !far_behind)
        {
            self.cache.unpin_all();
            self.cleaning_idle_at = Some(self.next_block);
            return;
        }
        self.read_for_cleaning(&sel.missing);
        if alone && !sel.leaves.is_empty() && self.batch.is_none() && self.queue.is_empty() {
            self.cleaning_ready = true;
            self.maybe_start_batch();
        }
    }

    /// Reads pages the cleaner wants (a few at once, and no more than a
    /// quarter of the cache).
    fn read_for_cleaning(&mut self, blocks: &[u64]) {
        let reads_max = clean::CLEAN_READS_MAX.min(self.cache.pages_max() / 4 + 1);
        for &block in blocks {
            if self.cleaning_reads >= reads_max {
                break;
            }
            if !self.loads.contains_key(&block) {
                self.cleaning_reads += 1;
                let root = self.committed.map(|r| r.child.block);
                self.load(block, |l| {
                    l.cleaning = true;
                    l.cleaning_root = root;
                });
            }
        }
    }

    fn batch_stalled(&mut self, batch: Batch, stall: Stall) {
        self.batch = Some(batch);
        match stall {
            Stall::NeedPage(block) => {
                self.probes.waits_for_pages += 1;
                self.load(block, |l| l.batch = true);
                self.prefetch();
            }
            Stall::Corrupt { block, why } => self.exit(format!("block {block} is corrupt: {why}")),
        }
    }

    /// Reads ahead, for the requests queued behind the stalled one, the
    /// first page of their path that is not cached (again once that page
    /// has come, for the next one down).
    fn prefetch(&mut self) {
        let Some(root) = self.tip() else { return };
        let limit = PREFETCH_PAGES_MAX.min(self.cache.pages_max() / 4);
        for i in 1..self.queue.len().min(1 + PREFETCH_SCAN_MAX) {
            if self.prefetches >= limit {
                break;
            }
            let w = &self.queue[i];
            match w.read_ahead {
                ReadAhead::Done => continue,
                ReadAhead::Reading(block) if self.loads.contains_key(&block) => continue,
                _ => {}
            }
            let Some(key) = tree::modified_key(&w.request).cloned() else { continue };
            let mut d = Descent::from_root(root);
            let state = match read::get(&mut self.cache, &mut d, &key) {
                Err(Stall::NeedPage(block)) => {
                    if !self.loads.contains_key(&block) {
                        self.prefetches += 1;
                        self.load(block, |l| l.prefetch = true);
                    }
                    ReadAhead::Reading(block)
                }
                _ => ReadAhead::Done,
            };
            self.queue[i].read_ahead = state;
        }
    }

    fn append_done(&mut self, next_block: Option<u64>) {
        let Some(mut batch) = self.sent.take() else {
            return self.exit("lbs answered an APPEND that was not sent".into());
        };
        let Some((pages, root)) = batch.writing.take() else {
            return self.exit("lbs answered an APPEND that was not sent".into());
        };
        let Some(next_block) = next_block else {
            return self.exit(format!(
                "lbs refused the APPEND at block {} (is another kvlds using this lbs?)",
                self.next_block
            ));
        };
        let written_end = self.next_block + pages.len() as u64;
        if next_block < written_end || next_block >= BLOCK_NUMBER_MAX {
            return self
                .exit(format!("lbs says the next block is {next_block} after writing up to {written_end}"));
        }
        self.next_block = next_block;
        self.committed = Some(root);
        self.probes.commits += 1;
        if batch.leaves_cleaned > 0 {
            self.probes.cleaning_commits += 1;
            self.probes.leaves_cleaned += batch.leaves_cleaned;
            if !batch.took_requests {
                self.probes.cleaning_only_commits += 1;
            }
        }
        if let Some(n) = self.tree_pages {
            let replaced = batch.superseded.len() as u64;
            assert!(
                !self.config.check_invariants || replaced <= n,
                "a commit replaced {replaced} pages of a tree of {n}"
            );
            let n = n.saturating_sub(replaced) + pages.len() as u64;
            self.tree_pages = Some(n);
            let old_pages_replaced = batch.superseded.iter().filter(|&&b| b < batch.clean_below).count();
            self.pacing.paid(old_pages_replaced as u64, n);
        }
        for (generation, req_id, done) in std::mem::take(&mut batch.answers) {
            self.answer(generation, req_id, &KvldsResponse::Done(done));
        }
        self.maybe_free();
        // The open batch, if any, may now be rebalanced and sent: first, so
        // that lbs writes it while this commit's pages settle.
        self.run_batch();
        for block in std::mem::take(&mut batch.superseded) {
            self.cache.remove(block);
        }
        drop(pages);
        self.cache.settle(written_end);
        self.maybe_start_batch();
        self.clean_step();
    }

    /// Tells lbs it may delete blocks below the oldest page still reachable
    /// from the committed tree or from the tree any read in progress reads.
    fn maybe_free(&mut self) {
        let Some(root) = self.committed else { return };
        if self.frees_disabled {
            return;
        }
        let oldest =
            self.reads.values().map(|r| r.snapshot_oldest_block).fold(root.child.oldest_block, u64::min);
        if oldest > self.freed_below {
            self.freed_below = oldest;
            self.probes.frees += 1;
            self.upstream(LbsRequest::Free { keep_from: oldest }, UpRequest::Free);
        }
    }

    // ---- lbs's answers ----

    fn upstream_bytes(&mut self, data: &[u8]) {
        self.up_decoder.push(data);
        loop {
            if self.stopped() {
                return;
            }
            let packet = match self.up_decoder.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => return self.exit(format!("bad packet from lbs: {e}")),
            };
            let Some(waiting) = self.up_pending.remove(&packet.id) else {
                return self.exit(format!("lbs answered request {:#x}, which was not asked", packet.id));
            };
            let kind = match waiting {
                UpRequest::Params2 => LbsRequestKind::Params2,
                UpRequest::Get { .. } => LbsRequestKind::Get,
                UpRequest::Append => LbsRequestKind::Append,
                UpRequest::Free => LbsRequestKind::Free,
            };
            let response = match LbsResponse::decode(kind, packet.record) {
                Ok(r) => r,
                Err(e) => return self.exit(format!("bad answer from lbs: {e}")),
            };
            match (waiting, response) {
                (UpRequest::Params2, LbsResponse::Params2 { block_size, next_block, last_block }) => {
                    self.params_arrived(block_size, next_block, last_block)
                }
                (UpRequest::Get { block }, LbsResponse::Get(data)) => {
                    if data.as_ref().is_some_and(|d| d.len() != self.block_size) {
                        return self.exit(format!("lbs returned block {block} with the wrong length"));
                    }
                    self.page_arrived(block, data)
                }
                (UpRequest::Append, LbsResponse::Append(next)) => self.append_done(next),
                (UpRequest::Free, LbsResponse::Free) => {}
                _ => return self.exit("lbs answered with the wrong kind of response".into()),
            }
        }
    }
}

impl Node for KvldsNode {
    fn handle_input(&mut self, now: Instant, input: Input) {
        if self.stopped() {
            return;
        }
        self.now = self.now.max(now);
        match input {
            Input::Received { conn, data } if conn == ConnId::UPSTREAM => self.upstream_bytes(&data),
            Input::Closed { conn, reason } if conn == ConnId::UPSTREAM => {
                let why = match reason {
                    ConnClosed::PeerClosed => "closed".to_string(),
                    ConnClosed::Failed(e) => format!("failed: {e}"),
                };
                self.exit(format!("the connection to lbs {why}"));
            }
            Input::Sent { conn, .. } if conn == ConnId::UPSTREAM => {}
            Input::Accepted { conn } => self.accept(conn),
            Input::Received { conn, data } => {
                if let Some(c) = self.client.as_mut().filter(|c| c.conn == conn) {
                    c.decoder.push(&data);
                    self.process_requests();
                }
            }
            Input::Sent { conn, len_bytes } => {
                if let Some(c) = self.client.as_mut().filter(|c| c.conn == conn) {
                    c.unsent_bytes = c.unsent_bytes.saturating_sub(len_bytes);
                    self.process_requests();
                }
            }
            Input::Closed { conn, reason } => {
                if self.client.as_ref().is_some_and(|c| c.conn == conn) {
                    if let ConnClosed::Failed(e) = reason {
                        self.log(LogLevel::Info, format!("client {conn} failed: {e}"));
                    }
                    self.forget_client();
                }
            }
            Input::Disk { .. } => {
                self.exit("a disk completion arrived, but kvlds asks for no disk I/O".into())
            }
            Input::Timeout => self.maybe_start_batch(),
        }
        if !self.stopped() && self.tree_pages.is_some() && self.now >= self.clean_tick_due {
            self.clean_step();
        }
        if !self.stopped() {
            // Answers may have freed room for more requests.
            self.process_requests();
            self.flush();
            if self.config.check_invariants {
                assert!(self.cache.len() <= self.cache.pages_max(), "page cache above its bound");
            }
        }
    }

    fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        if !matches!(self.phase, Phase::Serving) {
            return None;
        }
        let commit_due = match (&self.batch, self.queue.front()) {
            (None, Some(first)) => Some(first.arrived.after_ns(self.config.commit_delay_ns)),
            _ => None,
        };
        // While there are leaves old enough to clean: when enough is owed
        // for a commit of cleaning alone, and no sooner than a tick after
        // the cleaner last looked.
        let clean_due = match (self.tree_pages, self.committed) {
            (Some(n), Some(root))
                if root.child.oldest_block < self.clean_threshold()
                    && self.cleaning_can_pin_a_path()
                    && self.cleaning_idle_at != Some(self.next_block) =>
            {
                self.pacing
                    .owed_at(clean::cleaning_alone_min(n), self.log_blocks().saturating_sub(n))
                    .map(|owed| owed.max(self.clean_tick_due))
            }
            _ => None,
        };
        match (commit_due, clean_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
