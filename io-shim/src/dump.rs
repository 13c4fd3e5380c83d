//! `kivaloo dump` and `kivaloo load`: every pair of a store in a file, and
//! back (into the same store or another one), like kivaloo's `kvlds-dump`
//! and `kvlds-undump`; and the file's format.
//!
//! # `kivaloo dump --socket ADDR [--force] FILE`
//!
//! Reads every pair with RANGE, a page (about 1 MiB) at a time in key
//! order, and writes them to `FILE.tmp.PID` in FILE's directory; then
//! fsyncs that file, gives it the name FILE and fsyncs the directory. So a
//! file named FILE is always a complete dump: an error removes the
//! temporary file, and a crash leaves at most a `FILE.tmp.PID` (an
//! unfinished dump, safe to delete). An existing FILE is refused (exit 2)
//! unless `--force`, which replaces it (rename). Without `--force`, FILE is
//! created with a hard link, which fails if FILE appeared meanwhile (on a
//! file system without hard links: checked, then renamed).
//!
//! A dump taken while other clients write is **not a point-in-time
//! snapshot**. Each RANGE page is consistent, but the whole is not: a pair
//! changed after its page was read is dumped as it was, one changed before
//! as it is now, so the dump may hold a state the store never had (as with
//! kivaloo's kvlds-dump). Stop the writers for an exact copy.
//!
//! # `kivaloo load --socket ADDR [--check] FILE`
//!
//! FILE must be a regular file: it is read twice, and a FIFO would block
//! its opening; anything else is refused before it is opened (exit 2).
//!
//! The first pass checks all of it (format, every checksum, the trailer's
//! counts) and finds its longest key and value; on the way it records a
//! *checkpoint* at the first chunk boundary at least
//! [`CHECKPOINT_BYTES_MIN`] (32 KiB) after the previous one: where it is,
//! and the CRC-32C of every byte before it. Then PARAMS asks the store for
//! its limits. A file that is not a complete, valid dump, or holds a key or
//! value over the store's limits, is refused with the reason and its byte
//! offset, before anything is sent. `--check` does the first pass only,
//! connecting to nothing.
//!
//! The second pass reads the same open file again (renaming another file
//! to FILE meanwhile does not matter) and SETs every pair, pipelined: up to
//! the client's window
//! ([`DEFAULT_IN_FLIGHT_MAX`](crate::client::DEFAULT_IN_FLIGHT_MAX)) at once.
//! What it guarantees if FILE is changed in place meanwhile (e.g. `cp
//! other.kvd FILE`):
//!
//! - Before it starts, the open file's length and modification time (and
//!   device and inode) must be what they were when it was opened:
//!   otherwise nothing is sent.
//! - It reads the chunks up to the next checkpoint (a *group*: one chunk of
//!   a dump `kivaloo dump` wrote; less than 32 KiB plus one chunk in any
//!   case), checks them again as the first pass did, and compares the
//!   CRC-32C of every byte from the file's start to the checkpoint with the
//!   one recorded; only if they are equal does it send any SET of the
//!   group. So nothing of a group that changed is sent, nor anything after
//!   it: every pair sent is one the first pass checked, at the same place
//!   (unless a change leaves that CRC unchanged: for arbitrary changes, a
//!   chance of 1 in 2^32). The last group is compared with the trailer's
//!   totals, which the first pass read.
//! - Groups read before the change was seen were unchanged then, and their
//!   pairs may have been stored: the load stops (exit 4), saying how many
//!   pairs were stored. A change to a part already read again is not seen:
//!   the pairs sent from it were the checked ones.
//!
//! Pairs already in the store and not in the dump are left alone; a pair in
//! both gets the dump's value. If the connection is lost during the load,
//! the message says how many pairs the store acknowledged; SET is
//! idempotent, so running the same load again finishes it.
//!
//! # Signals
//!
//! SIGINT (Ctrl-C) or SIGTERM stops either command: `dump` removes its
//! temporary file and writes no FILE; `load` stops sending, drops the SETs
//! in flight, and says how many pairs were sent and how many the store
//! acknowledged (those in flight may or may not have been stored). The exit
//! status is 130 for SIGINT, 143 for SIGTERM. Exceptions:
//!
//! - During `load`'s first pass (and with `--check`), which reads the file
//!   without pausing, a signal has its default effect: the process is
//!   killed at once (shells report 130 or 143 alike). Nothing was sent
//!   yet.
//! - Once `dump` has read the last page, it syncs and names FILE without
//!   pausing: a signal arriving then is seen too late, and the dump
//!   completes (exit 0).
//!
//! # Progress
//!
//! If stderr is a terminal, a line rewritten in place (`\r`) at most every
//! [`PROGRESS_INTERVAL`] says how far the command got (pairs, pairs/s; for
//! load also the percentage); otherwise nothing is printed until the
//! summary line (pairs, bytes, seconds) or the error.
//!
//! # Exit status
//!
//! | status | `dump` | `load` |
//! |---|---|---|
//! | 0 | FILE is a complete dump | every pair was stored (with `--check`: FILE is a complete, valid dump) |
//! | 2 | usage: bad arguments, FILE exists (without `--force`) | usage: bad arguments, FILE cannot be opened, is not a complete, valid dump (truncated or corrupt, at which byte), or holds a key or value over the store's limits; nothing was sent |
//! | 3 | the store cannot be reached, the connection was lost, or the store broke the protocol; FILE was not written | the same; the message says how many pairs were acknowledged |
//! | 4 | writing FILE failed (create, write, fsync, rename, fsync of the directory); FILE was not written, except after a failed fsync of the directory (the message says so) | reading FILE failed ("reading FILE failed at byte N: ...; K of M pairs were stored"), or FILE changed after it was checked (see above; the message says how many pairs were stored: none if the change was seen before the second pass) |
//! | 130 | SIGINT arrived: FILE was not written, the temporary file was removed | SIGINT arrived: the message says how many pairs were sent and acknowledged |
//! | 143 | SIGTERM arrived: the same | SIGTERM arrived: the same |
//!
//! Either command also exits 4 if it cannot start its runtime or listen for
//! signals: a local failure, before anything is sent or written.
//!
//! # Format
//!
//! A dump is a header, chunks of pairs, and a trailer. Integers are
//! big-endian; every CRC is the standard CRC-32C (Castagnoli, pre- and
//! post-inverted, as the `crc32c` crate computes it: `123456789` gives
//! 0xe3069283), written as a 4-byte integer.
//!
//! The header, at byte 0:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVLDDUMP` |
//! | 8 | 4 | format version: 1 |
//!
//! Then any number of chunks, each:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | tag `CHNK` |
//! | 4 | 4 | payload length in bytes: 2 ..= 65536 ([`CHUNK_PAYLOAD_BYTES_MAX`]) |
//! | 8 | 4 | pair count: 1 ..= payload length / 2 |
//! | 12 | 4 | CRC of the payload |
//! | 16 | 4 | CRC of bytes 0..16 of this chunk header |
//! | 20 | payload length | the payload: pairs, each key length (1), key, value length (1), value, filling it exactly |
//!
//! Then the trailer, and nothing after it:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | tag `TAIL` |
//! | 4 | 8 | pair count, all chunks together |
//! | 12 | 8 | bytes of keys and values, all chunks together (length bytes not counted) |
//! | 20 | 8 | the body's length: the bytes before the trailer (= the trailer's offset) |
//! | 28 | 4 | CRC of the body (every byte before the trailer) |
//! | 32 | 4 | CRC of bytes 0..32 of the trailer |
//!
//! Keys are in strictly increasing (bytewise) order through the whole file,
//! as RANGE returns them; so no key appears twice. An empty store's dump is
//! the header and the trailer: 48 bytes. A chunk header carries its own CRC
//! so that a damaged length is reported as such instead of misreading what
//! follows; the body's CRC and length in the trailer catch a chunk removed,
//! repeated or moved, and a file cut at a chunk boundary has no trailer.
//!
//! # Bounds
//!
//! - dump: one RANGE page (at most
//!   [`RANGE_MAX_BYTES`](crate::client::RANGE_MAX_BYTES)) and one chunk
//!   being filled (at most [`CHUNK_PAYLOAD_BYTES_MAX`]).
//! - load: the checkpoints, 16 bytes each, one per at least 32 KiB of the
//!   file: at most 512 KiB per GiB of FILE (about 256 KiB per GiB for a
//!   dump `kivaloo dump` wrote, whose chunks are full); a 64 KiB read
//!   buffer; one group of chunks read at a time (less than
//!   [`CHECKPOINT_BYTES_MIN`] of chunks plus one chunk: under 96 KiB of
//!   pairs, so under 49152 of them, about 72 bytes each in memory besides
//!   their bytes); and at most the client's window of SETs in flight, each
//!   holding its pair (at most 512 bytes) and so the chunk it came from:
//!   about 2 MiB with the default window.

use std::cell::Cell;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use kivaloo::kvlds_proto::SHORT_STRING_LEN_MAX;
use kivaloo::LogLevel;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::addr::SocketAddr;
use crate::cli::{connect_failure, EXIT_DONE, EXIT_OUTPUT, EXIT_STORE, EXIT_USAGE};
use crate::client::{Client, Error};
use crate::runtime::{build_runtime, log};

// ---------------------------------------------------------------------------
// The format
// ---------------------------------------------------------------------------

/// The first 8 bytes of every dump.
pub const MAGIC: [u8; 8] = *b"KVLDDUMP";
/// The format version written, and the only one read.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the header: magic and version.
pub const HEADER_LEN: usize = 12;
/// Bytes of a chunk's header, before its payload.
pub const CHUNK_HEADER_LEN: usize = 20;
/// The most bytes of pairs in one chunk.
pub const CHUNK_PAYLOAD_BYTES_MAX: usize = 64 << 10;
/// Bytes of the trailer.
pub const TRAILER_LEN: usize = 36;
/// The tag of a chunk.
const CHUNK_TAG: [u8; 4] = *b"CHNK";
/// The tag of the trailer.
const TRAILER_TAG: [u8; 4] = *b"TAIL";
/// The fewest bytes a pair takes: two length bytes (empty key and value).
const PAIR_LEN_MIN: usize = 2;

