//! Finding where the durable log ends in the newest file. Pure functions
//! over bytes already read; the node does the reading.
//!
//! The writer has at most one write batch unsynced at any time (it writes
//! the next batch only after the previous one's fsync succeeded), so after
//! a crash only the newest batch can be damaged. The rule:
//!
//! 1. The durable end is just after the newest batch all of whose records
//!    are valid.
//! 2. Everything after it is the torn batch: at most one batch long, and
//!    every valid record in it must belong to that one batch (start at the
//!    durable end). Anything else means synced, acknowledged data was
//!    damaged, and recovery refuses rather than silently drop it.
//! 3. No valid record of a batch starting past the durable end lies
//!    anywhere in the region, even off its own place (a misdirected write):
//!    that batch was written only after everything before it was synced.
//!
//! Limitation (stated, not hidden): bit rot that destroys records of the
//! newest acknowledged batch only, with nothing written after it, looks
//! exactly like a torn write and is rolled back.

use super::layout::{
    check_record, record_len, BatchPlace, FILE_HEADER_LEN, RECORD_MAGIC, RECORD_TRAILER_LEN, SECTOR_LEN,
};

/// What recovery found in the newest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailVerdict {
    /// The block after the last durable one.
    pub durable_end: u64,
    /// The first block of the batch that ends there, if there is one.
    pub newest_batch_start: Option<u64>,
    /// Records (whole or partial) after the durable end, to be cut off.
    pub torn_records: u64,
}

/// The region of the newest file that recovery reads: whole record slots
/// from `region_first_block` to the end of the file.
#[derive(Debug, Clone, Copy)]
pub struct TailRegion {
    /// Block size of the store.
    pub block_size: u32,
    /// First block of the file.
    pub file_first_block: u64,
    /// Block whose slot the region starts at.
    pub region_first_block: u64,
    /// The largest batch the writer ever forms, in blocks.
    pub batch_blocks_max: u64,
}

/// How many record slots before the end of the file recovery must read:
/// enough for a torn batch and the whole complete batch before it.
pub fn tail_slots_to_read(batch_blocks_max: u64) -> u64 {
    2 * batch_blocks_max + 1
}

/// Finds the durable end of the newest file from `region`, the bytes from
/// `region.region_first_block`'s slot to the end of the file (the last slot
/// may be partial).
///
/// # Errors
/// A description naming the damaged block when synced data is damaged.
pub fn find_durable_end(region: &TailRegion, bytes: &[u8]) -> Result<TailVerdict, String> {
    let rec_len = record_len(region.block_size) as usize;
    let whole_slots = (bytes.len() / rec_len) as u64;
    let partial = !bytes.len().is_multiple_of(rec_len);
    let first = region.region_first_block;
    let slot = |i: u64| -> Option<BatchPlace> {
        let off = (i * rec_len as u64) as usize;
        let place = check_record(&bytes[off..off + rec_len], region.block_size, first + i).ok()?;
        (place.batch_start >= region.file_first_block && place.batch_len as u64 <= region.batch_blocks_max)
            .then_some(place)
    };
    let places: Vec<Option<BatchPlace>> = (0..whole_slots).map(slot).collect();

    // 1. The newest batch whose records are all valid and agree.
    let mut newest = None;
    for j in (0..whole_slots).rev() {
        let Some(place) = places[j as usize] else { continue };
        let block = first + j;
        if place.batch_end() != block + 1 || place.batch_start < first {
            continue;
        }
        let lo = (place.batch_start - first) as usize;
        if places[lo..=j as usize].iter().all(|p| *p == Some(place)) {
            newest = Some(place);
            break;
        }
    }
    let durable_end = match newest {
        Some(place) => place.batch_end(),
        None if first == region.file_first_block => first,
        None => {
            return Err(format!(
                "no complete write batch among blocks {first}..{} of the newest file: synced data is damaged",
                first + whole_slots
            ))
        }
    };

    // 2. What follows must be one torn batch.
    let torn_records = whole_slots - (durable_end - first) + partial as u64;
    if torn_records > region.batch_blocks_max {
        return Err(format!(
            "{torn_records} damaged records follow block {}: more than one write batch is damaged, \
             so acknowledged data was lost",
            durable_end.wrapping_sub(1)
        ));
    }
    for j in (durable_end - first)..whole_slots {
        if let Some(place) = places[j as usize] {
            if place.batch_start != durable_end {
                return Err(format!(
                    "block {} of a batch starting at {} survives after the damaged block {durable_end}: \
                     acknowledged data was damaged",
                    first + j,
                    place.batch_start
                ));
            }
            // The torn batch's own records say how long it was; the file
            // cannot extend past it unless a later batch was written.
            if torn_records > place.batch_len as u64 {
                return Err(format!(
                    "{torn_records} records follow block {} but the torn batch there was {} blocks long: \
                     a later batch was written, so acknowledged data was damaged",
                    durable_end.wrapping_sub(1),
                    place.batch_len
                ));
            }
        }
    }
    // 3. No record of a later batch anywhere in the region, at any sector.
    if let Some((off, block, place)) = stray_record_past(region, bytes, durable_end) {
        let at = FILE_HEADER_LEN + (first - region.file_first_block) * rec_len as u64 + off as u64;
        return Err(format!(
            "a record of block {block} (of a batch starting at {}) lies at offset {at}, not at its own \
             place: a misdirected write of a batch written after blocks {durable_end}..{} were synced, \
             so acknowledged data was damaged",
            place.batch_start, place.batch_start
        ));
    }
    Ok(TailVerdict { durable_end, newest_batch_start: newest.map(|p| p.batch_start), torn_records })
}

