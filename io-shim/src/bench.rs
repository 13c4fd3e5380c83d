//! `kivaloo bench`: kivaloo's six benchmarks (its `bench/` programs), with
//! kivaloo's data, requests, window and statistics, so that figures can be
//! compared with kivaloo's own.
//!
//! # The data (kivaloo's `mkpairs`, `lib/bench/mkpair.c`)
//!
//! Pair number `X * 2^16 + Y` (for `X` = 0, 1, ... and `Y` < 2^16) has
//!
//! - the 40-byte key `X` (8 bytes, big-endian) followed by
//!   SHA-256(`0x00`, `X`, `Y`), `X` and `Y` 8 bytes big-endian each;
//! - the 40-byte value `X * 2^16 + Y` (8 bytes, big-endian) followed by
//!   SHA-256(`0x00`, `X`, `Y`) again. kivaloo's comment on `mkval` says
//!   `0x01`, but its code hashes with `0x00` (the value's digest is the
//!   key's); this module does what kivaloo's code does, so that the pairs are
//!   byte for byte those of kivaloo's `mkpairs`.
//!
//! `--pairs N` takes pairs 0 to N-1, used in key order (which is `X` order,
//! and within one `X` the order of the digests). They are computed once, in
//! memory (80 bytes a pair), before the clock starts.
//!
//! # The workloads
//!
//! All but bulk-extract keep [`IN_FLIGHT_DEFAULT`] (4096, kivaloo's)
//! requests in flight on one connection: a new one is sent as each answer
//! arrives. bulk-extract has one RANGE in flight, as kivaloo's.
//!
//! | workload | requests | result |
//! |---|---|---|
//! | bulk-insert | SET of every pair, in key order, once | a point for each power of two `p`: the insert rate from the `p`th answer to the `2p`th, or over 10 s if that is longer (then not counting answers after the 10 s); a point of fewer than 4096 inserts, or whose answers all came in one read, is not shown |
//! | bulk-update | SET of every pair in key order, over and over; pass `g` (from 0) adds `g` to the value's last byte | median of 10 one-second counts of answers, after 50 s |
//! | bulk-extract | RANGE (1 MiB budget) from the first key to past the last, page after page, over and over | median of 10 one-second counts of pairs received, after 50 s |
//! | random-read | GET of a pair chosen uniformly at random | median of 100 one-second counts, after 50 s |
//! | random-mixed | requests 0, 1 (mod 4) GET, 2, 3 SET a random pair; the SET of request `i` stores `i + 1` (8 bytes big-endian) and 32 zero bytes | mean of 100 one-second counts, after 50 s |
//! | hotspot-read | GET of the 2^16 pairs of one random `X` (consecutive in key order) in `Y` order (random in key order), then another `X` | median of 10 one-second counts, after 50 s |
//!
//! The one-second counts are kivaloo's (`lib/bench/bench.c`, here
//! [`SlotCounts`]): nothing is counted before the warm-up ends; the first
//! answer after it opens the first second, and an answer more than a second
//! after the answer that opened the current second opens the next one.
//! `--seconds S` shrinks the warm-up and the seconds in proportion (S = 60,
//! or 150 for the random workloads, is kivaloo's) and divides the counts by
//! the shrunk second; for bulk-insert it is the longest window of a point
//! (10 s by default, kivaloo's). Since a slot opens only at an answer, the
//! time between answers that straddle a slot's end is not counted: with
//! bursty answers and short slots the statistics overstate the rate, so the
//! result line also gives the plain rate over the whole time counted
//! ([`SlotCounts::counted_span`]).
//!
//! Every workload but bulk-insert expects the store to hold the `--pairs`
//! pairs already (bulk-insert them into an empty store first, as kivaloo's
//! `bench-local.sh` does). A GET that finds no value is counted like one
//! that does, as kivaloo does, and reported at the end.
//!
//! # Output and exit status
//!
//! stdout: bulk-insert's points as they are measured, then one line with
//! the result. stderr: what is run, then the progress (a line rewritten in
//! place if stderr is a terminal, a line every few seconds otherwise).
//! Exit status: 0 done; 1 the store is empty (bulk-extract); 2 usage; 3 the
//! store cannot be reached, the connection was lost, the store answered
//! garbage or refused a request, or it answered nothing for 60 s; 4 writing
//! stdout failed.
//!
//! # How it is fast
//!
//! The client must not be what is measured: requests are written straight
//! from the precomputed pairs into one reused buffer (many per `write`),
//! answers are decoded in place, and nothing is allocated per request. One
//! thread writes and one reads; they share the window through atomics (the
//! writer parks when it is full, the reader wakes it).

use std::io::{self, IsTerminal, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use clap::{Args, ValueEnum};
use kivaloo::client::{DEFAULT_IN_FLIGHT_MAX, RANGE_MAX_BYTES, RESPONSE_RECORD_LEN_MAX};
use kivaloo::kvlds_proto::{request_type, KvldsRequestKind, KvldsResponse};
use kivaloo::packet::{encode_packet_with, Packet, PacketDecoder};
use kivaloo::LogLevel;
use sha2::{Digest, Sha256};

use crate::addr::SocketAddr;
use crate::cli::{EXIT_DONE, EXIT_NOT_DONE, EXIT_OUTPUT, EXIT_STORE, EXIT_USAGE};
use crate::runtime::log;

/// The length of every key.
pub const KEY_LEN: usize = 40;
/// The length of every value.
pub const VALUE_LEN: usize = 40;
/// A pair as stored here: the key, then the value.
pub const PAIR_LEN: usize = KEY_LEN + VALUE_LEN;
/// Pairs with one `X`: `Y` runs over 0..2^16.
pub const GROUP_LEN: u64 = 1 << 16;
/// `--pairs` by default.
pub const PAIRS_DEFAULT: u64 = 1 << 20;
/// The most `--pairs` (80 bytes each in memory: 5 GiB).
pub const PAIRS_MAX: u64 = 1 << 26;
/// Requests in flight by default: kivaloo's benchmarks keep 4096.
pub const IN_FLIGHT_DEFAULT: u32 = DEFAULT_IN_FLIGHT_MAX as u32;
/// The most `--in-flight`.
pub const IN_FLIGHT_MAX: u32 = 1 << 16;
/// The byte budget of bulk-extract's RANGEs: kivaloo's (1 MiB).
pub const RANGE_BUDGET: u32 = RANGE_MAX_BYTES;
/// A bulk-insert point of fewer inserts than this is not shown (kivaloo:
/// it could be one burst of answers).
pub const INSERT_POINT_MIN: u64 = 4096;
/// bulk-insert's longest window for one point by default (kivaloo's).
pub const INSERT_WINDOW_DEFAULT: Duration = Duration::from_secs(10);
/// The warm-up of the timed workloads, at their full length (kivaloo's).
const WARMUP_SECONDS: f64 = 50.0;
/// The longest `--seconds`.
const SECONDS_MAX: f64 = 1e6;

/// Requests encoded into one `write`, at most.
const WRITE_BATCH_MAX: u64 = 512;
/// Bytes read at a time.
const READ_BUF_LEN: usize = 256 << 10;
/// Request IDs whose answers are tracked: an answer must carry the ID of a
/// request sent and not yet answered among the last this many. The writer
/// waits rather than send a request this far past the oldest unanswered
/// one, so one request the store never answers stops the benchmark (after
/// [`STALL_LIMIT`]) instead of growing anything.
const ANSWERED_IDS: u64 = 1 << 20;
/// With requests in flight and no byte from the store for this long, the
/// benchmark fails.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// How often a blocked read wakes to check [`STALL_LIMIT`].
const READ_POLL: Duration = Duration::from_secs(1);
/// The ID of the PARAMS request sent first (a workload's requests are
/// numbered from 0).
const PARAMS_ID: u64 = u64::MAX;

/// The benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// SET every pair in key order into an empty store; the insert rate after each power of two.
    BulkInsert,
    /// SET every pair again, in key order, over and over; updates per second.
    BulkUpdate,
    /// RANGE over the whole store, over and over; pairs per second.
    BulkExtract,
    /// GET uniformly random pairs; reads per second.
    RandomRead,
    /// GET and SET (two of each in turn) uniformly random pairs; requests per second.
    RandomMixed,
    /// GET the 65536 pairs of one random group in random key order, then another; reads per second.
    HotspotRead,
}

