//! A map from block number to a small value, for the page cache's hot
//! lookups: open addressing with linear probing in one flat table, at most
//! half full, with deletion by backward shift (no tombstones). A lookup is
//! one multiply and, almost always, one cache line, where an ordered map
//! takes a pointer chase per level.
//!
//! The table never iterates, so no output can depend on its order; the hash
//! is fixed (block numbers come from our own log, not from clients, so
//! there is no flooding to defend against). Memory: 2 to 4 slots of
//! `8 + size_of::<V>()` bytes (padded) per entry at the most entries it
//! has held (it never shrinks).

/// The smallest table, in slots (a power of two).
const SLOTS_MIN: usize = 16;

/// A map from `u64` to `V`; see the module doc.
#[derive(Debug, Clone)]
pub struct BlockIndex<V: Copy> {
    /// `slots.len()` is a power of two; `None` is an empty slot.
    slots: Vec<Option<(u64, V)>>,
    len: usize,
}

impl<V: Copy> Default for BlockIndex<V> {
    fn default() -> Self {
        BlockIndex { slots: vec![None; SLOTS_MIN], len: 0 }
    }
}

impl<V: Copy> BlockIndex<V> {
    /// How many entries.
    pub fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot where `block`'s probe starts: the golden-ratio multiply,
    /// with its high half folded into the low bits the mask keeps, so that
    /// they depend on every bit of the block number.
    fn home(&self, block: u64) -> usize {
        let h = block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> 32 ^ h) as usize & self.mask()
    }

    /// The slot holding `block`, if any.
    fn find(&self, block: u64) -> Option<usize> {
        let mut i = self.home(block);
        loop {
            match self.slots[i] {
                None => return None,
                Some((b, _)) if b == block => return Some(i),
                Some(_) => i = (i + 1) & self.mask(),
            }
        }
    }

    /// The value for `block`.
    pub fn get(&self, block: u64) -> Option<V> {
        self.find(block).and_then(|i| self.slots[i].map(|(_, v)| v))
    }

    /// Whether `block` has a value.
    pub fn contains(&self, block: u64) -> bool {
        self.find(block).is_some()
    }

    /// The value for `block`, to change in place.
    pub fn get_mut(&mut self, block: u64) -> Option<&mut V> {
        let i = self.find(block)?;
        self.slots[i].as_mut().map(|(_, v)| v)
    }

    /// Sets `block`'s value; the previous one.
    pub fn insert(&mut self, block: u64, value: V) -> Option<V> {
        if let Some(v) = self.get_mut(block) {
            return Some(std::mem::replace(v, value));
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mut i = self.home(block);
        loop {
            match &mut self.slots[i] {
                slot @ None => {
                    *slot = Some((block, value));
                    self.len += 1;
                    return None;
                }
                Some((b, v)) if *b == block => return Some(std::mem::replace(v, value)),
                Some(_) => i = (i + 1) & self.mask(),
            }
        }
    }

    /// Removes `block`; its value. The entries after it in its run move
    /// back where their probe would look first, so no lookup ever stops
    /// early at the hole.
    pub fn remove(&mut self, block: u64) -> Option<V> {
        let mut hole = self.find(block)?;
        let (_, value) = self.slots[hole].take()?;
        self.len -= 1;
        let mut i = hole;
        loop {
            i = (i + 1) & self.mask();
            let Some((b, _)) = self.slots[i] else { return Some(value) };
            // The entry at `i` moves into the hole unless its home is
            // cyclically within (hole, i] (its probe would then miss it).
            let home_from_hole = self.home(b).wrapping_sub(hole) & self.mask();
            let home_between = home_from_hole != 0 && home_from_hole <= (i.wrapping_sub(hole) & self.mask());
            if !home_between {
                self.slots[hole] = self.slots[i].take();
                hole = i;
            }
        }
    }

    fn grow(&mut self) {
        let doubled = vec![None; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        self.len = 0;
        for (block, value) in old.into_iter().flatten() {
            self.insert(block, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        Get(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct keys, some of them colliding in a small table
        // (multiples of a large power of two), so that runs form, wrap
        // around the table's end and are cut by removals.
        let key = prop_oneof![0u64..64, (0u64..8).prop_map(|k| k << 40), Just(u64::MAX)];
        prop_oneof![
            (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key.clone().prop_map(Op::Remove),
            key.prop_map(Op::Get),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_an_ordered_map(ops in proptest::collection::vec(op(), 1..400)) {
            let mut index = BlockIndex::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(index.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(index.remove(k), model.remove(&k)),
                    Op::Get(k) => prop_assert_eq!(index.get(k), model.get(&k).copied()),
                }
                prop_assert_eq!(index.len(), model.len());
                for (&k, &v) in &model {
                    prop_assert_eq!(index.get(k), Some(v));
                }
            }
        }
    }
}
