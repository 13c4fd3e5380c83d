//! End-to-end tests of the real `kivaloo-lbs` daemon: real files in a temp
//! directory, real unix and TCP sockets, `kill -9`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kivaloo::lbs_proto::{LbsRequest, LbsRequestKind, LbsResponse, NO_LAST_BLOCK};
use kivaloo::packet::PacketDecoder;

const BIN: &str = env!("CARGO_BIN_EXE_kivaloo-lbs");

/// A blocking client speaking PROTOCOL.md over any stream.
struct Client<S: Read + Write> {
    stream: S,
    decoder: PacketDecoder,
}

impl<S: Read + Write> Client<S> {
    fn new(stream: S) -> Self {
        Client { stream, decoder: PacketDecoder::new() }
    }

    fn send(&mut self, id: u64, req: &LbsRequest) {
        let mut out = BytesMut::new();
        req.encode(id, &mut out);
        self.stream.write_all(&out).unwrap();
    }

    /// The next response packet, or None when the server closed.
    fn recv(&mut self) -> Option<(u64, Bytes)> {
        loop {
            if let Some(p) = self.decoder.next_packet().unwrap() {
                return Some((p.id, p.record));
            }
            let mut buf = [0u8; 65536];
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.push(&buf[..n]),
            }
        }
    }

    fn call(&mut self, id: u64, req: &LbsRequest) -> LbsResponse {
        self.send(id, req);
        let (got_id, record) = self.recv().expect("a response");
        assert_eq!(got_id, id);
        LbsResponse::decode(req.kind(), record).unwrap()
    }
}

fn wait_for_socket(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return s;
        }
        assert!(Instant::now() < deadline, "daemon did not start listening on {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Store {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    sock: PathBuf,
}

impl Store {
    fn new() -> Store {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        let sock = tmp.path().join("lbs.sock");
        Store { dir, sock, _tmp: tmp }
    }

    /// Starts the daemon in the foreground (-F) so the test holds its pid.
    fn start(&self, block_size: u32) -> Daemon {
        Daemon(Some(
            Command::new(BIN)
                .args(["-F", "-s"])
                .arg(&self.sock)
                .arg("-d")
                .arg(&self.dir)
                .args(["-b", &block_size.to_string()])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ))
    }

    fn connect(&self) -> Client<UnixStream> {
        let s = wait_for_socket(&self.sock);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client::new(s)
    }
}

