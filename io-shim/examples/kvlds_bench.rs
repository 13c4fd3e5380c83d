//! A bulk-insert and random-read benchmark through the real daemons, in the
//! manner of kivaloo's own benchmarks: one connection, 40-byte keys and
//! 40-byte values, 4096 requests in flight.
//!
//! ```sh
//! cargo run --release -p kivaloo-io-shim --example kvlds_bench -- \
//!     [pairs] [--sequential] [--gets N] [--in-flight N] [--dir DIR] [--kvlds SOCKET]
//! ```
//!
//! By default it builds and starts `kivaloo-lbs` (`-b 2048`, fsync on) and
//! `kivaloo-kvlds` on a fresh store in a temporary directory (under `--dir`
//! if given, so that the disk can be chosen), SETs `pairs` pairs (default
//! 1,000,000) with keys in random order (`--sequential`: in key order),
//! then GETs `--gets` random keys (default: as many as pairs), checking
//! every answer. It prints pairs and reads per second. With `--kvlds` it
//! uses a running kvlds instead (whose store should not hold these keys
//! with other values).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::packet::PacketDecoder;

const KEY_LEN: usize = 40;
const VALUE_LEN: usize = 40;
const BLOCK_SIZE: u32 = 2048;

struct Args {
    pairs: u64,
    gets: Option<u64>,
    sequential: bool,
    in_flight: u64,
    dir: Option<PathBuf>,
    kvlds: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: kvlds_bench [pairs] [--sequential] [--gets N] [--in-flight N] [--dir DIR] [--kvlds SOCKET]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args =
        Args { pairs: 1_000_000, gets: None, sequential: false, in_flight: 4096, dir: None, kvlds: None };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--sequential" => args.sequential = true,
            "--gets" => args.gets = Some(value().parse().unwrap_or_else(|_| usage())),
            "--in-flight" => args.in_flight = value().parse().unwrap_or_else(|_| usage()),
            "--dir" => args.dir = Some(PathBuf::from(value())),
            "--kvlds" => args.kvlds = Some(value()),
            n => args.pairs = n.parse().unwrap_or_else(|_| usage()),
        }
    }
    if args.pairs == 0 || args.pairs > u64::from(u32::MAX) || args.in_flight == 0 {
        usage();
    }
    args
}

