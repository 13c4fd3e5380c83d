//! The real runtime of kivaloo's nodes: tokio sockets (unix and TCP), real
//! files with fsync on threads, signals, daemonizing; and the daemons built
//! on it. See `DESIGN.md` in this crate for one line per module.

pub mod addr;
pub mod bench;
pub mod cli;
pub mod client;
pub mod conn;
pub mod daemon;
pub mod dir_lock;
pub mod disk;
pub mod dump;
pub mod humansize;
pub mod runtime;
pub mod serve;
