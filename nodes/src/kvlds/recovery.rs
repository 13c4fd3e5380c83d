//! Recovery: finding the newest valid root by scanning back from the last
//! block in lbs.
//!
//! Every commit is one APPEND whose last block is its root, and the root
//! records how many blocks the commit wrote. Scanning down from the last
//! block, the first root found is a candidate; it is taken only if every
//! block of its commit below it is present and a valid page. Anything
//! newer than the taken root (a torn or corrupt commit, which lbs's own
//! guarantees make impossible, but a block store that does not checksum
//! might serve) is passed over with a warning naming the blocks. A store
//! with blocks but no complete commit is refused rather than started empty:
//! starting empty would silently lose every acknowledged write.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use bytes::Bytes;
use kivaloo::lbs_proto::NO_LAST_BLOCK;

use super::page::{self, PageView};

/// Blocks read at once while scanning.
pub const SCAN_READS_MAX: usize = 32;

/// What the scan wants next.
pub enum ScanStep {
    /// Read these blocks (answer with [`Scan::arrived`]).
    Read(Vec<u64>),
    /// Wait for blocks already asked for.
    Wait,
    /// Tell the operator.
    Log(String),
    /// Refuse to start.
    Failed(String),
    /// Done: the root (and whether newer blocks were passed over), or no
    /// tree at all.
    Found(Option<(Rc<PageView>, bool)>),
}

/// The scan's state.
pub struct Scan {
    block_size: usize,
    next_block: u64,
    /// The next block to examine, going down; `None` once block 0 is done.
    cursor: Option<u64>,
    /// The next block to ask for, going down.
    next_request: Option<u64>,
    in_flight: usize,
    arrived: BTreeMap<u64, Option<Bytes>>,
    /// A root being checked, and the lowest block of its commit.
    candidate: Option<(Rc<PageView>, u64)>,
    saw_blocks: bool,
    skipped: bool,
    logs: VecDeque<String>,
}

impl Scan {
    /// A scan of an lbs store whose PARAMS2 said `next_block` and
    /// `last_block` ([`NO_LAST_BLOCK`] when empty).
    pub fn new(block_size: usize, next_block: u64, last_block: u64) -> Self {
        let start = (last_block != NO_LAST_BLOCK).then_some(last_block);
        Scan {
            block_size,
            next_block,
            cursor: start,
            next_request: start,
            in_flight: 0,
            arrived: BTreeMap::new(),
            candidate: None,
            saw_blocks: false,
            skipped: false,
            logs: VecDeque::new(),
        }
    }

    /// The block number the next commit goes to.
    pub fn next_block(&self) -> u64 {
        self.next_block
    }

    /// A block asked for arrived (`None`: lbs does not have it).
    pub fn arrived(&mut self, block: u64, data: Option<Bytes>) {
        self.in_flight -= 1;
        self.arrived.insert(block, data);
    }

    /// Moves the scan on as far as the blocks that arrived allow.
    pub fn step(&mut self) -> ScanStep {
        loop {
            if let Some(message) = self.logs.pop_front() {
                return ScanStep::Log(message);
            }
            let Some(cursor) = self.cursor else {
                if self.saw_blocks {
                    return ScanStep::Failed(
                        "lbs holds blocks but none is the root of a complete commit; refusing to start \
                         rather than start empty and lose the data"
                            .into(),
                    );
                }
                return ScanStep::Found(None);
            };
            let Some(data) = self.arrived.remove(&cursor) else {
                let mut blocks = Vec::new();
                while self.in_flight < SCAN_READS_MAX {
                    let Some(b) = self.next_request else { break };
                    blocks.push(b);
                    self.in_flight += 1;
                    self.next_request = b.checked_sub(1);
                }
                return if blocks.is_empty() { ScanStep::Wait } else { ScanStep::Read(blocks) };
            };
            self.cursor = cursor.checked_sub(1);
            if let Some(found) = self.examine(cursor, data) {
                return ScanStep::Found(Some((found, self.skipped)));
            }
        }
    }

    /// Looks at one block; the root, once a whole commit has checked out.
    fn examine(&mut self, block: u64, data: Option<Bytes>) -> Option<Rc<PageView>> {
        let verdict = match data {
            None => Err("missing".to_string()),
            Some(data) => {
                self.saw_blocks = true;
                // The root found is cached: in a buffer of its own, not one
                // shared with the rest of what was received.
                page::parse(Bytes::copy_from_slice(&data), block, self.block_size).map_err(|e| e.to_string())
            }
        };
        if let Some((root, lowest)) = self.candidate.take() {
            match verdict {
                Ok(p) if !p.is_root() => {
                    if block == lowest {
                        return Some(root);
                    }
                    self.candidate = Some((root, lowest));
                    return None;
                }
                // That root may head a complete commit of its own: look at
                // it as a candidate below.
                Ok(_) => self.reject(&root, block, "another commit's root inside it"),
                Err(why) => {
                    self.reject(&root, block, &why);
                    return None;
                }
            }
        }
        match verdict {
            // Numbers lbs skipped, or freed: nothing to see.
            Err(why) if why == "missing" => {}
            Err(why) => {
                self.skipped = true;
                self.logs
                    .push_back(format!("block {block} is not a valid page ({why}); looking further back"));
            }
            Ok(p) if p.is_root() => {
                let lowest = block + 1 - u64::from(p.commit_blocks);
                let root = Rc::new(p);
                if lowest == block {
                    return Some(root);
                }
                self.candidate = Some((root, lowest));
            }
            Ok(_) => {
                self.skipped = true;
                self.logs.push_back(format!(
                    "block {block} is a page of a commit whose root is missing; looking further back"
                ));
            }
        }
        None
    }

    fn reject(&mut self, root: &PageView, block: u64, why: &str) {
        self.skipped = true;
        self.logs.push_back(format!(
            "the commit with its root at block {} is incomplete (block {block}: {why}); looking further back",
            root.block
        ));
    }
}
