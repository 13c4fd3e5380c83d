//! The page format: how one B+tree node is laid out in one lbs block, and
//! its validation (right after every read, right before every write).
//!
//! A page fills exactly one block (big-endian integers):
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 2 | magic `K1` (also the format version) |
//! | 2 | 1 | level: 0 for a leaf, parent = child + 1 |
//! | 3 | 1 | flags: bit 0 = the root of a commit; other bits zero |
//! | 4 | 4 | entry count: pairs in a leaf, children in an internal page |
//! | 8 | 8 | the block number this page was written to |
//! | 16 | 4 | root only: blocks in its commit (the commit is the blocks `block - n + 1 ..= block`); 0 otherwise |
//! | 20 | 4 | CRC-32C of bytes 0..20 then 24..block size (padding included) |
//! | 24 | | entries, then zeros to the end of the block |
//!
//! A leaf entry is a pair: key length (1), key, value length (1), value,
//! in strictly increasing key order. An internal page with `n` children has
//! `n - 1` separator keys; its entries are child 0's reference, then for
//! each later child: key length (1), key, reference. A reference is the
//! child's block (8), the oldest block in the child's subtree (8) and the
//! child page's length in bytes (4), so that the balancing rule can be
//! checked without reading the child. Child `i` holds the keys `k` with
//! `key[i-1] <= k < key[i]`. A child is always written before its parent,
//! so its block number is lower.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Bytes before the first entry.
pub const PAGE_HEADER_LEN: usize = 24;
/// Bytes of a child reference (block, oldest block, page length).
pub const CHILD_REF_LEN: usize = 20;
/// The magic number and format version.
const PAGE_MAGIC: [u8; 2] = *b"K1";
/// Flag: this page is the root of a commit.
const FLAG_ROOT: u8 = 1;
/// Deeper trees than this are refused as corrupt: with internal pages of
/// two children or more, 32 levels would be 2^32 leaves, more pages than
/// any store holds.
pub const LEVEL_MAX: u8 = 32;

/// The lowest block number in the subtree of an internal page in `block`
/// with `children` (its own block if it has none).
pub fn oldest_of(children: &[ChildRef], block: u64) -> u64 {
    children.iter().map(|c| c.oldest_block).min().unwrap_or(block)
}

/// Where a parent finds a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildRef {
    /// The child's block number.
    pub block: u64,
    /// The lowest block number in the child's subtree (for FREE and, later,
    /// cleaning).
    pub oldest_block: u64,
    /// The child page's length in bytes (header and entries).
    pub page_len: u32,
}

impl ChildRef {
    /// Its bytes in a parent page: block, oldest block, page length.
    fn encoded(&self) -> [u8; CHILD_REF_LEN] {
        let mut b = [0u8; CHILD_REF_LEN];
        b[..8].copy_from_slice(&self.block.to_be_bytes());
        b[8..16].copy_from_slice(&self.oldest_block.to_be_bytes());
        b[16..].copy_from_slice(&self.page_len.to_be_bytes());
        b
    }
}

/// The contents of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageBody {
    /// Key-value pairs in strictly increasing key order.
    Leaf { pairs: Vec<(Bytes, Bytes)> },
    /// `children.len() - 1` separator keys in strictly increasing order.
    Internal { keys: Vec<Bytes>, children: Vec<ChildRef> },
}

/// A page as read from (or about to be written to) lbs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The block it lives in.
    pub block: u64,
    /// 0 for leaves.
    pub level: u8,
    /// For a commit's root: how many blocks the commit wrote; else 0.
    pub commit_blocks: u32,
    /// The entries.
    pub body: PageBody,
}

impl Page {
    /// Whether this page is the root of a commit.
    pub fn is_root(&self) -> bool {
        self.commit_blocks > 0
    }

    /// The page's length in bytes (header and entries, without padding).
    pub fn page_len(&self) -> usize {
        match &self.body {
            PageBody::Leaf { pairs } => leaf_len(pairs),
            PageBody::Internal { keys, children } => internal_len(keys, children.len()),
        }
    }

