//! The dirty tree: one batch of modifying requests applied copy-on-write
//! on top of the last committed tree, then rebalanced (split, merge until
//! stable, deroot) and turned into the pages of one commit.
//!
//! Nodes the batch touched live in an arena ([`DirtyNode`]); everything
//! else is still a [`ChildRef`] to a clean page of the committed tree,
//! shared, never changed. A clean page is copied into the arena the first
//! time the batch needs to change it, which needs the page in the cache:
//! when it is not there, the operation returns [`Stall::NeedPage`] and is
//! run again, from the start, once the page has been read. Operations are
//! written so that a rerun is harmless and makes progress: whatever was
//! copied stays copied.
//!
//! Balance (relaxed, as kivaloo's): every page fits its block, and any two
//! adjacent siblings, merged, would be longer than 2/3 of a block. The root
//! may be any size; an internal root has at least two children.

use std::rc::Rc;

use bytes::Bytes;
use kivaloo::kvlds_proto::KvldsRequest;

use super::cache::PageCache;
use super::page::{
    edited_internal_view, edited_leaf_view, leaf_len, oldest_of, pair_len, ChildRef, Page, PageBody,
    PageView, CHILD_REF_LEN, PAGE_HEADER_LEN,
};

/// Why an operation on the tree could not finish now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stall {
    /// The page in this block must be read into the cache first.
    NeedPage(u64),
    /// A page that is part of the committed tree is not what its parent
    /// says (wrong level): corruption the node must report.
    Corrupt { block: u64, why: String },
}

/// A child of a dirty internal node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child {
    /// Unchanged: a page of the committed tree.
    Clean(ChildRef),
    /// Changed in this batch: an index into the arena.
    Dirty(usize),
}

/// A node changed in this batch.
#[derive(Debug, Clone)]
struct DirtyNode {
    level: u8,
    body: DirtyBody,
    /// Whether two of its children were merged in this batch's rebalance
    /// (it lost a child and a separator): for the `merge_cascades` probe.
    children_merged: bool,
    /// Whether some of its children became siblings in this batch, by a
    /// merge of two internal nodes (the last child of one beside the first
    /// of the other): a rebalance then checks every pair of them, clean
    /// or not.
    siblings_joined: bool,
}

impl DirtyNode {
    fn new(level: u8, body: DirtyBody) -> Self {
        DirtyNode { level, body, children_merged: false, siblings_joined: false }
    }
}

#[derive(Debug, Clone)]
enum DirtyBody {
    /// A leaf as its pairs.
    Leaf(Vec<(Bytes, Bytes)>),
    /// A leaf as its clean page and a few changes (how a leaf is copied
    /// in); it becomes a `Leaf` when it must split or merge, or gathers
    /// more than [`LEAF_EDITS_MAX`] changes.
    Edited(LeafEdits),
    Internal {
        keys: Separators,
        children: Vec<Child>,
    },
}

/// A dirty internal node's separator keys: those of the clean page it was
/// copied from, for as long as no split or merge below changes them (so
/// that copying it in takes no keys apart, and writing it copies the
/// page's entries whole), or a list of its own.
#[derive(Debug, Clone)]
enum Separators {
    Page(Rc<PageView>),
    Owned(Vec<Bytes>),
}

impl Separators {
    /// The length of separator `i`.
    fn key_len(&self, i: usize) -> usize {
        match self {
            Separators::Page(p) => p.key(i).len(),
            Separators::Owned(keys) => keys[i].len(),
        }
    }

    /// Separator `i`.
    fn get(&self, i: usize) -> Bytes {
        match self {
            Separators::Page(p) => p.key_bytes(i),
            Separators::Owned(keys) => keys[i].clone(),
        }
    }

    /// The index of the child whose range holds `key`.
    fn child_index(&self, key: &[u8]) -> usize {
        match self {
            Separators::Page(p) => p.child_index(key),
            Separators::Owned(keys) => keys.partition_point(|k| k.as_ref() <= key),
        }
    }

    /// The length of an internal page with these separators and `children`
    /// children.
    fn page_len(&self, children: usize) -> usize {
        let keys_len = match self {
            Separators::Page(p) => p.page_len() - PAGE_HEADER_LEN - CHILD_REF_LEN * p.children().len(),
            Separators::Owned(keys) => keys.iter().map(|k| 1 + k.len()).sum(),
        };
        PAGE_HEADER_LEN + CHILD_REF_LEN * children + keys_len
    }

    /// The list, made the node's own (to change it).
    fn owned(&mut self) -> &mut Vec<Bytes> {
        if let Separators::Page(p) = self {
            *self = Separators::Owned(p.separators());
        }
        match self {
            Separators::Owned(keys) => keys,
            Separators::Page(_) => unreachable!("made owned above"),
        }
    }

    fn into_vec(self) -> Vec<Bytes> {
        match self {
            Separators::Page(p) => p.separators(),
            Separators::Owned(keys) => keys,
        }
    }
}

/// The most changes a leaf keeps beside its clean page before it is
/// turned into a list of pairs: each change costs a binary search of them
/// on every lookup and a shift on every insertion.
const LEAF_EDITS_MAX: usize = 8;

