//! Background cleaning: how much to clean (pacing from `-S` and the
//! garbage in the log), which leaves to clean (the oldest still reachable),
//! and counting the tree's pages once after recovery (the pacing needs it).
//!
//! The log holds the blocks from the oldest one the tree still reaches to
//! the newest: `log_blocks`. The tree has `tree_pages` pages; the rest of
//! the log is garbage. Cleaning a leaf copies it, unchanged, into the next
//! commit, which writes it (and its path) at the head of the log; once the
//! oldest leaves have moved, everything below the new oldest block is
//! FREEd and lbs deletes whole files.
//!
//! # Pacing
//!
//! `-S` is the cost of storing a GB for a month over the cost of 10^6
//! I/Os (kivaloo's definition). Cleaning more keeps less garbage but costs
//! I/O; for a given write load the product of the two is about constant
//! (a log with `g` garbage blocks per live one makes each clean free about
//! `g` blocks), so their sum is least when the cost of storing the garbage
//! equals the cost of cleaning. So the node spends on cleaning, every
//! second, the I/Os that the garbage of that second costs to store:
//!
//! `cleans per second = garbage blocks * S * 10^6 * block size / (10^9 * 2_592_000)`
//!
//! (a month taken as 30 days; one clean counted as one I/O, the write of
//! its page). At the default `-S 1`, 4096-byte blocks: 1.6e-6 cleans per
//! garbage block per second, so a log with a million garbage blocks
//! cleans about 1.6 leaves a second. This accrues as a debt of cleans, paid by cleaning and by
//! client commits that happen to rewrite old pages: every page a commit
//! replaces that was below the cleaning threshold pays one. The debt stays
//! within plus or minus the tree's size: cleaning more than a tree's worth
//! at once would rewrite pages just written, and a long run of client
//! rewrites earns no more than a tree's worth of rest.
//!
//! Only leaves older than `newest block - 9/8 * tree pages - 64` are
//! cleaned: a log within an eighth of the tree (and 64 blocks) has none,
//! so a store that is not written is not rewritten for ever (each clean
//! also rewrites the pages above the leaf, which makes a little garbage of
//! its own). The node's timer is set only while there is something to
//! clean, for the moment enough is owed for a commit of cleaning alone.
//!
//! # Never blocking clients
//!
//! Cleaning only touches pages already in the cache: the oldest leaves and
//! the pages on their path are read ahead (at most [`CLEAN_READS_MAX`] at
//! once) and pinned in the cache (at most half of it) until the next
//! batch. The batch takes its client requests first; then, if cleaning is
//! owed, it copies in the oldest leaves it finds in the cache (at most
//! [`CLEAN_LEAVES_PER_COMMIT_MAX`]); a leaf it would have to wait for is
//! left for later. When no client request waits and cleaning is owed, a
//! batch of cleaning alone is written. A batch whose client requests
//! changed nothing answers them at once, before any cleaning is added.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use bytes::Bytes;
use kivaloo::contract::Instant;

use super::cache::PageCache;
use super::page::{ChildRef, PageView};
use super::tree::{check_child, check_level, RootRef, Stall};

/// Leaves one commit cleans at most.
pub const CLEAN_LEAVES_PER_COMMIT_MAX: usize = 256;
/// Leaves owed before a commit of cleaning alone is written (or the whole
/// tree, if smaller): it rewrites the pages above its leaves too, so one
/// leaf at a time would make about as much garbage as it frees.
pub const CLEAN_ALONE_LEAVES_MIN: usize = 16;
/// Leaves owed before a commit of cleaning alone, for a tree of
/// `tree_pages` pages: [`CLEAN_ALONE_LEAVES_MIN`], or the whole tree.
pub fn cleaning_alone_min(tree_pages: u64) -> usize {
    tree_pages.clamp(1, CLEAN_ALONE_LEAVES_MIN as u64) as usize
}