    /// The lowest block number in this page's subtree.
    pub fn oldest_block(&self) -> u64 {
        match &self.body {
            PageBody::Leaf { .. } => self.block,
            PageBody::Internal { children, .. } => oldest_of(children, self.block),
        }
    }

    /// A reference to this page for its parent.
    pub fn child_ref(&self) -> ChildRef {
        ChildRef { block: self.block, oldest_block: self.oldest_block(), page_len: self.page_len() as u32 }
    }
}

/// The length of a leaf page holding `pairs`.
pub fn leaf_len(pairs: &[(Bytes, Bytes)]) -> usize {
    PAGE_HEADER_LEN + pairs.iter().map(|(k, v)| pair_len(k, v)).sum::<usize>()
}

/// The bytes one pair takes in a leaf.
pub fn pair_len(key: &[u8], value: &[u8]) -> usize {
    2 + key.len() + value.len()
}

/// The length of an internal page with separator `keys` and `children`
/// children (`keys.len() + 1`).
pub fn internal_len(keys: &[Bytes], children: usize) -> usize {
    PAGE_HEADER_LEN + CHILD_REF_LEN * children + keys.iter().map(|k| 1 + k.len()).sum::<usize>()
}

/// Why bytes read from a block are not a valid page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    /// The block is not one block long.
    WrongLength { len: usize },
    /// No page magic at the start.
    BadMagic,
    /// The checksum does not match.
    BadChecksum,
    /// A well-formed page that belongs to another block (a misdirected or
    /// stale write).
    WrongBlock { found: u64 },
    /// The entries do not parse or break the format's rules.
    Malformed(&'static str),
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageError::WrongLength { len } => write!(f, "{len} bytes is not one block"),
            PageError::BadMagic => write!(f, "no page magic"),
            PageError::BadChecksum => write!(f, "checksum mismatch"),
            PageError::WrongBlock { found } => write!(f, "page was written for block {found}"),
            PageError::Malformed(why) => write!(f, "malformed page: {why}"),
        }
    }
}

impl std::error::Error for PageError {}

fn page_crc(block: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&block[..20]), &block[PAGE_HEADER_LEN..])
}

/// Serializes `page` into one block of `block_size` bytes.
///
/// # Panics
/// If the page does not fit the block or has more entries than the count
/// field holds: the tree code never builds such a page (a programmer
/// error).
pub fn serialize(page: &Page, block_size: usize) -> Bytes {
    serialize_noting_keys(page, block_size, &mut Vec::new())
}

/// [`serialize`], noting in `key_offsets` where each key starts.
fn serialize_noting_keys(page: &Page, block_size: usize, key_offsets: &mut Vec<u32>) -> Bytes {
    let page_len = page.page_len();
    assert!(page_len <= block_size, "page of {page_len} bytes for block {} > {block_size}", page.block);
    let count = match &page.body {
        PageBody::Leaf { pairs } => pairs.len(),
        PageBody::Internal { children, .. } => children.len(),
    };
    let flags = if page.is_root() { FLAG_ROOT } else { 0 };
    let mut out = begin_block(block_size, page.level, flags, count, page.block, page.commit_blocks);
    match &page.body {
        PageBody::Leaf { pairs } => {
            key_offsets.reserve_exact(pairs.len());
            for (k, v) in pairs {
                put_pair(&mut out, key_offsets, k, v);
            }
        }
        PageBody::Internal { keys, children } => {
            key_offsets.reserve_exact(keys.len());
            for (i, c) in children.iter().enumerate() {
                if i > 0 {
                    out.put_u8(keys[i - 1].len() as u8);
                    key_offsets.push(out.len() as u32);
                    out.put_slice(&keys[i - 1]);
                }
                out.put_slice(&c.encoded());
            }
        }
    }
    debug_assert_eq!(out.len(), page_len);
    seal_block(out, block_size)
}