/// A leaf copied into the batch, kept as its clean page and the changes
/// made to it, so that copying it in does not take its pairs apart and
/// writing it copies the page's unchanged entries in runs.
#[derive(Debug, Clone)]
pub struct LeafEdits {
    base: Rc<PageView>,
    /// Sorted by key, each key once; `None` removes the key.
    edits: Vec<(Bytes, Option<Bytes>)>,
    /// The page's length with the changes made.
    len: usize,
}

impl LeafEdits {
    fn new(base: Rc<PageView>) -> Self {
        let len = base.page_len();
        LeafEdits { base, edits: Vec::new(), len }
    }

    /// The value of `key` with the changes made.
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        match self.edits.binary_search_by(|(k, _)| k.as_ref().cmp(key)) {
            Ok(i) => self.edits[i].1.as_deref(),
            Err(_) => self.base.search(key).ok().map(|i| self.base.value(i)),
        }
    }

    /// Sets (`Some`) or removes (`None`) `key`.
    fn set(&mut self, key: &Bytes, value: Option<&Bytes>) {
        if let Some(old) = self.get(key) {
            self.len -= pair_len(key, old);
        }
        if let Some(v) = value {
            self.len += pair_len(key, v);
        }
        let change = (key.clone(), value.cloned());
        match self.edits.binary_search_by(|(k, _)| k.as_ref().cmp(key)) {
            Ok(i) => self.edits[i] = change,
            Err(i) => self.edits.insert(i, change),
        }
    }

    /// The pairs, with the changes made (a merge of the two sorted lists).
    fn pairs(&self) -> Vec<(Bytes, Bytes)> {
        let n = self.base.keys_len();
        let mut pairs = Vec::with_capacity(n + self.edits.len());
        let mut i = 0;
        for (k, v) in &self.edits {
            while i < n && self.base.key(i) < k.as_ref() {
                pairs.push((self.base.key_bytes(i), self.base.value_bytes(i)));
                i += 1;
            }
            if i < n && self.base.key(i) == k.as_ref() {
                i += 1;
            }
            if let Some(v) = v {
                pairs.push((k.clone(), v.clone()));
            }
        }
        for j in i..n {
            pairs.push((self.base.key_bytes(j), self.base.value_bytes(j)));
        }
        pairs
    }
}

/// The root of a committed tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootRef {
    /// Where the root page is.
    pub child: ChildRef,
    /// Its level (0: the root is a leaf).
    pub level: u8,
}

/// Counts of rebalancing work, for the node's probes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebalanceCounts {
    pub splits: u64,
    pub root_splits: u64,
    pub merges: u64,
    /// Merges of two internal siblings at least one of which had lost a
    /// child to a merge below in the same rebalance: a merge propagating
    /// up a level (counted in `merge_pass`).
    pub merge_cascades: u64,
    pub deroots: u64,
}

/// One batch's copy-on-write tree.
pub struct DirtyTree {
    nodes: Vec<Option<DirtyNode>>,
    /// Live (`Some`) entries of `nodes`.
    live_nodes: usize,
    root: Child,
    root_level: u8,
    block_size: usize,
    /// Whether any request of the batch changed anything.
    pub modified: bool,
    /// Bytes of pairs added or grown, for estimating the commit's size.
    pub bytes_added: usize,
    /// Rebalancing work done so far.
    pub counts: RebalanceCounts,
    /// Clean pages copied into the batch: once it commits, no tree reaches
    /// them any more.
    pub superseded: Vec<u64>,
}

/// The pages of one commit, in block order (the root last).
pub struct CommitPages {
    pub pages: Vec<CommitPage>,
    pub root: RootRef,
}

/// One page of a commit.
pub enum CommitPage {
    Whole(Page),
    /// A leaf that is a clean page with a few changes (never the root).
    EditedLeaf {
        block: u64,
        leaf: LeafEdits,
    },
    /// An internal page that is a clean page with new references to its
    /// children (never the root).
    EditedInternal {
        block: u64,
        base: Rc<PageView>,
        children: Vec<ChildRef>,
    },
}

impl CommitPage {
    /// The block it goes to.
    pub fn block(&self) -> u64 {
        match self {
            CommitPage::Whole(p) => p.block,
            CommitPage::EditedLeaf { block, .. } | CommitPage::EditedInternal { block, .. } => *block,
        }
    }

    /// Its bytes, as the view the cache holds.
    pub fn view(&self, block_size: usize) -> PageView {
        match self {
            CommitPage::Whole(p) => PageView::of(p, block_size),
            CommitPage::EditedLeaf { block, leaf } => {
                let view = edited_leaf_view(*block, &leaf.base, &leaf.edits, block_size);
                // The parent recorded this length.
                assert_eq!(
                    view.page_len(),
                    leaf.len,
                    "edited leaf {block}: its length as kept and as written"
                );
                view
            }
            CommitPage::EditedInternal { block, base, children } => {
                edited_internal_view(*block, base, children, block_size)
            }
        }
    }