/// Pages read for cleaning at once, at most.
pub const CLEAN_READS_MAX: usize = 64;
/// The seconds in a month, as `-S` counts them (30 days).
const MONTH_S: f64 = 2_592_000.0;
/// The cleaner's timer fires at most this often (when a clean is owed but
/// could not be done, e.g. while its pages are read).
pub const CLEAN_TICK_NS: u64 = 1_000_000_000;
/// The longest the cleaner's timer is set for (about 3 years).
pub const CLEAN_WAIT_NS_MAX: u64 = 100_000_000_000_000_000;
/// Garbage blocks below which the cleaner never cleans, whatever the
/// tree's size (with an eighth of the tree; see [`clean_threshold`]).
pub const GARBAGE_BLOCKS_MIN: u64 = 64;

/// Leaves in blocks below this are old enough to clean, for a log whose
/// next block is `next_block` and a tree of `tree_pages` pages: more than a
/// tree's worth of blocks, an eighth of a tree and [`GARBAGE_BLOCKS_MIN`]
/// were written after them. The slack keeps a store that is not written
/// from cleaning for ever the garbage its own cleaning makes (the pages
/// above the leaves it moves).
pub fn clean_threshold(next_block: u64, tree_pages: u64) -> u64 {
    next_block.saturating_sub(tree_pages + tree_pages / 8 + GARBAGE_BLOCKS_MIN)
}
/// Internal pages read at once when counting the tree after recovery.
pub const CENSUS_READS_MAX: usize = 32;

/// Cleans owed per garbage block per second, for `-S` `storage_io_cost_ratio`
/// and `block_size`-byte blocks (see the module documentation).
pub fn cleans_per_garbage_block_per_s(storage_io_cost_ratio: f64, block_size: usize) -> f64 {
    // GB per block, months per second, (10^6 I/Os) per GB-month, I/Os
    // per 10^6 I/Os (in this order, any finite `-S` gives a finite rate).
    let rate = block_size as f64 / 1e9 / MONTH_S * storage_io_cost_ratio * 1e6;
    rate.min(f64::MAX)
}

/// The cleaner's accounts.
#[derive(Debug)]
pub struct Pacing {
    rate: f64,
    /// Cleans owed (negative: cleaning done ahead).
    debt_cleans: f64,
    accrued_until: Option<Instant>,
}

impl Pacing {
    /// A cleaner owing `rate` cleans per garbage block per second (0:
    /// cleaning is off).
    pub fn new(rate: f64) -> Self {
        Pacing { rate, debt_cleans: 0.0, accrued_until: None }
    }

    /// Whether cleaning is on.
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Adds what the garbage cost since the last call.
    pub fn accrue(&mut self, now: Instant, log_blocks: u64, tree_pages: u64) {
        let since = self.accrued_until.replace(now).unwrap_or(now);
        let garbage_blocks = log_blocks.saturating_sub(tree_pages) as f64;
        let seconds = now.ns_since(since) as f64 / 1e9;
        // (Garbage times time first: with no time or no garbage nothing is
        // owed, however large the rate; an infinite debt is clamped.)
        self.debt_cleans += self.rate * (garbage_blocks * seconds);
        self.clamp(tree_pages);
    }

    /// Pays `cleans` off the debt.
    pub fn paid(&mut self, cleans: u64, tree_pages: u64) {
        self.debt_cleans -= cleans as f64;
        self.clamp(tree_pages);
    }

    fn clamp(&mut self, tree_pages: u64) {
        let bound = tree_pages as f64;
        self.debt_cleans =
            if self.debt_cleans.is_nan() { 0.0 } else { self.debt_cleans.clamp(-bound, bound) };
    }

    /// When `cleans` whole cleans will be owed, at this much garbage
    /// (`None`: never, or not before the accounts were first brought up to
    /// date).
    pub fn owed_at(&self, cleans: usize, garbage_blocks: u64) -> Option<Instant> {
        let since = self.accrued_until?;
        let per_s = self.rate * garbage_blocks as f64;
        if per_s <= 0.0 {
            return None;
        }
        let wait_ns = (cleans as f64 - self.debt_cleans).max(0.0) / per_s * 1e9;
        // Beyond about 3 years: never, as far as a timer goes (the debt
        // still grows whenever the node looks).
        if wait_ns > CLEAN_WAIT_NS_MAX as f64 {
            return None;
        }
        let at = since.ns_since(Instant::default()).checked_add(wait_ns as u64)?;
        Some(Instant::from_nanos(at))
    }

