//! Reads (GET and RANGE) on a committed tree, one page at a time through
//! the cache. A read that meets a page not in the cache stops there and
//! says which block it needs; once that page arrives it continues from it
//! (not from the root), so every page read moves it forward, however small
//! the cache.

use bytes::Bytes;

use super::cache::PageCache;
use super::tree::{check_level, RootRef, Stall};

/// Where a descent is: the next page to look at, the level it must have,
/// and the exclusive upper bound of its keys (`None`: no bound).
#[derive(Debug, Clone)]
pub struct Descent {
    pub block: u64,
    pub level: u8,
    pub hi: Option<Bytes>,
}

impl Descent {
    /// A descent from `root`.
    pub fn from_root(root: RootRef) -> Self {
        Descent { block: root.child.block, level: root.level, hi: None }
    }
}

/// A GET: descends to the leaf that holds `key`; its value or `None`.
///
/// # Errors
/// [`Stall::NeedPage`] (the descent waits at that block), or corruption.
pub fn get(cache: &mut PageCache, d: &mut Descent, key: &[u8]) -> Result<Option<Bytes>, Stall> {
    loop {
        let page = cache.get(d.block).ok_or(Stall::NeedPage(d.block))?;
        check_level(&page, d.level)?;
        if page.is_leaf() {
            return Ok(page.search(key).ok().map(|i| page.value_bytes(i)));
        }
        d.block = page.children()[page.child_index(key)].block;
        d.level -= 1;
    }
}

/// A RANGE in progress.
#[derive(Debug, Clone)]
pub struct RangeScan {
    root: RootRef,
    end: Bytes,
    budget_bytes: usize,
    /// Keys below this are done.
    pos: Bytes,
    descent: Descent,
    /// Pairs found so far.
    pub pairs: Vec<(Bytes, Bytes)>,
    bytes: usize,
    /// Set when the scan stopped at its byte budget (for the node's
    /// `range_answers_cut_by_budget` probe).
    pub cut_by_budget: bool,
}

impl RangeScan {
    /// A scan of `[start, end)` on the tree at `root`, returning about
    /// `budget_bytes` of pairs (each counted as key and value plus their
    /// two length bytes), at least one if there is one.
    pub fn new(root: RootRef, start: Bytes, end: Bytes, budget_bytes: usize) -> Self {
        RangeScan {
            root,
            end,
            budget_bytes,
            pos: start,
            descent: Descent::from_root(root),
            pairs: Vec::new(),
            bytes: 0,
            cut_by_budget: false,
        }
    }

    /// The most pair bytes it returns (one pair more, whatever its size).
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    fn before_end(&self, key: &[u8]) -> bool {
        self.end.is_empty() || key < self.end.as_ref()
    }

    /// Runs the scan as far as the cache allows; when finished, `next`: every
    /// key in `[start, next)` was returned (empty: past the last key).
    ///
    /// # Errors
    /// [`Stall::NeedPage`] (the scan waits at that block), or corruption.
    pub fn run(&mut self, cache: &mut PageCache) -> Result<Bytes, Stall> {
        loop {
            let page = cache.get(self.descent.block).ok_or(Stall::NeedPage(self.descent.block))?;
            check_level(&page, self.descent.level)?;
            if !page.is_leaf() {
                let i = page.child_index(&self.pos);
                self.descent.block = page.children()[i].block;
                self.descent.level -= 1;
                if i < page.keys_len() {
                    self.descent.hi = Some(page.key_bytes(i));
                }
                continue;
            }
            for i in page.keys_below(&self.pos)..page.keys_len() {
                let (k, v) = (page.key(i), page.value(i));
                if !self.before_end(k) {
                    return Ok(self.end.clone());
                }
                let n = 2 + k.len() + v.len();
                if !self.pairs.is_empty() && self.bytes + n > self.budget_bytes {
                    self.cut_by_budget = true;
                    return Ok(self.next_after_last());
                }
                self.bytes += n;
                self.pairs.push((page.key_bytes(i), page.value_bytes(i)));
            }
            match self.descent.hi.take() {
                Some(hi) if self.before_end(&hi) => {
                    self.pos = hi;
                    self.descent = Descent::from_root(self.root);
                }
                _ => return Ok(self.end.clone()),
            }
        }
    }

    /// `next` when the budget stopped the scan: just after the last key
    /// returned (kivaloo's answer), or `end` if nothing lies between.
    fn next_after_last(&self) -> Bytes {
        let last = &self.pairs.last().expect("a pair was returned").0;
        match key_successor(last) {
            Some(next) if self.before_end(&next) => next,
            Some(_) => self.end.clone(),
            // Nothing sorts after the last key: past the end.
            None => Bytes::new(),
        }
    }
}

/// The smallest key (of at most 255 bytes) greater than `key`, or `None`
/// if there is none (255 bytes of 0xff).
pub fn key_successor(key: &[u8]) -> Option<Bytes> {
    if key.len() < 255 {
        let mut next = key.to_vec();
        next.push(0);
        return Some(Bytes::from(next));
    }
    let mut next = key.to_vec();
    while next.last() == Some(&0xff) {
        next.pop();
    }
    let last = next.last_mut()?;
    *last += 1;
    Some(Bytes::from(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_is_the_next_key_in_byte_order() {
        assert_eq!(key_successor(b"a").unwrap().as_ref(), b"a\0");
        assert_eq!(key_successor(b"").unwrap().as_ref(), b"\0");
        let mut long = vec![b'a'; 254];
        long.push(0xff);
        let mut expected = vec![b'a'; 253];
        expected.push(b'b');
        assert_eq!(key_successor(&long).unwrap().as_ref(), &expected[..]);
        assert_eq!(key_successor(&[0xff; 255]), None);
    }
}