impl Workload {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::BulkInsert => "bulk-insert",
            Workload::BulkUpdate => "bulk-update",
            Workload::BulkExtract => "bulk-extract",
            Workload::RandomRead => "random-read",
            Workload::RandomMixed => "random-mixed",
            Workload::HotspotRead => "hotspot-read",
        }
    }

    /// What is counted.
    fn unit(self) -> &'static str {
        match self {
            Workload::BulkInsert => "inserts",
            Workload::BulkUpdate => "updates",
            Workload::BulkExtract => "pairs",
            Workload::RandomRead | Workload::HotspotRead => "reads",
            Workload::RandomMixed => "requests",
        }
    }

    /// The timed workloads' schedule at full length (kivaloo's), `None`
    /// for bulk-insert.
    fn schedule(self) -> Option<Schedule> {
        let (seconds_total, slots, stat) = match self {
            Workload::BulkInsert => return None,
            Workload::BulkUpdate | Workload::BulkExtract | Workload::HotspotRead => (60.0, 10, Stat::Median),
            Workload::RandomRead => (150.0, 100, Stat::Median),
            Workload::RandomMixed => (150.0, 100, Stat::Mean),
        };
        Some(Schedule { seconds_total, slots, stat })
    }

    /// The kind of request number `seq` (which is also its ID).
    fn request_kind(self, seq: u64) -> KvldsRequestKind {
        match self {
            Workload::BulkInsert | Workload::BulkUpdate => KvldsRequestKind::Set,
            Workload::RandomRead | Workload::HotspotRead => KvldsRequestKind::Get,
            Workload::RandomMixed if mixed_is_set(seq) => KvldsRequestKind::Set,
            Workload::RandomMixed => KvldsRequestKind::Get,
            Workload::BulkExtract => KvldsRequestKind::Range,
        }
    }
}

/// random-mixed's pattern (kivaloo's `(Nr++) & 2`): requests 2 and 3 of
/// every 4 are SETs.
fn mixed_is_set(seq: u64) -> bool {
    seq & 2 != 0
}

/// Which statistic of the one-second counts a timed workload reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stat {
    Median,
    Mean,
}

/// A timed workload at full length.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// Warm-up plus the counted seconds.
    seconds_total: f64,
    /// Seconds counted.
    slots: usize,
    stat: Stat,
}

const AFTER_HELP: &str = "\
kivaloo's benchmarks (its bench/ programs), with its data: pair X*65536+Y has the 40-byte key \
X (8 bytes big-endian) + SHA-256(0x00, X, Y) and the 40-byte value X*65536+Y + the same digest; \
--pairs N uses pairs 0 to N-1, in key order, computed in memory before the clock starts.

bulk-insert SETs them once (into an empty store) and prints, for each power of two p, the insert \
rate from the p-th answer to the 2p-th (over at most --seconds, default 10). The others expect \
the store to hold the same --pairs pairs already: run bulk-insert first. They warm up for 50 s \
then count answers (pairs, for bulk-extract) for 10 s (bulk-update, bulk-extract, hotspot-read) \
or 100 s (random-read, random-mixed), one second at a time, and print the median of the \
one-second counts (the mean for random-mixed), as kivaloo's do; --seconds S runs them for S s in \
all instead of 60 or 150, shrinking the warm-up and the seconds in proportion. A second opens at \
the first answer after the previous one ended, so when answers come in bursts short seconds \
overstate the rate: the result line also gives the plain rate over all the time counted.

4096 requests are kept in flight on one connection (--in-flight), as kivaloo's benchmarks do; \
bulk-extract has one RANGE in flight.

Exit status: 0 done; 1 the store is empty (bulk-extract); 2 usage error; 3 the store cannot be \
reached, the connection was lost, the store answered garbage or refused a request, or it \
answered nothing for 60 s; 4 writing stdout failed.";

/// `kivaloo bench`'s arguments.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = AFTER_HELP)]
pub struct BenchArgs {
    /// The benchmark.
    #[arg(value_enum)]
    pub workload: Workload,
    /// The store: a unix socket path, host:port or [ip]:port (where `kivaloo serve --listen`
    /// listens, or a kvlds or mux socket).
    #[arg(long, value_name = "ADDR", default_value = "kivaloo.sock")]
    pub socket: String,
    /// Pairs used (the store must already hold them for every workload but bulk-insert).
    #[arg(long, value_name = "N", default_value_t = PAIRS_DEFAULT)]
    pub pairs: u64,
    /// Run a timed workload for S seconds in all instead of kivaloo's 60 or 150, the warm-up
    /// and the counted seconds shrunk in proportion; for bulk-insert, the longest window of a
    /// point (default 10).
    #[arg(long, value_name = "S")]
    pub seconds: Option<f64>,
    /// Requests kept in flight (default 4096, as kivaloo's benchmarks; not for bulk-extract,
    /// which has one RANGE in flight).
    #[arg(long, value_name = "K",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(IN_FLIGHT_MAX)))]
    pub in_flight: Option<u32>,
}

/// Runs `kivaloo bench`. Returns the exit status (see the module docs).
pub fn run(args: &BenchArgs) -> i32 {
    let plan = match Plan::from_args(args) {
        Ok(plan) => plan,
        Err(msg) => {
            log("kivaloo bench", LogLevel::Error, &msg);
            return EXIT_USAGE;
        }
    };
    match bench(&plan) {
        Ok(()) => EXIT_DONE,
        Err(Failure::Usage(msg)) => {
            log("kivaloo bench", LogLevel::Error, &msg);
            EXIT_USAGE
        }
        Err(Failure::Store(msg)) => {
            log("kivaloo bench", LogLevel::Error, &msg);
            EXIT_STORE
        }
        Err(Failure::NotDone(msg)) => {
            log("kivaloo bench", LogLevel::Error, &msg);
            EXIT_NOT_DONE
        }
        Err(Failure::Output(e)) => {
            if e.kind() != io::ErrorKind::BrokenPipe {
                log("kivaloo bench", LogLevel::Error, &format!("writing the result failed: {e}"));
            }
            EXIT_OUTPUT
        }
    }
}

/// Why a benchmark failed, by exit status.
#[derive(Debug)]
enum Failure {
    /// [`EXIT_USAGE`].
    Usage(String),
    /// [`EXIT_STORE`].
    Store(String),
    /// [`EXIT_NOT_DONE`].
    NotDone(String),
    /// [`EXIT_OUTPUT`].
    Output(io::Error),
}

// ---------------------------------------------------------------------------
// The data.

/// SHA-256 of (`tag`, `x`, `y`), `x` and `y` 8 bytes big-endian.
fn digest(tag: u8, x: u64, y: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([tag]);
    h.update(x.to_be_bytes());
    h.update(y.to_be_bytes());
    h.finalize().into()
}

/// The key of pair `x * 2^16 + y`: `x` (8 bytes big-endian), then
/// SHA-256(0x00, `x`, `y`).
///
/// # Panics
/// If `y` is not below 2^16 (a programmer error).
pub fn make_key(x: u64, y: u64) -> [u8; KEY_LEN] {
    assert!(y < GROUP_LEN, "Y of {y} is not below 2^16");
    let mut key = [0u8; KEY_LEN];
    key[..8].copy_from_slice(&x.to_be_bytes());
    key[8..].copy_from_slice(&digest(0, x, y));
    key
}

/// The value of pair `x * 2^16 + y`: `x * 2^16 + y` (8 bytes big-endian),
/// then SHA-256(0x00, `x`, `y`), the key's digest: kivaloo's `mkval` says
/// `0x01` in its comment but hashes with `0x00`, and this matches its code.
///
/// # Panics
/// If `y` is not below 2^16 or `x` is 2^48 or more (programmer errors).
pub fn make_value(x: u64, y: u64) -> [u8; VALUE_LEN] {
    assert!(y < GROUP_LEN, "Y of {y} is not below 2^16");
    assert!(x < 1 << 48, "X of {x} is 2^48 or more");
    let mut value = [0u8; VALUE_LEN];
    value[..8].copy_from_slice(&((x << 16) + y).to_be_bytes());
    value[8..].copy_from_slice(&digest(0, x, y));
    value
}

/// kivaloo's benchmark pairs 0 to N-1, in key order.
pub struct Pairs {
    /// Key then value, in key order.
    pairs: Vec<[u8; PAIR_LEN]>,
}

impl Pairs {
    /// Computes pairs 0 to `n`-1 and sorts them by key, on every core.
    ///
    /// # Panics
    /// If `n` is over [`PAIRS_MAX`] (a programmer error; `kivaloo bench`
    /// refuses it as a usage error).
    pub fn generate(n: u64) -> Pairs {
        assert!(n <= PAIRS_MAX, "{n} pairs is over the maximum of {PAIRS_MAX}");
        let mut pairs = vec![[0u8; PAIR_LEN]; n as usize];
        let groups = n.div_ceil(GROUP_LEN) as usize;
        let threads = thread::available_parallelism().map_or(1, |t| t.get()).clamp(1, groups.max(1));
        // Groups are dealt round-robin to the threads; each fills and sorts
        // its own groups in place. Sorting each group sorts the whole, since
        // keys begin with X.
        let mut work: Vec<Vec<Group<'_>>> = (0..threads).map(|_| Vec::new()).collect();
        for (x, group) in pairs.chunks_mut(GROUP_LEN as usize).enumerate() {
            work[x % threads].push((x as u64, group));
        }
        thread::scope(|s| {
            for groups in work {
                s.spawn(move || {
                    for (x, group) in groups {
                        fill_group(x, group);
                    }
                });
            }
        });
        Pairs { pairs }
    }