/// A block's buffer with its header written (its checksum left for
/// [`seal_block`]).
fn begin_block(
    block_size: usize,
    level: u8,
    flags: u8,
    count: usize,
    block: u64,
    commit_blocks: u32,
) -> BytesMut {
    let mut out = BytesMut::with_capacity(block_size);
    out.put_slice(&PAGE_MAGIC);
    out.put_u8(level);
    out.put_u8(flags);
    out.put_u32(u32::try_from(count).expect("entry count fits u32"));
    out.put_u64(block);
    out.put_u32(commit_blocks);
    out.put_u32(0);
    out
}

/// Writes one leaf entry, noting where its key starts.
fn put_pair(out: &mut BytesMut, key_offsets: &mut Vec<u32>, key: &[u8], value: &[u8]) {
    out.put_u8(key.len() as u8);
    key_offsets.push(out.len() as u32);
    out.put_slice(key);
    out.put_u8(value.len() as u8);
    out.put_slice(value);
}

/// Pads the block with zeros and writes its checksum.
fn seal_block(mut out: BytesMut, block_size: usize) -> Bytes {
    out.resize(block_size, 0);
    let crc = page_crc(&out);
    out[20..24].copy_from_slice(&crc.to_be_bytes());
    out.freeze()
}

/// The view of leaf `block` written as the leaf `base` with `edits`
/// applied: each `(key, Some(value))` sets a pair, each `(key, None)`
/// removes one (a key `base` lacks is skipped). `edits` are sorted by key,
/// each key once. The runs of `base`'s entries between edits are copied
/// whole, so a leaf changed by one request costs a few copies, not one per
/// pair.
///
/// # Panics
/// If the result does not fit the block, or `base` is not a leaf: the tree
/// code never asks for either (a programmer error).
pub fn edited_leaf_view(
    block: u64,
    base: &PageView,
    edits: &[(Bytes, Option<Bytes>)],
    block_size: usize,
) -> PageView {
    assert!(base.is_leaf(), "edits apply to leaves");
    // The count is known at the end.
    let mut out = begin_block(block_size, 0, 0, 0, block, 0);
    let base_len = base.keys_len();
    let mut key_offsets: Vec<u32> = Vec::with_capacity(base_len + edits.len());
    // Where base entry `i` starts (its key's length byte); for `base_len`,
    // the end of the entries.
    let entry_start =
        |i: usize| if i < base_len { base.key_offsets[i] as usize - 1 } else { base.page_len as usize };
    // Copies base entries `from..to` as one run.
    let copy_run = |out: &mut BytesMut, key_offsets: &mut Vec<u32>, from: usize, to: usize| {
        if from < to {
            let (start, end) = (entry_start(from), entry_start(to));
            // The run moves from `start` in the base to `at` here (either
            // way: the edits before it may have grown or shrunk the page).
            let (start_u32, at) = (start as u32, out.len() as u32);
            out.put_slice(&base.data[start..end]);
            key_offsets.extend(base.key_offsets[from..to].iter().map(|&o| o - start_u32 + at));
        }
    };
    let mut next = 0;
    for (key, value) in edits {
        let (at, present) = match base.search(key) {
            Ok(i) => (i, true),
            Err(i) => (i, false),
        };
        copy_run(&mut out, &mut key_offsets, next, at);
        next = if present { at + 1 } else { at };
        if let Some(value) = value {
            put_pair(&mut out, &mut key_offsets, key, value);
        }
    }
    copy_run(&mut out, &mut key_offsets, next, base_len);
    let page_len = out.len();
    assert!(page_len <= block_size, "edited leaf of {page_len} bytes for block {block} > {block_size}");
    let count = u32::try_from(key_offsets.len()).expect("entry count fits u32");
    out[4..8].copy_from_slice(&count.to_be_bytes());
    assemble(seal_block(out, block_size), block, 0, 0, (page_len as u32, block), key_offsets, Vec::new())
}

