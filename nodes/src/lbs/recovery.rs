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
//!
//! Limitation (stated, not hidden): bit rot that destroys records of the
//! newest acknowledged batch only, with nothing written after it, looks
//! exactly like a torn write and is rolled back.

use super::layout::{check_record, record_len, BatchPlace};

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
    Ok(TailVerdict { durable_end, newest_batch_start: newest.map(|p| p.batch_start), torn_records })
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
    fn region_not_at_file_start_without_complete_batch_is_refused() {
        let mut f = file(&[(0, 2), (2, 2)]);
        corrupt(&mut f, 2);
        corrupt(&mut f, 1);
        let r = TailRegion { region_first_block: 1, ..region() };
        let bytes = &f[record_len(BS) as usize..];
        assert!(find_durable_end(&r, bytes).is_err());
    }
}
