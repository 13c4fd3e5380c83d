//! The space soak: real `kivaloo-lbs` and `kivaloo-kvlds` (fsync on), a
//! fixed key set written once and then updated at random over and over,
//! while the lbs directory's size is sampled every second. Background
//! cleaning must keep it bounded: at most [`SPACE_FACTOR`] times the
//! tree's pages (as lbs records), plus two lbs files. The tree's size is
//! learned at the end by restarting kvlds, whose census after recovery
//! logs it.
//!
//! `cargo test` runs it for [`SOAK_SECONDS_DEFAULT`] seconds; for a longer
//! soak: `KIVALOO_SOAK_SECONDS=300 cargo test --release -p kivaloo-io-shim
//! --test soak -- --nocapture` (the table of samples is printed);
//! `KIVALOO_SOAK_STORAGE_COST` sets kvlds's `-S` (0: no cleaning, which
//! this test must fail).

use std::fs::OpenOptions;
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use kivaloo_io_shim::addr::SocketAddr;
use kivaloo_io_shim::client::Client;

const LBS_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-lbs");
const KVLDS_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-kvlds");

const SOAK_SECONDS_DEFAULT: u64 = 20;
const BLOCK_SIZE: u32 = 4096;
/// lbs's record for a 4096-byte block: data and trailer, rounded up to
/// whole 512-byte sectors.
const RECORD_BYTES: u64 = 4608;
/// lbs `--file-size-min`: small files, so that freed space returns soon.
const FILE_BYTES: u64 = 1 << 20;
/// Distinct keys (40-byte keys and values, as kivaloo's benchmarks).
const KEYS: u64 = 100_000;
/// Requests in flight.
const IN_FLIGHT: usize = 256;
/// kvlds `-S`: see the note on the pace in `nodes/src/kvlds/clean.rs`.
/// Every page of this store is rewritten tens of times a second, which a
/// real store is not; the cost ratio that balances storage against I/O at
/// that rate is correspondingly high.
const STORAGE_COST: &str = "1e8";
const SPACE_FACTOR: f64 = 3.0;

/// A daemon in the foreground; killed and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listening(addr: &str) -> bool {
    if addr.contains('/') {
        UnixStream::connect(addr).is_ok()
    } else {
        TcpStream::connect(addr).is_ok()
    }
}

