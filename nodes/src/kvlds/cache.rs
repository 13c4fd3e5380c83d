//! The page cache: clean pages by block number, at most `pages_max` of
//! them, evicted by the CLOCK algorithm (a second chance for pages used
//! since the hand last passed). Pages are immutable and shared (`Rc`);
//! nothing outside holds one across inputs, so any page may be evicted,
//! except those the cleaner pinned: at most half the cache, until it
//! unpins them all (after its next batch took what it needed).
//!
//! Beside the bounded pages, the cache holds the pages of the commit being
//! written (`unsynced`), so that the next batch can be built on top of it:
//! they cannot be evicted (lbs may not have them yet), and they join the
//! bounded pages once lbs has made them durable. Right after a commit is
//! durable, the next is sent before the first settles, so there are at most
//! two commits' pages (2 x `COMMIT_BYTES_MAX`, 32 MiB) outside the bound.

use std::collections::VecDeque;
use std::rc::Rc;

use super::block_index::BlockIndex;
use super::page::PageView;

/// How many of the latest evictions the cache remembers (block numbers, for
/// the `reloads_during_commit` probe): at most 1024 entries in a ring and
/// in a map beside it, about 50 KiB whatever the cache size.
pub const EVICTED_RECORD_MAX: usize = 1024;

/// A slot's number as the index stores it (`u32`, half the index's memory
/// of a `usize`): a cache of 2^32 pages would be 8 TiB of 2 KiB blocks.
fn slot_number(i: usize) -> u32 {
    u32::try_from(i).expect("fewer than 2^32 cached pages")
}

/// One cached page and its CLOCK bit.
struct Slot {
    page: Rc<PageView>,
    referenced: bool,
    pinned: bool,
}

/// A bounded cache of clean pages.
pub struct PageCache {
    pages_max: usize,
    /// Block number to index in `slots`.
    index: BlockIndex<u32>,
    slots: Vec<Slot>,
    hand: usize,
    evictions: u64,
    /// Blocks pinned (some may have been removed since).
    pinned: Vec<u64>,
    /// The blocks of the last [`EVICTED_RECORD_MAX`] evictions, oldest
    /// first (a block evicted twice is there twice).
    evicted: VecDeque<u64>,
    /// The same blocks, each with how many times it is in `evicted`.
    evicted_count: BlockIndex<u32>,
    /// The pages of the commit being written (see the module doc).
    /// In block order (commits come in block order).
    unsynced: VecDeque<Rc<PageView>>,
}

impl PageCache {
    /// An empty cache holding at most `pages_max` pages (at least 1).
    pub fn new(pages_max: usize) -> Self {
        let pages_max = pages_max.max(1);
        PageCache {
            pages_max,
            index: BlockIndex::default(),
            slots: Vec::new(),
            hand: 0,
            evictions: 0,
            pinned: Vec::new(),
            evicted: VecDeque::new(),
            evicted_count: BlockIndex::default(),
            unsynced: VecDeque::new(),
        }
    }

    /// The bound.
    pub fn pages_max(&self) -> usize {
        self.pages_max
    }

    /// Pages held now (never above the bound).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Pages evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether `block` was evicted in one of the last
    /// [`EVICTED_RECORD_MAX`] evictions (an older eviction is forgotten).
    pub fn evicted_recently(&self, block: u64) -> bool {
        self.evicted_count.contains(block)
    }

    fn remember_eviction(&mut self, block: u64) {
        if self.evicted.len() >= EVICTED_RECORD_MAX {
            if let Some(old) = self.evicted.pop_front() {
                if let Some(n) = self.evicted_count.get_mut(old) {
                    *n -= 1;
                    if *n == 0 {
                        self.evicted_count.remove(old);
                    }
                }
            }
        }
        self.evicted.push_back(block);
        let n = self.evicted_count.get(block).unwrap_or(0);
        self.evicted_count.insert(block, n + 1);
    }

    /// The page in `block`, if cached; marks it used.
    pub fn get(&mut self, block: u64) -> Option<Rc<PageView>> {
        let Some(i) = self.index.get(block) else { return self.unsynced_page(block) };
        let slot = &mut self.slots[i as usize];
        slot.referenced = true;
        Some(slot.page.clone())
    }