    /// The number of pairs.
    pub fn len(&self) -> u64 {
        self.pairs.len() as u64
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The key of the `i`th pair in key order.
    pub fn key(&self, i: u64) -> &[u8] {
        &self.pairs[i as usize][..KEY_LEN]
    }

    /// The value of the `i`th pair in key order.
    pub fn value(&self, i: u64) -> &[u8] {
        &self.pairs[i as usize][KEY_LEN..]
    }

    /// The pair number (`X * 2^16 + Y`) of the `i`th pair in key order: the
    /// first 8 bytes of its value.
    pub fn number(&self, i: u64) -> u64 {
        let value = self.value(i);
        u64::from_be_bytes(value[..8].try_into().expect("8 bytes"))
    }

    /// For each pair number, its position in key order.
    fn positions(&self) -> Vec<u32> {
        let mut positions = vec![0u32; self.pairs.len()];
        for i in 0..self.len() {
            positions[self.number(i) as usize] = i as u32;
        }
        positions
    }
}

/// One group's number `X` and its pairs.
type Group<'a> = (u64, &'a mut [[u8; PAIR_LEN]]);

/// Fills `group` with the pairs of `x` (in `Y` order), then sorts it.
fn fill_group(x: u64, group: &mut [[u8; PAIR_LEN]]) {
    for (y, pair) in group.iter_mut().enumerate() {
        let y = y as u64;
        let hash = digest(0, x, y);
        pair[..8].copy_from_slice(&x.to_be_bytes());
        pair[8..KEY_LEN].copy_from_slice(&hash);
        pair[KEY_LEN..KEY_LEN + 8].copy_from_slice(&((x << 16) + y).to_be_bytes());
        pair[KEY_LEN + 8..].copy_from_slice(&hash);
    }
    group.sort_unstable();
}

// ---------------------------------------------------------------------------
// The statistics.

/// kivaloo's one-second counts (`lib/bench/bench.c`): nothing is counted
/// before `start`; the first answer at or after it opens slot 0, which ends
/// `slot_len` later; an answer after the end of the current slot opens the
/// next one (ending `slot_len` after that answer, so a gap without answers
/// is skipped rather than counted as empty slots); an answer after the end
/// of the last slot ends the benchmark and is not counted.
#[derive(Debug, Clone)]
pub struct SlotCounts {
    start: Instant,
    slot_len: Duration,
    /// The end of the current slot, once the first one is open.
    slot_end: Option<Instant>,
    /// When the first slot opened.
    first_open: Option<Instant>,
    counts: Vec<u64>,
    /// The slot being counted; `counts.len()` once over.
    current: usize,
}

impl SlotCounts {
    /// Counts in `slots` slots of `slot_len`, from `start` on.
    ///
    /// # Panics
    /// If `slots` is 0 (a programmer error).
    pub fn new(start: Instant, slot_len: Duration, slots: usize) -> SlotCounts {
        assert!(slots > 0, "no slots to count in");
        SlotCounts { start, slot_len, slot_end: None, first_open: None, counts: vec![0; slots], current: 0 }
    }

    /// Records `n` answers that arrived at `now` (not earlier than any
    /// recorded before). Returns whether the benchmark is over.
    pub fn record(&mut self, now: Instant, n: u64) -> bool {
        if self.is_over() {
            return true;
        }
        let slot_end = match self.slot_end {
            Some(end) => end,
            None if now < self.start => return false,
            None => {
                self.first_open = Some(now);
                *self.slot_end.insert(now + self.slot_len)
            }
        };
        if now > slot_end {
            self.current += 1;
            if self.is_over() {
                return true;
            }
            self.slot_end = Some(now + self.slot_len);
        }
        self.counts[self.current] += n;
        false
    }

    /// Whether every slot is counted.
    pub fn is_over(&self) -> bool {
        self.current >= self.counts.len()
    }

    /// The counts, slot by slot.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Once over, the time from the opening of the first slot to the end
    /// of the last, gaps between slots included: the counts' sum over it
    /// is the plain throughput while counting, `(N(end) - N(start)) /
    /// (end - start)` (kivaloo's statistic before its per-second counts).
    pub fn counted_span(&self) -> Option<Duration> {
        match (self.is_over(), self.first_open, self.slot_end) {
            (true, Some(first), Some(end)) => Some(end.duration_since(first)),
            _ => None,
        }
    }

    /// kivaloo's median: the middle count, or the mean (rounded down) of
    /// the two middle ones.
    pub fn median(&self) -> u64 {
        let mut sorted = self.counts.clone();
        sorted.sort_unstable();
        let mid = (sorted.len() - 1) / 2;
        if sorted.len().is_multiple_of(2) {
            (sorted[mid] + sorted[mid + 1]) / 2
        } else {
            sorted[mid]
        }
    }

    /// kivaloo's mean: the sum over the number of slots, rounded down.
    pub fn mean(&self) -> u64 {
        self.counts.iter().sum::<u64>() / self.counts.len() as u64
    }
}

/// One bulk-insert point: `inserts` answers in `seconds` from the answer
/// to insert number `at` (a power of two) on.
#[derive(Debug, Clone, PartialEq)]
pub struct InsertPoint {
    /// The power of two the window starts at.
    pub at: u64,
    /// Answers in the window (not counting the one at its start).
    pub inserts: u64,
    /// The window's length.
    pub seconds: f64,
}

impl InsertPoint {
    /// Inserts per second.
    pub fn rate(&self) -> f64 {
        self.inserts as f64 / self.seconds
    }
}

/// kivaloo's bulk-insert points (`bench/bulk_insert/main.c`): answer
/// number `p`, a power of two, opens a point; it closes at answer `2p`, or
/// at the first answer more than `window` after it opened (then counting
/// the answers before that one over exactly `window`). A point of fewer
/// than [`INSERT_POINT_MIN`] inserts is dropped, as kivaloo does, since it
/// could be one burst of answers; so is one that opened and closed in the
/// same burst (here: one read from the socket, given one clock reading),
/// for the same reason. (kivaloo's comment says one second; its code,
/// followed here, says 10.)
#[derive(Debug, Clone)]
pub struct InsertPoints {
    window: Duration,
    /// Answers recorded.
    answered: u64,
    /// The open point: its power of two and when it opened.
    open: Option<(u64, Instant)>,
}

impl InsertPoints {
    /// No answers yet; points are at most `window` long.
    pub fn new(window: Duration) -> InsertPoints {
        InsertPoints { window, answered: 0, open: None }
    }

    /// Answers recorded.
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// Records `n` answers that arrived together at `now`, appending the
    /// points they close to `closed`.
    pub fn record(&mut self, now: Instant, n: u64, closed: &mut Vec<InsertPoint>) {
        let before = self.answered;
        let after = before + n;
        let mut power = (before + 1).next_power_of_two();
        while power <= after {
            if let Some((at, since)) = self.open.take() {
                let elapsed = now.duration_since(since);
                if elapsed > self.window {
                    // Every answer from before + 1 on came after the window.
                    self.close(at, before - at, self.window, closed);
                } else {
                    self.close(at, power - at, elapsed, closed);
                }
            }
            self.open = Some((power, now));
            match power.checked_mul(2) {
                Some(next) => power = next,
                None => break,
            }
        }
        if let Some((at, since)) = self.open {
            if now.duration_since(since) > self.window {
                self.open = None;
                self.close(at, before - at, self.window, closed);
            }
        }
        self.answered = after;
    }

    fn close(&self, at: u64, inserts: u64, elapsed: Duration, closed: &mut Vec<InsertPoint>) {
        let seconds = elapsed.as_secs_f64();
        if inserts >= INSERT_POINT_MIN && seconds > 0.0 {
            closed.push(InsertPoint { at, inserts, seconds });
        }
    }
}

// ---------------------------------------------------------------------------
// Requests.

/// Appends a kvlds string (length byte, bytes).
fn put_string(o: &mut BytesMut, s: &[u8]) {
    debug_assert!(s.len() <= usize::from(u8::MAX));
    o.put_u8(s.len() as u8);
    o.extend_from_slice(s);
}