    /// The page in its owned form (for checks: built independently of
    /// [`CommitPage::view`]).
    pub fn to_page(&self) -> Page {
        match self {
            CommitPage::Whole(p) => p.clone(),
            CommitPage::EditedLeaf { block, leaf } => Page {
                block: *block,
                level: 0,
                commit_blocks: 0,
                body: PageBody::Leaf { pairs: leaf.pairs() },
            },
            CommitPage::EditedInternal { block, base, children } => Page {
                block: *block,
                level: base.level,
                commit_blocks: 0,
                body: PageBody::Internal { keys: base.separators(), children: children.clone() },
            },
        }
    }
}

impl DirtyTree {
    /// A batch on top of `committed` (`None`: the store is empty).
    pub fn new(committed: Option<RootRef>, block_size: usize) -> Self {
        let (nodes, root, root_level) = match committed {
            None => {
                let empty = DirtyNode::new(0, DirtyBody::Leaf(Vec::new()));
                (vec![Some(empty)], Child::Dirty(0), 0)
            }
            Some(r) => (Vec::new(), Child::Clean(r.child), r.level),
        };
        DirtyTree {
            live_nodes: nodes.len(),
            nodes,
            root,
            root_level,
            block_size,
            modified: false,
            bytes_added: 0,
            counts: RebalanceCounts::default(),
            superseded: Vec::new(),
        }
    }

    /// Nodes in the arena (an upper bound on the pages this batch writes,
    /// before splits).
    pub fn dirty_nodes(&self) -> usize {
        self.live_nodes
    }

    /// The root's level.
    pub fn root_level(&self) -> u8 {
        self.root_level
    }

    fn node(&self, i: usize) -> &DirtyNode {
        self.nodes[i].as_ref().expect("live dirty node")
    }

    fn node_mut(&mut self, i: usize) -> &mut DirtyNode {
        self.nodes[i].as_mut().expect("live dirty node")
    }

    fn push(&mut self, n: DirtyNode) -> usize {
        self.nodes.push(Some(n));
        self.live_nodes += 1;
        self.nodes.len() - 1
    }

    fn remove(&mut self, i: usize) -> DirtyNode {
        self.live_nodes -= 1;
        self.nodes[i].take().expect("live dirty node")
    }

    /// Copies the clean page `r` (expected at `level`) into the arena.
    fn copy_in(&mut self, r: ChildRef, level: u8, cache: &mut PageCache) -> Result<usize, Stall> {
        let page = cache.get(r.block).ok_or(Stall::NeedPage(r.block))?;
        check_child(&page, r, level)?;
        self.superseded.push(r.block);
        let body = if page.is_leaf() {
            DirtyBody::Edited(LeafEdits::new(page))
        } else {
            DirtyBody::Internal {
                children: page.children().iter().map(|&c| Child::Clean(c)).collect(),
                keys: Separators::Page(page),
            }
        };
        Ok(self.push(DirtyNode::new(level, body)))
    }

    fn root_dirty(&mut self, cache: &mut PageCache) -> Result<usize, Stall> {
        match self.root {
            Child::Dirty(i) => Ok(i),
            Child::Clean(r) => {
                let i = self.copy_in(r, self.root_level, cache)?;
                self.root = Child::Dirty(i);
                Ok(i)
            }
        }
    }

    /// Makes child `i` of dirty internal node `parent` dirty; its index.
    fn dirty_child(&mut self, parent: usize, i: usize, cache: &mut PageCache) -> Result<usize, Stall> {
        let level = self.node(parent).level - 1;
        let child = match &self.node(parent).body {
            DirtyBody::Internal { children, .. } => children[i],
            DirtyBody::Leaf(_) | DirtyBody::Edited(_) => unreachable!("a leaf has no children"),
        };
        match child {
            Child::Dirty(j) => Ok(j),
            Child::Clean(r) => {
                let j = self.copy_in(r, level, cache)?;
                if let DirtyBody::Internal { children, .. } = &mut self.node_mut(parent).body {
                    children[i] = Child::Dirty(j);
                }
                Ok(j)
            }
        }
    }

    /// The dirty leaf that holds (or would hold) `key`, copying the path.
    fn leaf_for(&mut self, key: &[u8], cache: &mut PageCache) -> Result<usize, Stall> {
        let mut i = self.root_dirty(cache)?;
        loop {
            let slot = match &self.node(i).body {
                DirtyBody::Leaf(_) | DirtyBody::Edited(_) => return Ok(i),
                DirtyBody::Internal { keys, .. } => keys.child_index(key),
            };
            i = self.dirty_child(i, slot, cache)?;
        }
    }

    /// Cleaning: copies the leaf in `block`, which `key` leads to, and the
    /// path to it into the batch unchanged, so that the commit rewrites
    /// them at the head of the log. Whether it did: nothing is copied when
    /// that leaf is already dirty, when `key` leads elsewhere (the tree
    /// changed since the leaf was chosen), or when a page on the way is not
    /// in the cache (cleaning never makes a batch wait).
    ///
    /// # Errors
    /// [`Stall::Corrupt`] for a page at the wrong level.
    pub fn touch(&mut self, key: &[u8], block: u64, cache: &mut PageCache) -> Result<bool, Stall> {
        // Look first, without copying anything.
        let mut at = self.root;
        let mut level = self.root_level;
        while level > 0 {
            let next = match at {
                Child::Dirty(i) => match &self.node(i).body {
                    DirtyBody::Internal { keys, children } => children[keys.child_index(key)],
                    DirtyBody::Leaf(_) | DirtyBody::Edited(_) => unreachable!("levels above 0 are internal"),
                },
                Child::Clean(r) => {
                    let Some(page) = cache.get(r.block) else { return Ok(false) };
                    check_level(&page, level)?;
                    Child::Clean(page.children()[page.child_index(key)])
                }
            };
            at = next;
            level -= 1;
        }
        match at {
            Child::Clean(r) if r.block == block && cache.get(block).is_some() => {}
            _ => return Ok(false),
        }
        self.leaf_for(key, cache)?;
        self.modified = true;
        Ok(true)
    }

