//! The sans-IO contract between a node (a pure state machine) and a driver
//! (the tokio runtime in io-shim, or the simulator).
//!
//! A node never performs I/O, reads a clock, sleeps or spawns. The driver
//! feeds it [`Input`]s with the current [`Instant`], drains its
//! [`Output`]s, and wakes it with [`Input::Timeout`] at
//! [`Node::poll_timeout`]. Same inputs, same outputs.

use bytes::Bytes;
use std::fmt;

/// A point in time, in nanoseconds since an arbitrary origin chosen by the
/// driver (the simulator's virtual clock or the runtime's monotonic clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant {
    /// Nanoseconds since the driver's origin.
    pub nanos: u64,
}

impl Instant {
    /// The instant `nanos` nanoseconds after the origin.
    pub const fn from_nanos(nanos: u64) -> Self {
        Instant { nanos }
    }

    /// This instant plus `delay_ns`, saturating.
    pub const fn after_ns(self, delay_ns: u64) -> Self {
        Instant { nanos: self.nanos.saturating_add(delay_ns) }
    }

    /// Nanoseconds from `earlier` to `self` (0 if `earlier` is later).
    pub const fn ns_since(self, earlier: Instant) -> u64 {
        self.nanos.saturating_sub(earlier.nanos)
    }
}

/// A connection, named by the driver when it is accepted. Never reused
/// within one run of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

impl ConnId {
    /// The connection to a node's upstream (kvlds to its lbs, mux to its
    /// kvlds). The driver opens it before it builds the node, so it is open
    /// from the node's first input: bytes on it arrive as
    /// [`Input::Received`], and [`Output::Send`], [`Output::ReadInterest`]
    /// and [`Input::Sent`] work on it as on any connection. If it ends, the
    /// driver reports [`Input::Closed`] for it and never reopens it; a node
    /// that needs its upstream exits. Drivers never give this id to an
    /// accepted connection.
    pub const UPSTREAM: ConnId = ConnId(u64::MAX);
}

/// A disk operation, named by the node when it asks for it; the completion
/// carries the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskOpId(pub u64);

/// A disk operation on the node's own directory. File names are plain
/// names inside that directory (no separators). Operations the node has
/// outstanding at once may complete in any order; a node that needs an
/// order waits for one completion before asking for the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// List the names of the files in the directory.
    List,
    /// Open a file (creating it, empty, if `create` and it is missing) and
    /// report its length. Creating is durable only after [`DiskOp::SyncDir`].
    Open { name: String, create: bool },
    /// Read up to `len` bytes at `offset`. Fewer bytes may come back (a short
    /// read, or the end of the file); none means the end of the file.
    Read { name: String, offset: u64, len: u32 },
    /// Write `data` at `offset`. Not durable until [`DiskOp::SyncFile`]; the
    /// completion may report fewer bytes written (a short write).
    Write { name: String, offset: u64, data: Bytes },
    /// Cut (or extend with zeros) the file to `len` bytes; durable after
    /// [`DiskOp::SyncFile`].
    Truncate { name: String, len: u64 },
    /// fsync the file's data and length.
    SyncFile { name: String },
    /// fsync the directory, making creations and removals durable.
    SyncDir,
    /// Remove a file; durable after [`DiskOp::SyncDir`].
    Remove { name: String },
    /// Drop the file's clean cached pages, so that later reads come from the
    /// device. After a failed fsync an operating system may keep pages that
    /// never reached the device, marked clean; a node recovering from that
    /// must not read them as if they were durable. (Best effort where the
    /// platform only advises, as `posix_fadvise` does.)
    DropCache { name: String },
}

impl DiskOp {
    /// A short name for logs and traces.
    pub fn verb(&self) -> &'static str {
        match self {
            DiskOp::List => "list",
            DiskOp::Open { .. } => "open",
            DiskOp::Read { .. } => "read",
            DiskOp::Write { .. } => "write",
            DiskOp::Truncate { .. } => "truncate",
            DiskOp::SyncFile { .. } => "fsync",
            DiskOp::SyncDir => "fsync-dir",
            DiskOp::Remove { .. } => "remove",
            DiskOp::DropCache { .. } => "drop-cache",
        }
    }
}