/// Appends a SET packet (the record as [`kivaloo::kvlds_proto::KvldsRequest`]
/// encodes it; the unit tests check that they agree).
fn encode_set(out: &mut BytesMut, id: u64, key: &[u8], value: &[u8]) {
    encode_packet_with(out, id, |o| {
        o.put_u32(request_type::SET);
        put_string(o, key);
        put_string(o, value);
    });
}

/// Appends a GET packet.
fn encode_get(out: &mut BytesMut, id: u64, key: &[u8]) {
    encode_packet_with(out, id, |o| {
        o.put_u32(request_type::GET);
        put_string(o, key);
    });
}

/// Appends a RANGE packet.
fn encode_range(out: &mut BytesMut, id: u64, max_bytes: u32, start: &[u8], end: &[u8]) {
    encode_packet_with(out, id, |o| {
        o.put_u32(request_type::RANGE);
        o.put_u32(max_bytes);
        put_string(o, start);
        put_string(o, end);
    });
}

/// A small, fast random generator (SplitMix64): the benchmarks need
/// uniform choices, not secrets.
struct Rng(u64);

impl Rng {
    /// Seeded from the clock and the process ID.
    fn from_clock() -> Rng {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Rng(nanos ^ (u64::from(std::process::id()) << 32))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (multiply-shift; the bias is below 2^-40 for any n
    /// this module uses).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// hotspot-read's state: the group being read and the next `Y`.
struct Hotspot {
    /// Position in key order of each pair number.
    positions: Vec<u32>,
    /// Whole groups of 2^16 (kivaloo: `N / 65536`).
    groups: u64,
    x: u64,
    y: u64,
}

/// Encodes a pipelined workload's requests, request number = request ID.
struct RequestMaker<'a> {
    workload: Workload,
    pairs: &'a Pairs,
    rng: Rng,
    hotspot: Option<Hotspot>,
}

impl<'a> RequestMaker<'a> {
    /// # Panics
    /// For bulk-extract, or hotspot-read with fewer than 2^16 pairs
    /// (programmer errors: [`Plan::from_args`] refuses them).
    fn new(workload: Workload, pairs: &'a Pairs, rng: Rng) -> RequestMaker<'a> {
        assert!(workload != Workload::BulkExtract, "bulk-extract sends one RANGE at a time");
        let hotspot = (workload == Workload::HotspotRead).then(|| {
            assert!(pairs.len() >= GROUP_LEN, "hotspot-read needs a whole group of pairs");
            Hotspot { positions: pairs.positions(), groups: pairs.len() / GROUP_LEN, x: 0, y: GROUP_LEN }
        });
        RequestMaker { workload, pairs, rng, hotspot }
    }

    /// Appends request number `seq` (requests are made in order).
    fn encode(&mut self, seq: u64, out: &mut BytesMut) {
        let pairs = self.pairs;
        match self.workload {
            Workload::BulkInsert => encode_set(out, seq, pairs.key(seq), pairs.value(seq)),
            Workload::BulkUpdate => {
                let i = seq % pairs.len();
                let pass = seq / pairs.len();
                let mut value = [0u8; VALUE_LEN];
                value.copy_from_slice(pairs.value(i));
                // kivaloo: `buf[39] += generation` on a byte.
                value[VALUE_LEN - 1] = value[VALUE_LEN - 1].wrapping_add(pass as u8);
                encode_set(out, seq, pairs.key(i), &value);
            }
            Workload::RandomRead => encode_get(out, seq, pairs.key(self.rng.below(pairs.len()))),
            Workload::RandomMixed => {
                let key = pairs.key(self.rng.below(pairs.len()));
                if mixed_is_set(seq) {
                    let mut value = [0u8; VALUE_LEN];
                    value[..8].copy_from_slice(&(seq + 1).to_be_bytes());
                    encode_set(out, seq, key, &value);
                } else {
                    encode_get(out, seq, key);
                }
            }
            Workload::HotspotRead => {
                let h = self.hotspot.as_mut().expect("hotspot-read has its state");
                if h.y == GROUP_LEN {
                    h.x = self.rng.below(h.groups);
                    h.y = 0;
                }
                let position = h.positions[(h.x * GROUP_LEN + h.y) as usize];
                h.y += 1;
                encode_get(out, seq, pairs.key(u64::from(position)));
            }
            Workload::BulkExtract => unreachable!("checked in RequestMaker::new"),
        }
    }
}

// ---------------------------------------------------------------------------
// The connection.

/// A blocking connection to the store.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn connect(addr: &SocketAddr) -> io::Result<Conn> {
        match addr {
            SocketAddr::Unix(path) => UnixStream::connect(path).map(Conn::Unix),
            SocketAddr::Tcp(s) => {
                let stream = TcpStream::connect(s.as_str())?;
                stream.set_nodelay(true)?;
                Ok(Conn::Tcp(stream))
            }
        }
    }

    fn try_clone(&self) -> io::Result<Conn> {
        match self {
            Conn::Unix(s) => s.try_clone().map(Conn::Unix),
            Conn::Tcp(s) => s.try_clone().map(Conn::Tcp),
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    /// Shuts the socket down both ways, waking any thread blocked on it.
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads from the store, waiting at most [`STALL_LIMIT`] for a byte.
/// Returns the bytes read (at least one).
fn read_some(conn: &mut Conn, buf: &mut [u8]) -> Result<usize, Failure> {
    let waiting_since = Instant::now();
    loop {
        match conn.read(buf) {
            Ok(0) => return Err(Failure::Store("the store closed the connection".into())),
            Ok(n) => return Ok(n),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if waiting_since.elapsed() >= STALL_LIMIT {
                    return Err(Failure::Store(format!(
                        "the store answered nothing for {} s",
                        STALL_LIMIT.as_secs()
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(Failure::Store(format!("the store closed the connection ({e})")))
            }
            Err(e) => return Err(Failure::Store(format!("the connection was lost: {e}"))),
        }
    }
}

/// Reads until `decoder` has a whole packet.
fn read_packet(conn: &mut Conn, decoder: &mut PacketDecoder, buf: &mut [u8]) -> Result<Packet, Failure> {
    loop {
        if let Some(packet) = decoder.next_packet().map_err(|e| Failure::Store(e.to_string()))? {
            return Ok(packet);
        }
        let n = read_some(conn, buf)?;
        decoder.push(&buf[..n]);
    }
}

/// A decoder for the store's answers.
fn answer_decoder() -> PacketDecoder {
    PacketDecoder::with_record_len_max(RESPONSE_RECORD_LEN_MAX)
}

/// Asks the store its limits (before the clock starts): the keys and
/// values must fit.
fn check_params(conn: &mut Conn) -> Result<(), Failure> {
    let mut out = BytesMut::new();
    encode_packet_with(&mut out, PARAMS_ID, |o| o.put_u32(request_type::PARAMS));
    conn.write_all(&out).map_err(|e| Failure::Store(format!("the connection was lost: {e}")))?;
    let mut decoder = answer_decoder();
    let mut buf = vec![0u8; 4096];
    let packet = read_packet(conn, &mut decoder, &mut buf)?;
    if packet.id != PARAMS_ID || decoder.buffered_len() != 0 {
        return Err(Failure::Store(format!(
            "the store answered request ID {:#x} (and {} bytes more) to PARAMS {PARAMS_ID:#x}",
            packet.id,
            decoder.buffered_len()
        )));
    }
    match KvldsResponse::decode(KvldsRequestKind::Params, packet.record) {
        Ok(KvldsResponse::Params { max_key_len, max_value_len }) => {
            if (max_key_len as usize) < KEY_LEN || (max_value_len as usize) < VALUE_LEN {
                return Err(Failure::Usage(format!(
                    "the store takes keys of at most {max_key_len} bytes and values of at most \
                     {max_value_len}: the benchmarks need {KEY_LEN} and {VALUE_LEN}"
                )));
            }
            Ok(())
        }
        Ok(other) => Err(Failure::Store(format!("invalid answer to PARAMS: {other:?}"))),
        Err(e) => Err(Failure::Store(format!("invalid answer to PARAMS: {e}"))),
    }
}

// ---------------------------------------------------------------------------
// Running.

/// The arguments, checked and resolved.
#[derive(Debug, Clone)]
struct Plan {
    workload: Workload,
    socket: SocketAddr,
    pairs: u64,
    in_flight: u64,
    timing: Timing,
}

/// How a workload is measured.
#[derive(Debug, Clone, Copy)]
enum Timing {
    /// bulk-insert: the longest window of a point.
    Inserts { window: Duration },
    /// The timed workloads.
    Slots {
        warmup: Duration,
        slot: Duration,
        slots: usize,
        stat: Stat,
        /// `--seconds` was given.
        scaled: bool,
    },
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Result<Plan, String> {
        let workload = args.workload;
        let name = workload.name();
        if args.pairs == 0 || args.pairs > PAIRS_MAX {
            return Err(format!("--pairs must be 1 to {PAIRS_MAX}, not {}", args.pairs));
        }
        if workload == Workload::HotspotRead && args.pairs < GROUP_LEN {
            return Err(format!(
                "hotspot-read reads whole groups of {GROUP_LEN} pairs: --pairs must be at least {GROUP_LEN}"
            ));
        }
        if let Some(s) = args.seconds {
            if !(s > 0.0 && s <= SECONDS_MAX) {
                return Err(format!("--seconds must be over 0 and at most {SECONDS_MAX}, not {s}"));
            }
        }
        if workload == Workload::BulkExtract && args.in_flight.is_some() {
            return Err(
                "bulk-extract has one RANGE in flight, as kivaloo's: --in-flight does not apply".into()
            );
        }
        let timing = match workload.schedule() {
            None => Timing::Inserts {
                window: args.seconds.map_or(INSERT_WINDOW_DEFAULT, Duration::from_secs_f64),
            },
            Some(schedule) => {
                let scale = args.seconds.map_or(1.0, |s| s / schedule.seconds_total);
                let slot = Duration::from_secs_f64(scale);
                if slot < Duration::from_millis(1) {
                    return Err(format!(
                        "--seconds {} is too short for {name}: its seconds would be under 1 ms",
                        args.seconds.unwrap_or_default()
                    ));
                }
                Timing::Slots {
                    warmup: Duration::from_secs_f64(WARMUP_SECONDS * scale),
                    slot,
                    slots: schedule.slots,
                    stat: schedule.stat,
                    scaled: args.seconds.is_some(),
                }
            }
        };
        Ok(Plan {
            workload,
            socket: SocketAddr::parse(&args.socket),
            pairs: args.pairs,
            in_flight: u64::from(args.in_flight.unwrap_or(IN_FLIGHT_DEFAULT)),
            timing,
        })
    }

    /// What is run, in words.
    fn describe(&self) -> String {
        let w = self.workload;
        let flight = if w == Workload::BulkExtract {
            "one RANGE in flight".to_string()
        } else {
            format!("{} requests in flight", self.in_flight)
        };
        let timing = match self.timing {
            Timing::Inserts { window } => {
                format!("the insert rate after each power of two, over at most {} s", secs(window))
            }
            Timing::Slots { warmup, slot, slots, stat, .. } => format!(
                "{} s of warm-up, then the {} of {slots} counts of {} s",
                secs(warmup),
                stat_name(stat),
                secs(slot)
            ),
        };
        format!("{}: {} pairs, {flight}, on {}; {timing}", w.name(), self.pairs, self.socket)
    }

    /// The measurement, the clock started at `t0`.
    fn measure(&self, t0: Instant) -> Measure {
        match self.timing {
            Timing::Inserts { window } => {
                Measure::Inserts { points: InsertPoints::new(window), total: self.pairs, closed: Vec::new() }
            }
            Timing::Slots { warmup, slot, slots, .. } => {
                Measure::Slots(SlotCounts::new(t0 + warmup, slot, slots))
            }
        }
    }

    /// The whole run's expected length, if known.
    fn expected(&self) -> Option<Duration> {
        match self.timing {
            Timing::Inserts { .. } => None,
            Timing::Slots { warmup, slot, slots, .. } => Some(warmup + slot * slots as u32),
        }
    }
}

fn stat_name(stat: Stat) -> &'static str {
    match stat {
        Stat::Median => "median",
        Stat::Mean => "mean",
    }
}

/// A duration in seconds, briefly.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 || s.fract() == 0.0 {
        format!("{s:.0}")
    } else if s >= 0.1 {
        format!("{s:.1}")
    } else {
        format!("{s:.3}")
    }
}

/// The measurement running on the thread that receives the answers.
enum Measure {
    Inserts { points: InsertPoints, total: u64, closed: Vec<InsertPoint> },
    Slots(SlotCounts),
}

impl Measure {
    /// Records `n` answers at `now`, sending closed bulk-insert points as
    /// events. Returns whether the workload is over.
    fn record(&mut self, now: Instant, n: u64, events: &mpsc::Sender<Event>) -> bool {
        match self {
            Measure::Inserts { points, total, closed } => {
                points.record(now, n, closed);
                for point in closed.drain(..) {
                    let _ = events.send(Event::Point(point));
                }
                points.answered() >= *total
            }
            Measure::Slots(counts) => counts.record(now, n),
        }
    }
}

/// What the benchmark threads tell the main thread.
enum Event {
    /// A bulk-insert point, to print now.
    Point(InsertPoint),
    /// The end.
    Finished(Result<Outcome, Failure>),
}

/// How a workload ended.
struct Outcome {
    measure: Measure,
    /// When the last answer counted arrived.
    finished_at: Instant,
    /// Answers (pairs, for bulk-extract) received.
    answered: u64,
    /// GETs that found no value.
    misses: u64,
    /// bulk-extract: pairs in the first whole pass over the store.
    store_pairs: Option<u64>,
}

/// The window shared by the writer and the reader.
struct Window {
    in_flight_max: u64,
    /// Requests handed to the socket (published before each write).
    sent: AtomicU64,
    /// Answers received.
    answered: AtomicU64,
    /// The oldest request not answered (all before it are).
    oldest_unanswered: AtomicU64,
    /// Set when the writer is to stop.
    stop: AtomicBool,
    /// Set while the writer is (about to be) parked for room.
    writer_waiting: AtomicBool,
}

impl Window {
    fn new(in_flight_max: u64) -> Window {
        Window {
            in_flight_max,
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            oldest_unanswered: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            writer_waiting: AtomicBool::new(false),
        }
    }

    /// Requests the writer may send now, having sent `sent`.
    fn room(&self, sent: u64) -> u64 {
        let in_flight = sent - self.answered.load(Ordering::SeqCst);
        let id_span = sent - self.oldest_unanswered.load(Ordering::SeqCst);
        (self.in_flight_max.saturating_sub(in_flight)).min(ANSWERED_IDS.saturating_sub(id_span))
    }
}

/// The writer: sends requests `0..total` (or until told to stop), as
/// many as the window has room for, many to a write.
fn write_requests(
    conn: &mut Conn,
    window: &Window,
    maker: &mut RequestMaker<'_>,
    total: Option<u64>,
) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(WRITE_BATCH_MAX as usize * 128);
    let mut seq = 0u64;
    loop {
        if window.stop.load(Ordering::SeqCst) || total == Some(seq) {
            return Ok(());
        }
        let room = window.room(seq);
        if room == 0 {
            window.writer_waiting.store(true, Ordering::SeqCst);
            // Checked again after the flag is up: the reader either saw
            // the flag (and unparks) or made room before this check.
            if window.room(seq) == 0 && !window.stop.load(Ordering::SeqCst) {
                thread::park();
            }
            window.writer_waiting.store(false, Ordering::SeqCst);
            continue;
        }
        let n = room.min(WRITE_BATCH_MAX).min(total.map_or(u64::MAX, |t| t - seq));
        out.clear();
        for s in seq..seq + n {
            maker.encode(s, &mut out);
        }
        seq += n;
        window.sent.store(seq, Ordering::SeqCst);
        conn.write_all(&out)?;
    }
}

/// Which request IDs have been answered, among [`ANSWERED_IDS`] from the
/// oldest unanswered one: each answer must carry the ID of a request sent
/// and not answered yet.
struct Answered {
    oldest_unanswered: u64,
    bits: Vec<u64>,
}

impl Answered {
    fn new() -> Answered {
        Answered { oldest_unanswered: 0, bits: vec![0; (ANSWERED_IDS / 64) as usize] }
    }

    fn bit(&self, id: u64) -> bool {
        let slot = id % ANSWERED_IDS;
        self.bits[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    fn flip(&mut self, id: u64) {
        let slot = id % ANSWERED_IDS;
        self.bits[(slot / 64) as usize] ^= 1 << (slot % 64);
    }

    /// Marks `id` answered, `sent` requests having been sent.
    fn mark(&mut self, id: u64, sent: u64) -> Result<(), String> {
        // The writer keeps sent - oldest_unanswered <= ANSWERED_IDS, so
        // every ID in [oldest_unanswered, sent) has its own bit.
        if id < self.oldest_unanswered || id >= sent || self.bit(id) {
            return Err(format!("the store answered request ID {id:#x}, which is not in flight"));
        }
        self.flip(id);
        while self.oldest_unanswered < sent && self.bit(self.oldest_unanswered) {
            let oldest = self.oldest_unanswered;
            self.flip(oldest);
            self.oldest_unanswered += 1;
        }
        Ok(())
    }
}

/// The reader: receives and checks answers, releases their room in the
/// window, and measures, until the workload is over.
fn read_answers(
    conn: &mut Conn,
    workload: Workload,
    window: &Window,
    writer: &thread::Thread,
    mut measure: Measure,
    progress: &AtomicU64,
    events: &mpsc::Sender<Event>,
) -> Result<Outcome, Failure> {
    let mut decoder = answer_decoder();
    let mut buf = vec![0u8; READ_BUF_LEN];
    let mut answered = Answered::new();
    let (mut total, mut misses) = (0u64, 0u64);
    loop {
        let n = read_some(conn, &mut buf)?;
        decoder.push(&buf[..n]);
        let mut batch = 0u64;
        while let Some(packet) = decoder.next_packet().map_err(|e| Failure::Store(e.to_string()))? {
            answered.mark(packet.id, window.sent.load(Ordering::SeqCst)).map_err(Failure::Store)?;
            let kind = workload.request_kind(packet.id);
            match KvldsResponse::decode(kind, packet.record) {
                Ok(KvldsResponse::Get(None)) => misses += 1,
                Ok(_) => {}
                Err(e) => {
                    return Err(Failure::Store(format!(
                        "invalid answer to {kind:?} request {:#x}: {e}",
                        packet.id
                    )))
                }
            }
            batch += 1;
        }
        if batch == 0 {
            continue;
        }
        window.answered.fetch_add(batch, Ordering::SeqCst);
        window.oldest_unanswered.store(answered.oldest_unanswered, Ordering::SeqCst);
        if window.writer_waiting.load(Ordering::SeqCst) {
            writer.unpark();
        }
        total += batch;
        progress.store(total, Ordering::Relaxed);
        let now = Instant::now();
        if measure.record(now, batch, events) {
            return Ok(Outcome { measure, finished_at: now, answered: total, misses, store_pairs: None });
        }
    }
}

/// bulk-extract: RANGE over the whole store, one page at a time, over and
/// over, counting pairs, until the measurement is over.
fn extract(conn: &mut Conn, mut measure: Measure, progress: &AtomicU64) -> Result<Outcome, Failure> {
    let mut decoder = answer_decoder();
    let mut buf = vec![0u8; READ_BUF_LEN];
    let mut out = BytesMut::with_capacity(1024);
    let mut start: Vec<u8> = Vec::with_capacity(256);
    let (mut id, mut total, mut pass_pairs) = (0u64, 0u64, 0u64);
    let mut store_pairs = None;
    let (events, _unused) = mpsc::channel();
    loop {
        out.clear();
        encode_range(&mut out, id, RANGE_BUDGET, &start, &[]);
        conn.write_all(&out).map_err(|e| Failure::Store(format!("the connection was lost: {e}")))?;
        let packet = read_packet(conn, &mut decoder, &mut buf)?;
        if packet.id != id {
            return Err(Failure::Store(format!(
                "the store answered request ID {:#x}, which is not in flight ({id:#x} is)",
                packet.id
            )));
        }
        let (pairs, next) = check_range_answer(&packet.record)
            .map_err(|e| Failure::Store(format!("invalid answer to RANGE request {id:#x}: {e}")))?;
        id += 1;
        pass_pairs += pairs;
        total += pairs;
        progress.store(total, Ordering::Relaxed);
        let now = Instant::now();
        // kivaloo counts each pair; a page without pairs counts nothing.
        if pairs > 0 && measure.record(now, pairs, &events) {
            return Ok(Outcome { measure, finished_at: now, answered: total, misses: 0, store_pairs });
        }
        start.clear();
        if next.is_empty() {
            // The end of the store: start again from the first key.
            if pass_pairs == 0 {
                return Err(Failure::NotDone(
                    "the store is empty: load it first with `kivaloo bench bulk-insert`".into(),
                ));
            }
            store_pairs.get_or_insert(pass_pairs);
            pass_pairs = 0;
        } else {
            start.extend_from_slice(next);
        }
    }
}

/// Checks a RANGE answer's record in place (the layout
/// [`KvldsResponse::decode`] reads, without building its list of pairs:
/// bulk-extract's client must not cost more than the store): status 0, the
/// pair count, `next`, then exactly that many keys and values. Returns the
/// pair count and `next`.
fn check_range_answer(record: &[u8]) -> Result<(u64, &[u8]), String> {
    let mut rest = record;
    let mut take = |len: usize, field: &str| -> Result<&[u8], String> {
        if rest.len() < len {
            return Err(format!(
                "record truncated in field `{field}`: needs {len} bytes, {} remain",
                rest.len()
            ));
        }
        let (taken, after) = rest.split_at(len);
        rest = after;
        Ok(taken)
    };
    let status = u32::from_be_bytes(take(4, "status")?.try_into().expect("4 bytes"));
    if status != 0 {
        return Err(format!("status {status}"));
    }
    let count = u32::from_be_bytes(take(4, "pair count")?.try_into().expect("4 bytes"));
    let next_len = take(1, "next key")?[0];
    let next = take(usize::from(next_len), "next key")?;
    for _ in 0..count {
        for field in ["key", "value"] {
            let len = take(1, field)?[0];
            take(usize::from(len), field)?;
        }
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes left over after the last pair", rest.len()));
    }
    Ok((u64::from(count), next))
}

/// The progress display on stderr: a line rewritten in place on a
/// terminal, a plain line every few seconds otherwise.
struct Display {
    name: &'static str,
    unit: &'static str,
    tty: bool,
    interval: Duration,
    t0: Instant,
    next: Instant,
    last: (Instant, u64),
    /// Characters of the line on screen (terminal only).
    shown: usize,
    pairs: u64,
    expected: Option<Duration>,
    warmup: Option<Duration>,
}

impl Display {
    fn new(plan: &Plan, t0: Instant) -> Display {
        let tty = io::stderr().is_terminal();
        let expected = plan.expected();
        let interval = if tty {
            Duration::from_millis(500)
        } else {
            expected.map_or(Duration::from_secs(10), |e| {
                (e / 6).clamp(Duration::from_secs(1), Duration::from_secs(10))
            })
        };
        let warmup = match plan.timing {
            Timing::Slots { warmup, .. } => Some(warmup),
            Timing::Inserts { .. } => None,
        };
        Display {
            name: plan.workload.name(),
            unit: plan.workload.unit(),
            tty,
            interval,
            t0,
            next: t0 + interval,
            last: (t0, 0),
            shown: 0,
            pairs: plan.pairs,
            expected,
            warmup,
        }
    }

    /// Time until the next update.
    fn until_next(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    /// Shows the progress, `answered` answers (pairs) so far.
    fn show(&mut self, answered: u64) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + self.interval;
        let elapsed = now.duration_since(self.t0);
        let rate = (answered - self.last.1) as f64 / now.duration_since(self.last.0).as_secs_f64().max(1e-9);
        self.last = (now, answered);
        let line = match (self.expected, self.warmup) {
            (Some(expected), Some(warmup)) => {
                let phase = if elapsed < warmup {
                    format!("warming up until {} s", secs(warmup))
                } else {
                    format!("counting from {} s", secs(warmup))
                };
                format!(
                    "{}: {} s of {} ({phase}): {answered} {}, {rate:.0}/s",
                    self.name,
                    secs(elapsed),
                    secs(expected),
                    self.unit
                )
            }
            _ => format!(
                "{}: {} s: {answered} of {} pairs ({:.0}%), {rate:.0} {}/s",
                self.name,
                secs(elapsed),
                self.pairs,
                answered as f64 * 100.0 / self.pairs as f64,
                self.unit
            ),
        };
        let mut err = io::stderr().lock();
        // A progress line that cannot be written is not worth failing for.
        if self.tty {
            let chars = line.chars().count();
            let pad = self.shown.saturating_sub(chars);
            let _ = write!(err, "\r{line}{:pad$}", "");
            self.shown = chars;
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    /// Erases the line on the terminal, before other output or the end.
    fn clear(&mut self) {
        if self.shown > 0 {
            let _ = write!(io::stderr(), "\r{:width$}\r", "", width = self.shown);
            self.shown = 0;
        }
    }
}

/// Shows the progress and prints bulk-insert's points until the end.
fn watch(
    rx: &mpsc::Receiver<Event>,
    progress: &AtomicU64,
    display: &mut Display,
    stdout_error: &mut Option<io::Error>,
) -> Result<Outcome, Failure> {
    loop {
        match rx.recv_timeout(display.until_next()) {
            Ok(Event::Point(point)) => {
                display.clear();
                let line = format!(
                    "bulk-insert: at {} pairs: {:.0} inserts/s ({} in {:.3} s)",
                    point.at,
                    point.rate(),
                    point.inserts,
                    point.seconds
                );
                if let Err(e) = writeln!(io::stdout(), "{line}") {
                    stdout_error.get_or_insert(e);
                }
            }
            Ok(Event::Finished(result)) => {
                display.clear();
                return result;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => display.show(progress.load(Ordering::Relaxed)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                display.clear();
                return Err(Failure::Store("the benchmark stopped without a result".into()));
            }
        }
    }
}

/// Runs the benchmark and prints its result.
fn bench(plan: &Plan) -> Result<(), Failure> {
    log("kivaloo bench", LogLevel::Info, &plan.describe());
    let pairs = if plan.workload == Workload::BulkExtract {
        None
    } else {
        let started = Instant::now();
        let pairs = Pairs::generate(plan.pairs);
        log(
            "kivaloo bench",
            LogLevel::Info,
            &format!("computed {} pairs in {:.2} s", pairs.len(), started.elapsed().as_secs_f64()),
        );
        Some(pairs)
    };
    let mut conn = Conn::connect(&plan.socket)
        .map_err(|e| Failure::Store(format!("cannot connect to {}: {e}", plan.socket)))?;
    conn.set_read_timeout(Some(READ_POLL))
        .map_err(|e| Failure::Store(format!("socket setup failed: {e}")))?;
    check_params(&mut conn)?;

    let t0 = Instant::now();
    let measure = plan.measure(t0);
    let progress = AtomicU64::new(0);
    let mut display = Display::new(plan, t0);
    let mut stdout_error = None;
    let (tx, rx) = mpsc::channel();
    let outcome = match &pairs {
        None => thread::scope(|s| {
            let progress = &progress;
            s.spawn(move || {
                let result = extract(&mut conn, measure, progress);
                let _ = tx.send(Event::Finished(result));
            });
            watch(&rx, progress, &mut display, &mut stdout_error)
        }),
        Some(pairs) => {
            let clone = |conn: &Conn| {
                conn.try_clone().map_err(|e| Failure::Store(format!("cannot use the connection: {e}")))
            };
            let mut write_conn = clone(&conn)?;
            let stopper = clone(&conn)?;
            let window = Window::new(plan.in_flight);
            let mut maker = RequestMaker::new(plan.workload, pairs, Rng::from_clock());
            let total = (plan.workload == Workload::BulkInsert).then_some(plan.pairs);
            thread::scope(|s| {
                let (window, progress) = (&window, &progress);
                let writer = s.spawn(move || {
                    let result = write_requests(&mut write_conn, window, &mut maker, total);
                    if result.is_err() {
                        // Wake the reader: the connection is of no more use.
                        write_conn.shutdown();
                    }
                    result
                });
                let writer_thread = writer.thread().clone();
                let workload = plan.workload;
                s.spawn(move || {
                    let result =
                        read_answers(&mut conn, workload, window, &writer_thread, measure, progress, &tx);
                    let _ = tx.send(Event::Finished(result));
                });
                let result = watch(&rx, progress, &mut display, &mut stdout_error);
                window.stop.store(true, Ordering::SeqCst);
                writer.thread().unpark();
                stopper.shutdown();
                let written = writer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                match (result, written) {
                    (Err(Failure::Store(msg)), Err(e)) => {
                        Err(Failure::Store(format!("{msg} (writing to the store failed: {e})")))
                    }
                    (result, _) => result,
                }
            })
        }
    }?;
    if let Some(e) = stdout_error {
        return Err(Failure::Output(e));
    }
    report(plan, &outcome, t0).map_err(Failure::Output)
}

/// Prints the result line on stdout, and warnings on stderr.
fn report(plan: &Plan, outcome: &Outcome, t0: Instant) -> io::Result<()> {
    let name = plan.workload.name();
    let unit = plan.workload.unit();
    let line = match (&outcome.measure, plan.timing) {
        (Measure::Inserts { total, .. }, _) => {
            let seconds = outcome.finished_at.duration_since(t0).as_secs_f64().max(1e-6);
            format!(
                "{name}: {total} pairs in {seconds:.2} s: {:.0} {unit}/s overall",
                *total as f64 / seconds
            )
        }
        (Measure::Slots(counts), Timing::Slots { warmup, slot, slots, stat, scaled }) => {
            let (headline, other, other_name) = match stat {
                Stat::Median => (counts.median(), counts.mean(), "mean"),
                Stat::Mean => (counts.mean(), counts.median(), "median"),
            };
            let per_second = |count: u64| count as f64 / slot.as_secs_f64();
            let span = counts.counted_span().unwrap_or(slot * slots as u32);
            let plain = counts.counts().iter().sum::<u64>() as f64 / span.as_secs_f64().max(1e-9);
            let plain = format!("{plain:.0}/s over the {:.1} s counted", span.as_secs_f64());
            if scaled {
                format!(
                    "{name}: {:.0} {unit}/s ({} of {slots} counts over {} s each after {} s, per second; \
                     {other_name} {:.0}; {plain})",
                    per_second(headline),
                    stat_name(stat),
                    secs(slot),
                    secs(warmup),
                    per_second(other)
                )
            } else {
                format!(
                    "{name}: {headline} {unit}/s ({} of {slots} one-second counts after {} s; \
                     {other_name} {other}; {plain})",
                    stat_name(stat),
                    secs(warmup)
                )
            }
        }
        (Measure::Slots(_), Timing::Inserts { .. }) => unreachable!("a timed workload has a timed plan"),
    };
    writeln!(io::stdout(), "{line}")?;
    if outcome.misses > 0 {
        log(
            "kivaloo bench",
            LogLevel::Warn,
            &format!(
                "{} of the GETs found no value (counted all the same, as kivaloo does): load the store \
                 first with `kivaloo bench bulk-insert --pairs {}`",
                outcome.misses, plan.pairs
            ),
        );
    }
    if let Some(store_pairs) = outcome.store_pairs {
        if store_pairs != plan.pairs {
            log(
                "kivaloo bench",
                LogLevel::Warn,
                &format!("the store holds {store_pairs} pairs, not --pairs {}", plan.pairs),
            );
        }
    }
    log(
        "kivaloo bench",
        LogLevel::Info,
        &format!(
            "{} {unit} in {:.2} s",
            outcome.answered,
            outcome.finished_at.duration_since(t0).as_secs_f64()
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kivaloo::kvlds_proto::KvldsRequest;

    fn ms(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn requests_are_encoded_as_the_codec_encodes_them() {
        let key = Bytes::from_static(&[7u8; KEY_LEN]);
        let value = Bytes::from_static(&[9u8; VALUE_LEN]);
        let mut ours = BytesMut::new();
        let mut codec = BytesMut::new();
        encode_set(&mut ours, 3, &key, &value);
        KvldsRequest::Set { key: key.clone(), value: value.clone() }.encode(3, &mut codec);
        encode_get(&mut ours, u64::MAX - 1, &key);
        KvldsRequest::Get { key: key.clone() }.encode(u64::MAX - 1, &mut codec);
        encode_range(&mut ours, 5, RANGE_BUDGET, &key, &[]);
        KvldsRequest::Range { max_bytes: RANGE_BUDGET, start: key, end: Bytes::new() }.encode(5, &mut codec);
        assert_eq!(ours, codec);
    }

    #[test]
    fn range_answers_are_checked_as_the_codec_decodes_them() {
        let b = |s: &[u8]| Bytes::copy_from_slice(s);
        let answers = [
            (b(b""), vec![]),
            (b(b"next"), vec![(b(b"a"), b(b"1")), (b(b""), b(&[7u8; 255])), (b(&[0u8; 255]), b(b""))]),
        ];
        for (next, pairs) in answers {
            let count = pairs.len() as u64;
            let mut wire = BytesMut::new();
            KvldsResponse::Range { next: next.clone(), pairs }.encode(1, &mut wire);
            let record = wire[16..wire.len() - 4].to_vec();
            assert_eq!(check_range_answer(&record), Ok((count, &next[..])));
            assert!(KvldsResponse::decode(KvldsRequestKind::Range, Bytes::from(record.clone())).is_ok());
            // Every truncation, and a byte too many, is refused by both.
            for len in 0..record.len() {
                assert!(check_range_answer(&record[..len]).is_err(), "{len} of {}", record.len());
                let cut = Bytes::copy_from_slice(&record[..len]);
                assert!(KvldsResponse::decode(KvldsRequestKind::Range, cut).is_err());
            }
            let mut longer = record.clone();
            longer.push(0);
            assert!(check_range_answer(&longer).is_err());
            let mut refused = record;
            refused[3] = 1;
            assert_eq!(check_range_answer(&refused), Err("status 1".to_string()));
        }
    }

    #[test]
    fn slots_wait_for_the_warm_up_then_count_kivaloos_way() {
        let base = Instant::now();
        let mut c = SlotCounts::new(ms(base, 50), Duration::from_millis(10), 3);
        assert!(!c.record(ms(base, 10), 5), "before the warm-up ends");
        assert!(!c.record(ms(base, 52), 1), "opens slot 0, ending at 62");
        assert!(!c.record(ms(base, 62), 2), "62 is not after the end");
        assert!(!c.record(ms(base, 63), 4), "opens slot 1, ending at 73");
        // A gap: the next answer opens slot 2, not an empty slot.
        assert!(!c.record(ms(base, 200), 8));
        assert_eq!(c.counts(), &[3, 4, 8]);
        assert_eq!(c.counted_span(), None, "not over yet");
        assert!(c.record(ms(base, 211), 100), "after the last slot: over, not counted");
        assert!(c.record(ms(base, 300), 1));
        assert_eq!(c.counts(), &[3, 4, 8]);
        assert_eq!((c.median(), c.mean()), (4, 5));
        assert_eq!(c.counted_span(), Some(Duration::from_millis(210 - 52)));
    }

    #[test]
    fn median_of_an_even_number_of_slots_is_the_mean_of_the_middle_two() {
        let base = Instant::now();
        let mut c = SlotCounts::new(base, Duration::from_millis(10), 4);
        for (t, n) in [(0, 10), (11, 1), (22, 7), (33, 4)] {
            assert!(!c.record(ms(base, t), n));
        }
        assert_eq!(c.counts(), &[10, 1, 7, 4]);
        assert_eq!(c.median(), 5); // (4 + 7) / 2, rounded down
        assert_eq!(c.mean(), 5); // 22 / 4, rounded down
    }

    #[test]
    fn insert_points_close_at_the_next_power_of_two() {
        let base = Instant::now();
        let mut p = InsertPoints::new(Duration::from_secs(10));
        let mut closed = Vec::new();
        // Answers 1..=4096 at 0 ms, up to 8192 at 100 ms, 16384 at 300 ms.
        p.record(ms(base, 0), 4096, &mut closed);
        assert_eq!(closed, []);
        p.record(ms(base, 100), 4096, &mut closed);
        assert_eq!(closed, [InsertPoint { at: 4096, inserts: 4096, seconds: 0.1 }]);
        p.record(ms(base, 300), 8192, &mut closed);
        assert_eq!(closed[1], InsertPoint { at: 8192, inserts: 8192, seconds: 0.2 });
        assert_eq!(closed[1].rate(), 40960.0);
        assert_eq!(p.answered(), 16384);
    }

    #[test]
    fn an_insert_point_longer_than_its_window_counts_only_what_came_before_the_window_end() {
        let base = Instant::now();
        let mut p = InsertPoints::new(Duration::from_secs(1));
        let mut closed = Vec::new();
        // Opens 8192; 4096 (opened and closed in this one burst) is not shown.
        p.record(ms(base, 0), 8192, &mut closed);
        assert_eq!(closed, []);
        p.record(ms(base, 900), 5000, &mut closed); // 13192 answered
        assert_eq!(closed, []);
        // More than a second after 8192 opened: closed with the 5000
        // answers before this batch, over exactly one second.
        p.record(ms(base, 1500), 10, &mut closed);
        assert_eq!(closed, [InsertPoint { at: 8192, inserts: 5000, seconds: 1.0 }]);
        // Nothing is open until 16384, which closes nothing.
        p.record(ms(base, 1600), 16384 - 13202, &mut closed);
        assert_eq!(closed.len(), 1);
        p.record(ms(base, 1700), 16384, &mut closed);
        assert_eq!(closed[1], InsertPoint { at: 16384, inserts: 16384, seconds: 0.1 });
    }

    #[test]
    fn small_insert_points_are_not_shown() {
        let base = Instant::now();
        let mut p = InsertPoints::new(Duration::from_secs(10));
        let mut closed = Vec::new();
        for i in 0..4096 {
            p.record(ms(base, i), 1, &mut closed);
        }
        // Points 1, 2, ..., 1024 closed with fewer than 4096 inserts.
        assert_eq!(closed, []);
    }

    fn decode_all(wire: &[u8]) -> Vec<KvldsRequest> {
        let mut d = PacketDecoder::new();
        d.push(wire);
        let mut out = Vec::new();
        while let Some(p) = d.next_packet().unwrap() {
            out.push(KvldsRequest::decode(p.record).unwrap());
        }
        out
    }

    #[test]
    fn random_mixed_sends_two_gets_then_two_sets_of_the_request_number_plus_one() {
        let pairs = Pairs::generate(10);
        let mut maker = RequestMaker::new(Workload::RandomMixed, &pairs, Rng(1));
        let mut out = BytesMut::new();
        for seq in 0..8 {
            maker.encode(seq, &mut out);
        }
        let requests = decode_all(&out);
        for (seq, req) in requests.iter().enumerate() {
            let seq = seq as u64;
            assert_eq!(req.kind(), Workload::RandomMixed.request_kind(seq));
            match req {
                KvldsRequest::Get { .. } => assert!(seq % 4 < 2),
                KvldsRequest::Set { value, .. } => {
                    assert!(seq % 4 >= 2);
                    let mut expected = [0u8; VALUE_LEN];
                    expected[..8].copy_from_slice(&(seq + 1).to_be_bytes());
                    assert_eq!(&value[..], &expected);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn bulk_update_adds_the_pass_number_to_the_last_byte() {
        let pairs = Pairs::generate(3);
        let mut maker = RequestMaker::new(Workload::BulkUpdate, &pairs, Rng(1));
        let mut out = BytesMut::new();
        for seq in 0..3 * 257 {
            maker.encode(seq, &mut out);
        }
        for (seq, req) in decode_all(&out).into_iter().enumerate() {
            let (i, pass) = (seq as u64 % 3, seq as u64 / 3);
            let KvldsRequest::Set { key, value } = req else { panic!("not a SET") };
            assert_eq!(&key[..], pairs.key(i));
            assert_eq!(&value[..VALUE_LEN - 1], &pairs.value(i)[..VALUE_LEN - 1]);
            assert_eq!(value[VALUE_LEN - 1], pairs.value(i)[VALUE_LEN - 1].wrapping_add(pass as u8));
        }
    }

    #[test]
    fn hotspot_read_reads_one_group_in_y_order() {
        let pairs = Pairs::generate(2 * GROUP_LEN + 5);
        let mut maker = RequestMaker::new(Workload::HotspotRead, &pairs, Rng(7));
        let mut out = BytesMut::new();
        for seq in 0..GROUP_LEN + 1 {
            maker.encode(seq, &mut out);
        }
        let keys: Vec<Bytes> = decode_all(&out)
            .into_iter()
            .map(|r| match r {
                KvldsRequest::Get { key } => key,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let x = u64::from_be_bytes(keys[0][..8].try_into().unwrap());
        assert!(x < 2, "only whole groups are read");
        for (y, key) in keys[..GROUP_LEN as usize].iter().enumerate() {
            assert_eq!(&key[..], &make_key(x, y as u64));
        }
        // Then a new group from Y = 0.
        let x2 = u64::from_be_bytes(keys[GROUP_LEN as usize][..8].try_into().unwrap());
        assert_eq!(&keys[GROUP_LEN as usize][..], &make_key(x2, 0));
    }

    #[test]
    fn answers_must_carry_the_id_of_a_request_in_flight() {
        let mut a = Answered::new();
        assert!(a.mark(0, 0).is_err(), "nothing sent");
        a.mark(1, 3).unwrap();
        assert_eq!(a.oldest_unanswered, 0);
        assert!(a.mark(1, 3).is_err(), "answered twice");
        a.mark(0, 3).unwrap();
        assert_eq!(a.oldest_unanswered, 2);
        assert!(a.mark(0, 3).is_err(), "answered before");
        assert!(a.mark(3, 3).is_err(), "not sent");
        a.mark(2, 3).unwrap();
        assert_eq!(a.oldest_unanswered, 3);
        // IDs far along reuse the same bits.
        let far = ANSWERED_IDS * 3 + 5;
        a.oldest_unanswered = far;
        a.mark(far, far + 1).unwrap();
        assert_eq!(a.oldest_unanswered, far + 1);
    }

    #[test]
    fn the_rng_is_uniform_enough() {
        let mut rng = Rng(42);
        let mut seen = [0u32; 10];
        for _ in 0..100_000 {
            seen[rng.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (9_000..11_000).contains(&n)), "{seen:?}");
    }
}