/// What a dump holds: counted by its writer as it writes, by its reader as
/// it reads, and recorded in its trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpTotals {
    /// Pairs.
    pub pair_count: u64,
    /// Bytes of keys and values (their length bytes not counted).
    pub key_value_bytes: u64,
    /// Bytes of the body: the header and the chunks, everything before the
    /// trailer.
    pub body_len: u64,
    /// CRC-32C of the body.
    pub body_crc: u32,
}

impl DumpTotals {
    /// The length of the whole file: the body and the trailer.
    pub fn file_len(&self) -> u64 {
        self.body_len + TRAILER_LEN as u64
    }

    /// Counts `bytes` as the next bytes of the body.
    fn add_body(&mut self, bytes: &[u8]) {
        self.body_len += bytes.len() as u64;
        self.body_crc = crc32c::crc32c_append(self.body_crc, bytes);
    }
}

/// Big-endian `u32` at `at` in `bytes`.
///
/// # Panics
/// If `bytes` is shorter than `at + 4` (callers pass fixed-size records).
fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

/// Big-endian `u64` at `at` in `bytes`.
///
/// # Panics
/// If `bytes` is shorter than `at + 8` (callers pass fixed-size records).
fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

/// The header of a chunk of `pair_count` pairs whose payload has
/// `payload_len` bytes and CRC `payload_crc`.
fn encode_chunk_header(payload_len: u32, pair_count: u32, payload_crc: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut header = [0u8; CHUNK_HEADER_LEN];
    header[0..4].copy_from_slice(&CHUNK_TAG);
    header[4..8].copy_from_slice(&payload_len.to_be_bytes());
    header[8..12].copy_from_slice(&pair_count.to_be_bytes());
    header[12..16].copy_from_slice(&payload_crc.to_be_bytes());
    let header_crc = crc32c::crc32c(&header[..16]);
    header[16..20].copy_from_slice(&header_crc.to_be_bytes());
    header
}

/// The trailer of a dump with `totals`.
fn encode_trailer(totals: &DumpTotals) -> [u8; TRAILER_LEN] {
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[0..4].copy_from_slice(&TRAILER_TAG);
    trailer[4..12].copy_from_slice(&totals.pair_count.to_be_bytes());
    trailer[12..20].copy_from_slice(&totals.key_value_bytes.to_be_bytes());
    trailer[20..28].copy_from_slice(&totals.body_len.to_be_bytes());
    trailer[28..32].copy_from_slice(&totals.body_crc.to_be_bytes());
    let trailer_crc = crc32c::crc32c(&trailer[..32]);
    trailer[32..36].copy_from_slice(&trailer_crc.to_be_bytes());
    trailer
}

/// Writes a dump: the header at once, then pairs in key order, a chunk
/// at a time, then the trailer ([`DumpWriter::finish`]).
///
/// After an error from `out`, the dump is unfinished: drop the writer and
/// what it wrote.
pub struct DumpWriter<W: Write> {
    out: W,
    /// The pairs of the chunk being filled, encoded; at most
    /// [`CHUNK_PAYLOAD_BYTES_MAX`] bytes.
    payload: Vec<u8>,
    /// How many pairs `payload` holds.
    payload_pairs: u32,
    /// The body written so far, and every pair pushed.
    totals: DumpTotals,
    /// The last key pushed.
    last_key: Option<Vec<u8>>,
}

impl<W: Write> DumpWriter<W> {
    /// Writes the header to `out`.
    ///
    /// # Errors
    /// Writing to `out` failed.
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.write_all(&header)?;
        let mut totals = DumpTotals::default();
        totals.add_body(&header);
        Ok(DumpWriter {
            out,
            payload: Vec::with_capacity(CHUNK_PAYLOAD_BYTES_MAX),
            payload_pairs: 0,
            totals,
            last_key: None,
        })
    }

    /// Adds a pair; writes the chunk being filled first if the pair does not
    /// fit in it.
    ///
    /// # Errors
    /// Writing to `out` failed.
    ///
    /// # Panics
    /// If `key` or `value` is over 255 bytes, or `key` is not after the
    /// previous key: the caller checks what the store returned.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        assert!(
            key.len() <= SHORT_STRING_LEN_MAX && value.len() <= SHORT_STRING_LEN_MAX,
            "a key of {} bytes or a value of {} bytes",
            key.len(),
            value.len()
        );
        assert!(self.last_key.as_deref().is_none_or(|last| last < key), "keys pushed out of order");
        let pair_len = PAIR_LEN_MIN + key.len() + value.len();
        if self.payload.len() + pair_len > CHUNK_PAYLOAD_BYTES_MAX {
            self.write_chunk()?;
        }
        self.payload.push(key.len() as u8);
        self.payload.extend_from_slice(key);
        self.payload.push(value.len() as u8);
        self.payload.extend_from_slice(value);
        self.payload_pairs += 1;
        self.totals.pair_count += 1;
        self.totals.key_value_bytes += (key.len() + value.len()) as u64;
        let last_key = self.last_key.get_or_insert_with(Vec::new);
        last_key.clear();
        last_key.extend_from_slice(key);
        Ok(())
    }

    /// Every pair pushed so far (`pair_count`, `key_value_bytes`) and the
    /// body written so far (`body_len`, `body_crc`).
    pub fn totals(&self) -> DumpTotals {
        self.totals
    }

    /// Writes the chunk being filled, if it holds any pair.
    fn write_chunk(&mut self) -> io::Result<()> {
        if self.payload_pairs == 0 {
            return Ok(());
        }
        assert!(self.payload.len() <= CHUNK_PAYLOAD_BYTES_MAX);
        let header =
            encode_chunk_header(self.payload.len() as u32, self.payload_pairs, crc32c::crc32c(&self.payload));
        self.out.write_all(&header)?;
        self.out.write_all(&self.payload)?;
        self.totals.add_body(&header);
        self.totals.add_body(&self.payload);
        self.payload.clear();
        self.payload_pairs = 0;
        Ok(())
    }

    /// Writes the last chunk and the trailer. Returns `out` (neither
    /// flushed nor synced: the caller's job) and what the dump holds.
    ///
    /// # Errors
    /// Writing to `out` failed.
    pub fn finish(mut self) -> io::Result<(W, DumpTotals)> {
        self.write_chunk()?;
        self.out.write_all(&encode_trailer(&self.totals))?;
        Ok((self.out, self.totals))
    }
}

/// Why a dump cannot be read. Offsets are bytes from the file's start.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReadError {
    /// Reading failed: the operating system's error.
    Io {
        /// Where the read started.
        offset: u64,
        /// The error.
        error: io::Error,
    },
    /// The file ends before the trailer does.
    Truncated {
        /// Where it ends: its length.
        file_len: u64,
        /// What it ends in: "header", "chunk or trailer", "chunk header",
        /// "chunk payload", "trailer".
        record: &'static str,
        /// Where that starts.
        record_at: u64,
    },
    /// The bytes are not what the format says.
    Corrupt {
        /// Where the damaged record (or pair) starts.
        offset: u64,
        /// What is wrong, for humans.
        problem: String,
    },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io { offset, error } => write!(f, "reading at byte {offset} failed: {error}"),
            ReadError::Truncated { file_len, record: "chunk or trailer", record_at }
                if file_len == record_at =>
            {
                write!(
                    f,
                    "it is truncated: it ends at byte {file_len}, where a chunk or the trailer should \
                     start (a complete dump ends with a trailer)"
                )
            }
            ReadError::Truncated { file_len, record, record_at } => {
                write!(
                    f,
                    "it is truncated: it ends at byte {file_len}, inside the {record} at byte {record_at}"
                )
            }
            ReadError::Corrupt { offset, problem } => write!(f, "at byte {offset}: {problem}"),
        }
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// One pair of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Where it starts in the file (its key's length byte).
    pub offset: u64,
    /// The key.
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
}

/// One chunk of a dump, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where it starts in the file (its tag).
    pub offset: u64,
    /// Its pairs, in key order: slices of one buffer of its payload.
    pub pairs: Vec<Pair>,
}

/// Reads a dump a chunk at a time, checking everything on the way: the
/// header, each chunk's checksums, framing, pair count and key order, and
/// at the end the trailer against everything read before it.
pub struct DumpReader<R: Read> {
    input: R,
    /// Bytes read so far.
    offset: u64,
    /// What the chunks read so far hold, and the body read so far.
    totals: DumpTotals,
    /// The last key read (a slice of its chunk's payload).
    last_key: Option<Bytes>,
    /// The trailer was read and checked: nothing more to read.
    finished: bool,
    /// An error was returned: reading on would make no sense.
    failed: bool,
}