    /// The page of `block` among those held unsynced.
    fn unsynced_page(&self, block: u64) -> Option<Rc<PageView>> {
        let i = self.unsynced.partition_point(|p| p.block < block);
        self.unsynced.get(i).filter(|p| p.block == block).cloned()
    }

    /// Holds the pages of a commit just sent to lbs, outside the bound and
    /// never evicted, until [`PageCache::settle`]. Commits come in block
    /// order.
    pub fn hold_unsynced(&mut self, pages: &[Rc<PageView>]) {
        let mut after = self.unsynced.back().map(|p| p.block);
        for page in pages {
            assert!(after.is_none_or(|a| page.block > a), "commits in block order");
            after = Some(page.block);
            // A page cached for the same block (one read past a torn tail
            // that recovery cut, say) is stale: the new page replaces it.
            self.remove(page.block);
            self.unsynced.push_back(page.clone());
        }
    }

    /// The commit below `end_block` is durable: its pages become ordinary
    /// cached pages (evicting others if need be).
    pub fn settle(&mut self, end_block: u64) {
        while self.unsynced.front().is_some_and(|p| p.block < end_block) {
            let page = self.unsynced.pop_front().expect("a front page");
            self.insert(page);
        }
    }

    /// Caches `page` (replacing any page of the same block), evicting
    /// others if the cache is full. The new page is never the one evicted.
    pub fn insert(&mut self, page: Rc<PageView>) {
        if let Some(i) = self.index.get(page.block) {
            let i = i as usize;
            let pinned = self.slots[i].pinned;
            self.slots[i] = Slot { page, referenced: true, pinned };
            return;
        }
        if self.slots.len() >= self.pages_max {
            self.evict_one();
        }
        self.index.insert(page.block, slot_number(self.slots.len()));
        self.slots.push(Slot { page, referenced: true, pinned: false });
        assert!(self.slots.len() <= self.pages_max, "page cache above its bound");
        debug_assert_eq!(self.index.len(), self.slots.len(), "one index entry per slot");
    }

    /// Drops the page of `block` if cached (a page no tree reaches any
    /// more), making room without evicting a live one.
    pub fn remove(&mut self, block: u64) {
        let Some(i) = self.index.remove(block) else { return };
        self.slots.swap_remove(i as usize);
        if let Some(moved) = self.slots.get(i as usize) {
            self.index.insert(moved.page.block, i);
        }
        if self.hand > self.slots.len() {
            self.hand = 0;
        }
    }

    /// Pins the cached page of `block` so that it is not evicted until
    /// [`PageCache::unpin_all`]; whether it is pinned (not when it is not
    /// cached, or when half the cache is pinned already).
    pub fn pin(&mut self, block: u64) -> bool {
        let Some(i) = self.index.get(block) else { return false };
        let i = i as usize;
        if self.slots[i].pinned {
            return true;
        }
        if self.pinned.len() >= self.pages_max / 2 {
            return false;
        }
        self.slots[i].pinned = true;
        self.pinned.push(block);
        true
    }

    /// Pages that may still be pinned.
    pub fn pins_left(&self) -> usize {
        self.pages_max / 2 - self.pinned.len()
    }

    /// Unpins every pinned page.
    pub fn unpin_all(&mut self) {
        for block in std::mem::take(&mut self.pinned) {
            if let Some(i) = self.index.get(block) {
                self.slots[i as usize].pinned = false;
            }
        }
    }