    /// Applies one modifying request; its answer (`true`: status 0).
    ///
    /// # Errors
    /// [`Stall`]: a page is needed first (run it again once it is cached),
    /// or corruption was found.
    ///
    /// # Panics
    /// On a request that does not modify (the caller's error).
    pub fn apply(&mut self, req: &KvldsRequest, cache: &mut PageCache) -> Result<bool, Stall> {
        let key = modified_key(req).unwrap_or_else(|| panic!("not a modifying request: {req:?}"));
        let leaf = self.leaf_for(key, cache)?;
        let body = &mut self.nodes[leaf].as_mut().expect("live dirty node").body;
        let (done, new_value, had) = {
            let current: Option<&[u8]> = match &*body {
                DirtyBody::Leaf(pairs) => {
                    pairs.binary_search_by(|(k, _)| k.as_ref().cmp(key)).ok().map(|i| pairs[i].1.as_ref())
                }
                DirtyBody::Edited(leaf) => leaf.get(key),
                DirtyBody::Internal { .. } => unreachable!("leaf_for ends at a leaf"),
            };
            let (done, new_value) = decide(req, current);
            (done, new_value, current.is_some())
        };
        // Nothing to do: refused, or removing a key that is not there.
        let Some(new_value) = new_value else { return Ok(done) };
        if new_value.is_none() && !had {
            return Ok(done);
        }
        self.modified = true;
        if let Some(v) = new_value {
            self.bytes_added += if had { v.len() } else { pair_len(key, v) };
        }
        match body {
            DirtyBody::Leaf(pairs) => match (new_value, pairs.binary_search_by(|(k, _)| k.as_ref().cmp(key)))
            {
                (Some(v), Ok(i)) => pairs[i].1 = v.clone(),
                (Some(v), Err(i)) => pairs.insert(i, (key.clone(), v.clone())),
                (None, Ok(i)) => {
                    pairs.remove(i);
                }
                (None, Err(_)) => unreachable!("removing a key that is there"),
            },
            DirtyBody::Edited(leaf) => {
                leaf.set(key, new_value);
                if leaf.edits.len() > LEAF_EDITS_MAX {
                    *body = DirtyBody::Leaf(leaf.pairs());
                }
            }
            DirtyBody::Internal { .. } => unreachable!("leaf_for ends at a leaf"),
        }
        Ok(done)
    }

    fn node_len(&self, i: usize) -> usize {
        match &self.node(i).body {
            DirtyBody::Leaf(pairs) => leaf_len(pairs),
            DirtyBody::Edited(leaf) => leaf.len,
            DirtyBody::Internal { keys, children } => keys.page_len(children.len()),
        }
    }

    fn child_len(&self, c: Child) -> usize {
        match c {
            Child::Clean(r) => r.page_len as usize,
            Child::Dirty(j) => self.node_len(j),
        }
    }

    /// Whether two adjacent siblings of length `a` and `b` (at `level`,
    /// with a separator of `sep_len` bytes between them) would fit 2/3 of a
    /// block merged.
    fn mergeable(&self, a: usize, b: usize, level: u8, sep_len: usize) -> bool {
        let merged = merged_len(a, b, level, sep_len);
        3 * merged <= 2 * self.block_size
    }

    /// Rebalances the batch: splits every page that outgrew its block (the
    /// root too, growing the tree), merges adjacent siblings until no two
    /// fit 2/3 of a block together, and removes single-child roots. May
    /// stall for pages (siblings to merge with); run it again then.
    ///
    /// # Errors
    /// [`Stall`], as for [`DirtyTree::apply`].
    pub fn rebalance(&mut self, cache: &mut PageCache) -> Result<(), Stall> {
        let root = self.root_dirty(cache)?;
        self.split_root(root);
        loop {
            let Child::Dirty(root) = self.root else { unreachable!("the root is dirty") };
            let mut changed = self.merge_pass(root, cache)?;
            changed |= self.deroot(cache)?;
            if !changed {
                return Ok(());
            }
        }
    }

    fn split_root(&mut self, mut root: usize) {
        loop {
            let extra = self.split(root);
            if extra.is_empty() {
                self.root = Child::Dirty(root);
                return;
            }
            self.counts.root_splits += 1;
            // Pages read claim at most LEVEL_MAX levels; growing from there
            // to 64 would take 2^31 more pages than any store holds.
            assert!(self.root_level < 64, "tree deeper than 64 levels");
            self.root_level += 1;
            let mut keys = Vec::with_capacity(extra.len());
            let mut children = vec![Child::Dirty(root)];
            for (sep, j) in extra {
                keys.push(sep);
                children.push(Child::Dirty(j));
            }
            root = self.push(DirtyNode::new(
                self.root_level,
                DirtyBody::Internal { keys: Separators::Owned(keys), children },
            ));
        }
    }