impl<R: Read> DumpReader<R> {
    /// Reads and checks the header.
    ///
    /// # Errors
    /// The header is not a dump's (of [`FORMAT_VERSION`]), or reading
    /// failed.
    pub fn new(input: R) -> Result<Self, ReadError> {
        let mut reader = DumpReader {
            input,
            offset: 0,
            totals: DumpTotals::default(),
            last_key: None,
            finished: false,
            failed: false,
        };
        let mut header = [0u8; HEADER_LEN];
        reader.read_exact(&mut header, "header", 0)?;
        if header[..8] != MAGIC {
            return Err(ReadError::Corrupt {
                offset: 0,
                problem: format!(
                    "this is not a kivaloo dump: it starts with {}, not {:?}",
                    escape_bytes(&header[..8]),
                    "KVLDDUMP"
                ),
            });
        }
        let version = be_u32(&header, 8);
        if version != FORMAT_VERSION {
            return Err(ReadError::Corrupt {
                offset: 8,
                problem: format!("format version {version} is not supported (only {FORMAT_VERSION})"),
            });
        }
        reader.totals.add_body(&header);
        Ok(reader)
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// What the chunks read so far hold, and the body read so far; once
    /// [`DumpReader::next_chunk`] has returned `None`, the whole dump's,
    /// equal to its trailer's.
    pub fn totals(&self) -> DumpTotals {
        self.totals
    }

    /// The next chunk, checked; `None` once the trailer has been read and
    /// found to match everything before it, with nothing after it.
    ///
    /// # Errors
    /// The file is truncated or corrupt (where and how), or reading failed.
    /// After an error, every later call fails.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, ReadError> {
        if self.failed {
            return Err(ReadError::Corrupt {
                offset: self.offset,
                problem: "reading stopped at an earlier error".to_string(),
            });
        }
        let result = self.read_record();
        self.failed = result.is_err();
        result
    }

    /// Reads `buf.len()` bytes of the `record` at `record_at`.
    fn read_exact(&mut self, buf: &mut [u8], record: &'static str, record_at: u64) -> Result<(), ReadError> {
        let mut got = 0;
        while got < buf.len() {
            match self.input.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(ReadError::Truncated {
                        file_len: self.offset + got as u64,
                        record,
                        record_at,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(ReadError::Io { offset: self.offset + got as u64, error }),
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn read_record(&mut self) -> Result<Option<Chunk>, ReadError> {
        if self.finished {
            return Ok(None);
        }
        let record_at = self.offset;
        let mut tag = [0u8; 4];
        self.read_exact(&mut tag, "chunk or trailer", record_at)?;
        match tag {
            CHUNK_TAG => self.read_chunk(record_at).map(Some),
            TRAILER_TAG => {
                self.read_trailer(record_at)?;
                Ok(None)
            }
            _ => Err(ReadError::Corrupt {
                offset: record_at,
                problem: format!(
                    "a chunk (\"CHNK\") or the trailer (\"TAIL\") should start here, not {}",
                    escape_bytes(&tag)
                ),
            }),
        }
    }

    /// Reads the chunk at `chunk_at`, its tag read.
    fn read_chunk(&mut self, chunk_at: u64) -> Result<Chunk, ReadError> {
        let corrupt = |problem: String| ReadError::Corrupt { offset: chunk_at, problem };
        let mut header = [0u8; CHUNK_HEADER_LEN];
        header[..4].copy_from_slice(&CHUNK_TAG);
        self.read_exact(&mut header[4..], "chunk header", chunk_at)?;
        if crc32c::crc32c(&header[..16]) != be_u32(&header, 16) {
            return Err(corrupt("the chunk header is damaged: its checksum does not match".to_string()));
        }
        let (payload_len, pair_count, payload_crc) =
            (be_u32(&header, 4) as usize, be_u32(&header, 8), be_u32(&header, 12));
        if !(PAIR_LEN_MIN..=CHUNK_PAYLOAD_BYTES_MAX).contains(&payload_len) {
            return Err(corrupt(format!(
                "the chunk's payload of {payload_len} bytes is not in {PAIR_LEN_MIN}..={CHUNK_PAYLOAD_BYTES_MAX}"
            )));
        }
        if pair_count == 0 || pair_count as usize > payload_len / PAIR_LEN_MIN {
            return Err(corrupt(format!(
                "a chunk of {payload_len} bytes cannot hold {pair_count} pairs (1 to one per {PAIR_LEN_MIN} bytes)"
            )));
        }
        let mut payload = vec![0u8; payload_len];
        self.read_exact(&mut payload, "chunk payload", chunk_at)?;
        if crc32c::crc32c(&payload) != payload_crc {
            let payload_at = chunk_at + CHUNK_HEADER_LEN as u64;
            return Err(corrupt(format!(
                "the chunk's pairs (bytes {payload_at}..{}) are damaged: their checksum does not match",
                payload_at + payload_len as u64
            )));
        }
        let payload = Bytes::from(payload);
        let pairs = self.parse_pairs(chunk_at, &payload, pair_count)?;
        self.totals.add_body(&header);
        self.totals.add_body(&payload);
        self.totals.pair_count += pairs.len() as u64;
        self.totals.key_value_bytes +=
            pairs.iter().map(|p| (p.key.len() + p.value.len()) as u64).sum::<u64>();
        Ok(Chunk { offset: chunk_at, pairs })
    }

    /// The `pair_count` pairs of the chunk at `chunk_at` in `payload`,
    /// checked: they fill it exactly, their keys follow every key before.
    fn parse_pairs(
        &mut self,
        chunk_at: u64,
        payload: &Bytes,
        pair_count: u32,
    ) -> Result<Vec<Pair>, ReadError> {
        let payload_at = chunk_at + CHUNK_HEADER_LEN as u64;
        let mut pairs = Vec::with_capacity(pair_count as usize);
        let mut pos = 0;
        while pos < payload.len() {
            let pair_at = payload_at + pos as u64;
            let corrupt =
                |problem: &str| ReadError::Corrupt { offset: pair_at, problem: problem.to_string() };
            let key =
                take_short_string(payload, &mut pos).ok_or_else(|| corrupt("the key runs past its chunk"))?;
            let value = take_short_string(payload, &mut pos)
                .ok_or_else(|| corrupt("the value runs past its chunk"))?;
            if pairs.len() == pair_count as usize {
                return Err(corrupt(&format!(
                    "the chunk at byte {chunk_at} holds more than the {pair_count} pairs its header says"
                )));
            }
            if self.last_key.as_ref().is_some_and(|last| *last >= key) {
                return Err(corrupt(
                    "its key is not after the key before it (a dump's keys are in strictly increasing order)",
                ));
            }
            self.last_key = Some(key.clone());
            pairs.push(Pair { offset: pair_at, key, value });
        }
        if pairs.len() != pair_count as usize {
            return Err(ReadError::Corrupt {
                offset: chunk_at,
                problem: format!(
                    "the chunk's header says {pair_count} pairs, its payload holds {}",
                    pairs.len()
                ),
            });
        }
        Ok(pairs)
    }

    /// Reads the trailer at `trailer_at`, its tag read, checks it against
    /// everything read before, and that nothing follows it.
    fn read_trailer(&mut self, trailer_at: u64) -> Result<(), ReadError> {
        let corrupt = |problem: String| ReadError::Corrupt { offset: trailer_at, problem };
        let mut trailer = [0u8; TRAILER_LEN];
        trailer[..4].copy_from_slice(&TRAILER_TAG);
        self.read_exact(&mut trailer[4..], "trailer", trailer_at)?;
        if crc32c::crc32c(&trailer[..32]) != be_u32(&trailer, 32) {
            return Err(corrupt("the trailer is damaged: its checksum does not match".to_string()));
        }
        let said = DumpTotals {
            pair_count: be_u64(&trailer, 4),
            key_value_bytes: be_u64(&trailer, 12),
            body_len: be_u64(&trailer, 20),
            body_crc: be_u32(&trailer, 28),
        };
        let read = self.totals;
        debug_assert_eq!(read.body_len, trailer_at);
        if said.body_len != read.body_len {
            return Err(corrupt(format!(
                "the trailer says it is at byte {}: chunks are missing or extra",
                said.body_len
            )));
        }
        if said.pair_count != read.pair_count {
            return Err(corrupt(format!(
                "the trailer says {} pairs, the chunks hold {}",
                said.pair_count, read.pair_count
            )));
        }
        if said.key_value_bytes != read.key_value_bytes {
            return Err(corrupt(format!(
                "the trailer says {} bytes of keys and values, the chunks hold {}",
                said.key_value_bytes, read.key_value_bytes
            )));
        }
        if said.body_crc != read.body_crc {
            return Err(corrupt(format!(
                "the checksum of bytes 0..{trailer_at} does not match the trailer's: chunks were changed or \
                 reordered"
            )));
        }
        let end = self.offset;
        let mut after = [0u8; 1];
        match self.read_exact(&mut after, "end", end) {
            Err(ReadError::Truncated { .. }) => {}
            Err(e) => return Err(e),
            Ok(()) => {
                return Err(ReadError::Corrupt {
                    offset: end,
                    problem: "bytes follow the trailer (a dump ends with it)".to_string(),
                })
            }
        }
        self.finished = true;
        Ok(())
    }
}

/// The short string (length byte, bytes) at `*pos` in `payload`, advancing
/// `*pos` past it; `None` if it runs past the end.
fn take_short_string(payload: &Bytes, pos: &mut usize) -> Option<Bytes> {
    let len = usize::from(*payload.get(*pos)?);
    let start = *pos + 1;
    let end = start + len;
    if end > payload.len() {
        return None;
    }
    *pos = end;
    Some(payload.slice(start..end))
}

/// `bytes` as a quoted string with `\xNN` for anything but printable
/// ASCII, for messages.
fn escape_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", crate::cli::escape(bytes))
}

// ---------------------------------------------------------------------------
// Progress
// ---------------------------------------------------------------------------

/// The least time between two updates of the progress line.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// A line on stderr saying how far a command got, rewritten in place, if
/// stderr is a terminal; otherwise nothing.
struct Progress {
    enabled: bool,
    started: Instant,
    /// No update before this.
    next_update: Instant,
    /// Characters of the line on screen (0: none).
    shown_chars: usize,
}

impl Progress {
    /// Starts the clock; shows anything only if stderr is a terminal.
    fn start() -> Progress {
        let now = Instant::now();
        Progress {
            enabled: io::stderr().is_terminal(),
            started: now,
            next_update: now + PROGRESS_INTERVAL,
            shown_chars: 0,
        }
    }

    /// Time since the start.
    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Shows `line(elapsed seconds)` in place of the last line, unless one
    /// was shown less than [`PROGRESS_INTERVAL`] ago.
    fn update(&mut self, line: impl FnOnce(f64) -> String) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if now < self.next_update {
            return;
        }
        self.next_update = now + PROGRESS_INTERVAL;
        let line = line(now.duration_since(self.started).as_secs_f64());
        let chars = line.chars().count();
        let pad = self.shown_chars.saturating_sub(chars);
        // A progress line that cannot be written is not worth failing for.
        let _ = write!(io::stderr(), "\r{line}{:pad$}", "");
        self.shown_chars = chars;
    }

    /// Erases the line, before a message or the end.
    fn clear(&mut self) {
        if self.shown_chars > 0 {
            let _ = write!(io::stderr(), "\r{:width$}\r", "", width = self.shown_chars);
            self.shown_chars = 0;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// `count / seconds`, as a whole number, for messages.
fn per_second(count: u64, seconds: f64) -> u64 {
    if seconds > 0.0 {
        (count as f64 / seconds) as u64
    } else {
        0
    }
}

// ---------------------------------------------------------------------------
// The commands
// ---------------------------------------------------------------------------

/// The arguments of `kivaloo dump`.
#[derive(Args, Debug, Clone)]
pub struct DumpArgs {
    /// The store: a unix socket path, host:port or [ip]:port (where `kivaloo serve --listen`
    /// listens, or a kvlds or mux socket).
    #[arg(long, value_name = "ADDR", default_value = "kivaloo.sock")]
    pub socket: String,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// The dump to write.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The arguments of `kivaloo load`.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// The store: a unix socket path, host:port or [ip]:port (where `kivaloo serve --listen`
    /// listens, or a kvlds or mux socket).
    #[arg(long, value_name = "ADDR", default_value = "kivaloo.sock")]
    pub socket: String,
    /// Only check FILE (format, checksums, counts); connect to no store.
    #[arg(long)]
    pub check: bool,
    /// The dump to read.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The exit status after SIGINT: 128 + its number, as shells report a
/// process killed by it.
pub const EXIT_SIGINT: i32 = 130;
/// The exit status after SIGTERM: 128 + its number.
pub const EXIT_SIGTERM: i32 = 143;

/// A signal that stops `dump` or `load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    fn exit_status(self) -> i32 {
        match self {
            StopSignal::Interrupt => EXIT_SIGINT,
            StopSignal::Terminate => EXIT_SIGTERM,
        }
    }
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        })
    }
}

/// SIGINT and SIGTERM, caught from [`Signals::listen`] on (for the rest of
/// the process: they no longer kill it).
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    /// Starts catching SIGINT and SIGTERM.
    fn listen() -> Result<Signals, Failure> {
        let listen = |kind| {
            signal(kind)
                .map_err(|e| Failure::File(format!("cannot listen for signals: {e}; nothing was done")))
        };
        Ok(Signals {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
        })
    }