/// A unix or TCP connection.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn connect(addr: &str) -> std::io::Result<Stream> {
        if addr.contains('/') {
            Ok(Stream::Unix(UnixStream::connect(addr)?))
        } else {
            let s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            Ok(Stream::Tcp(s))
        }
    }

    fn try_clone(&self) -> Stream {
        match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone().expect("clone the socket")),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone().expect("clone the socket")),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The key of pair `i`: its number in 40 decimal digits (so key order is
/// number order).
fn key_of(i: u32) -> Bytes {
    let k = format!("{i:0KEY_LEN$}");
    debug_assert_eq!(k.len(), KEY_LEN);
    Bytes::from(k)
}

/// The value of pair `i`: 40 bytes that depend on `i`.
fn value_of(i: u32) -> Bytes {
    let v = format!("{:0VALUE_LEN$x}", u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    Bytes::from(v)
}

/// xorshift64*.
fn next_random(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// The daemons this benchmark started; stopped (SIGTERM) when dropped.
struct Daemons {
    _tmp: tempfile::TempDir,
    data_dir: PathBuf,
    lbs: Child,
    kvlds: Child,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in [&mut self.kvlds, &mut self.lbs] {
            // SAFETY: kill only reads its integer arguments; the pid is our
            // own child's, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

/// The daemons' executables, built if needed: next to this example's own
/// target directory, with the same profile.
fn daemon_binaries() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("my own path");
    // <target>/<profile dir>/examples/kvlds_bench
    let profile_dir = exe.parent().and_then(Path::parent).expect("a cargo target layout");
    let target_dir = profile_dir.parent().expect("a cargo target layout");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => panic!("unexpected target layout: {}", exe.display()),
    };
    if let Some(cargo) = std::env::var_os("CARGO") {
        eprintln!("building the daemons ({profile} profile)...");
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "kivaloo-io-shim", "--bins", "--profile", &profile, "--target-dir"])
            .arg(target_dir)
            .status()
            .expect("run cargo");
        assert!(status.success(), "building the daemons failed");
    }
    let lbs = profile_dir.join("kivaloo-lbs");
    let kvlds = profile_dir.join("kivaloo-kvlds");
    for bin in [&lbs, &kvlds] {
        assert!(
            bin.exists(),
            "{} is missing: build it with `cargo build -p kivaloo-io-shim --bins` (same profile)",
            bin.display()
        );
    }
    (lbs, kvlds)
}

fn connect_with_retries(addr: &str, child: &mut Child, what: &str) -> Stream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = Stream::connect(addr) {
            return s;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited during startup ({status})");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts lbs and kvlds in the foreground on a fresh store; their logs go
/// to this program's stderr.
fn start_daemons(dir: Option<&Path>) -> (Daemons, String) {
    let (lbs_bin, kvlds_bin) = daemon_binaries();
    let mut builder = tempfile::Builder::new();
    builder.prefix("kvlds-bench-");
    let tmp = match dir {
        Some(d) => builder.tempdir_in(d),
        None => builder.tempdir(),
    }
    .expect("a temporary directory");
    let data_dir = tmp.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    let lbs_sock = tmp.path().join("lbs.sock").to_str().unwrap().to_string();
    let kvlds_sock = tmp.path().join("kvlds.sock").to_str().unwrap().to_string();
    let mut lbs = Command::new(lbs_bin)
        .args(["-F", "-s", &lbs_sock, "-b", &BLOCK_SIZE.to_string(), "-d"])
        .arg(&data_dir)
        .spawn()
        .expect("start kivaloo-lbs");
    // A probe connection, so that kvlds finds lbs listening.
    drop(connect_with_retries(&lbs_sock, &mut lbs, "kivaloo-lbs"));
    let kvlds = Command::new(kvlds_bin)
        .args(["-F", "-s", &kvlds_sock, "-l", &lbs_sock])
        .spawn()
        .expect("start kivaloo-kvlds");
    eprintln!("store in {}", tmp.path().display());
    (Daemons { _tmp: tmp, data_dir, lbs, kvlds }, kvlds_sock)
}

fn recv(stream: &mut Stream, dec: &mut PacketDecoder, buf: &mut [u8]) -> (u64, Bytes) {
    loop {
        if let Some(p) = dec.next_packet().expect("well-formed packets") {
            return (p.id, p.record);
        }
        let n = stream.read(buf).expect("read from kvlds");
        assert!(n > 0, "kvlds closed the connection");
        dec.push(&buf[..n]);
    }
}

/// Sends request `i` for every `i` in `0..order.len()` as made by `make`
/// from `order[i]`, with at most `in_flight` outstanding; a reader thread
/// checks every response with `check`. Returns the seconds taken.
fn run(
    stream: &Stream,
    order: Arc<Vec<u32>>,
    in_flight: u64,
    make: impl Fn(u32) -> KvldsRequest,
    check: impl Fn(u32, KvldsResponse) + Send + 'static,
    kind: kivaloo::kvlds_proto::KvldsRequestKind,
) -> f64 {
    let total = order.len() as u64;
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let reader = {
        let mut rd = stream.try_clone();
        let done = done.clone();
        let order = order.clone();
        std::thread::spawn(move || {
            let mut dec = PacketDecoder::new();
            let mut buf = vec![0u8; 1 << 16];
            for _ in 0..total {
                let (id, record) = recv(&mut rd, &mut dec, &mut buf);
                let resp = KvldsResponse::decode(kind, record).expect("a well-formed response");
                check(order[id as usize], resp);
                done.fetch_add(1, Ordering::Release);
            }
        })
    };
    let mut wr = stream.try_clone();
    let mut out = BytesMut::new();
    let mut sent = 0u64;
    while sent < total {
        while sent < total && sent - done.load(Ordering::Acquire) < in_flight && out.len() < 1 << 20 {
            make(order[sent as usize]).encode(sent, &mut out);
            sent += 1;
        }
        if out.is_empty() {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            wr.write_all(&out).expect("write to kvlds");
            out.clear();
        }
    }
    reader.join().expect("every response checked");
    started.elapsed().as_secs_f64()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let args = parse_args();
    let (mut daemons, kvlds_addr) = match &args.kvlds {
        Some(addr) => (None, addr.clone()),
        None => {
            let (d, addr) = start_daemons(args.dir.as_deref());
            (Some(d), addr)
        }
    };
    let stream = match daemons.as_mut() {
        Some(d) => connect_with_retries(&kvlds_addr, &mut d.kvlds, "kivaloo-kvlds"),
        None => {
            Stream::connect(&kvlds_addr).unwrap_or_else(|e| panic!("cannot connect to {kvlds_addr}: {e}"))
        }
    };

    // PARAMS first: it also waits for kvlds to finish starting.
    let mut s = stream.try_clone();
    let mut out = BytesMut::new();
    KvldsRequest::Params.encode(u64::MAX, &mut out);
    s.write_all(&out).unwrap();
    let (_, record) = recv(&mut s, &mut PacketDecoder::new(), &mut vec![0u8; 1 << 16]);
    match KvldsResponse::decode(kivaloo::kvlds_proto::KvldsRequestKind::Params, record) {
        Ok(KvldsResponse::Params { max_key_len, max_value_len })
            if max_key_len as usize >= KEY_LEN && max_value_len as usize >= VALUE_LEN => {}
        other => panic!("kvlds cannot hold 40-byte keys and values: {other:?}"),
    }

    let n = args.pairs as u32;
    let mut order: Vec<u32> = (0..n).collect();
    let mut x = 0x1234_5678_9abc_def1u64;
    if !args.sequential {
        for i in (1..order.len()).rev() {
            let j = (next_random(&mut x) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    let order_name = if args.sequential { "in key order" } else { "in random order" };
    let secs = run(
        &stream,
        Arc::new(order),
        args.in_flight,
        |i| KvldsRequest::Set { key: key_of(i), value: value_of(i) },
        |i, resp| assert_eq!(resp, KvldsResponse::Done(true), "SET of pair {i}"),
        kivaloo::kvlds_proto::KvldsRequestKind::Set,
    );
    println!(
        "set:  {n} pairs of {KEY_LEN}+{VALUE_LEN} bytes {order_name}, {} in flight: {secs:.2} s = {:.0} pairs/s",
        args.in_flight,
        f64::from(n) / secs
    );

    let gets = args.gets.unwrap_or(args.pairs);
    let reads: Vec<u32> = (0..gets).map(|_| (next_random(&mut x) % u64::from(n)) as u32).collect();
    let secs = run(
        &stream,
        Arc::new(reads),
        args.in_flight,
        |i| KvldsRequest::Get { key: key_of(i) },
        |i, resp| assert_eq!(resp, KvldsResponse::Get(Some(value_of(i))), "GET of pair {i}"),
        kivaloo::kvlds_proto::KvldsRequestKind::Get,
    );
    println!("get:  {gets} random keys: {secs:.2} s = {:.0} reads/s", gets as f64 / secs);

    if let Some(d) = &daemons {
        let store_mib = dir_bytes(&d.data_dir) as f64 / f64::from(1 << 20);
        let rss = rss_kib(d.kvlds.id()).map_or("?".to_string(), |k| format!("{:.0} MiB", k as f64 / 1024.0));
        println!("store: {store_mib:.1} MiB in lbs (-b {BLOCK_SIZE}); kvlds resident memory {rss}");
    }
}
