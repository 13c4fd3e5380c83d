//! The on-disk format of the block store: file names, the file header, and
//! the block record with its trailer. Pure functions, no I/O.
//!
//! A store is a directory of files named `blocks-<first block, 16 hex
//! digits>`. Each file is
//!
//! ```text
//! header (FILE_HEADER_LEN = 512 bytes: one sector)
//! record for block first+0 (record_len bytes, a whole number of sectors)
//! record for block first+1
//! ...
//! ```
//!
//! so block `b` of a file starting at `first` lives at offset
//! `FILE_HEADER_LEN + (b - first) * record_len`, where `record_len` is the
//! block size plus the 32-byte trailer, rounded up to a multiple of 512.
//!
//! Why whole sectors: a write torn by a crash can leave garbage in every
//! 512-byte sector it touched. If a record shared a sector with the next
//! one, appending the next batch would rewrite that sector, and a crash
//! could destroy the end of an acknowledged record. With every record (and
//! the header) starting on a sector boundary, a write only ever touches
//! sectors that belong to the batch being written. The price is the padding:
//! 100% for 512-byte blocks, 12.5% for 4096, under 6.3% from 8192 up.
//!
//! A record is the block's data, a 32-byte trailer, and zero padding:
//!
//! ```text
//! 4  magic "LBSR"
//! 8  block number                      (big-endian, like everything here)
//! 8  first block of the write batch this record was written in
//! 4  number of blocks in that batch
//! 4  block size
//! 4  CRC-32C of the data and the 28 trailer bytes above
//! ```
//!
//! The checksum covers the block's own number, so a record that is
//! well-formed but sits at the wrong offset (a misdirected write, a stale
//! record) fails validation. The batch fields let recovery tell a complete
//! write batch from a torn one: a batch is durable only if every one of its
//! records is valid.
//!
//! The header is
//!
//! ```text
//! 8   magic "kvlbs\0\0\x02" (the last byte is the format version)
//! 4   block size
//! 8   first block number of this file (equals the name's)
//! 40  zero
//! 4   CRC-32C of the 60 bytes above
//! 448 zero (to the end of the sector)
//! ```

use bytes::{BufMut, BytesMut};

/// Length of the header at the start of every file.
pub const FILE_HEADER_LEN: u64 = SECTOR_LEN;
/// The unit a torn write garbles; records are aligned to it.
pub const SECTOR_LEN: u64 = 512;
/// Length of the trailer after each block's data.
pub const RECORD_TRAILER_LEN: u64 = 32;
/// Smallest and largest block sizes (PROTOCOL.md).
pub const BLOCK_SIZE_MIN: u32 = 512;
/// See [`BLOCK_SIZE_MIN`].
pub const BLOCK_SIZE_MAX: u32 = 131_072;

const FILE_MAGIC: &[u8; 8] = b"kvlbs\0\0\x02";
/// Bytes of the header that carry something (the rest is zero).
const HEADER_USED_LEN: usize = 64;
/// The first bytes of every record's trailer.
pub const RECORD_MAGIC: &[u8; 4] = b"LBSR";
const FILE_NAME_PREFIX: &str = "blocks-";

/// The name of the file whose first block is `first_block`.
pub fn file_name(first_block: u64) -> String {
    format!("{FILE_NAME_PREFIX}{first_block:016x}")
}

/// The first block number encoded in a file name, if it is one of ours.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix(FILE_NAME_PREFIX)?;
    if hex.len() != 16 || !hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Bytes one block takes on disk: data and trailer, padded to whole sectors.
pub fn record_len(block_size: u32) -> u64 {
    (block_size as u64 + RECORD_TRAILER_LEN).div_ceil(SECTOR_LEN) * SECTOR_LEN
}

/// Offset of block `block` in a file whose first block is `first_block`.
pub fn record_offset(block_size: u32, first_block: u64, block: u64) -> u64 {
    debug_assert!(block >= first_block);
    FILE_HEADER_LEN + (block - first_block) * record_len(block_size)
}

/// Appends a file header to `out`.
pub fn put_file_header(out: &mut BytesMut, block_size: u32, first_block: u64) {
    let start = out.len();
    out.put_slice(FILE_MAGIC);
    out.put_u32(block_size);
    out.put_u64(first_block);
    out.put_bytes(0, 40);
    let crc = crc32c::crc32c(&out[start..]);
    out.put_u32(crc);
    out.put_bytes(0, FILE_HEADER_LEN as usize - HEADER_USED_LEN);
}

/// A file header that passed its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    pub block_size: u32,
    pub first_block: u64,
}