    /// The next signal caught.
    async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            Some(()) = self.interrupt.recv() => StopSignal::Interrupt,
            Some(()) = self.terminate.recv() => StopSignal::Terminate,
            else => std::future::pending().await,
        }
    }
}

/// Why `dump` or `load` failed, by exit status.
#[derive(Debug)]
enum Failure {
    /// [`EXIT_USAGE`].
    Usage(String),
    /// [`EXIT_STORE`].
    Store(String),
    /// [`EXIT_OUTPUT`]: writing or reading FILE, or a local failure.
    File(String),
    /// [`EXIT_SIGINT`] or [`EXIT_SIGTERM`].
    Stopped(StopSignal, String),
}

/// Runs `kivaloo dump`: writes every pair of the store to the file. Returns
/// the exit status (see the module docs).
pub fn run_dump(args: &DumpArgs) -> i32 {
    run(|| dump(args))
}

/// Runs `kivaloo load`: checks the file, then stores every pair. Returns
/// the exit status (see the module docs).
pub fn run_load(args: &LoadArgs) -> i32 {
    run(|| load(args))
}

/// Runs `command` on a runtime; prints its summary or its failure.
fn run<F: std::future::Future<Output = Result<String, Failure>>>(command: impl FnOnce() -> F) -> i32 {
    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            // A local failure, like one with FILE.
            log("kivaloo", LogLevel::Error, &format!("cannot start the runtime: {e}; nothing was done"));
            return EXIT_OUTPUT;
        }
    };
    match rt.block_on(command()) {
        Ok(summary) => {
            log("kivaloo", LogLevel::Info, &summary);
            EXIT_DONE
        }
        Err(failure) => {
            let (status, message) = match failure {
                Failure::Usage(m) => (EXIT_USAGE, m),
                Failure::Store(m) => (EXIT_STORE, m),
                Failure::File(m) => (EXIT_OUTPUT, m),
                Failure::Stopped(signal, m) => (signal.exit_status(), m),
            };
            log("kivaloo", LogLevel::Error, &message);
            status
        }
    }
}

/// Connects to the store at `addr`.
async fn connect(addr: &SocketAddr) -> Result<Client, Failure> {
    Client::connect(addr).await.map_err(|e| Failure::Store(connect_failure(addr, &e)))
}

/// What went wrong with the store at `addr`, from a request's error.
fn store_problem(addr: &SocketAddr, e: &Error) -> String {
    match e {
        Error::ConnectionLost { reason, .. } => {
            format!("the connection to the store at {addr} was lost ({reason})")
        }
        Error::Protocol(msg) => format!("the store at {addr} broke the protocol ({msg})"),
        e => format!("the store at {addr} refused a request ({e})"),
    }
}

/// `kivaloo dump`; returns the summary.
async fn dump(args: &DumpArgs) -> Result<String, Failure> {
    let file = args.file.as_path();
    let shown = file.display();
    if !args.force && fs::symlink_metadata(file).is_ok() {
        return Err(Failure::Usage(format!("{shown} exists; --force replaces it")));
    }
    let Some(file_name) = file.file_name() else {
        return Err(Failure::Usage(format!("{shown} does not name a file")));
    };
    let mut temp_name = file_name.to_os_string();
    temp_name.push(format!(".tmp.{}", std::process::id()));
    let temp_path = file.with_file_name(temp_name);
    let mut signals = Signals::listen()?;
    // On a signal, `dump_to` is dropped, and with it the temporary file
    // (removed), before the message is written.
    tokio::select! {
        result = dump_to(args, temp_path.clone()) => result,
        signal = signals.recv() => Err(Failure::Stopped(
            signal,
            format!("stopped by {signal}: {shown} was not written (its temporary file {} was removed)", temp_path.display()),
        )),
    }
}

/// `kivaloo dump` once FILE is known to be writable: dumps into `temp_path`
/// and names it FILE.
async fn dump_to(args: &DumpArgs, temp_path: PathBuf) -> Result<String, Failure> {
    let file = args.file.as_path();
    let shown = file.display();
    let addr = SocketAddr::parse(&args.socket);
    let client = connect(&addr).await?;

    let mut temp = TempFile::create(temp_path)?;
    let mut progress = Progress::start();
    let totals = write_pairs(&client, &addr, &temp, &mut progress).await;
    progress.clear();
    let totals = totals.map_err(|failure| match failure {
        Failure::Store(m) => Failure::Store(format!("{m}; {shown} was not written")),
        f => f,
    })?;
    temp.install(file, args.force)?;
    let seconds = progress.elapsed().as_secs_f64();
    Ok(format!(
        "dumped {} pairs ({} bytes of keys and values; the file is {} bytes) to {shown} in {seconds:.2} s \
         ({} pairs/s)",
        totals.pair_count,
        totals.key_value_bytes,
        totals.file_len(),
        per_second(totals.pair_count, seconds)
    ))
}

/// Reads every pair from the store and writes the dump to `temp`, synced.
async fn write_pairs(
    client: &Client,
    addr: &SocketAddr,
    temp: &TempFile,
    progress: &mut Progress,
) -> Result<DumpTotals, Failure> {
    let temp_shown = temp.path.display().to_string();
    let write_failed = |e: io::Error| Failure::File(format!("writing {temp_shown} failed: {e}"));
    let mut writer = DumpWriter::new(&temp.file).map_err(write_failed)?;
    let mut pages = client.range_iter("", "").map_err(|e| Failure::Store(store_problem(addr, &e)))?;
    let mut last_key: Option<Bytes> = None;
    loop {
        let page = pages.next_page().await.map_err(|e| {
            let pairs = writer.totals().pair_count;
            Failure::Store(format!("{} after {pairs} pairs", store_problem(addr, &e)))
        })?;
        let Some(page) = page else { break };
        for (key, value) in page {
            if last_key.as_ref().is_some_and(|last| *last >= key) {
                return Err(Failure::Store(format!(
                    "the store at {addr} returned the key {} after {}: out of order",
                    escape_bytes(&key),
                    escape_bytes(last_key.as_deref().unwrap_or_default())
                )));
            }
            writer.push(&key, &value).map_err(write_failed)?;
            last_key = Some(key);
        }
        let pairs = writer.totals().pair_count;
        progress.update(|seconds| format!("dumping: {pairs} pairs, {} pairs/s", per_second(pairs, seconds)));
    }
    let (file, totals) = writer.finish().map_err(write_failed)?;
    file.sync_all().map_err(|e| Failure::File(format!("syncing {temp_shown} failed: {e}")))?;
    Ok(totals)
}

/// The dump being written, under a temporary name; removed when dropped
/// unless installed.
struct TempFile {
    path: PathBuf,
    file: File,
    /// It has its final name.
    installed: bool,
}