/// The view of internal page `block` written as the internal page `base`
/// with new references to its `children` (one per child of `base`, in
/// order): the separators, their offsets and their heads are `base`'s,
/// copied whole, and only the references are written anew.
///
/// # Panics
/// If `base` is a leaf or `children` does not match its children in
/// number: the tree code never asks for either (a programmer error).
pub fn edited_internal_view(
    block: u64,
    base: &PageView,
    children: &[ChildRef],
    block_size: usize,
) -> PageView {
    assert!(!base.is_leaf(), "new references apply to internal pages");
    assert_eq!(children.len(), base.children.len(), "one reference per child");
    let mut out = begin_block(block_size, base.level, 0, children.len(), block, 0);
    let page_len = base.page_len as usize;
    out.put_slice(&base.data[PAGE_HEADER_LEN..page_len]);
    for (i, c) in children.iter().enumerate() {
        // Child 0's reference opens the entries; each later child's follows
        // the key before it.
        let at = match i {
            0 => PAGE_HEADER_LEN,
            _ => {
                let key_at = base.key_offsets[i - 1] as usize;
                key_at + usize::from(base.data[key_at - 1])
            }
        };
        out[at..at + CHILD_REF_LEN].copy_from_slice(&c.encoded());
    }
    let oldest_block = oldest_of(children, block);
    PageView {
        block,
        level: base.level,
        commit_blocks: 0,
        page_len: base.page_len,
        oldest_block,
        prefix_len: base.prefix_len,
        prefix_inline: base.prefix_inline,
        data: seal_block(out, block_size),
        heads: base.heads.clone(),
        key_offsets: base.key_offsets.clone(),
        children: children.into(),
    }
}