/// A successful disk operation's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDone {
    /// [`DiskOp::List`]: the names, in no particular order.
    Listed(Vec<String>),
    /// [`DiskOp::Open`]: the file's length in bytes.
    Opened { len_bytes: u64 },
    /// [`DiskOp::Read`]: the bytes read (possibly fewer than asked).
    Read(Bytes),
    /// [`DiskOp::Write`]: how many bytes were written (possibly fewer).
    Written { len_bytes: u64 },
    /// Truncate, SyncFile, SyncDir, Remove, DropCache: done.
    Done,
}

impl DiskDone {
    /// A short description for logs (without the data).
    pub fn describe(&self) -> String {
        match self {
            DiskDone::Listed(names) => format!("listed {} names", names.len()),
            DiskDone::Opened { len_bytes } => format!("opened, {len_bytes} bytes"),
            DiskDone::Read(data) => format!("read {} bytes", data.len()),
            DiskDone::Written { len_bytes } => format!("wrote {len_bytes} bytes"),
            DiskDone::Done => "done".into(),
        }
    }
}

/// What kind of failure a disk operation met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiskErrorKind {
    /// The file does not exist.
    NotFound,
    /// No space left on the device.
    NoSpace,
    /// An I/O error (EIO and anything else).
    Io,
}

/// A failed disk operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskError {
    /// The kind of failure.
    pub kind: DiskErrorKind,
    /// The operating system's (or simulator's) words.
    pub message: String,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for DiskError {}

/// Why a connection ended, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnClosed {
    /// The peer closed its end (end of stream).
    PeerClosed,
    /// The transport failed (reset, broken pipe...), with the driver's words.
    Failed(String),
}

/// Something that happened to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A client connected to the node's listener.
    Accepted { conn: ConnId },
    /// Bytes arrived on a connection, in order; any split, any size.
    Received { conn: ConnId, data: Bytes },
    /// A connection ended from the peer's side or the transport's. The node
    /// does not send on it again; it gets no `Output::Close` for it.
    Closed { conn: ConnId, reason: ConnClosed },
    /// `len_bytes` of what the node gave in `Output::Send` on `conn` have
    /// been handed to the transport. A node counts what it sent and not yet
    /// heard of here to bound the memory a client that does not read can
    /// make it (and the driver) hold.
    Sent { conn: ConnId, len_bytes: u64 },
    /// A disk operation completed.
    Disk { id: DiskOpId, result: Result<DiskDone, DiskError> },
    /// The instant asked for by [`Node::poll_timeout`] has passed.
    Timeout,
}

/// Log levels for [`Output::Log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

/// Why a node stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReason {
    /// Whether this is a failure (non-zero exit status) or an orderly stop.
    pub failure: bool,
    /// What happened, for the operator.
    pub message: String,
}

/// Something a node wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send bytes on a connection, after everything sent before on it.
    Send { conn: ConnId, data: Bytes },
    /// Close a connection (after flushing what was sent on it); the driver
    /// logs the reason. No `Input::Closed` follows.
    Close { conn: ConnId, reason: String },
    /// Stop (`false`) or resume (`true`) delivering bytes received on a
    /// connection: backpressure when the node's bounded queues are full.
    ReadInterest { conn: ConnId, enabled: bool },
    /// Whether the driver should accept new connections. Nodes start not
    /// accepting; the first `Accepting(true)` means the node is ready.
    Accepting(bool),
    /// Start a disk operation.
    Disk { id: DiskOpId, op: DiskOp },
    /// A message for the operator's log.
    Log { level: LogLevel, message: String },
    /// The node has stopped and takes no more input.
    Exit(ExitReason),
}

/// The interface every node implements and every driver drives.
pub trait Node {
    /// Feeds one input at time `now`. Never blocks, never panics on input
    /// from outside the process.
    fn handle_input(&mut self, now: Instant, input: Input);
    /// Takes the next output, if any. Drivers drain this after every input.
    fn poll_output(&mut self) -> Option<Output>;
    /// The next instant at which the node wants [`Input::Timeout`].
    fn poll_timeout(&self) -> Option<Instant>;
}
