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
            PageBody::Internal { children, .. } => {
                children.iter().map(|c| c.oldest_block).min().unwrap_or(self.block)
            }
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
    let page_len = page.page_len();
    assert!(page_len <= block_size, "page of {page_len} bytes for block {} > {block_size}", page.block);
    let mut out = BytesMut::with_capacity(block_size);
    out.put_slice(&PAGE_MAGIC);
    out.put_u8(page.level);
    out.put_u8(if page.is_root() { FLAG_ROOT } else { 0 });
    let count = match &page.body {
        PageBody::Leaf { pairs } => pairs.len(),
        PageBody::Internal { children, .. } => children.len(),
    };
    out.put_u32(u32::try_from(count).expect("entry count fits u32"));
    out.put_u64(page.block);
    out.put_u32(page.commit_blocks);
    out.put_u32(0);
    match &page.body {
        PageBody::Leaf { pairs } => {
            for (k, v) in pairs {
                out.put_u8(k.len() as u8);
                out.put_slice(k);
                out.put_u8(v.len() as u8);
                out.put_slice(v);
            }
        }
        PageBody::Internal { keys, children } => {
            for (i, c) in children.iter().enumerate() {
                if i > 0 {
                    out.put_u8(keys[i - 1].len() as u8);
                    out.put_slice(&keys[i - 1]);
                }
                out.put_u64(c.block);
                out.put_u64(c.oldest_block);
                out.put_u32(c.page_len);
            }
        }
    }
    debug_assert_eq!(out.len(), page_len);
    out.resize(block_size, 0);
    let crc = page_crc(&out);
    out[20..24].copy_from_slice(&crc.to_be_bytes());
    out.freeze()
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
    fn short(&mut self) -> Result<Bytes, PageError> {
        let n = self.u8()? as usize;
        let r = self.take(n)?;
        Ok(self.data.slice(r))
    }
}

/// Parses and validates the bytes of block `block`: length, magic,
/// checksum, the block number inside, and every structural rule of the
/// format (key order, child references pointing to older blocks, lengths
/// within the block, zero padding). Keys and values are slices of `data`.
///
/// # Errors
/// A [`PageError`] saying what is wrong; nothing is trusted from a page
/// that fails.
pub fn parse(data: Bytes, block: u64, block_size: usize) -> Result<Page, PageError> {
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
    let body = if level == 0 {
        let mut pairs: Vec<(Bytes, Bytes)> = Vec::with_capacity(count);
        for _ in 0..count {
            let k = cur.short()?;
            let v = cur.short()?;
            if pairs.last().is_some_and(|(prev, _)| *prev >= k) {
                return Err(PageError::Malformed("leaf keys out of order"));
            }
            pairs.push((k, v));
        }
        PageBody::Leaf { pairs }
    } else {
        if count == 0 {
            return Err(PageError::Malformed("internal page without children"));
        }
        let mut keys: Vec<Bytes> = Vec::with_capacity(count - 1);
        let mut children = Vec::with_capacity(count);
        for i in 0..count {
            if i > 0 {
                let k = cur.short()?;
                if keys.last().is_some_and(|prev| *prev >= k) {
                    return Err(PageError::Malformed("separator keys out of order"));
                }
                keys.push(k);
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
        PageBody::Internal { keys, children }
    };
    if data[cur.pos..].iter().any(|&b| b != 0) {
        return Err(PageError::Malformed("bytes after the last entry"));
    }
    Ok(Page { block, level, commit_blocks, body })
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
        assert_eq!(parse(data, 7, 512).unwrap(), p);
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
        assert_eq!(back, p);
    }

    #[test]
    fn every_flipped_bit_and_the_wrong_block_are_caught() {
        let data = serialize(&leaf(7), 512);
        assert_eq!(parse(data.clone(), 8, 512), Err(PageError::WrongBlock { found: 7 }));
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
        assert_eq!(parse(data, 1, 512), Err(PageError::Malformed("leaf keys out of order")));
    }
}
