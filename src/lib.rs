//! `kivaloo`: the wire protocol of a kivaloo-compatible key-value store
//! (packet framing, typed lbs and kvlds messages) and the sans-IO contract
//! shared by every node and driver. See DESIGN.md in this directory for one
//! line per module.
//!
//! Nothing in this crate performs I/O, reads a clock, or uses ambient
//! randomness (checked by `ci/check-sans-io.sh`).

pub mod client;
pub mod contract;
pub mod crc;
pub mod fields;
pub mod kvlds_proto;
pub mod lbs_proto;
pub mod packet;

pub use contract::{
    ConnClosed, ConnId, DiskDone, DiskError, DiskErrorKind, DiskOp, DiskOpId, ExitReason, Input, Instant,
    LogLevel, Node, Output,
};
pub use fields::MessageError;
pub use packet::{FrameError, Packet, PacketDecoder};