    /// Turns an edited leaf into its list of pairs, and an internal node's
    /// separators into its own list (to split or merge it).
    fn materialize(&mut self, i: usize) {
        let body = &mut self.node_mut(i).body;
        match body {
            DirtyBody::Edited(leaf) => *body = DirtyBody::Leaf(leaf.pairs()),
            DirtyBody::Internal { keys, .. } => {
                keys.owned();
            }
            DirtyBody::Leaf(_) => {}
        }
    }

    /// Splits the dirty subtree under `i` bottom-up; returns the pieces
    /// that `i` itself split off, with their separators, in key order.
    fn split(&mut self, i: usize) -> Vec<(Bytes, usize)> {
        let dirty_children: Vec<(usize, usize)> = match &self.node(i).body {
            DirtyBody::Internal { children, .. } => children
                .iter()
                .enumerate()
                .filter_map(|(slot, c)| match c {
                    Child::Dirty(j) => Some((slot, *j)),
                    Child::Clean(_) => None,
                })
                .collect(),
            DirtyBody::Leaf(_) | DirtyBody::Edited(_) => Vec::new(),
        };
        // Children's new pieces, inserted right to left so that earlier
        // slots keep their places.
        for (slot, j) in dirty_children.into_iter().rev() {
            let pieces = self.split(j);
            if pieces.is_empty() {
                continue;
            }
            let DirtyBody::Internal { keys, children } = &mut self.node_mut(i).body else { unreachable!() };
            let (seps, nodes): (Vec<Bytes>, Vec<Child>) =
                pieces.into_iter().map(|(sep, p)| (sep, Child::Dirty(p))).unzip();
            keys.owned().splice(slot..slot, seps);
            children.splice(slot + 1..slot + 1, nodes);
        }
        let len = self.node_len(i);
        if len <= self.block_size {
            return Vec::new();
        }
        self.materialize(i);
        // Even pieces: as few as fit, each about the same size, so that a
        // piece is neither full (it would split again at the next insert)
        // nor nearly empty (it would be merged right back).
        let room = self.block_size - PAGE_HEADER_LEN;
        let content = len - PAGE_HEADER_LEN;
        let target = content.div_ceil(content.div_ceil(room));
        let level = self.node(i).level;
        let pieces: Vec<(Bytes, DirtyBody)> = match &mut self.node_mut(i).body {
            DirtyBody::Leaf(pairs) => {
                let all = std::mem::take(pairs);
                let mut pieces: Vec<Vec<(Bytes, Bytes)>> = vec![Vec::new()];
                let mut used = 0;
                for (k, v) in all {
                    let n = pair_len(&k, &v);
                    if !pieces.last().expect("one piece").is_empty() && (used + n > room || used >= target) {
                        pieces.push(Vec::new());
                        used = 0;
                    }
                    used += n;
                    pieces.last_mut().expect("one piece").push((k, v));
                }
                let mut it = pieces.into_iter();
                *pairs = it.next().expect("first piece");
                it.map(|p| (p[0].0.clone(), DirtyBody::Leaf(p))).collect()
            }
            DirtyBody::Edited(_) => unreachable!("materialized above"),
            DirtyBody::Internal { keys, children } => {
                let all_keys = std::mem::take(keys.owned());
                let all_children = std::mem::take(children);
                let mut pieces: Vec<(Option<Bytes>, Vec<Bytes>, Vec<Child>)> =
                    vec![(None, Vec::new(), vec![all_children[0]])];
                let mut used = CHILD_REF_LEN;
                for (k, c) in all_keys.into_iter().zip(all_children.into_iter().skip(1)) {
                    let n = 1 + k.len() + CHILD_REF_LEN;
                    if used + n > room || used >= target {
                        // The separator moves up; the piece starts with c.
                        pieces.push((Some(k), Vec::new(), vec![c]));
                        used = CHILD_REF_LEN;
                    } else {
                        let last = pieces.last_mut().expect("one piece");
                        last.1.push(k);
                        last.2.push(c);
                        used += n;
                    }
                }
                let mut it = pieces.into_iter();
                let (_, k0, c0) = it.next().expect("first piece");
                *keys = Separators::Owned(k0);
                *children = c0;
                it.map(|(sep, k, c)| {
                    (
                        sep.expect("later pieces have a separator"),
                        DirtyBody::Internal { keys: Separators::Owned(k), children: c },
                    )
                })
                .collect()
            }
        };
        self.counts.splits += pieces.len() as u64;
        let siblings_joined = self.node(i).siblings_joined;
        pieces
            .into_iter()
            .map(|(sep, body)| (sep, self.push(DirtyNode { siblings_joined, ..DirtyNode::new(level, body) })))
            .collect()
    }