fn start(bin: &str, args: &[&str], addr: &str, log: &Path) -> Daemon {
    let log = OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("-F").args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    let mut d = Daemon(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !listening(addr) {
        assert!(d.0.try_wait().unwrap().is_none(), "{bin} exited during startup");
        assert!(Instant::now() < deadline, "{bin} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(5));
    }
    d
}

/// Bytes of the lbs files in `dir`.
fn stored_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("blocks-"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

fn key(i: u64) -> Vec<u8> {
    let mut k = format!("key{i:037}").into_bytes();
    k.truncate(40);
    k
}

fn value(i: u64, round: u64) -> Vec<u8> {
    format!("value {round:016x} {i:017}").into_bytes()
}

/// A small deterministic generator of key numbers.
fn next_key(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % KEYS
}

#[test]
fn updating_a_fixed_key_set_keeps_the_lbs_directory_bounded() {
    let seconds: u64 = std::env::var("KIVALOO_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SOAK_SECONDS_DEFAULT);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let lbs_addr = tmp.path().join("lbs.sock").to_str().unwrap().to_string();
    let kvlds_addr = tmp.path().join("kvlds.sock").to_str().unwrap().to_string();
    let (lbs_log, kvlds_log) = (tmp.path().join("lbs.log"), tmp.path().join("kvlds.log"));
    let file_bytes = FILE_BYTES.to_string();
    let block_size = BLOCK_SIZE.to_string();
    let lbs_pid = tmp.path().join("lbs.pid");
    let lbs_args = [
        "-s",
        &lbs_addr,
        "-d",
        data.to_str().unwrap(),
        "-b",
        &block_size,
        "--file-size-min",
        &file_bytes,
        "-p",
        lbs_pid.to_str().unwrap(),
    ];
    let kvlds_pid = tmp.path().join("kvlds.pid");
    let storage_cost = std::env::var("KIVALOO_SOAK_STORAGE_COST").unwrap_or_else(|_| STORAGE_COST.into());
    println!("kvlds -S {storage_cost}, {KEYS} keys, {IN_FLIGHT} requests in flight, {seconds} s");
    let kvlds_args =
        ["-s", &kvlds_addr, "-l", &lbs_addr, "-S", &storage_cost, "-p", kvlds_pid.to_str().unwrap()];
    let _lbs = start(LBS_BIN, &lbs_args, &lbs_addr, &lbs_log);
    let kvlds = start(KVLDS_BIN, &kvlds_args, &kvlds_addr, &kvlds_log);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let samples: Vec<(f64, u64, u64)> = rt.block_on(async {
        let client = Arc::new(Client::connect(&SocketAddr::parse(&kvlds_addr)).await.unwrap());
        // Fill: every key once.
        let mut pending = FuturesUnordered::new();
        for i in 0..KEYS {
            let c = client.clone();
            pending.push(async move { c.set(key(i), value(i, 0)).await }.boxed_local());
            if pending.len() >= IN_FLIGHT {
                pending.next().await.unwrap().unwrap();
            }
        }
        while let Some(r) = pending.next().await {
            r.unwrap();
        }
        // Update at random, sampling the directory every second.
        let started = Instant::now();
        let mut next_sample = started;
        let mut samples = Vec::new();
        let (mut state, mut updates) = (0x9e37_79b9_7f4a_7c15_u64, 0_u64);
        while started.elapsed() < Duration::from_secs(seconds) {
            if Instant::now() >= next_sample {
                samples.push((started.elapsed().as_secs_f64(), stored_bytes(&data), updates));
                next_sample += Duration::from_secs(1);
            }
            let i = next_key(&mut state);
            let c = client.clone();
            updates += 1;
            pending.push(async move { c.set(key(i), value(i, updates)).await }.boxed_local());
            if pending.len() >= IN_FLIGHT {
                pending.next().await.unwrap().unwrap();
            }
        }
        while let Some(r) = pending.next().await {
            r.unwrap();
        }
        samples.push((started.elapsed().as_secs_f64(), stored_bytes(&data), updates));
        samples
    });

    // The tree's size, from kvlds's census after a restart.
    drop(kvlds);
    let logged_before = std::fs::read_to_string(&kvlds_log).unwrap().len();
    // (With cleaning on, whatever this run used: only then is there a census.)
    let census_args = ["-s", &kvlds_addr, "-l", &lbs_addr, "-S", "1", "-p", kvlds_pid.to_str().unwrap()];
    let _kvlds = start(KVLDS_BIN, &census_args, &kvlds_addr, &kvlds_log);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let tree_pages: u64 = loop {
        text.clear();
        std::fs::File::open(&kvlds_log).unwrap().read_to_string(&mut text).unwrap();
        let found = text[logged_before..]
            .lines()
            .find_map(|l| l.split("the tree has ").nth(1)?.split(' ').next()?.parse().ok());
        if let Some(n) = found {
            break n;
        }
        assert!(Instant::now() < deadline, "kvlds did not log its census:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for log in [&lbs_log, &kvlds_log] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        println!(
            "--- {} (last lines) ---\n{}",
            log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
    let live_bytes = tree_pages * RECORD_BYTES;
    let pair_bytes = KEYS * (2 + 40 + 40);
    println!("tree: {tree_pages} pages = {live_bytes} bytes as lbs records; pairs: {pair_bytes} bytes");
    println!("{:>8} {:>12} {:>10} {:>12} {:>10}", "seconds", "stored", "/ tree", "/ pairs", "updates");
    for &(t, stored, updates) in &samples {
        println!(
            "{t:>8.1} {stored:>12} {:>10.2} {:>12.2} {updates:>10}",
            stored as f64 / live_bytes as f64,
            stored as f64 / pair_bytes as f64
        );
    }
    let allowed = SPACE_FACTOR * live_bytes as f64 + 2.0 * FILE_BYTES as f64;
    // Once the log has wrapped (the second half of the run), every sample
    // is within the bound.
    let half = samples.len() / 2;
    for &(t, stored, _) in &samples[half..] {
        assert!(
            stored as f64 <= allowed,
            "at {t:.1} s lbs held {stored} bytes, above {SPACE_FACTOR} times the tree's {live_bytes} \
             and two files ({allowed:.0})"
        );
    }
    // Liveness, not speed: a store that stalls (a review once saw one
    // answer every few seconds for a minute) fails; 256 updates in any 5
    // seconds is hundreds of times below what this machine does.
    for w in samples.windows(6) {
        let ((t0, _, u0), (t1, _, u1)) = (w[0], w[5]);
        assert!(
            u1 - u0 >= IN_FLIGHT as u64,
            "from {t0:.1} s to {t1:.1} s only {} updates were answered",
            u1 - u0
        );
    }
    let (_, _, updates) = samples.last().copied().unwrap();
    assert!(
        updates >= 2 * KEYS,
        "too few updates ({updates}) to rewrite the key set twice; the soak proves nothing"
    );
}