    /// At most half the slots are pinned, so a victim is found within two
    /// turns of the hand.
    fn evict_one(&mut self) {
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &mut self.slots[self.hand];
            if slot.pinned {
                self.hand += 1;
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                self.hand += 1;
                continue;
            }
            let victim = self.slots.swap_remove(self.hand);
            self.index.remove(victim.page.block);
            if let Some(moved) = self.slots.get(self.hand) {
                self.index.insert(moved.page.block, slot_number(self.hand));
            }
            self.evictions += 1;
            self.remember_eviction(victim.page.block);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::page::{Page, PageBody};
    use super::*;

    fn page(block: u64) -> Rc<PageView> {
        let page = Page { block, level: 0, commit_blocks: 0, body: PageBody::Leaf { pairs: vec![] } };
        Rc::new(PageView::of(&page, 512))
    }

    #[test]
    fn a_commit_being_written_is_held_outside_the_bound_until_settled() {
        let mut cache = PageCache::new(2);
        cache.insert(page(1));
        cache.insert(page(2));
        cache.hold_unsynced(&[page(2), page(3), page(4)]);
        // Found, never evicted, not counted; the stale page 2 replaced.
        assert_eq!(cache.len(), 1);
        for block in [1, 2, 3, 4] {
            assert!(cache.get(block).is_some(), "block {block}");
        }
        // The next commit is sent before the first settles.
        cache.hold_unsynced(&[page(5)]);
        cache.settle(5);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(4).is_some() && cache.get(3).is_some());
        assert!(cache.get(5).is_some());
        cache.settle(6);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(5).is_some());
    }

    #[test]
    fn bound_holds_and_recently_used_pages_survive() {
        let mut c = PageCache::new(3);
        for b in 0..3 {
            c.insert(page(b));
        }
        // One CLOCK sweep clears every bit; touch block 1 afterwards.
        c.insert(page(3));
        assert_eq!(c.len(), 3);
        assert!(c.get(1).is_some() || c.get(0).is_none());
        for b in 4..100 {
            c.get(3);
            c.insert(page(b));
            assert!(c.len() <= 3);
            assert!(c.get(b).is_some(), "the page just inserted stays");
        }
        assert!(c.evictions() >= 97);
        let mut one = PageCache::new(0);
        one.insert(page(1));
        one.insert(page(2));
        assert_eq!(one.len(), 1);
        assert!(one.get(2).is_some());
    }

    #[test]
    fn pinned_pages_survive_eviction_until_unpinned_and_at_most_half_are() {
        let mut c = PageCache::new(4);
        for b in 0..4 {
            c.insert(page(b));
        }
        assert!(c.pin(0) && c.pin(1));
        assert!(!c.pin(2), "half the cache is pinned already");
        assert!(!c.pin(99), "not cached");
        assert_eq!(c.pins_left(), 0);
        for b in 10..50 {
            c.insert(page(b));
            assert!(c.len() <= 4);
        }
        assert!(c.get(0).is_some() && c.get(1).is_some());
        c.unpin_all();
        assert_eq!(c.pins_left(), 2);
        for b in 50..60 {
            c.insert(page(b));
        }
        assert!(c.get(0).is_none() && c.get(1).is_none());
        // A one-page cache pins nothing, so it can always evict.
        let mut one = PageCache::new(1);
        one.insert(page(1));
        assert!(!one.pin(1));
        one.insert(page(2));
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn the_eviction_record_keeps_the_last_evictions_only() {
        let mut c = PageCache::new(1);
        c.insert(page(0));
        assert!(!c.evicted_recently(0));
        c.insert(page(1));
        assert!(c.evicted_recently(0), "block 0 was just evicted");
        c.remove(1);
        assert!(!c.evicted_recently(1), "removing is not evicting");
        // Block 0 evicted again: it is in the ring twice.
        c.insert(page(0));
        c.insert(page(2));
        assert_eq!(c.evicted_count.get(0), Some(2));
        for b in 3..(3 + EVICTED_RECORD_MAX as u64) {
            c.insert(page(b));
        }
        assert_eq!(c.evicted.len(), EVICTED_RECORD_MAX);
        let distinct: std::collections::BTreeSet<u64> = c.evicted.iter().copied().collect();
        assert_eq!(c.evicted_count.len(), distinct.len());
        let counted: u32 = distinct.iter().map(|&b| c.evicted_count.get(b).unwrap_or(0)).sum();
        assert_eq!(counted as usize, EVICTED_RECORD_MAX);
        assert!(!c.evicted_recently(0), "forgotten after {EVICTED_RECORD_MAX} later evictions");
        assert!(c.evicted_recently(2));
    }

    #[test]
    fn removing_keeps_the_index_right() {
        let mut c = PageCache::new(4);
        for b in 0..4 {
            c.insert(page(b));
        }
        c.remove(1);
        c.remove(7);
        assert_eq!(c.len(), 3);
        for b in [0, 2, 3] {
            assert_eq!(c.get(b).map(|p| p.block), Some(b));
        }
        assert!(c.get(1).is_none());
        c.insert(page(9));
        c.insert(page(10));
        assert_eq!(c.len(), 4);
        assert_eq!(c.get(10).map(|p| p.block), Some(10));
    }
}