    /// One bottom-up pass of merges over the dirty subtree under `i`;
    /// whether anything merged.
    fn merge_pass(&mut self, i: usize, cache: &mut PageCache) -> Result<bool, Stall> {
        let dirty_children: Vec<usize> = match &self.node(i).body {
            DirtyBody::Leaf(_) | DirtyBody::Edited(_) => return Ok(false),
            DirtyBody::Internal { children, .. } => children
                .iter()
                .filter_map(|c| match c {
                    Child::Dirty(j) => Some(*j),
                    Child::Clean(_) => None,
                })
                .collect(),
        };
        let mut changed = false;
        for j in dirty_children {
            changed |= self.merge_pass(j, cache)?;
        }
        let child_level = self.node(i).level - 1;
        let mut slot = 0;
        loop {
            let (a, b, sep_len) = match &self.node(i).body {
                DirtyBody::Internal { keys, children } if slot + 1 < children.len() => {
                    (children[slot], children[slot + 1], keys.key_len(slot))
                }
                _ => break,
            };
            // Two clean siblings that were siblings before are as the last
            // commit left them, side by side with the same separator: not
            // mergeable (every commit rebalances all it changes, and
            // nothing else changes).
            let both_clean = matches!((a, b), (Child::Clean(_), Child::Clean(_)));
            if (both_clean && !self.node(i).siblings_joined)
                || !self.mergeable(self.child_len(a), self.child_len(b), child_level, sep_len)
            {
                slot += 1;
                continue;
            }
            let DirtyBody::Internal { keys, .. } = &self.node(i).body else { unreachable!("checked above") };
            let sep = keys.get(slot);
            let left = self.dirty_child(i, slot, cache)?;
            let right = self.dirty_child(i, slot + 1, cache)?;
            self.materialize(left);
            self.materialize(right);
            let right_node = self.remove(right);
            // In this tree an internal page shrinks only when two of its
            // children merge (a split below makes it grow), so an internal
            // merge one of whose sides lost a child that way is a merge
            // that propagated up from the level below.
            let cascade = child_level > 0 && (self.node(left).children_merged || right_node.children_merged);
            self.node_mut(left).children_merged |= right_node.children_merged;
            self.node_mut(left).siblings_joined |= child_level > 0;
            match (&mut self.node_mut(left).body, right_node.body) {
                (DirtyBody::Leaf(l), DirtyBody::Leaf(r)) => l.extend(r),
                (
                    DirtyBody::Internal { keys: lk, children: lc },
                    DirtyBody::Internal { keys: rk, children: rc },
                ) => {
                    let lk = lk.owned();
                    lk.push(sep);
                    lk.extend(rk.into_vec());
                    lc.extend(rc);
                }
                _ => unreachable!("siblings are at the same level"),
            }
            let DirtyBody::Internal { keys, children } = &mut self.node_mut(i).body else { unreachable!() };
            keys.owned().remove(slot);
            children.remove(slot + 1);
            self.node_mut(i).children_merged = true;
            self.counts.merges += 1;
            if cascade {
                self.counts.merge_cascades += 1;
            }
            changed = true;
        }
        Ok(changed)
    }

    /// Replaces an internal root with a single child by that child, as long
    /// as there is one; whether it did.
    fn deroot(&mut self, cache: &mut PageCache) -> Result<bool, Stall> {
        let mut changed = false;
        loop {
            let Child::Dirty(root) = self.root else { unreachable!("the root is dirty") };
            match &self.node(root).body {
                DirtyBody::Internal { children, .. } if children.len() == 1 => {}
                _ => return Ok(changed),
            }
            let child = self.dirty_child(root, 0, cache)?;
            self.remove(root);
            self.root = Child::Dirty(child);
            self.root_level -= 1;
            self.counts.deroots += 1;
            changed = true;
        }
    }

    /// Checks the balance, order and size rules over every dirty node (clean
    /// pages were checked when they were written).
    ///
    /// # Panics
    /// On any violation: a bug in this module.
    pub fn check_invariants(&self) {
        let Child::Dirty(root) = self.root else { return };
        let n = self.node(root);
        assert_eq!(n.level, self.root_level, "root level");
        if let DirtyBody::Internal { children, .. } = &n.body {
            assert!(children.len() >= 2, "internal root with {} children", children.len());
        }
        self.check_node(root, None, None);
    }