    /// Leaves to clean now (whole cleans owed, at most a commit's worth).
    pub fn owed(&self) -> usize {
        if self.debt_cleans < 1.0 {
            0
        } else {
            (self.debt_cleans as usize).min(CLEAN_LEAVES_PER_COMMIT_MAX)
        }
    }
}

/// The oldest leaves found in the cache, and the pages to read to find more.
#[derive(Debug, Default)]
pub struct Selection {
    /// A key that leads to the leaf (its first key, or the lowest key its
    /// parent allows when it is empty), and the leaf's block; oldest first.
    pub leaves: Vec<(Bytes, u64)>,
    /// Pages of the tree below the threshold that are not cached.
    pub missing: Vec<u64>,
    /// Internal pages looked into (for pinning).
    pub internal: Vec<u64>,
    /// Level-1 pages whose leaves were taken, and the pages above level 1
    /// looked into: with the leaves, about what a commit of these leaves
    /// alone writes.
    pub pages_above: usize,
    /// The oldest block the tree will still reach once the leaves taken
    /// are moved (at most: the oldest of what was left, or not cached).
    pub oldest_left: u64,
}

impl Selection {
    /// Whether a commit of these leaves alone frees at least twice the
    /// blocks it writes (the log then shrinks by at least what it writes),
    /// where the tree's oldest block is now `oldest`.
    pub fn worth_a_commit_alone(&self, oldest: u64) -> bool {
        let writes = self.leaves.len() + self.pages_above;
        !self.leaves.is_empty() && self.oldest_left.saturating_sub(oldest) >= 2 * writes as u64
    }
}

/// Finds, oldest first, about `want` leaves of the tree under `root` whose
/// blocks are below `threshold`, looking only at cached pages (stopping
/// at `missing_max` pages not cached). Leaves come in groups: when one
/// leaf is taken, so are its siblings below the threshold, which share the
/// pages above them that the commit rewrites anyway (so a group may take
/// a few more than `want`).
///
/// # Errors
/// [`Stall::Corrupt`] for a page at the wrong level.
pub fn oldest_leaves(
    cache: &mut PageCache,
    root: RootRef,
    threshold: u64,
    want: usize,
    missing_max: usize,
) -> Result<Selection, Stall> {
    /// What the walk has yet to look at.
    enum Item {
        /// A page, its level and the lowest key allowed in it.
        Page(u64, u8, Bytes),
        /// The leaves below the threshold under one level-1 page, with the
        /// lowest key allowed in each.
        Leaves(Vec<(u64, Bytes)>),
    }
    let mut sel = Selection { oldest_left: u64::MAX, ..Selection::default() };
    let mut items = vec![Item::Page(root.child.block, root.level, Bytes::new())];
    // (the oldest block under the item, its index in `items`)
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    heap.push(Reverse((root.child.oldest_block, 0)));
    while let Some(Reverse((oldest, i))) = heap.pop() {
        if oldest >= threshold || sel.leaves.len() >= want || sel.missing.len() >= missing_max {
            sel.oldest_left = sel.oldest_left.min(oldest);
            break;
        }
        match std::mem::replace(&mut items[i], Item::Leaves(Vec::new())) {
            Item::Leaves(leaves) => {
                sel.pages_above += 1;
                for (block, low_key) in leaves {
                    match cache.get(block) {
                        None => {
                            sel.missing.push(block);
                            sel.oldest_left = sel.oldest_left.min(block);
                        }
                        Some(page) => {
                            check_level(&page, 0)?;
                            let first = if page.keys_len() > 0 { page.key_bytes(0) } else { low_key };
                            sel.leaves.push((first, block));
                        }
                    }
                }
            }
            Item::Page(block, level, low_key) => {
                let Some(page) = cache.get(block) else {
                    sel.missing.push(block);
                    sel.oldest_left = sel.oldest_left.min(oldest);
                    continue;
                };
                check_level(&page, level)?;
                match page.is_leaf() {
                    // Only a root can be a leaf here.
                    true => {
                        let first = if page.keys_len() > 0 { page.key_bytes(0) } else { low_key };
                        sel.leaves.push((first, block));
                    }
                    false => {
                        let children = page.children();
                        sel.internal.push(block);
                        let old = children.iter().enumerate().filter(|(_, c)| c.oldest_block < threshold);
                        let low = |j: usize| if j == 0 { low_key.clone() } else { page.key_bytes(j - 1) };
                        if level > 1 {
                            sel.pages_above += 1;
                        }
                        // (Children at or above the threshold are not
                        // looked at: they stay, so the tree will still
                        // reach the threshold at least.)
                        if level == 1 {
                            let leaves: Vec<(u64, Bytes)> = old.map(|(j, c)| (c.block, low(j))).collect();
                            items.push(Item::Leaves(leaves));
                            heap.push(Reverse((oldest, items.len() - 1)));
                        } else {
                            for (j, c) in old {
                                items.push(Item::Page(c.block, level - 1, low(j)));
                                heap.push(Reverse((c.oldest_block, items.len() - 1)));
                            }
                        }
                    }
                }
            }
        }
    }
    // What was never pushed is at or above the threshold.
    sel.oldest_left = sel.oldest_left.min(threshold);
    Ok(sel)
}

