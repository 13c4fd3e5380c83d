//! End-to-end tests of the real `kivaloo-perf` daemon: in front of a real
//! kvlds (over a real lbs) with `-w 1 -l FILE` and a pipelining client; in
//! front of a real lbs with `-1`, reporting to stderr; daemon mode and
//! SIGTERM; the target's end; and its flags.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use kivaloo::lbs_proto::{LbsRequest, LbsResponse};
use kivaloo::packet::PacketDecoder;
use kivaloo_io_shim::addr::SocketAddr;
use kivaloo_io_shim::client::Client;

const LBS_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-lbs");
const KVLDS_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-kvlds");
const MUX_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-mux");
const PERF_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-perf");

/// How long a test waits for a daemon to listen or exit, an answer, or a
/// report line, before it fails (generous: the machine is shared).
const TIMEOUT: Duration = Duration::from_secs(15);
const BLOCK_SIZE: usize = 1024;

/// A daemon in the foreground; killed (SIGKILL) and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    fn wait_exit(&mut self, why: &str) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {TIMEOUT:?} {why}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A temp directory holding the sockets, the store, and each daemon's
/// stderr (`<name>.log`, shown when a test fails).
struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("data")).unwrap();
        Dir { tmp }
    }

    fn path(&self, name: &str) -> String {
        self.tmp.path().join(name).to_str().unwrap().to_string()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        ["lbs", "kvlds", "mux", "perf"].iter().map(|n| format!("--- {n} ---\n{}", self.log(n))).collect()
    }

    /// Starts `bin` in the foreground with `args`, its stderr to
    /// `<name>.log`.
    fn spawn(&self, name: &str, bin: &str, args: &[&str]) -> Daemon {
        let log =
            OpenOptions::new().create(true).append(true).open(self.path(&format!("{name}.log"))).unwrap();
        Daemon(
            Command::new(bin)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// Waits until `<name>.log` says the daemon listens (without taking a
    /// connection from it: perf's `-1` would count it).
    fn wait_listening(&self, name: &str, daemon: &mut Daemon) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.log(name).contains("listening on") {
            if let Some(status) = daemon.0.try_wait().unwrap() {
                panic!("{name} exited during startup ({status})\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "{name} did not listen\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn start_lbs(&self) -> Daemon {
        let (sock, data) = (self.path("lbs.sock"), self.path("data"));
        let mut d =
            self.spawn("lbs", LBS_BIN, &["-F", "-s", &sock, "-b", &BLOCK_SIZE.to_string(), "-d", &data]);
        self.wait_listening("lbs", &mut d);
        d
    }

    fn start_kvlds(&self) -> Daemon {
        let (sock, lbs) = (self.path("kvlds.sock"), self.path("lbs.sock"));
        let mut d = self.spawn("kvlds", KVLDS_BIN, &["-F", "-s", &sock, "-l", &lbs]);
        self.wait_listening("kvlds", &mut d);
        d
    }

    fn start_mux(&self) -> Daemon {
        let (sock, kvlds) = (self.path("mux.sock"), self.path("kvlds.sock"));
        let mut d = self.spawn("mux", MUX_BIN, &["-F", "-s", &sock, "-t", &kvlds]);
        self.wait_listening("mux", &mut d);
        d
    }

    fn start_perf(&self, target: &str, extra: &[&str]) -> Daemon {
        let (target, sock) = (self.path(target), self.path("perf.sock"));
        let mut args = vec!["-F", "-t", &target, "-s", &sock];
        args.extend_from_slice(extra);
        let mut d = self.spawn("perf", PERF_BIN, &args);
        self.wait_listening("perf", &mut d);
        d
    }
}

/// One report line of one request type, parsed.
#[derive(Debug)]
struct TypeLine {
    interval_s: f64,
    name: String,
    count: u64,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Parses `... perf: interval <s> s: <NAME> count <n> mean <ms> ms p50 <ms>
/// ms p99 <ms> ms max <ms> ms` (after any prefix); `None` for other lines.
fn parse_type_line(line: &str) -> Option<TypeLine> {
    let rest = &line[line.find("perf: interval ")? + "perf: interval ".len()..];
    let w: Vec<&str> = rest.split_whitespace().collect();
    if w.len() != 17 || w[3] != "count" {
        return None;
    }
    let ms = |i: usize, label: &str| -> f64 {
        assert_eq!((w[i - 1], w[i + 1]), (label, "ms"), "{line}");
        w[i].parse().unwrap()
    };
    Some(TypeLine {
        interval_s: w[0].parse().unwrap(),
        name: w[2].to_string(),
        count: w[4].parse().unwrap(),
        mean_ms: ms(6, "mean"),
        p50_ms: ms(9, "p50"),
        p99_ms: ms(12, "p99"),
        max_ms: ms(15, "max"),
    })
}

/// Requests of type `name` counted over every line of `text`, after
/// checking that each line's statistics are plausible.
fn total_count(text: &str, name: &str) -> u64 {
    let mut total = 0;
    for line in text.lines().filter_map(parse_type_line).filter(|l| l.name == name) {
        assert!(line.count > 0, "{line:?}");
        assert!(line.p50_ms <= line.p99_ms && line.p99_ms <= line.max_ms, "{line:?}");
        assert!(line.mean_ms <= line.max_ms && line.max_ms < 10_000.0, "{line:?}");
        assert!(line.max_ms > 0.0, "a round trip through two daemons takes time: {line:?}");
        total += line.count;
    }
    total
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

#[test]
fn in_front_of_kvlds_it_forwards_and_reports_every_interval_to_the_file() {
    let dir = Dir::new();
    let _lbs = dir.start_lbs();
    let mut kvlds = dir.start_kvlds();
    let stats = dir.path("stats.log");
    let mut perf = dir.start_perf("kvlds.sock", &["-w", "1", "-l", &stats]);

    const PAIRS: usize = 300;
    block_on(async {
        let client = Client::connect(&SocketAddr::parse(&dir.path("perf.sock"))).await.unwrap();
        let sets = (0..PAIRS).map(|i| {
            let c = client.clone();
            async move { c.set(format!("key{i}"), format!("value{i}")).await }
        });
        for r in join_all(sets).await {
            r.unwrap();
        }
        let gets = (0..PAIRS).map(|i| {
            let c = client.clone();
            async move { c.get(format!("key{i}")).await }
        });
        for (i, r) in join_all(gets).await.into_iter().enumerate() {
            assert_eq!(r.unwrap(), Some(Bytes::from(format!("value{i}"))));
        }
    });

    // Every request shows up in some interval; then the intervals go idle.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&stats).unwrap_or_default();
        let (sets, gets) = (total_count(&text, "KVLDS_SET"), total_count(&text, "KVLDS_GET"));
        let idle_after = text
            .lines()
            .skip_while(|l| !l.contains("KVLDS_GET"))
            .any(|l| l.contains("no requests completed"));
        if sets == PAIRS as u64 && gets == PAIRS as u64 && idle_after {
            break;
        }
        assert!(sets <= PAIRS as u64 && gets <= PAIRS as u64, "{text}");
        assert!(Instant::now() < deadline, "sets {sets}, gets {gets} reported:\n{text}\n{}", dir.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&stats).unwrap();
    for line in text.lines() {
        // `2024-02-29T12:34:56Z perf: interval 1.000 s: ...`
        assert!(
            line.len() > 21 && line.as_bytes()[19] == b'Z' && line[21..].starts_with("perf: interval "),
            "{line}"
        );
        if let Some(l) = parse_type_line(line) {
            assert!((0.5..5.0).contains(&l.interval_s), "intervals of about -w 1: {line}");
        }
    }

    // The target going away takes perf with it.
    let _ = kvlds.0.kill();
    let status = perf.wait_exit("after its target died");
    assert!(!status.success(), "{status}");
    assert!(dir.log("perf").contains("target connection"), "{}", dir.logs());
    let _ = kvlds.0.wait();
}

#[test]
fn in_front_of_a_mux_it_reports_the_same_way() {
    let dir = Dir::new();
    let _lbs = dir.start_lbs();
    let _kvlds = dir.start_kvlds();
    let _mux = dir.start_mux();
    let mut perf = dir.start_perf("mux.sock", &["-1", "-w", "60"]);
    block_on(async {
        let client = Client::connect(&SocketAddr::parse(&dir.path("perf.sock"))).await.unwrap();
        let sets = (0..50).map(|i| {
            let c = client.clone();
            async move { c.set(format!("k{i}"), "v").await }
        });
        for r in join_all(sets).await {
            r.unwrap();
        }
        assert_eq!(client.range("k", "l", 1 << 20).await.unwrap().0.len(), 50);
    });
    let status = perf.wait_exit("after its one connection (-1)");
    assert!(status.success(), "{status}\n{}", dir.logs());
    let log = dir.log("perf");
    assert_eq!(total_count(&log, "KVLDS_SET"), 50, "{log}");
    assert_eq!(total_count(&log, "KVLDS_RANGE"), 1, "{log}");
}

/// Sends `req` on `s` and reads its answer.
fn lbs_call(s: &mut UnixStream, d: &mut PacketDecoder, id: u64, req: &LbsRequest) -> LbsResponse {
    let mut out = BytesMut::new();
    req.encode(id, &mut out);
    s.write_all(&out).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(p) = d.next_packet().unwrap() {
            assert_eq!(p.id, id);
            return LbsResponse::decode(req.kind(), p.record).unwrap();
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "perf closed the connection");
        d.push(&buf[..n]);
    }
}

#[test]
fn in_front_of_lbs_with_dash_1_it_reports_to_stderr_when_the_client_leaves() {
    let dir = Dir::new();
    let _lbs = dir.start_lbs();
    // -w 60: the only report is the last one, made at exit.
    let mut perf = dir.start_perf("lbs.sock", &["-1", "-w", "60"]);
    let mut s = UnixStream::connect(dir.path("perf.sock")).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut d = PacketDecoder::new();
    let LbsResponse::Params2 { block_size, next_block, .. } =
        lbs_call(&mut s, &mut d, 1, &LbsRequest::Params2)
    else {
        panic!("not a PARAMS2 answer")
    };
    assert_eq!(block_size as usize, BLOCK_SIZE);
    let data = Bytes::from(vec![0x5a; BLOCK_SIZE]);
    let append = LbsRequest::Append { count: 1, start: next_block, data: data.clone() };
    assert!(matches!(lbs_call(&mut s, &mut d, 2, &append), LbsResponse::Append(Some(_))));
    assert_eq!(
        lbs_call(&mut s, &mut d, 3, &LbsRequest::Get { block: next_block }),
        LbsResponse::Get(Some(data))
    );
    assert_eq!(lbs_call(&mut s, &mut d, 4, &LbsRequest::Free { keep_from: 0 }), LbsResponse::Free);
    drop(s);

    let status = perf.wait_exit("after its one connection (-1)");
    assert!(status.success(), "{status}\n{}", dir.logs());
    let log = dir.log("perf");
    for name in ["LBS_PARAMS2", "LBS_APPEND", "LBS_GET", "LBS_FREE"] {
        assert_eq!(total_count(&log, name), 1, "{name} in:\n{log}");
    }
    assert!(log.contains("kivaloo-perf: info: perf: interval "), "{log}");
}

#[test]
fn daemon_mode_returns_once_listening_and_reports_on_sigterm() {
    let dir = Dir::new();
    let _lbs = dir.start_lbs();
    let (pidfile, stats) = (dir.path("perf.pid"), dir.path("stats.log"));
    let status = Command::new(PERF_BIN)
        .args(["-t", &dir.path("lbs.sock"), "-s", &dir.path("perf.sock"), "-p", &pidfile, "-l", &stats])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    // Listening already.
    let mut s = UnixStream::connect(dir.path("perf.sock")).expect("listening when the command returned");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    lbs_call(&mut s, &mut PacketDecoder::new(), 7, &LbsRequest::Params2);
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    let deadline = Instant::now() + TIMEOUT;
    while Path::new(&pidfile).exists() {
        assert!(Instant::now() < deadline, "perf did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = std::fs::read_to_string(&stats).unwrap();
    assert_eq!(total_count(&text, "LBS_PARAMS2"), 1, "the last report, written at SIGTERM:\n{text}");
}

fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(PERF_BIN).args(args).stdin(Stdio::null()).output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn flags_are_checked() {
    let (status, stdout, _) = run(&["--version"]);
    assert!(status.success() && stdout.starts_with("kivaloo-perf "), "{stdout}");
    let dir = Dir::new();
    let (t, s) = (dir.path("nothing.sock"), dir.path("perf.sock"));
    let (status, _, stderr) = run(&["-t", &t, "-s", &s, "-w", "0"]);
    assert!(!status.success() && stderr.contains("-w"), "{stderr}");
    let (status, _, stderr) = run(&["-s", &s]);
    assert!(!status.success() && stderr.contains("-t"), "{stderr}");
    // A statistics file that cannot be opened is refused before anything.
    let bad: PathBuf = dir.tmp.path().join("no-such-dir").join("stats.log");
    let (status, _, stderr) = run(&["-t", &t, "-s", &s, "-l", bad.to_str().unwrap()]);
    assert!(!status.success() && stderr.contains("cannot open the statistics file"), "{stderr}");
    // No target: refused, in the foreground and as a daemon.
    for extra in [&["-F"][..], &[][..]] {
        let mut args = vec!["-t", &t, "-s", &s];
        args.extend_from_slice(extra);
        let (status, _, stderr) = run(&args);
        assert!(!status.success() && stderr.contains("cannot connect"), "{stderr}");
    }
}
