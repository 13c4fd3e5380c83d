//! The deterministic simulator: one u64 seed reproduces a whole run. See
//! `sim/DESIGN.md` for one line per module.

pub mod client;
pub mod coverage;
pub mod enumerate;
pub mod kvlds_workload;
pub mod lbs_workload;
pub mod linearizability;
pub mod link;
pub mod network;
pub mod nightly;
pub mod process;
pub mod rng;
pub mod runner;
pub mod scenario;
pub mod shrink;
pub mod storage;
pub mod tape;
pub mod time;
pub mod trace;
pub mod world;