/// Counting the pages of the tree found at recovery: every internal page
/// is read (leaves are counted from their parents), [`CENSUS_READS_MAX`]
/// at once. Pages written or replaced after that are counted by the
/// commits.
#[derive(Debug)]
pub struct Census {
    /// Internal pages not asked for yet: (reference, level).
    to_read: Vec<(ChildRef, u8)>,
    /// Internal pages asked for.
    reading: BTreeMap<u64, (ChildRef, u8)>,
    pages: u64,
}

/// What the census needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum CensusStep {
    /// Read these blocks.
    Read(Vec<u64>),
    /// Wait for reads in flight.
    Wait,
    /// The tree has this many pages.
    Done(u64),
}

impl Census {
    /// A census of the tree under `root` (`None`: an empty store).
    pub fn new(root: Option<RootRef>) -> Self {
        let (to_read, pages) = match root {
            None => (Vec::new(), 0),
            Some(r) if r.level == 0 => (Vec::new(), 1),
            Some(r) => (vec![(r.child, r.level)], 1),
        };
        Census { to_read, reading: BTreeMap::new(), pages }
    }

    /// Counts what the cache holds and says what to read next.
    ///
    /// # Errors
    /// [`Stall::Corrupt`]: a page that disagrees with its parent.
    pub fn step(&mut self, cache: &mut PageCache) -> Result<CensusStep, Stall> {
        let mut read = Vec::new();
        while self.reading.len() < CENSUS_READS_MAX {
            let Some((r, level)) = self.to_read.pop() else { break };
            match cache.get(r.block) {
                Some(page) => self.count(&page, r, level)?,
                None => {
                    self.reading.insert(r.block, (r, level));
                    read.push(r.block);
                }
            }
        }
        Ok(if !read.is_empty() {
            CensusStep::Read(read)
        } else if self.to_read.is_empty() && self.reading.is_empty() {
            CensusStep::Done(self.pages)
        } else {
            CensusStep::Wait
        })
    }

    /// A page the census asked for has arrived.
    ///
    /// # Errors
    /// [`Stall::Corrupt`]: it disagrees with its parent.
    pub fn arrived(&mut self, page: &PageView) -> Result<(), Stall> {
        match self.reading.remove(&page.block) {
            Some((r, level)) => self.count(page, r, level),
            None => Ok(()),
        }
    }