    fn check_node(&self, i: usize, lo: Option<&Bytes>, hi: Option<&Bytes>) {
        let len = self.node_len(i);
        assert!(len <= self.block_size, "page of {len} bytes in {}-byte blocks", self.block_size);
        let n = self.node(i);
        let in_range = |k: &Bytes| lo.is_none_or(|lo| k >= lo) && hi.is_none_or(|hi| k < hi);
        // An edited leaf is checked as its pairs.
        let edited_as_pairs;
        let body = match &n.body {
            DirtyBody::Edited(leaf) => {
                let pairs = leaf.pairs();
                assert_eq!(leaf_len(&pairs), leaf.len, "an edited leaf's length");
                edited_as_pairs = DirtyBody::Leaf(pairs);
                &edited_as_pairs
            }
            body => body,
        };
        match body {
            DirtyBody::Edited(_) => unreachable!("checked as its pairs"),
            DirtyBody::Leaf(pairs) => {
                assert_eq!(n.level, 0, "leaf level");
                for w in pairs.windows(2) {
                    assert!(w[0].0 < w[1].0, "leaf keys out of order");
                }
                assert!(pairs.iter().all(|(k, _)| in_range(k)), "leaf key outside its parent's range");
            }
            DirtyBody::Internal { keys, children } => {
                let keys = &keys.clone().into_vec();
                assert!(n.level > 0, "internal level");
                assert_eq!(keys.len() + 1, children.len(), "keys and children");
                for w in keys.windows(2) {
                    assert!(w[0] < w[1], "separators out of order");
                }
                assert!(keys.iter().all(in_range), "separator outside its parent's range");
                for s in 0..children.len().saturating_sub(1) {
                    let (a, b) = (self.child_len(children[s]), self.child_len(children[s + 1]));
                    assert!(
                        !self.mergeable(a, b, n.level - 1, keys[s].len()),
                        "adjacent siblings of {a} and {b} bytes fit 2/3 of a block merged"
                    );
                }
                for (s, c) in children.iter().enumerate() {
                    if let Child::Dirty(j) = *c {
                        assert_eq!(self.node(j).level + 1, n.level, "child level");
                        let clo = if s == 0 { lo } else { Some(&keys[s - 1]) };
                        let chi = if s + 1 == children.len() { hi } else { Some(&keys[s]) };
                        self.check_node(j, clo, chi);
                    }
                }
            }
        }
    }

    /// Turns the rebalanced batch into its pages, numbered from
    /// `first_block` in post-order (children before parents, the root
    /// last and marked as the commit's root).
    pub fn into_pages(mut self, first_block: u64) -> CommitPages {
        let Child::Dirty(root) = self.root else { panic!("into_pages on an unchanged tree") };
        // The root carries the commit's length: it is written whole.
        self.materialize(root);
        let mut pages = Vec::new();
        let mut next = first_block;
        self.emit(root, &mut next, &mut pages);
        assert_eq!(self.live_nodes, 0, "dirty nodes that the root does not reach");
        let count = pages.len() as u32;
        let Some(CommitPage::Whole(root_page)) = pages.last_mut() else { unreachable!("the root is whole") };
        root_page.commit_blocks = count;
        let root = RootRef { child: root_page.child_ref(), level: root_page.level };
        CommitPages { pages, root }
    }

    fn emit(&mut self, i: usize, next: &mut u64, pages: &mut Vec<CommitPage>) -> ChildRef {
        let node = self.remove(i);
        let body = match node.body {
            DirtyBody::Leaf(pairs) => PageBody::Leaf { pairs },
            DirtyBody::Edited(leaf) => {
                let block = *next;
                *next += 1;
                let r = ChildRef { block, oldest_block: block, page_len: leaf.len as u32 };
                pages.push(CommitPage::EditedLeaf { block, leaf });
                return r;
            }
            DirtyBody::Internal { keys, children } => {
                let children: Vec<ChildRef> = children
                    .into_iter()
                    .map(|c| match c {
                        Child::Clean(r) => r,
                        Child::Dirty(j) => self.emit(j, next, pages),
                    })
                    .collect();
                match keys {
                    Separators::Page(base) => {
                        let block = *next;
                        *next += 1;
                        let len = base.page_len() as u32;
                        let oldest_block = oldest_of(&children, block);
                        pages.push(CommitPage::EditedInternal { block, base, children });
                        return ChildRef { block, oldest_block, page_len: len };
                    }
                    Separators::Owned(keys) => PageBody::Internal { keys, children },
                }
            }
        };
        let page = Page { block: *next, level: node.level, commit_blocks: 0, body };
        *next += 1;
        let r = page.child_ref();
        pages.push(CommitPage::Whole(page));
        r
    }
}

/// The key a modifying request changes; `None` for other requests.
pub fn modified_key(req: &KvldsRequest) -> Option<&Bytes> {
    match req {
        KvldsRequest::Set { key, .. }
        | KvldsRequest::Cas { key, .. }
        | KvldsRequest::Add { key, .. }
        | KvldsRequest::Modify { key, .. }
        | KvldsRequest::Delete { key }
        | KvldsRequest::Cad { key, .. } => Some(key),
        _ => None,
    }
}

/// What `req` does to a key whose value is `current`: whether it is done,
/// and if it changes the key, its new value (`Some(None)`: removed).
fn decide<'r>(req: &'r KvldsRequest, current: Option<&[u8]>) -> (bool, Option<Option<&'r Bytes>>) {
    let is = |v: &Bytes| current == Some(v.as_ref());
    match req {
        KvldsRequest::Set { value, .. } => (true, Some(Some(value))),
        KvldsRequest::Cas { old_value, new_value, .. } if is(old_value) => (true, Some(Some(new_value))),
        KvldsRequest::Add { value, .. } if current.is_none() => (true, Some(Some(value))),
        KvldsRequest::Modify { value, .. } if current.is_some() => (true, Some(Some(value))),
        KvldsRequest::Delete { .. } => (true, Some(None)),
        KvldsRequest::Cad { old_value, .. } if is(old_value) => (true, Some(None)),
        KvldsRequest::Cas { .. }
        | KvldsRequest::Add { .. }
        | KvldsRequest::Modify { .. }
        | KvldsRequest::Cad { .. } => (false, None),
        _ => unreachable!("not a modifying request"),
    }
}