fn block_bytes(block: u64, block_size: u32) -> Vec<u8> {
    (0..block_size as u64).map(|i| (block.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8).collect()
}

/// A daemon started by a test; killed (SIGKILL) when dropped, so that a
/// failing test leaves no server behind.
struct Daemon(Option<Child>);

impl Daemon {
    fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn kill9(daemon: Daemon) {
    drop(daemon);
}

#[test]
fn params_append_get_free_against_the_real_daemon() {
    let store = Store::new();
    let daemon = store.start(512);
    let mut c = store.connect();
    assert_eq!(
        c.call(1, &LbsRequest::Params2),
        LbsResponse::Params2 { block_size: 512, next_block: 0, last_block: NO_LAST_BLOCK }
    );
    let data: Vec<u8> = (0..3).flat_map(|b| block_bytes(b, 512)).collect();
    let append = LbsRequest::Append { count: 3, start: 0, data: Bytes::from(data) };
    assert_eq!(c.call(2, &append), LbsResponse::Append(Some(3)));
    for b in 0..3 {
        assert_eq!(
            c.call(10 + b, &LbsRequest::Get { block: b }),
            LbsResponse::Get(Some(block_bytes(b, 512).into()))
        );
    }
    assert_eq!(c.call(20, &LbsRequest::Get { block: 3 }), LbsResponse::Get(None));
    // A wrong start block is refused and the connection stays usable.
    let wrong = LbsRequest::Append { count: 1, start: 7, data: Bytes::from(vec![0u8; 512]) };
    assert_eq!(c.call(21, &wrong), LbsResponse::Append(None));
    assert_eq!(c.call(22, &LbsRequest::Params), LbsResponse::Params { block_size: 512, next_block: 3 });
    assert_eq!(c.call(23, &LbsRequest::Free { keep_from: 2 }), LbsResponse::Free);
    assert_eq!(c.call(24, &LbsRequest::Free { keep_from: 1000 }), LbsResponse::Free);
    assert_eq!(c.call(25, &LbsRequest::Get { block: 2 }), LbsResponse::Get(Some(block_bytes(2, 512).into())));
    assert_eq!(
        c.call(26, &LbsRequest::Params2),
        LbsResponse::Params2 { block_size: 512, next_block: 3, last_block: 2 }
    );
    kill9(daemon);
}

#[test]
fn a_bad_crc_drops_only_that_connection() {
    let store = Store::new();
    let daemon = store.start(1024);
    let mut bad = store.connect();
    let mut out = BytesMut::new();
    LbsRequest::Params2.encode(5, &mut out);
    let last = out.len() - 1;
    out[last] ^= 0x55;
    bad.stream.write_all(&out).unwrap();
    assert_eq!(bad.recv(), None, "the server must close a connection that sent a bad CRC");
    // The daemon is still there and serves the next connection.
    let mut good = store.connect();
    assert_eq!(
        good.call(6, &LbsRequest::Params2),
        LbsResponse::Params2 { block_size: 1024, next_block: 0, last_block: NO_LAST_BLOCK }
    );
    kill9(daemon);
}

#[test]
fn kill_9_during_appends_loses_nothing_acknowledged() {
    const BS: u32 = 4096;
    let store = Store::new();
    let mut acked_end = 0u64;
    for round in 0..3u64 {
        let daemon = store.start(BS);
        let mut c = store.connect();
        let LbsResponse::Params2 { next_block, .. } = c.call(1, &LbsRequest::Params2) else { panic!() };
        assert!(next_block >= acked_end, "next block went backwards: {next_block} < {acked_end}");
        // Every acknowledged block reads back exactly.
        for b in 0..acked_end {
            let got = c.call(100 + b, &LbsRequest::Get { block: b });
            assert_eq!(got, LbsResponse::Get(Some(block_bytes(b, BS).into())), "round {round}, block {b}");
        }
        // Anything past the acknowledged end is either absent or exactly
        // what was sent for that block number.
        for b in acked_end..next_block {
            match c.call(200_000 + b, &LbsRequest::Get { block: b }) {
                LbsResponse::Get(None) => {}
                LbsResponse::Get(Some(d)) => {
                    assert_eq!(d, Bytes::from(block_bytes(b, BS)), "unacked block {b}")
                }
                other => panic!("{other:?}"),
            }
        }
        // A stream of pipelined APPENDs from one thread, acks collected by
        // another, and the daemon killed once some (not all) are acked.
        let reader_stream = c.stream.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let reader = std::thread::spawn(move || {
            let mut r = Client::new(reader_stream);
            while let Some((_, record)) = r.recv() {
                match LbsResponse::decode(LbsRequestKind::Append, record).unwrap() {
                    LbsResponse::Append(Some(next)) => tx.send(next).unwrap(),
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        let mut writer_stream = c.stream.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut start = next_block;
            for sent in 0..20_000u64 {
                let count = 1 + (sent % 4) as u32;
                let data: Vec<u8> = (start..start + count as u64).flat_map(|b| block_bytes(b, BS)).collect();
                let mut out = BytesMut::new();
                LbsRequest::Append { count, start, data: Bytes::from(data) }.encode(1000 + sent, &mut out);
                if writer_stream.write_all(&out).is_err() {
                    break;
                }
                start += count as u64;
            }
            start
        });
        let mut acks = Vec::new();
        while acks.len() < 40 + round as usize * 40 {
            acks.push(rx.recv_timeout(Duration::from_secs(30)).expect("APPENDs are acknowledged"));
        }
        kill9(daemon);
        let sent_up_to = writer.join().unwrap();
        reader.join().unwrap();
        acks.extend(rx.try_iter());
        eprintln!("round {round}: started at {next_block}, sent up to {sent_up_to}");
        assert!(acks.windows(2).all(|w| w[0] < w[1]), "acks in order");
        eprintln!("round {round}: {} acks, last {:?}", acks.len(), acks.last());
        if let Some(&last) = acks.last() {
            acked_end = acked_end.max(last);
        }
    }
    assert!(acked_end > 0, "some APPENDs were acknowledged before the kills");
    // A final restart still reads everything acknowledged.
    let daemon = store.start(BS);
    let mut c = store.connect();
    for b in 0..acked_end {
        assert_eq!(
            c.call(b, &LbsRequest::Get { block: b }),
            LbsResponse::Get(Some(block_bytes(b, BS).into()))
        );
    }
    kill9(daemon);
}

#[test]
fn reopening_with_another_block_size_is_refused() {
    let store = Store::new();
    let daemon = store.start(512);
    let mut c = store.connect();
    assert!(matches!(c.call(1, &LbsRequest::Params2), LbsResponse::Params2 { .. }));
    kill9(daemon);
    let out = Command::new(BIN)
        .args(["-F", "-s"])
        .arg(&store.sock)
        .arg("-d")
        .arg(&store.dir)
        .args(["-b", "1024"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("512-byte blocks") && stderr.contains("-b 1024"), "{stderr}");
}

#[test]
fn daemon_mode_returns_once_listening_and_writes_the_pidfile() {
    let store = Store::new();
    let status = Command::new(BIN)
        .arg("-s")
        .arg(&store.sock)
        .arg("-d")
        .arg(&store.dir)
        .args(["-b", "512"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    // Listening already: connect without waiting.
    let mut c = Client::new(UnixStream::connect(&store.sock).expect("listening when the command returned"));
    assert!(matches!(c.call(1, &LbsRequest::Params2), LbsResponse::Params2 { block_size: 512, .. }));
    let mut pidfile = store.sock.clone().into_os_string();
    pidfile.push(".pid");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(Command::new("kill").arg(pid.to_string()).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&pidfile).exists() {
        assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serves_over_tcp_and_exits_after_one_connection_with_dash_1() {
    let store = Store::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut daemon = Command::new(BIN)
        .args(["-F", "-1", "-s", &addr, "-p"])
        .arg(store.dir.join("..").join("tcp.pid"))
        .arg("-d")
        .arg(&store.dir)
        .args(["-b", "512"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        if let Ok(s) = std::net::TcpStream::connect(&addr) {
            break s;
        }
        assert!(Instant::now() < deadline, "not listening on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut c = Client::new(stream);
    assert!(matches!(c.call(1, &LbsRequest::Params2), LbsResponse::Params2 { block_size: 512, .. }));
    drop(c);
    let status = daemon.wait().unwrap();
    assert!(status.success(), "-1 exits cleanly after the connection: {status}");
}

#[test]
fn a_second_daemon_on_the_same_directory_is_refused() {
    let store = Store::new();
    let daemon = store.start(512);
    let mut c = store.connect();
    assert!(matches!(c.call(1, &LbsRequest::Params2), LbsResponse::Params2 { .. }));
    let other_sock = store.sock.with_file_name("other.sock");
    let out = Command::new(BIN)
        .args(["-F", "-s"])
        .arg(&other_sock)
        .arg("-d")
        .arg(&store.dir)
        .args(["-b", "512"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another running daemon"), "{stderr}");
    // The first one still serves.
    assert!(matches!(c.call(2, &LbsRequest::Params2), LbsResponse::Params2 { .. }));
    kill9(daemon);
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A client pipelining GETs of large blocks without reading the answers
/// gets backpressure, not a daemon that swells; and when such clients go
/// away, their sockets are released.
#[test]
fn clients_that_do_not_read_are_bounded_and_leave_nothing_behind() {
    const BS: u32 = 131_072;
    let store = Store::new();
    let daemon = store.start(BS);
    let pid = daemon.id();
    let mut c = store.connect();
    let data: Vec<u8> = (0..4).flat_map(|b| block_bytes(b, BS)).collect();
    assert_eq!(
        c.call(1, &LbsRequest::Append { count: 4, start: 0, data: data.into() }),
        LbsResponse::Append(Some(4))
    );
    drop(c);
    let mut gets = BytesMut::new();
    for i in 0..20_000u64 {
        LbsRequest::Get { block: i % 4 }.encode(i, &mut gets);
    }
    let fds_before = {
        // One connection is needed for the daemon to be idle and accepting.
        let mut probe = store.connect();
        assert!(matches!(probe.call(1, &LbsRequest::Params2), LbsResponse::Params2 { .. }));
        fd_count(pid)
    };
    let mut peak_rss_kib = 0;
    for _ in 0..3 {
        let mut hog = wait_for_socket(&store.sock);
        hog.set_nonblocking(true).unwrap();
        // Write until the daemon stops reading (the socket buffer stays full).
        let mut sent = 0;
        let mut last_progress = Instant::now();
        while sent < gets.len() && last_progress.elapsed() < Duration::from_millis(500) {
            match hog.write(&gets[sent..]) {
                Ok(n) => {
                    sent += n;
                    last_progress = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(sent < gets.len(), "the daemon read every request of a client that reads nothing");
        std::thread::sleep(Duration::from_millis(300));
        peak_rss_kib = peak_rss_kib.max(rss_kib(pid));
        drop(hog);
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("peak RSS with clients that do not read: {peak_rss_kib} KiB");
    // 20,000 GETs of 128 KiB would be 2.5 GiB of answers.
    assert!(peak_rss_kib < 256 * 1024, "the daemon grew to {peak_rss_kib} KiB for clients that do not read");
    let mut probe = store.connect();
    assert!(matches!(probe.call(2, &LbsRequest::Params2), LbsResponse::Params2 { .. }));
    assert!(fd_count(pid) <= fds_before, "sockets leaked: {} fds, {fds_before} before", fd_count(pid));
    kill9(daemon);
}