    fn count(&mut self, page: &PageView, r: ChildRef, level: u8) -> Result<(), Stall> {
        check_child(page, r, level)?;
        if !page.is_leaf() {
            let children = page.children();
            self.pages += children.len() as u64;
            if level >= 2 {
                self.to_read.extend(children.iter().map(|&c| (c, level - 1)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::super::page::{Page, PageBody};
    use super::*;

    fn view(page: &Page) -> PageView {
        PageView::of(page, 512)
    }

    fn leaf(block: u64, keys: &[&'static str]) -> Page {
        let pairs =
            keys.iter().map(|k| (Bytes::from_static(k.as_bytes()), Bytes::from_static(b"v"))).collect();
        Page { block, level: 0, commit_blocks: 0, body: PageBody::Leaf { pairs } }
    }

    fn internal(block: u64, level: u8, keys: &[&'static str], children: &[&Page]) -> Page {
        Page {
            block,
            level,
            commit_blocks: 0,
            body: PageBody::Internal {
                keys: keys.iter().map(|k| Bytes::from_static(k.as_bytes())).collect(),
                children: children.iter().map(|c| c.child_ref()).collect(),
            },
        }
    }

    /// A two-level tree: leaves at blocks 5, 1, 3, 7 (an empty one at 7),
    /// parents at 8 and 9, the root at 10.
    fn tree() -> (Vec<Page>, RootRef) {
        let (a, b, c, d) = (leaf(5, &["a"]), leaf(1, &["c", "d"]), leaf(3, &["m"]), leaf(7, &[]));
        let p = internal(8, 1, &["c"], &[&a, &b]);
        let q = internal(9, 1, &["x"], &[&c, &d]);
        let mut root = internal(10, 2, &["m"], &[&p, &q]);
        root.commit_blocks = 11;
        let r = RootRef { child: root.child_ref(), level: 2 };
        (vec![a, b, c, d, p, q, root], r)
    }

    fn cache_of(pages: &[Page], skip: &[u64]) -> PageCache {
        let mut cache = PageCache::new(64);
        for p in pages.iter().filter(|p| !skip.contains(&p.block)) {
            cache.insert(Rc::new(view(p)));
        }
        cache
    }

    #[test]
    fn the_rate_follows_the_cost_ratio_and_the_block_size() {
        // kivaloo's figure: 1.6e-6 cleans per garbage block per second at
        // -S 1 with 4096-byte blocks.
        let r = cleans_per_garbage_block_per_s(1.0, 4096);
        assert!((r - 4096.0 / 2.592e9).abs() < 1e-15, "{r}");
        assert!((1.5e-6..1.6e-6).contains(&r), "{r}");
        assert_eq!(cleans_per_garbage_block_per_s(0.0, 4096), 0.0);
        assert!((cleans_per_garbage_block_per_s(2.0, 2048) - r).abs() < 1e-15);
        assert!(cleans_per_garbage_block_per_s(f64::MAX, 131_072).is_finite());
    }

    #[test]
    fn the_debt_grows_with_garbage_and_time_and_stays_within_a_tree() {
        let mut p = Pacing::new(0.5);
        assert!(p.enabled() && !Pacing::new(0.0).enabled());
        p.accrue(Instant::from_nanos(1_000), 300, 100);
        assert_eq!(p.owed(), 0, "the first call only starts the clock");
        // 200 garbage blocks * 0.5 per second * 0.1 s = 10 cleans.
        p.accrue(Instant::from_nanos(1_000 + 100_000_000), 300, 100);
        assert_eq!(p.owed(), 10);
        p.paid(4, 100);
        assert_eq!(p.owed(), 6);
        // A compact log owes nothing more.
        p.accrue(Instant::from_nanos(10_000_000_000), 100, 100);
        assert_eq!(p.owed(), 6);
        // Never more than the tree, never more than a commit's worth.
        p.accrue(Instant::from_nanos(100_000_000_000), 10_000, 50);
        assert_eq!(p.owed(), 50);
        let mut big = Pacing::new(1.0);
        big.accrue(Instant::from_nanos(0), 1 << 30, 1 << 20);
        big.accrue(Instant::from_nanos(1_000_000_000), 1 << 30, 1 << 20);
        assert_eq!(big.owed(), CLEAN_LEAVES_PER_COMMIT_MAX);
        // Client rewrites can run ahead, by a tree's worth at most.
        big.paid(10 << 20, 1 << 20);
        big.accrue(Instant::from_nanos(1_000_000_001), 1 << 30, 1 << 20);
        assert_eq!(big.owed(), 0);
    }

    #[test]
    fn the_oldest_leaves_come_first_and_the_threshold_stops_the_walk() {
        let (pages, root) = tree();
        let mut cache = cache_of(&pages, &[]);
        let sel = oldest_leaves(&mut cache, root, 100, 10, 10).unwrap();
        // The group of the oldest leaf (1, with its sibling 5), then the
        // next group (3 and 7).
        let blocks: Vec<u64> = sel.leaves.iter().map(|(_, b)| *b).collect();
        assert_eq!(blocks, [5, 1, 3, 7]);
        let keys: Vec<&[u8]> = sel.leaves.iter().map(|(k, _)| k.as_ref()).collect();
        // An empty leaf is reached by the lowest key its parent allows.
        assert_eq!(keys, [b"a".as_ref(), b"c", b"m", b"x"]);
        assert!(sel.missing.is_empty());
        // Siblings above the threshold stay.
        let sel = oldest_leaves(&mut cache, root, 4, 10, 10).unwrap();
        assert_eq!(sel.leaves.iter().map(|(_, b)| *b).collect::<Vec<_>>(), [1, 3]);
        // A group is taken whole, even past `want`.
        let sel = oldest_leaves(&mut cache, root, 100, 1, 10).unwrap();
        assert_eq!(sel.leaves.iter().map(|(_, b)| *b).collect::<Vec<_>>(), [5, 1]);
    }

    #[test]
    fn pages_not_cached_are_named_and_passed_over() {
        let (pages, root) = tree();
        let mut cache = cache_of(&pages, &[1, 9]);
        let sel = oldest_leaves(&mut cache, root, 100, 10, 10).unwrap();
        assert_eq!(sel.leaves.iter().map(|(_, b)| *b).collect::<Vec<_>>(), [5]);
        assert_eq!(sel.missing, [1, 9]);
        assert_eq!(sel.internal, [10, 8]);
        let sel = oldest_leaves(&mut cache, root, 100, 10, 1).unwrap();
        assert_eq!(sel.missing, [1]);
    }

    #[test]
    fn a_page_at_the_wrong_level_is_corruption() {
        let (mut pages, _) = tree();
        let fake = leaf(10, &["q"]);
        pages[6] = fake.clone();
        let mut cache = cache_of(&pages, &[]);
        let root = RootRef { child: fake.child_ref(), level: 2 };
        assert!(matches!(
            oldest_leaves(&mut cache, root, 100, 10, 10),
            Err(Stall::Corrupt { block: 10, .. })
        ));
    }

    #[test]
    fn the_census_counts_every_page_reading_only_internal_ones() {
        let (pages, root) = tree();
        let mut census = Census::new(Some(root));
        let mut cache = cache_of(&pages, &[8, 9, 10]);
        assert_eq!(census.step(&mut cache).unwrap(), CensusStep::Read(vec![10]));
        assert_eq!(census.step(&mut cache).unwrap(), CensusStep::Wait);
        census.arrived(&view(&pages[6])).unwrap();
        let CensusStep::Read(mut blocks) = census.step(&mut cache).unwrap() else { panic!("reads") };
        blocks.sort_unstable();
        assert_eq!(blocks, [8, 9]);
        census.arrived(&view(&pages[4])).unwrap();
        cache.insert(Rc::new(view(&pages[5])));
        census.arrived(&view(&pages[5])).unwrap();
        assert_eq!(census.step(&mut cache).unwrap(), CensusStep::Done(7));
        assert_eq!(Census::new(None).step(&mut cache).unwrap(), CensusStep::Done(0));
        let lone = RootRef { child: pages[0].child_ref(), level: 0 };
        assert_eq!(Census::new(Some(lone)).step(&mut cache).unwrap(), CensusStep::Done(1));
    }

    #[test]
    fn the_census_refuses_a_page_that_disagrees_with_its_parent() {
        let (pages, root) = tree();
        let mut census = Census::new(Some(root));
        let mut cache = PageCache::new(8);
        census.step(&mut cache).unwrap();
        let mut wrong = pages[6].clone();
        let PageBody::Internal { keys, children } = &mut wrong.body else { unreachable!() };
        keys.pop();
        children.pop();
        assert!(matches!(census.arrived(&view(&wrong)), Err(Stall::Corrupt { block: 10, .. })));
    }
}