/// The length of two adjacent siblings of lengths `a` and `b` at `level`
/// merged (an internal merge takes the separator between them, `sep_len` bytes).
pub fn merged_len(a: usize, b: usize, level: u8, sep_len: usize) -> usize {
    let merged = a + b - PAGE_HEADER_LEN;
    if level > 0 {
        merged + 1 + sep_len
    } else {
        merged
    }
}

/// Checks that a page read for a place in the tree is what its parent's
/// reference says: its level, its length and its oldest block. Merges are
/// decided on the lengths parents record, and FREE and cleaning on the
/// oldest blocks: a page that disagrees with its parent must not be
/// trusted.
///
/// # Errors
/// [`Stall::Corrupt`] naming the block.
pub fn check_child(page: &PageView, r: ChildRef, level: u8) -> Result<(), Stall> {
    check_level(page, level)?;
    if page.page_len() != r.page_len as usize || page.oldest_block() != r.oldest_block {
        return Err(Stall::Corrupt {
            block: r.block,
            why: format!(
                "its parent records {} bytes and oldest block {}, the page has {} and {}",
                r.page_len,
                r.oldest_block,
                page.page_len(),
                page.oldest_block()
            ),
        });
    }
    Ok(())
}

/// Checks that a page read for a place in the tree is at the level its
/// parent implies.
///
/// # Errors
/// [`Stall::Corrupt`] naming the block.
pub fn check_level(page: &PageView, level: u8) -> Result<(), Stall> {
    if page.level != level {
        return Err(Stall::Corrupt {
            block: page.block,
            why: format!("page at level {} where level {level} was expected", page.level),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// Keys from a small alphabet, so that edits hit base keys often.
    fn key() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(vec![0u8, 1, 0xff]), 0..6)
    }

    proptest! {
        /// An edited leaf, as kept (its length) and as written (copied in
        /// runs from its clean page), is the leaf its changes make, built
        /// pair by pair from a model.
        #[test]
        fn an_edited_leaf_is_the_leaf_its_changes_make(
            base in proptest::collection::btree_map(key(), key(), 0..30),
            changes in proptest::collection::vec((key(), proptest::option::of(key())), 0..12),
        ) {
            let b = |v: &Vec<u8>| Bytes::from(v.clone());
            let pairs: Vec<(Bytes, Bytes)> = base.iter().map(|(k, v)| (b(k), b(v))).collect();
            let page = Page { block: 9, level: 0, commit_blocks: 0, body: PageBody::Leaf { pairs } };
            let mut leaf = LeafEdits::new(Rc::new(PageView::of(&page, 4096)));
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = base.clone();
            for (k, v) in &changes {
                prop_assert_eq!(leaf.get(k), model.get(k).map(Vec::as_slice));
                leaf.set(&b(k), v.as_ref().map(b).as_ref());
                match v {
                    Some(v) => model.insert(k.clone(), v.clone()),
                    None => model.remove(k),
                };
            }
            let want: Vec<(Bytes, Bytes)> = model.iter().map(|(k, v)| (b(k), b(v))).collect();
            prop_assert_eq!(&leaf.pairs(), &want);
            prop_assert_eq!(leaf.len, leaf_len(&want));
            let written = CommitPage::EditedLeaf { block: 12, leaf }.view(4096);
            let whole = Page { block: 12, level: 0, commit_blocks: 0, body: PageBody::Leaf { pairs: want } };
            prop_assert_eq!(format!("{written:?}"), format!("{:?}", PageView::of(&whole, 4096)));
        }

        /// An internal page written as its clean page with new references
        /// (its entries copied whole, the references patched in) is the
        /// page serialized from its separators and those references.
        #[test]
        fn an_internal_page_with_new_references_is_that_page_written_whole(
            keys in proptest::collection::btree_set(key(), 0..40),
            old_refs in proptest::collection::vec((1u64..1000, 1u64..1000, 24u32..4096), 41),
            new_refs in proptest::collection::vec((1u64..1000, 1u64..1000, 24u32..4096), 41),
            block in 1000u64..2000,
        ) {
            let keys: Vec<Bytes> = keys.into_iter().map(Bytes::from).collect();
            let r = |&(block, oldest_block, page_len): &(u64, u64, u32)| ChildRef { block, oldest_block, page_len };
            let n = keys.len() + 1;
            let old: Vec<ChildRef> = old_refs[..n].iter().map(r).collect();
            let new: Vec<ChildRef> = new_refs[..n].iter().map(r).collect();
            let clean = Page { block: 7, level: 2, commit_blocks: 0, body: PageBody::Internal { keys: keys.clone(), children: old } };
            let base = Rc::new(PageView::of(&clean, 4096));
            let written = CommitPage::EditedInternal { block, base, children: new.clone() };
            let whole = Page { block, level: 2, commit_blocks: 0, body: PageBody::Internal { keys, children: new } };
            prop_assert_eq!(&written.to_page(), &whole);
            let view = written.view(4096);
            prop_assert_eq!(format!("{view:?}"), format!("{:?}", PageView::of(&whole, 4096)));
            prop_assert_eq!(view.child_ref(), whole.child_ref());
        }
    }
}