impl TempFile {
    /// Creates `path` (replacing a leftover of a crashed dump of the same
    /// process ID).
    fn create(path: PathBuf) -> Result<TempFile, Failure> {
        let open = || File::options().write(true).create_new(true).open(&path);
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = fs::remove_file(&path);
                open()
            }
            other => other,
        }
        .map_err(|e| Failure::File(format!("cannot create {}: {e}", path.display())))?;
        Ok(TempFile { path, file, installed: false })
    }

    /// Gives the (complete, synced) file the name `file`, replacing it only
    /// if `replace`, and syncs the directory.
    fn install(&mut self, file: &Path, replace: bool) -> Result<(), Failure> {
        let (temp, shown) = (self.path.as_path(), file.display());
        let exists = || Failure::Usage(format!("{shown} appeared while dumping; it was not replaced"));
        let install_failed = |e: io::Error| Failure::File(format!("cannot name the dump {shown}: {e}"));
        if replace {
            fs::rename(temp, file).map_err(install_failed)?;
        } else {
            match fs::hard_link(temp, file) {
                Ok(()) => {
                    // FILE is complete; a leftover temporary name is only
                    // untidy.
                    if let Err(e) = fs::remove_file(temp) {
                        log("kivaloo", LogLevel::Warn, &format!("cannot remove {}: {e}", temp.display()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
                // No hard links on this file system: check, then rename.
                Err(_) if fs::symlink_metadata(file).is_ok() => return Err(exists()),
                Err(_) => fs::rename(temp, file).map_err(install_failed)?,
            }
        }
        self.installed = true;
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
            Failure::File(format!(
                "the dump is complete in {shown}, but syncing its directory {} failed ({e}): a crash \
                 could lose its name",
                dir.display()
            ))
        })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.installed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The least bytes of the file between two checkpoints of `load`: the
/// second pass compares what it read again with the first pass at a chunk
/// boundary at least this far from the previous one, before it sends any
/// pair of the chunks in between. Half a full chunk, so that each chunk of
/// a dump `kivaloo dump` wrote is compared on its own.
pub const CHECKPOINT_BYTES_MIN: usize = CHUNK_PAYLOAD_BYTES_MAX / 2;

/// What the first pass of `load` read up to a chunk boundary: how far,
/// and the CRC-32C of those bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checkpoint {
    body_len: u64,
    body_crc: u32,
}

impl Checkpoint {
    /// A checkpoint at the chunk boundary `totals` reached, if it is
    /// [`CHECKPOINT_BYTES_MIN`] from the previous one (at `previous`).
    fn due(previous: u64, totals: &DumpTotals) -> Option<Checkpoint> {
        (totals.body_len - previous >= CHECKPOINT_BYTES_MIN as u64)
            .then_some(Checkpoint { body_len: totals.body_len, body_crc: totals.body_crc })
    }
}

/// What the first pass of `load` found.
struct Checked {
    totals: DumpTotals,
    /// The longest key's length, and where its pair starts.
    longest_key: (usize, u64),
    /// The longest value's length, and where its pair starts.
    longest_value: (usize, u64),
    /// In file order.
    checkpoints: Vec<Checkpoint>,
}

/// What says whether FILE was written to, without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

impl FileStamp {
    fn of(metadata: &fs::Metadata) -> FileStamp {
        FileStamp {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
}

/// Pairs sent and acknowledged by the second pass of `load`, for the
/// message after a signal.
#[derive(Default)]
struct LoadCounts {
    sent: Cell<u64>,
    acknowledged: Cell<u64>,
}

/// `kivaloo load`; returns the summary.
async fn load(args: &LoadArgs) -> Result<String, Failure> {
    let shown = args.file.display();
    let not_regular = || Failure::Usage(format!("{shown} is not a regular file (load reads it twice)"));
    // Before opening it: opening a FIFO would wait for a writer.
    let path_metadata =
        fs::metadata(&args.file).map_err(|e| Failure::Usage(format!("cannot open {shown}: {e}")))?;
    if !path_metadata.is_file() {
        return Err(not_regular());
    }
    let file = File::open(&args.file).map_err(|e| Failure::Usage(format!("cannot open {shown}: {e}")))?;
    // Again: FILE may have been replaced in between.
    let metadata = file.metadata().map_err(|e| Failure::Usage(format!("cannot use {shown}: {e}")))?;
    if !metadata.is_file() {
        return Err(not_regular());
    }
    let opened = FileStamp::of(&metadata);
    let checked = check(&file, opened.len).map_err(|e| match e {
        ReadError::Io { offset, error } => {
            Failure::File(format!("reading {shown} failed at byte {offset}: {error}; nothing was loaded"))
        }
        e => Failure::Usage(format!("{shown} is not a complete, valid dump: {e}; nothing was loaded")),
    })?;
    let totals = checked.totals;
    if args.check {
        return Ok(format!(
            "{shown} is a complete dump: {} pairs, {} bytes of keys and values, {} bytes",
            totals.pair_count,
            totals.key_value_bytes,
            totals.file_len()
        ));
    }

    let mut signals = Signals::listen()?;
    let counts = LoadCounts::default();
    tokio::select! {
        result = load_checked(args, &file, &opened, &checked, &counts) => result,
        signal = signals.recv() => {
            let (sent, acknowledged) = (counts.sent.get(), counts.acknowledged.get());
            let total = totals.pair_count;
            Err(Failure::Stopped(signal, if sent == 0 {
                format!("stopped by {signal}; nothing was loaded")
            } else {
                format!(
                    "stopped by {signal} after {sent} of {total} pairs were sent, {acknowledged} of them \
                     acknowledged (the others may or may not have been stored); SET is idempotent: run the \
                     same load again to finish it"
                )
            }))
        }
    }
}

/// `kivaloo load` once the first pass has found `file` (`opened` when it
/// was opened) to be a complete, valid dump: checks the store's limits,
/// then stores every pair.
async fn load_checked(
    args: &LoadArgs,
    file: &File,
    opened: &FileStamp,
    checked: &Checked,
    counts: &LoadCounts,
) -> Result<String, Failure> {
    let shown = args.file.display();
    let totals = checked.totals;
    let addr = SocketAddr::parse(&args.socket);
    let client = connect(&addr).await?;
    let (key_len_max, value_len_max) = client
        .params()
        .await
        .map_err(|e| Failure::Store(format!("{}; nothing was loaded", store_problem(&addr, &e))))?;
    let limits = (key_len_max as usize, value_len_max as usize);
    for (what, (len, at), limit) in
        [("key", checked.longest_key, limits.0), ("value", checked.longest_value, limits.1)]
    {
        if len > limit {
            return Err(Failure::Usage(format!(
                "{shown} holds a {what} of {len} bytes (the pair at byte {at}), over the limit of {limit} of \
                 the store at {addr}; nothing was loaded"
            )));
        }
    }

    let now = file
        .metadata()
        .map(|m| FileStamp::of(&m))
        .map_err(|e| Failure::File(format!("cannot use {shown} again: {e}; nothing was loaded")))?;
    if now != *opened {
        return Err(Failure::File(format!(
            "{shown} changed after it was checked (its length or modification time is not what it was); \
             nothing was loaded"
        )));
    }
    let mut reading = file;
    reading
        .seek(SeekFrom::Start(0))
        .map_err(|e| Failure::File(format!("cannot read {shown} again: {e}; nothing was loaded")))?;
    let mut progress = Progress::start();
    let stored = store_pairs(&client, file, checked, limits, &mut progress, counts).await;
    progress.clear();
    let (total, acknowledged) = (totals.pair_count, counts.acknowledged.get());
    match stored {
        Stored::All => {}
        Stored::StoreFailed { error } => {
            return Err(Failure::Store(format!(
                "{} after {acknowledged} of {total} pairs were stored; SET is idempotent: run the same \
                 load again to finish it",
                store_problem(&addr, &error)
            )))
        }
        Stored::Reread(RereadError::Changed(problem)) => {
            return Err(Failure::File(format!(
                "{shown} changed after it was checked ({problem}); {acknowledged} of {total} pairs were \
                 stored before that was noticed, none from the part that changed"
            )))
        }
        Stored::Reread(RereadError::Read { offset, error }) => {
            return Err(Failure::File(format!(
                "reading {shown} failed at byte {offset}: {error}; {acknowledged} of {total} pairs were \
                 stored"
            )))
        }
    }
    let seconds = progress.elapsed().as_secs_f64();
    Ok(format!(
        "loaded {total} pairs ({} bytes of keys and values) from {shown} into the store at {addr} in \
         {seconds:.2} s ({} pairs/s)",
        totals.key_value_bytes,
        per_second(total, seconds)
    ))
}

/// The first pass of `load`: reads and checks all of `input` (of
/// `file_len` bytes, for the progress line), and records the checkpoints.
fn check(input: impl Read, file_len: u64) -> Result<Checked, ReadError> {
    let mut progress = Progress::start();
    let mut reader = DumpReader::new(BufReader::with_capacity(CHUNK_PAYLOAD_BYTES_MAX, input))?;
    let mut checked = Checked {
        totals: DumpTotals::default(),
        longest_key: (0, 0),
        longest_value: (0, 0),
        checkpoints: Vec::new(),
    };
    let mut previous_checkpoint = 0;
    while let Some(chunk) = reader.next_chunk()? {
        for pair in &chunk.pairs {
            if pair.key.len() > checked.longest_key.0 {
                checked.longest_key = (pair.key.len(), pair.offset);
            }
            if pair.value.len() > checked.longest_value.0 {
                checked.longest_value = (pair.value.len(), pair.offset);
            }
        }
        if let Some(checkpoint) = Checkpoint::due(previous_checkpoint, &reader.totals()) {
            checked.checkpoints.push(checkpoint);
            previous_checkpoint = checkpoint.body_len;
        }
        let (pairs, done_bytes) = (reader.totals().pair_count, reader.offset());
        progress.update(|_| {
            let percent = (done_bytes * 100).checked_div(file_len).unwrap_or(0);
            format!("checking: {pairs} pairs ({percent}% of the file)")
        });
    }
    checked.totals = reader.totals();
    Ok(checked)
}

/// Why the second pass of `load` stopped reading.
#[derive(Debug)]
enum RereadError {
    /// Reading failed.
    Read { offset: u64, error: io::Error },
    /// The file is not what the first pass checked.
    Changed(String),
}

impl From<ReadError> for RereadError {
    fn from(e: ReadError) -> RereadError {
        match e {
            ReadError::Io { offset, error } => RereadError::Read { offset, error },
            e => RereadError::Changed(e.to_string()),
        }
    }
}

/// The second pass of `load`'s reading: the file, read again a group of
/// chunks at a time, each group compared with the first pass's checkpoint
/// at its end before it is returned.
struct Reread<'a, R: Read> {
    reader: DumpReader<R>,
    checked: &'a Checked,
    /// The next checkpoint, in `checked.checkpoints`.
    next: usize,
    /// Where the last checkpoint passed is (0: none yet).
    previous: u64,
    /// The trailer was read and matched.
    finished: bool,
    /// An error was returned.
    failed: bool,
}

impl<'a, R: Read> Reread<'a, R> {
    /// Reads and checks the header of `input`, which the first pass found
    /// to be what `checked` says.
    fn new(input: R, checked: &'a Checked) -> Result<Self, RereadError> {
        let reader = DumpReader::new(input)?;
        Ok(Reread { reader, checked, next: 0, previous: 0, finished: false, failed: false })
    }

    /// The chunks up to the next checkpoint (or to the trailer), checked
    /// again and found to be what the first pass read: every byte from the
    /// file's start to their end has the CRC the first pass recorded there.
    /// `None` after the last.
    ///
    /// # Errors
    /// Reading failed, or the file is not what the first pass checked: no
    /// chunk of the group is returned. After an error, every later call
    /// fails.
    fn next_group(&mut self) -> Result<Option<Vec<Chunk>>, RereadError> {
        if self.failed {
            return Err(RereadError::Changed("reading stopped at an earlier error".into()));
        }
        let result = self.read_group();
        self.failed = result.is_err();
        result
    }

    fn read_group(&mut self) -> Result<Option<Vec<Chunk>>, RereadError> {
        if self.finished {
            return Ok(None);
        }
        let mut group = Vec::new();
        loop {
            let Some(chunk) = self.reader.next_chunk()? else {
                // The trailer matched the chunks read again; they must be
                // the ones checked.
                if self.reader.totals() != self.checked.totals || self.next != self.checked.checkpoints.len()
                {
                    return Err(RereadError::Changed("it holds other pairs now: its trailer differs".into()));
                }
                self.finished = true;
                return Ok((!group.is_empty()).then_some(group));
            };
            group.push(chunk);
            let totals = self.reader.totals();
            let Some(found) = Checkpoint::due(self.previous, &totals) else { continue };
            let expected = self.checked.checkpoints.get(self.next).copied();
            if expected != Some(found) {
                let (from, to) = (self.previous, found.body_len);
                return Err(RereadError::Changed(match expected {
                    Some(e) if e.body_len == to => format!("bytes {from}..{to} are not the ones checked"),
                    _ => format!("its chunks are not where they were: one ends at byte {to} now"),
                }));
            }
            self.next += 1;
            self.previous = found.body_len;
            return Ok(Some(group));
        }
    }
}

/// How the second pass of `load` ended. Every SET sent has been answered
/// or failed.
enum Stored {
    /// Every pair was stored.
    All,
    /// A SET failed: the connection was lost (or the store broke the
    /// protocol).
    StoreFailed { error: Error },
    /// Reading the file failed, or it is not what the first pass read.
    Reread(RereadError),
}

/// The second pass of `load`: reads `file` again from its start, SETs
/// every pair with up to the client's window in flight, and checks that the
/// file is still the one `checked` describes: a group of chunks at a time,
/// before sending any pair of it. Counts in `counts` the pairs sent and
/// acknowledged.
async fn store_pairs(
    client: &Client,
    file: &File,
    checked: &Checked,
    (key_len_max, value_len_max): (usize, usize),
    progress: &mut Progress,
    counts: &LoadCounts,
) -> Stored {
    let total = checked.totals.pair_count;
    let window = client.in_flight_max();
    let mut in_flight = FuturesUnordered::new();
    let mut store_error: Option<Error> = None;
    let mut file_problem: Option<RereadError> = None;
    let mut reread = match Reread::new(BufReader::with_capacity(CHUNK_PAYLOAD_BYTES_MAX, file), checked) {
        Ok(reread) => reread,
        Err(e) => return Stored::Reread(e),
    };
    'groups: loop {
        let group = match reread.next_group() {
            Ok(Some(group)) => group,
            Ok(None) => break,
            Err(e) => {
                file_problem = Some(e);
                break;
            }
        };
        for Pair { offset, key, value } in group.into_iter().flat_map(|chunk| chunk.pairs) {
            if key.len() > key_len_max || value.len() > value_len_max {
                let problem = format!("the pair at byte {offset} is over the store's limits now");
                file_problem = Some(RereadError::Changed(problem));
                break 'groups;
            }
            while in_flight.len() >= window {
                let Some(result) = in_flight.next().await else { break };
                tally(result, counts, &mut store_error);
            }
            if store_error.is_some() {
                break 'groups;
            }
            let client = client.clone();
            in_flight.push(async move { client.set(key, value).await });
            counts.sent.set(counts.sent.get() + 1);
            progress.update(|seconds| {
                let acknowledged = counts.acknowledged.get();
                format!(
                    "loading: {acknowledged} of {total} pairs ({}%), {} pairs/s",
                    acknowledged * 100 / total.max(1),
                    per_second(acknowledged, seconds)
                )
            });
        }
    }
    // The pairs sent came from groups that were checked: let them finish.
    while let Some(result) = in_flight.next().await {
        tally(result, counts, &mut store_error);
    }
    match (store_error, file_problem) {
        (Some(error), _) => Stored::StoreFailed { error },
        (None, Some(problem)) => Stored::Reread(problem),
        (None, None) => Stored::All,
    }
}

/// Counts a SET's answer: one more acknowledged, or the first error.
fn tally(result: Result<(), Error>, counts: &LoadCounts, store_error: &mut Option<Error>) {
    match result {
        Ok(()) => counts.acknowledged.set(counts.acknowledged.get() + 1),
        Err(e) => {
            store_error.get_or_insert(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    /// A dump of `pairs` (in key order), as bytes.
    fn dump_of(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut writer = DumpWriter::new(Vec::new()).unwrap();
        for (k, v) in pairs {
            writer.push(k, v).unwrap();
        }
        let (bytes, totals) = writer.finish().unwrap();
        assert_eq!(totals.file_len(), bytes.len() as u64);
        bytes
    }

    /// Every pair of the dump `bytes`, and its totals.
    fn read_all(bytes: &[u8]) -> Result<(Pairs, Vec<u64>, DumpTotals), ReadError> {
        let mut reader = DumpReader::new(bytes)?;
        let (mut pairs, mut chunk_offsets) = (Vec::new(), Vec::new());
        while let Some(chunk) = reader.next_chunk()? {
            chunk_offsets.push(chunk.offset);
            pairs.extend(chunk.pairs.into_iter().map(|p| (p.key.to_vec(), p.value.to_vec())));
        }
        Ok((pairs, chunk_offsets, reader.totals()))
    }

    /// `n` pairs of every size up to 255 + 255 bytes, binary, in key order.
    fn sample_pairs(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs: Vec<_> = (0..n)
            .map(|i| {
                let mut key = (i as u32).to_be_bytes().to_vec();
                key.resize(4 + i % 252, (i % 256) as u8);
                let value = vec![(i * 7 % 256) as u8; i * 31 % 256];
                (key, value)
            })
            .collect();
        pairs.sort();
        pairs
    }

    #[test]
    fn the_crc_is_the_standard_crc32c() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn an_empty_dump_is_a_header_and_a_trailer() {
        let bytes = dump_of(&[]);
        assert_eq!(bytes.len(), HEADER_LEN + TRAILER_LEN);
        assert_eq!(&bytes[..12], b"KVLDDUMP\0\0\0\x01");
        assert_eq!(&bytes[12..16], b"TAIL");
        // Counts 0, body 12 bytes, its CRC.
        assert_eq!(&bytes[16..32], &[0; 16]);
        assert_eq!(be_u64(&bytes, 32), 12);
        assert_eq!(be_u32(&bytes, 40), crc32c::crc32c(&bytes[..12]));
        assert_eq!(be_u32(&bytes, 44), crc32c::crc32c(&bytes[12..44]));
        let (pairs, chunks, totals) = read_all(&bytes).unwrap();
        assert!(pairs.is_empty() && chunks.is_empty());
        assert_eq!(
            totals,
            DumpTotals { pair_count: 0, key_value_bytes: 0, body_len: 12, body_crc: be_u32(&bytes, 40) }
        );
    }

    #[test]
    fn one_pair_is_laid_out_as_documented() {
        let bytes = dump_of(&[(b"k".to_vec(), b"vv".to_vec())]);
        let chunk = &bytes[HEADER_LEN..];
        assert_eq!(&chunk[..4], b"CHNK");
        assert_eq!(be_u32(chunk, 4), 5);
        assert_eq!(be_u32(chunk, 8), 1);
        assert_eq!(&chunk[20..25], b"\x01k\x02vv");
        assert_eq!(be_u32(chunk, 12), crc32c::crc32c(b"\x01k\x02vv"));
        assert_eq!(be_u32(chunk, 16), crc32c::crc32c(&chunk[..16]));
        let trailer = &bytes[HEADER_LEN + 25..];
        assert_eq!(trailer.len(), TRAILER_LEN);
        assert_eq!((be_u64(trailer, 4), be_u64(trailer, 12), be_u64(trailer, 20)), (1, 3, 37));
    }

    #[test]
    fn pairs_round_trip_through_full_chunks() {
        let mut pairs = sample_pairs(3000);
        // The extremes: an empty key and value, 255 bytes each.
        pairs.insert(0, (Vec::new(), Vec::new()));
        pairs.push((vec![0xff; 255], vec![0xfe; 255]));
        let bytes = dump_of(&pairs);
        let (read, chunks, totals) = read_all(&bytes).unwrap();
        assert_eq!(read, pairs);
        assert!(chunks.len() > 5, "{} chunks", chunks.len());
        assert_eq!(totals.pair_count, pairs.len() as u64);
        assert_eq!(totals.key_value_bytes, pairs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum());
        // Every chunk but the last is as full as the next pair allows.
        let mut reader = DumpReader::new(&bytes[..]).unwrap();
        let mut chunk_lens = Vec::new();
        while let Some(chunk) = reader.next_chunk().unwrap() {
            chunk_lens.push(chunk.pairs.iter().map(|p| 2 + p.key.len() + p.value.len()).sum::<usize>());
        }
        for len in &chunk_lens[..chunk_lens.len() - 1] {
            assert!(*len > CHUNK_PAYLOAD_BYTES_MAX - 512 && *len <= CHUNK_PAYLOAD_BYTES_MAX, "{len}");
        }
        // Reading is the same whatever the reads return at a time.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(7);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut reader = DumpReader::new(Dribble(&bytes)).unwrap();
        let mut count = 0;
        while let Some(chunk) = reader.next_chunk().unwrap() {
            count += chunk.pairs.len();
        }
        assert_eq!(count, pairs.len());
        assert_eq!(reader.totals(), totals);
    }

    #[test]
    #[should_panic(expected = "keys pushed out of order")]
    fn the_writer_refuses_keys_out_of_order() {
        let mut writer = DumpWriter::new(Vec::new()).unwrap();
        writer.push(b"b", b"").unwrap();
        writer.push(b"a", b"").unwrap();
    }

    /// The error reading `bytes`.
    #[track_caller]
    fn error_of(bytes: &[u8]) -> ReadError {
        match read_all(bytes) {
            Ok((pairs, ..)) => panic!("read {} pairs from a bad dump", pairs.len()),
            Err(e) => e,
        }
    }

    #[test]
    fn every_truncation_is_found_and_located() {
        let bytes = dump_of(&sample_pairs(600));
        let (_, chunks, _) = read_all(&bytes).unwrap();
        assert!(chunks.len() >= 2);
        let trailer_at = bytes.len() - TRAILER_LEN;
        // Every length up to the whole file but one: the end of each record
        // and a few bytes either side.
        let mut cuts: Vec<usize> =
            vec![0, 1, 11, 12, 13, 31, 32, 33, trailer_at, trailer_at + 1, bytes.len() - 1];
        for &at in &chunks {
            cuts.extend([at as usize - 1, at as usize, at as usize + 1, at as usize + 19, at as usize + 20]);
        }
        for cut in cuts {
            match error_of(&bytes[..cut]) {
                ReadError::Truncated { file_len, record_at, record } => {
                    assert_eq!(file_len, cut as u64);
                    assert!(record_at <= file_len, "{cut}: {record} at {record_at}");
                }
                e => panic!("cut at {cut}: {e}"),
            }
        }
        // At a chunk boundary, and exactly before the trailer: no trailer.
        for at in [chunks[1] as usize, trailer_at] {
            let e = error_of(&bytes[..at]);
            assert_eq!(
                e.to_string(),
                format!(
                    "it is truncated: it ends at byte {at}, where a chunk or the trailer should start (a \
                     complete dump ends with a trailer)"
                )
            );
        }
        assert_eq!(
            error_of(&bytes[..trailer_at + 10]).to_string(),
            format!(
                "it is truncated: it ends at byte {}, inside the trailer at byte {trailer_at}",
                trailer_at + 10
            )
        );
        assert_eq!(
            error_of(&bytes[..chunks[1] as usize + 100]).to_string(),
            format!(
                "it is truncated: it ends at byte {}, inside the chunk payload at byte {}",
                chunks[1] + 100,
                chunks[1]
            )
        );
    }

    #[test]
    fn every_flipped_bit_is_found() {
        let bytes = dump_of(&sample_pairs(40));
        // Every bit of a small dump (a single chunk): never read as good.
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let _ = error_of(&bad);
        }
    }

    #[test]
    fn a_flipped_bit_is_reported_where_it_is() {
        let bytes = dump_of(&sample_pairs(600));
        let (_, chunks, _) = read_all(&bytes).unwrap();
        let trailer_at = bytes.len() - TRAILER_LEN;
        let flipped = |at: usize| {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            error_of(&bad).to_string()
        };
        let second = chunks[1] as usize;
        // In a pair of the second chunk.
        let e = flipped(second + 100);
        assert!(
            e.starts_with(&format!("at byte {second}: the chunk's pairs (bytes {}..", second + 20)),
            "{e}"
        );
        assert!(e.contains("damaged"), "{e}");
        // In its header: the length, the count, the CRCs.
        for field_at in [4, 8, 12, 16] {
            let e = flipped(second + field_at + 3);
            assert_eq!(
                e,
                format!("at byte {second}: the chunk header is damaged: its checksum does not match")
            );
        }
        // Its tag.
        assert!(flipped(second).starts_with(&format!("at byte {second}: a chunk (\"CHNK\") or the trailer")));
        // In the trailer: a count, the body's CRC, the trailer's CRC.
        for field_at in [4, 12, 20, 28, 35] {
            let e = flipped(trailer_at + field_at);
            assert_eq!(
                e,
                format!("at byte {trailer_at}: the trailer is damaged: its checksum does not match")
            );
        }
        // In the header.
        assert!(flipped(0).contains("this is not a kivaloo dump"));
        assert!(flipped(11).contains("format version 17 is not supported"));
    }

    /// `bytes` with its trailer recomputed for what its chunks hold, as a
    /// careless tool would write it.
    fn retrailered(bytes: &[u8], pairs_said: u64) -> Vec<u8> {
        let body_len = bytes.len() - TRAILER_LEN;
        let totals = DumpTotals {
            pair_count: pairs_said,
            key_value_bytes: be_u64(bytes, body_len + 12),
            body_len: body_len as u64,
            body_crc: crc32c::crc32c(&bytes[..body_len]),
        };
        [&bytes[..body_len], &encode_trailer(&totals)[..]].concat()
    }

    #[test]
    fn a_trailer_must_match_the_chunks() {
        let bytes = dump_of(&sample_pairs(1000));
        let (_, chunks, totals) = read_all(&bytes).unwrap();
        assert!(chunks.len() >= 3);
        let trailer_at = bytes.len() - TRAILER_LEN;
        // A pair too many, with good checksums.
        let e = error_of(&retrailered(&bytes, totals.pair_count + 1)).to_string();
        assert_eq!(e, format!("at byte {trailer_at}: the trailer says 1001 pairs, the chunks hold 1000"));
        // A chunk removed: the trailer is where the old one said it would
        // not be.
        let (first, second) = (chunks[0] as usize, chunks[1] as usize);
        let removed = [&bytes[..first], &bytes[second..]].concat();
        let e = error_of(&removed).to_string();
        assert!(e.contains(&format!("the trailer says it is at byte {trailer_at}")), "{e}");
        // Two chunks swapped: their keys go backwards.
        let third = chunks[2] as usize;
        let swapped =
            [&bytes[..first], &bytes[second..third], &bytes[first..second], &bytes[third..]].concat();
        let e = error_of(&swapped).to_string();
        assert!(e.contains("is not after the key before it"), "{e}");
        // Bytes after the trailer.
        let e = error_of(&[&bytes[..], b"x"].concat()).to_string();
        assert_eq!(e, format!("at byte {}: bytes follow the trailer (a dump ends with it)", bytes.len()));
    }

    #[test]
    fn the_body_checksum_sees_a_chunk_rewritten_with_good_checksums() {
        let bytes = dump_of(&[(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);
        let payload = b"\x01a\x013\x01b\x012";
        assert_eq!(&bytes[HEADER_LEN + CHUNK_HEADER_LEN..][..payload.len()], b"\x01a\x011\x01b\x012");
        let header = encode_chunk_header(payload.len() as u32, 2, crc32c::crc32c(payload));
        let changed =
            [&bytes[..HEADER_LEN], &header[..], payload, &bytes[HEADER_LEN + CHUNK_HEADER_LEN + 8..]]
                .concat();
        let trailer_at = bytes.len() - TRAILER_LEN;
        assert_eq!(
            error_of(&changed).to_string(),
            format!(
                "at byte {trailer_at}: the checksum of bytes 0..{trailer_at} does not match the trailer's: \
                 chunks were changed or reordered"
            )
        );
    }

    #[test]
    fn malformed_chunks_with_good_checksums_are_refused() {
        let chunk = |payload: &[u8], pair_count: u32| {
            let header = encode_chunk_header(payload.len() as u32, pair_count, crc32c::crc32c(payload));
            let body = [&dump_of(&[])[..HEADER_LEN], &header[..], payload].concat();
            error_of(&body).to_string()
        };
        assert!(chunk(b"\x01k\x05v", 1).contains("the value runs past its chunk"));
        assert!(chunk(b"\x03k", 1).contains("the key runs past its chunk"));
        assert!(chunk(b"\x01k\x00\x01l\x00", 1).contains("more than the 1 pairs its header says"));
        assert!(chunk(b"\x01k\x00\x01l\x00", 4).contains("cannot hold 4 pairs"));
        assert!(chunk(b"\x01k\x00\x01l\x00", 3).contains("header says 3 pairs, its payload holds 2"));
        assert!(chunk(b"\x01k\x00\x01l\x00\x01m\x00", 2).contains("holds more than the 2 pairs"));
        assert!(chunk(b"\x01k\x01v", 2).contains("header says 2 pairs, its payload holds 1"));
        assert!(
            chunk(b"\x01k\x00\x01k\x00", 2).contains("at byte 35: its key is not after the key before it")
        );
        assert!(chunk(b"", 1).contains("payload of 0 bytes is not in 2..=65536"));
        // A header saying more than 64 KiB is refused before reading it.
        let header = encode_chunk_header(CHUNK_PAYLOAD_BYTES_MAX as u32 + 1, 1, 0);
        let e = error_of(&[&dump_of(&[])[..HEADER_LEN], &header[..]].concat()).to_string();
        assert!(e.contains("payload of 65537 bytes"), "{e}");
        // An error sticks.
        let mut reader = DumpReader::new(&b"KVLDDUMP\0\0\0\x01junk"[..]).unwrap();
        assert!(reader.next_chunk().is_err());
        assert!(reader.next_chunk().unwrap_err().to_string().contains("stopped at an earlier error"));
    }

    /// A dump whose chunks hold the given pairs, one chunk per element.
    fn dump_of_chunks(chunks: &[Pairs]) -> Vec<u8> {
        let mut bytes = dump_of(&[])[..HEADER_LEN].to_vec();
        let mut totals = DumpTotals::default();
        totals.add_body(&bytes.clone());
        for pairs in chunks {
            let mut payload = Vec::new();
            for (k, v) in pairs {
                payload.push(k.len() as u8);
                payload.extend_from_slice(k);
                payload.push(v.len() as u8);
                payload.extend_from_slice(v);
                totals.pair_count += 1;
                totals.key_value_bytes += (k.len() + v.len()) as u64;
            }
            let header =
                encode_chunk_header(payload.len() as u32, pairs.len() as u32, crc32c::crc32c(&payload));
            for part in [&header[..], &payload[..]] {
                bytes.extend_from_slice(part);
                totals.add_body(part);
            }
        }
        bytes.extend_from_slice(&encode_trailer(&totals));
        bytes
    }

    /// Every group the second pass of `load` reads from `again` after the
    /// first read `checked_bytes`, as the pairs of each; then the error, if
    /// any.
    fn reread(checked_bytes: &[u8], again: impl Read) -> (Vec<Pairs>, Option<RereadError>) {
        let checked = check(checked_bytes, checked_bytes.len() as u64).unwrap();
        let mut groups = Vec::new();
        let mut reread = match Reread::new(again, &checked) {
            Ok(reread) => reread,
            Err(e) => return (groups, Some(e)),
        };
        loop {
            match reread.next_group() {
                Ok(Some(group)) => groups.push(
                    group
                        .into_iter()
                        .flat_map(|c| c.pairs)
                        .map(|p| (p.key.to_vec(), p.value.to_vec()))
                        .collect(),
                ),
                Ok(None) => return (groups, None),
                Err(e) => {
                    // It sticks.
                    assert!(reread.next_group().is_err());
                    return (groups, Some(e));
                }
            }
        }
    }

    #[test]
    fn the_second_pass_returns_every_pair_a_group_at_a_time() {
        // Full chunks: a group each.
        let pairs = sample_pairs(3000);
        let bytes = dump_of(&pairs);
        let (_, chunks, _) = read_all(&bytes).unwrap();
        let checked = check(&bytes[..], bytes.len() as u64).unwrap();
        let (groups, error) = reread(&bytes, &bytes[..]);
        assert!(error.is_none(), "{error:?}");
        assert_eq!(groups.len(), chunks.len());
        assert_eq!(groups.concat(), pairs);
        // One per chunk, but the last if it is under 32 KiB (the trailer
        // checks it).
        let last_chunk_len = bytes.len() - TRAILER_LEN - *chunks.last().unwrap() as usize;
        let last_checked = usize::from(last_chunk_len >= CHECKPOINT_BYTES_MIN);
        assert_eq!(checked.checkpoints.len(), chunks.len() - 1 + last_checked);

        // Small chunks (about 1 KiB): grouped by at least 32 KiB.
        let small: Vec<Pairs> = sample_pairs(2000).chunks(5).map(|c| c.to_vec()).collect();
        let bytes = dump_of_chunks(&small);
        let checked = check(&bytes[..], bytes.len() as u64).unwrap();
        let (groups, error) = reread(&bytes, &bytes[..]);
        assert!(error.is_none(), "{error:?}");
        assert_eq!(groups.concat(), small.concat());
        assert!(groups.len() >= 3 && groups.len() < small.len() / 10, "{} groups", groups.len());
        let mut previous = 0;
        for c in &checked.checkpoints {
            let step = c.body_len - previous;
            assert!(step >= CHECKPOINT_BYTES_MIN as u64 && step < 3 * CHECKPOINT_BYTES_MIN as u64, "{step}");
            previous = c.body_len;
        }

        // An empty dump: no group.
        let (groups, error) = reread(&dump_of(&[]), &dump_of(&[])[..]);
        assert!(groups.is_empty() && error.is_none());
    }

    #[test]
    fn the_second_pass_returns_nothing_of_a_group_that_changed_nor_after() {
        let pairs = sample_pairs(3000);
        let bytes = dump_of(&pairs);
        let (_, chunks, _) = read_all(&bytes).unwrap();
        assert!(chunks.len() >= 4);

        // A whole other valid dump of the same length (one value changed in
        // the first chunk): nothing at all.
        let mut other = pairs.clone();
        other[3].1[0] ^= 1;
        let other_bytes = dump_of(&other);
        assert_eq!(other_bytes.len(), bytes.len());
        let (groups, error) = reread(&bytes, &other_bytes[..]);
        assert!(groups.is_empty(), "{} groups returned", groups.len());
        let end = chunks[1];
        match error {
            Some(RereadError::Changed(problem)) => {
                assert_eq!(problem, format!("bytes 0..{end} are not the ones checked"))
            }
            e => panic!("{e:?}"),
        }
        // Another dump altogether (other pairs, another length).
        let (groups, error) = reread(&bytes, &dump_of(&sample_pairs(2500)[7..])[..]);
        assert!(groups.is_empty(), "{} groups returned", groups.len());
        assert!(matches!(error, Some(RereadError::Changed(_))), "{error:?}");

        // A value changed in the third chunk: the first two groups only.
        // The pairs of the first two chunks.
        let second_chunk_pairs = {
            let mut reader = DumpReader::new(&bytes[..]).unwrap();
            (0..2).map(|_| reader.next_chunk().unwrap().unwrap().pairs.len()).sum::<usize>()
        };
        let mut third_changed = pairs.clone();
        third_changed[second_chunk_pairs + 1].1[0] ^= 1;
        let (groups, error) = reread(&bytes, &dump_of(&third_changed)[..]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups.concat(), pairs[..second_chunk_pairs]);
        let (from, to) = (chunks[2], chunks[3]);
        match error {
            Some(RereadError::Changed(problem)) => {
                assert_eq!(problem, format!("bytes {from}..{to} are not the ones checked"))
            }
            e => panic!("{e:?}"),
        }

        // Cut: the groups before the cut, then the truncation.
        let (groups, error) = reread(&bytes, &bytes[..chunks[2] as usize + 100]);
        assert_eq!(groups.concat(), pairs[..second_chunk_pairs]);
        match error {
            Some(RereadError::Changed(problem)) => assert!(problem.contains("truncated"), "{problem}"),
            e => panic!("{e:?}"),
        }

        // The last group has no checkpoint after it when it is under 32
        // KiB: the trailer checks it. A value changed in its last chunk:
        // nothing of it.
        let small: Vec<Pairs> = sample_pairs(2000).chunks(5).map(|c| c.to_vec()).collect();
        let bytes = dump_of_chunks(&small);
        let checked = check(&bytes[..], bytes.len() as u64).unwrap();
        let last_checkpoint = checked.checkpoints.last().unwrap().body_len;
        let trailer_at = (bytes.len() - TRAILER_LEN) as u64;
        assert!(trailer_at - last_checkpoint < CHECKPOINT_BYTES_MIN as u64);
        let mut last_changed = small.clone();
        last_changed.last_mut().unwrap()[0].1[0] ^= 1;
        let (groups, error) = reread(&bytes, &dump_of_chunks(&last_changed)[..]);
        assert_eq!(groups.len(), checked.checkpoints.len());
        let before_last_group: usize = groups.iter().map(|g| g.len()).sum();
        assert!(before_last_group < small.concat().len() - 5);
        match error {
            Some(RereadError::Changed(problem)) => assert!(problem.contains("trailer differs"), "{problem}"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_read_error_in_the_second_pass_is_an_io_error_with_its_offset() {
        let pairs = sample_pairs(3000);
        let bytes = dump_of(&pairs);
        let (_, chunks, _) = read_all(&bytes).unwrap();
        /// Fails once its second field's bytes have been read.
        struct FailsAt<'a>(&'a [u8], usize);
        impl Read for FailsAt<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.1 == 0 {
                    return Err(io::Error::other("the disk is on fire"));
                }
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                (self.0, self.1) = (&self.0[n..], self.1 - n);
                Ok(n)
            }
        }
        let at = chunks[1] as usize + 1000;
        let (groups, error) = reread(&bytes, FailsAt(&bytes, at));
        assert_eq!(groups.len(), 1);
        match error {
            Some(RereadError::Read { offset, error }) => {
                assert_eq!(offset, at as u64);
                assert_eq!(error.to_string(), "the disk is on fire");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn not_a_dump_is_said_so() {
        assert_eq!(
            error_of(b"key\tvalue\nkey2\tvalue2\n").to_string(),
            "at byte 0: this is not a kivaloo dump: it starts with \"key\\x09valu\", not \"KVLDDUMP\""
        );
        assert_eq!(
            error_of(b"").to_string(),
            "it is truncated: it ends at byte 0, inside the header at byte 0"
        );
    }
}