/// Parses a file header.
///
/// # Errors
/// A description of what is wrong with it.
pub fn parse_file_header(bytes: &[u8]) -> Result<FileHeader, String> {
    if (bytes.len() as u64) < FILE_HEADER_LEN {
        return Err(format!("header is {} bytes, not {FILE_HEADER_LEN}", bytes.len()));
    }
    let h = &bytes[..HEADER_USED_LEN];
    let crc_stored = u32::from_be_bytes(h[60..64].try_into().expect("4 bytes"));
    if crc32c::crc32c(&h[..60]) != crc_stored {
        return Err("header checksum mismatch".into());
    }
    if &h[0..8] != FILE_MAGIC {
        return Err("not an lbs file of this format version".into());
    }
    Ok(FileHeader {
        block_size: u32::from_be_bytes(h[8..12].try_into().expect("4 bytes")),
        first_block: u64::from_be_bytes(h[12..20].try_into().expect("8 bytes")),
    })
}

/// Where a record sits in the write batch it was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlace {
    /// First block of the batch.
    pub batch_start: u64,
    /// Blocks in the batch.
    pub batch_len: u32,
}

impl BatchPlace {
    /// The block after the batch's last.
    pub fn batch_end(&self) -> u64 {
        self.batch_start + self.batch_len as u64
    }
}

/// Appends the record for `block` (its `data`, the trailer, the padding)
/// to `out`.
pub fn put_record(out: &mut BytesMut, block: u64, place: BatchPlace, data: &[u8]) {
    let start = out.len();
    let padding = record_len(data.len() as u32) - data.len() as u64 - RECORD_TRAILER_LEN;
    out.put_slice(data);
    out.put_slice(RECORD_MAGIC);
    out.put_u64(block);
    out.put_u64(place.batch_start);
    out.put_u32(place.batch_len);
    out.put_u32(data.len() as u32);
    let crc = crc32c::crc32c(&out[start..]);
    out.put_u32(crc);
    out.put_bytes(0, padding as usize);
}

/// Checks the record `rec` that should hold block `block` of a store with
/// `block_size`-byte blocks, and returns its batch place.
///
/// # Errors
/// What is wrong: a wrong length, checksum, magic, block number or size.
pub fn check_record(rec: &[u8], block_size: u32, block: u64) -> Result<BatchPlace, String> {
    if rec.len() as u64 != record_len(block_size) {
        return Err(format!("record is {} bytes, not {}", rec.len(), record_len(block_size)));
    }
    let trailer_end = (block_size as u64 + RECORD_TRAILER_LEN) as usize;
    let (body, crc_bytes) = rec[..trailer_end].split_at(trailer_end - 4);
    let crc_stored = u32::from_be_bytes(crc_bytes.try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc_stored {
        return Err("checksum mismatch (torn, rotted or never written)".into());
    }
    let t = &body[block_size as usize..];
    if &t[0..4] != RECORD_MAGIC {
        return Err("no record magic".into());
    }
    let stored_block = u64::from_be_bytes(t[4..12].try_into().expect("8 bytes"));
    let batch_start = u64::from_be_bytes(t[12..20].try_into().expect("8 bytes"));
    let batch_len = u32::from_be_bytes(t[20..24].try_into().expect("4 bytes"));
    let stored_block_size = u32::from_be_bytes(t[24..28].try_into().expect("4 bytes"));
    if stored_block != block {
        return Err(format!("record holds block {stored_block} (a misdirected or stale write)"));
    }
    if stored_block_size != block_size {
        return Err(format!("record has block size {stored_block_size}"));
    }
    let place = BatchPlace { batch_start, batch_len };
    if batch_len == 0 || block < batch_start || block >= batch_start.saturating_add(batch_len as u64) {
        return Err(format!("block is outside its batch [{batch_start}, +{batch_len})"));
    }
    Ok(place)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_ignored() {
        assert_eq!(file_name(0x1234), "blocks-0000000000001234");
        assert_eq!(parse_file_name(&file_name(u64::MAX - 3)), Some(u64::MAX - 3));
        assert_eq!(parse_file_name("blocks-000000000000123"), None);
        assert_eq!(parse_file_name("blocks-000000000000123G"), None);
        assert_eq!(parse_file_name("blocks-000000000000123A"), None);
        assert_eq!(parse_file_name("lbs.pid"), None);
    }

    #[test]
    fn record_checks_catch_every_field() {
        let place = BatchPlace { batch_start: 10, batch_len: 3 };
        let mut out = BytesMut::new();
        put_record(&mut out, 11, place, &[7u8; 512]);
        assert_eq!(check_record(&out, 512, 11), Ok(place));
        assert!(check_record(&out, 512, 12).unwrap_err().contains("misdirected"));
        assert!(check_record(&out, 1024, 11).is_err());
        assert_eq!(out.len(), 1024, "a 512-byte block takes two sectors");
        for i in [0usize, 511, 512, 530, 543] {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert!(check_record(&bad, 512, 11).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let mut out = BytesMut::new();
        put_file_header(&mut out, 4096, 77);
        assert_eq!(out.len() as u64, FILE_HEADER_LEN);
        assert_eq!(parse_file_header(&out), Ok(FileHeader { block_size: 4096, first_block: 77 }));
        out[9] ^= 1;
        assert!(parse_file_header(&out).is_err());
    }
}