/// A cursor over a page's entry bytes.
struct Cursor<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, PageError> {
        if self.data.len() - self.pos < n {
            return Err(PageError::Malformed("entries run past the end of the block"));
        }
        self.pos += n;
        Ok(self.pos - n..self.pos)
    }
    fn u8(&mut self) -> Result<u8, PageError> {
        let r = self.take(1)?;
        Ok(self.data[r.start])
    }
    fn u32(&mut self) -> Result<u32, PageError> {
        let r = self.take(4)?;
        Ok(u32::from_be_bytes(self.data[r].try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, PageError> {
        let r = self.take(8)?;
        Ok(u64::from_be_bytes(self.data[r].try_into().expect("8 bytes")))
    }
}

/// Bytes of a key's head: the bytes after the page's shared prefix that a
/// search compares as one integer.
const HEAD_LEN: usize = 8;
/// Longest shared prefix kept inside the view itself (a longer one is
/// compared in the block's bytes).
const PREFIX_INLINE_MAX: usize = 32;

/// A validated page, searched in place: the block's bytes and, beside
/// them, each key's offset and head. This is the form the page cache holds.
///
/// A search compares first the page's shared key prefix, then each key's
/// next [`HEAD_LEN`] bytes as one big-endian integer (zero-padded), and the
/// key's bytes only when two heads are equal. For keys that differ in
/// those bytes, a binary search reads about three cache lines of heads and
/// one key, where a list of separately held keys costs a cache miss per
/// probe for the list and another for the key.
#[derive(Debug, Clone)]
pub struct PageView {
    /// The block it lives in.
    pub block: u64,
    /// 0 for leaves.
    pub level: u8,
    /// For a commit's root: how many blocks the commit wrote; else 0.
    pub commit_blocks: u32,
    /// Header and entries, without padding.
    page_len: u32,
    /// The lowest block number in its subtree.
    oldest_block: u64,
    /// Bytes all its keys start with.
    prefix_len: u8,
    /// The prefix, when at most [`PREFIX_INLINE_MAX`] bytes long.
    prefix_inline: [u8; PREFIX_INLINE_MAX],
    /// The block's bytes.
    data: Bytes,
    /// Each key's head (see above).
    heads: Box<[u64]>,
    /// Each key's offset in `data` (its length is the byte before it; in a
    /// leaf its value's length follows it, then the value).
    key_offsets: Box<[u32]>,
    /// An internal page's children (one more than its keys); empty for a
    /// leaf.
    children: Box<[ChildRef]>,
}

/// The head of a key's bytes after the shared prefix.
fn head_of(rest: &[u8]) -> u64 {
    let mut head = [0u8; HEAD_LEN];
    let n = rest.len().min(HEAD_LEN);
    head[..n].copy_from_slice(&rest[..n]);
    u64::from_be_bytes(head)
}

impl PageView {
    /// Whether this page is the root of a commit.
    pub fn is_root(&self) -> bool {
        self.commit_blocks > 0
    }

    /// Whether it is a leaf.
    pub fn is_leaf(&self) -> bool {
        self.level == 0
    }

    /// The page's length in bytes (header and entries, without padding).
    pub fn page_len(&self) -> usize {
        self.page_len as usize
    }

    /// The lowest block number in this page's subtree.
    pub fn oldest_block(&self) -> u64 {
        self.oldest_block
    }

    /// A reference to this page for its parent.
    pub fn child_ref(&self) -> ChildRef {
        ChildRef { block: self.block, oldest_block: self.oldest_block, page_len: self.page_len }
    }

    /// Whether its keys are in strictly increasing order, as every page
    /// parsed is. A page built from pages that were corrupt in a way their
    /// checks could not see might not be.
    pub fn keys_ascending(&self) -> bool {
        (1..self.keys_len()).all(|i| self.key(i - 1) < self.key(i))
    }

    /// The whole block, as stored.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Keys: a leaf's pairs, or an internal page's separators (one fewer
    /// than its children).
    pub fn keys_len(&self) -> usize {
        self.key_offsets.len()
    }

    /// Key `i`.
    pub fn key(&self, i: usize) -> &[u8] {
        let at = self.key_offsets[i] as usize;
        &self.data[at..at + usize::from(self.data[at - 1])]
    }

    /// Key `i`, sharing the block's buffer.
    pub fn key_bytes(&self, i: usize) -> Bytes {
        let at = self.key_offsets[i] as usize;
        self.data.slice(at..at + usize::from(self.data[at - 1]))
    }

    fn value_range(&self, i: usize) -> std::ops::Range<usize> {
        debug_assert!(self.is_leaf(), "values are in leaves");
        let at = self.key_offsets[i] as usize;
        let len_at = at + usize::from(self.data[at - 1]);
        len_at + 1..len_at + 1 + usize::from(self.data[len_at])
    }

    /// A leaf's value `i`.
    pub fn value(&self, i: usize) -> &[u8] {
        &self.data[self.value_range(i)]
    }

    /// A leaf's value `i`, sharing the block's buffer.
    pub fn value_bytes(&self, i: usize) -> Bytes {
        self.data.slice(self.value_range(i))
    }

    /// An internal page's children (empty for a leaf).
    pub fn children(&self) -> &[ChildRef] {
        &self.children
    }

    /// Where `key` is among the keys: `Ok(i)` if it is key `i`, else
    /// `Err(i)` with `i` the number of keys below it (as
    /// `slice::binary_search`).
    pub fn search(&self, key: &[u8]) -> Result<usize, usize> {
        let n = self.key_offsets.len();
        if n == 0 {
            return Err(0);
        }
        let p = usize::from(self.prefix_len);
        let shared = if p <= PREFIX_INLINE_MAX { &self.prefix_inline[..p] } else { &self.key(0)[..p] };
        let m = p.min(key.len());
        match key[..m].cmp(&shared[..m]) {
            std::cmp::Ordering::Less => return Err(0),
            std::cmp::Ordering::Greater => return Err(n),
            // A proper prefix of every key sorts before them all.
            std::cmp::Ordering::Equal if key.len() < p => return Err(0),
            std::cmp::Ordering::Equal => {}
        }
        let rest = &key[p..];
        let head = head_of(rest);
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            // Heads compare as the padded bytes do: a strictly smaller head
            // is a smaller key; equal heads need the bytes.
            let order = match self.heads[mid].cmp(&head) {
                std::cmp::Ordering::Equal => self.key(mid)[p..].cmp(rest),
                other => other,
            };
            match order {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// Keys below `key` (the first key at or above it).
    pub fn keys_below(&self, key: &[u8]) -> usize {
        self.search(key).unwrap_or_else(|i| i)
    }

    /// The index of an internal page's child whose range holds `key`: the
    /// number of separators at or below it.
    pub fn child_index(&self, key: &[u8]) -> usize {
        match self.search(key) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }

    /// A leaf's pairs, sharing the block's buffer.
    pub fn pairs(&self) -> Vec<(Bytes, Bytes)> {
        (0..self.keys_len()).map(|i| (self.key_bytes(i), self.value_bytes(i))).collect()
    }

    /// An internal page's separator keys, sharing the block's buffer.
    pub fn separators(&self) -> Vec<Bytes> {
        (0..self.keys_len()).map(|i| self.key_bytes(i)).collect()
    }

    /// The page in its owned form.
    pub fn to_page(&self) -> Page {
        let body = if self.is_leaf() {
            PageBody::Leaf { pairs: self.pairs() }
        } else {
            PageBody::Internal { keys: self.separators(), children: self.children.to_vec() }
        };
        Page { block: self.block, level: self.level, commit_blocks: self.commit_blocks, body }
    }

    /// The view of an owned page, serialized into a block of `block_size`
    /// bytes. Not parsed back: the offsets are noted as the bytes are
    /// written, and the checksum is computed once. (The node parses its
    /// pages back and compares when checking invariants.)
    ///
    /// # Panics
    /// If the page does not fit the block (a programmer error, as for
    /// [`serialize`]).
    pub fn of(page: &Page, block_size: usize) -> PageView {
        let mut key_offsets = Vec::new();
        let data = serialize_noting_keys(page, block_size, &mut key_offsets);
        let children = match &page.body {
            PageBody::Leaf { .. } => Vec::new(),
            PageBody::Internal { children, .. } => children.clone(),
        };
        let page_len = u32::try_from(page.page_len()).expect("a page fits its block");
        let page_len_oldest = (page_len, page.oldest_block());
        assemble(data, page.block, page.level, page.commit_blocks, page_len_oldest, key_offsets, children)
    }
}

/// Parses and validates the bytes of block `block`: length, magic,
/// checksum, the block number inside, and every structural rule of the
/// format (key order, child references pointing to older blocks, lengths
/// within the block, zero padding). Keys and values stay in `data`.
///
/// # Errors
/// A [`PageError`] saying what is wrong; nothing is trusted from a page
/// that fails.
pub fn parse(data: Bytes, block: u64, block_size: usize) -> Result<PageView, PageError> {
    if data.len() != block_size {
        return Err(PageError::WrongLength { len: data.len() });
    }
    if data[..2] != PAGE_MAGIC {
        return Err(PageError::BadMagic);
    }
    let stored_crc = u32::from_be_bytes(data[20..24].try_into().expect("4 bytes"));
    if page_crc(&data) != stored_crc {
        return Err(PageError::BadChecksum);
    }
    let mut cur = Cursor { data: &data, pos: 2 };
    let level = cur.u8()?;
    let flags = cur.u8()?;
    let count = cur.u32()? as usize;
    let found = cur.u64()?;
    let commit_blocks = cur.u32()?;
    cur.pos = PAGE_HEADER_LEN;
    if found != block {
        return Err(PageError::WrongBlock { found });
    }
    if level > LEVEL_MAX {
        return Err(PageError::Malformed("level too deep"));
    }
    if flags & !FLAG_ROOT != 0 {
        return Err(PageError::Malformed("unknown flags"));
    }
    if (flags & FLAG_ROOT != 0) != (commit_blocks > 0) || u64::from(commit_blocks) > block + 1 {
        return Err(PageError::Malformed("root flag and commit length disagree"));
    }
    // Every entry takes at least 2 bytes, so a count beyond this is a lie
    // (and must not size an allocation).
    if count > block_size / 2 {
        return Err(PageError::Malformed("entry count too large"));
    }
    let mut key_offsets: Vec<u32> = Vec::with_capacity(count);
    let mut children: Vec<ChildRef> = Vec::new();
    // A key: its length byte and bytes; its offset is recorded, and it
    // must sort after the previous one.
    let mut key = |cur: &mut Cursor<'_>, why: &'static str| -> Result<(), PageError> {
        let len = usize::from(cur.u8()?);
        let r = cur.take(len)?;
        if let Some(&prev) = key_offsets.last() {
            let prev = prev as usize;
            if data[prev..prev + usize::from(data[prev - 1])] >= data[r.clone()] {
                return Err(PageError::Malformed(why));
            }
        }
        key_offsets.push(u32::try_from(r.start).expect("offsets within a block"));
        Ok(())
    };
    let oldest_block = if level == 0 {
        for _ in 0..count {
            key(&mut cur, "leaf keys out of order")?;
            let len = usize::from(cur.u8()?);
            cur.take(len)?;
        }
        block
    } else {
        if count == 0 {
            return Err(PageError::Malformed("internal page without children"));
        }
        children.reserve_exact(count);
        for i in 0..count {
            if i > 0 {
                key(&mut cur, "separator keys out of order")?;
            }
            let c = ChildRef { block: cur.u64()?, oldest_block: cur.u64()?, page_len: cur.u32()? };
            if c.block >= block || c.oldest_block > c.block {
                return Err(PageError::Malformed("child reference to a block not older than its parent"));
            }
            if (c.page_len as usize) < PAGE_HEADER_LEN || c.page_len as usize > block_size {
                return Err(PageError::Malformed("child page length out of range"));
            }
            children.push(c);
        }
        oldest_of(&children, block)
    };
    if data[cur.pos..].iter().any(|&b| b != 0) {
        return Err(PageError::Malformed("bytes after the last entry"));
    }
    let page_len = cur.pos as u32;
    Ok(assemble(data, block, level, commit_blocks, (page_len, oldest_block), key_offsets, children))
}

/// The view of a page's bytes whose structure is known good (parsed, or
/// just serialized): the shared prefix of its keys and each key's head.
fn assemble(
    data: Bytes,
    block: u64,
    level: u8,
    commit_blocks: u32,
    (page_len, oldest_block): (u32, u64),
    key_offsets: Vec<u32>,
    children: Vec<ChildRef>,
) -> PageView {
    let key_at = |i: usize| {
        let at = key_offsets[i] as usize;
        &data[at..at + usize::from(data[at - 1])]
    };
    let prefix_len = match key_offsets.len() {
        0 => 0,
        n => {
            let (first, last) = (key_at(0), key_at(n - 1));
            first.iter().zip(last).take_while(|(a, b)| a == b).count()
        }
    };
    let mut prefix_inline = [0u8; PREFIX_INLINE_MAX];
    if prefix_len <= PREFIX_INLINE_MAX && prefix_len > 0 {
        prefix_inline[..prefix_len].copy_from_slice(&key_at(0)[..prefix_len]);
    }
    // (A built page is checked for order only afterwards, by
    // `keys_ascending`: a key out of order may be shorter than the prefix
    // of the first and last.)
    let heads =
        (0..key_offsets.len()).map(|i| head_of(key_at(i).get(prefix_len..).unwrap_or_default())).collect();
    PageView {
        block,
        level,
        commit_blocks,
        page_len,
        oldest_block,
        // Keys are at most 255 bytes, so their common prefix is too.
        prefix_len: prefix_len as u8,
        prefix_inline,
        heads,
        key_offsets: key_offsets.into_boxed_slice(),
        children: children.into_boxed_slice(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn leaf(block: u64) -> Page {
        Page {
            block,
            level: 0,
            commit_blocks: 0,
            body: PageBody::Leaf { pairs: vec![(b("a"), b("1")), (b("bb"), b(""))] },
        }
    }

    #[test]
    fn leaf_round_trips_and_length_is_exact() {
        let p = leaf(7);
        assert_eq!(p.page_len(), 24 + 4 + 4);
        let data = serialize(&p, 512);
        assert_eq!(data.len(), 512);
        assert_eq!(parse(data, 7, 512).unwrap().to_page(), p);
    }

    #[test]
    fn internal_root_round_trips() {
        let p = Page {
            block: 10,
            level: 1,
            commit_blocks: 3,
            body: PageBody::Internal {
                keys: vec![b("m")],
                children: vec![
                    ChildRef { block: 3, oldest_block: 3, page_len: 40 },
                    ChildRef { block: 9, oldest_block: 8, page_len: 100 },
                ],
            },
        };
        assert_eq!(p.oldest_block(), 3);
        assert_eq!(p.page_len(), 24 + 40 + 2);
        let data = serialize(&p, 1024);
        let back = parse(data, 10, 1024).unwrap();
        assert!(back.is_root());
        assert_eq!(back.child_ref(), p.child_ref());
        assert_eq!(back.to_page(), p);
    }

    #[test]
    fn every_flipped_bit_and_the_wrong_block_are_caught() {
        let data = serialize(&leaf(7), 512);
        assert_eq!(parse(data.clone(), 8, 512).err(), Some(PageError::WrongBlock { found: 7 }));
        for bit in (0..512 * 8).step_by(7) {
            let mut bad = data.to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(parse(Bytes::from(bad), 7, 512).is_err(), "bit {bit}");
        }
        assert!(parse(data.slice(..511), 7, 512).is_err());
    }

    #[test]
    fn out_of_order_keys_are_refused_even_with_a_good_checksum() {
        let p = Page {
            block: 1,
            level: 0,
            commit_blocks: 0,
            body: PageBody::Leaf { pairs: vec![(b("b"), b("")), (b("a"), b(""))] },
        };
        let data = serialize(&p, 512);
        assert_eq!(parse(data, 1, 512).err(), Some(PageError::Malformed("leaf keys out of order")));
    }
    /// Keys built from a small alphabet (so that prefixes, heads and
    /// zero padding collide often), lengths 0 to 39.
    fn key_strategy() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(vec![0u8, 1, 7, 0xff]), 0..40)
    }

    proptest::proptest! {
        /// The view's search agrees with a binary search of the sorted
        /// keys, for leaves and separators, for keys present and absent.
        #[test]
        fn search_agrees_with_a_binary_search(
            keys in proptest::collection::btree_set(key_strategy(), 0..40),
            probes in proptest::collection::vec(key_strategy(), 1..40),
            leaf in proptest::bool::ANY,
            shared in proptest::sample::select(vec![0usize, 3, 33, 200]),
        ) {
            // A prefix shared by every key (longer than the view keeps
            // inline, for 33 and 200), and by every other probe.
            let with_prefix = |k: &Vec<u8>| [vec![7u8; shared], k.clone()].concat();
            let keys: Vec<Bytes> = keys.iter().map(|k| Bytes::from(with_prefix(k))).collect();
            let probes: Vec<Vec<u8>> =
                probes.iter().enumerate().map(|(i, p)| if i % 2 == 0 { with_prefix(p) } else { p.clone() }).collect();
            let page = if leaf {
                let pairs = keys.iter().map(|k| (k.clone(), b("v"))).collect();
                Page { block: 1, level: 0, commit_blocks: 0, body: PageBody::Leaf { pairs } }
            } else {
                let child = ChildRef { block: 0, oldest_block: 0, page_len: 24 };
                let children = vec![child; keys.len() + 1];
                Page { block: 1, level: 1, commit_blocks: 0, body: PageBody::Internal { keys: keys.clone(), children } }
            };
            let view = PageView::of(&page, 16384);
            proptest::prop_assert_eq!(view.to_page(), page.clone());
            // The view built while serializing is the one parsing builds.
            let parsed = parse(Bytes::copy_from_slice(view.bytes()), 1, 16384).expect("a built page parses");
            proptest::prop_assert_eq!(format!("{view:?}"), format!("{parsed:?}"));
            for probe in probes.iter().chain(keys.iter().map(|k| k.as_ref().to_vec()).collect::<Vec<_>>().iter()) {
                let want = keys.binary_search_by(|k| k.as_ref().cmp(probe.as_slice()));
                proptest::prop_assert_eq!(view.search(probe), want, "probe {:?}", probe);
                proptest::prop_assert_eq!(view.child_index(probe), keys.partition_point(|k| k.as_ref() <= probe.as_slice()));
            }
        }
    }
}