/// A valid record, at any sector offset of `bytes`, of a batch that starts
/// past `durable_end`: its offset in `bytes`, its block and batch place.
///
/// lbs writes records only at their own places, and a batch only after
/// every block before it was synced (with `-L`: written). So such a record
/// can only be a misdirected write (the device reported success but put
/// the bytes at another offset), and it proves that the blocks from
/// `durable_end` to its batch were synced, hence acknowledged. Step 2
/// alone cannot see this when the misdirected batch landed over the newest
/// records of the file, sector-shifted: every slot then reads as garbage,
/// exactly like a torn write, and cutting them would silently drop several
/// acknowledged batches (simulator seed 36 of `lbs-everything.toml`).
///
/// The scan looks at a few bytes per sector; only a trailer with the magic,
/// this block size and a later block number has its checksum computed.
fn stray_record_past(
    region: &TailRegion,
    bytes: &[u8],
    durable_end: u64,
) -> Option<(usize, u64, BatchPlace)> {
    let rec_len = record_len(region.block_size) as usize;
    let bs = region.block_size as usize;
    let bs_be = region.block_size.to_be_bytes();
    let mut off = 0;
    while off + rec_len <= bytes.len() {
        let t = &bytes[off + bs..off + bs + RECORD_TRAILER_LEN as usize];
        let block = u64::from_be_bytes(t[4..12].try_into().expect("8 bytes"));
        let plausible = t[0..4] == *RECORD_MAGIC && block > durable_end && t[24..28] == bs_be;
        if plausible {
            if let Ok(place) = check_record(&bytes[off..off + rec_len], region.block_size, block) {
                if place.batch_start > durable_end {
                    return Some((off, block, place));
                }
            }
        }
        off += SECTOR_LEN as usize;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::layout::put_record;
    use super::*;
    use bytes::BytesMut;

    const BS: u32 = 512;

    /// Writes batches (start, len) of records for a file starting at 0.
    fn file(batches: &[(u64, u32)]) -> BytesMut {
        let mut out = BytesMut::new();
        for &(start, len) in batches {
            for b in start..start + len as u64 {
                put_record(
                    &mut out,
                    b,
                    BatchPlace { batch_start: start, batch_len: len },
                    &[b as u8; BS as usize],
                );
            }
        }
        out
    }

    fn region() -> TailRegion {
        TailRegion { block_size: BS, file_first_block: 0, region_first_block: 0, batch_blocks_max: 4 }
    }

    fn corrupt(buf: &mut [u8], block: u64) {
        buf[(block * record_len(BS)) as usize + 3] ^= 0xff;
    }

    #[test]
    fn clean_file_ends_after_last_batch() {
        let f = file(&[(0, 2), (2, 3)]);
        assert_eq!(
            find_durable_end(&region(), &f),
            Ok(TailVerdict { durable_end: 5, newest_batch_start: Some(2), torn_records: 0 })
        );
    }

    #[test]
    fn empty_file_is_empty() {
        assert_eq!(
            find_durable_end(&region(), &[]),
            Ok(TailVerdict { durable_end: 0, newest_batch_start: None, torn_records: 0 })
        );
    }

    #[test]
    fn torn_last_batch_is_rolled_back_whole_even_if_its_last_block_survived() {
        let mut f = file(&[(0, 2), (2, 3)]);
        corrupt(&mut f, 3);
        assert_eq!(
            find_durable_end(&region(), &f),
            Ok(TailVerdict { durable_end: 2, newest_batch_start: Some(0), torn_records: 3 })
        );
    }

    #[test]
    fn partial_trailing_slot_is_torn() {
        let mut f = file(&[(0, 2), (2, 1)]);
        f.truncate(f.len() - 100);
        assert_eq!(
            find_durable_end(&region(), &f),
            Ok(TailVerdict { durable_end: 2, newest_batch_start: Some(0), torn_records: 1 })
        );
    }

    #[test]
    fn damage_before_a_complete_later_batch_is_refused() {
        let mut f = file(&[(0, 2), (2, 1), (3, 2)]);
        corrupt(&mut f, 2);
        // Batch (3,2) is complete, so the newest complete batch ends at 5 and
        // nothing is torn: the damage at 2 is left for GET to report.
        assert_eq!(find_durable_end(&region(), &f).unwrap().durable_end, 5);
        // But damage in the newest batch with a record of a later batch
        // after it cannot be a torn write.
        let mut g = file(&[(0, 2), (2, 2), (4, 1)]);
        corrupt(&mut g, 4);
        corrupt(&mut g, 2);
        let err = find_durable_end(&region(), &g).unwrap_err();
        assert!(err.contains("torn batch there was 2 blocks long"), "{err}");
    }

    #[test]
    fn a_later_batch_after_damage_is_refused() {
        let mut f = file(&[(0, 1), (1, 1), (2, 2)]);
        corrupt(&mut f, 1);
        corrupt(&mut f, 3);
        let err = find_durable_end(&region(), &f).unwrap_err();
        assert!(err.contains("block 2 of a batch starting at 2 survives"), "{err}");
    }

    #[test]
    fn too_long_a_damaged_tail_is_refused() {
        let mut f = file(&[(0, 1), (1, 4), (5, 4)]);
        corrupt(&mut f, 1);
        corrupt(&mut f, 5);
        assert!(find_durable_end(&region(), &f).unwrap_err().contains("more than one write batch"));
    }

    #[test]
    fn a_later_batch_misdirected_over_the_tail_is_refused() {
        // Acked batches (0,2), (2,1), (3,1); batch (4,3) written one sector
        // into the file instead of at block 4: every slot is garbage, as if
        // torn, but the stray records prove that 0..4 were synced.
        let mut f = file(&[(0, 2), (2, 1), (3, 1)]);
        let stray = file(&[(4, 3)]);
        f[512..512 + stray.len()].copy_from_slice(&stray);
        let err = find_durable_end(&region(), &f).unwrap_err();
        assert!(err.contains("record of block 4") && err.contains("misdirected"), "{err}");
        // Landed on slot boundaries it counts too (there check_record sees
        // only a wrong block number): (1,4) looks torn, but (5,3) was written.
        let mut g = file(&[(0, 1), (1, 4)]);
        let stray = file(&[(5, 3)]);
        let at = 2 * record_len(BS) as usize;
        g[at..at + stray.len()].copy_from_slice(&stray);
        let err = find_durable_end(&region(), &g).unwrap_err();
        assert!(err.contains("record of block 5"), "{err}");
        // A stray of the batch at the durable end proves nothing cut was
        // synced: that newest batch itself went astray (GET reports the
        // records it landed on).
        let mut h = file(&[(0, 2), (2, 1)]);
        let stray = file(&[(3, 1)]);
        h[512..512 + stray.len()].copy_from_slice(&stray);
        assert_eq!(
            find_durable_end(&region(), &h),
            Ok(TailVerdict { durable_end: 3, newest_batch_start: Some(2), torn_records: 0 })
        );
    }

    #[test]
    fn region_not_at_file_start_without_complete_batch_is_refused() {
        let mut f = file(&[(0, 2), (2, 2)]);
        corrupt(&mut f, 2);
        corrupt(&mut f, 1);
        let r = TailRegion { region_first_block: 1, ..region() };
        let bytes = &f[record_len(BS) as usize..];
        assert!(find_durable_end(&r, bytes).is_err());
    }
}
