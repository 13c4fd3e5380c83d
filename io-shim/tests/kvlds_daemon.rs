//! End-to-end tests of the real `kivaloo-kvlds` daemon stored in the real
//! `kivaloo-lbs`: temp directories, unix and TCP sockets, a pipelined
//! client, and `kill -9` of either daemon at random moments under a random
//! workload checked against a model.

use std::collections::{BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::packet::{encode_packet, PacketDecoder};

const LBS_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-lbs");
const KVLDS_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-kvlds");

/// How long a test waits for any one response, a daemon to start listening
/// or a daemon to exit before it fails.
const TIMEOUT: Duration = Duration::from_secs(30);

// ----- a pipelined client ----------------------------------------------------

/// A connected socket of either kind, shared by a writer and a reader.
trait Socket: Read + Write + Send + 'static {
    fn try_clone_socket(&self) -> Box<dyn Socket>;
    fn shutdown_both(&self);
}

impl Socket for UnixStream {
    fn try_clone_socket(&self) -> Box<dyn Socket> {
        Box::new(self.try_clone().unwrap())
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Socket for TcpStream {
    fn try_clone_socket(&self) -> Box<dyn Socket> {
        Box::new(self.try_clone().unwrap())
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// What the reader thread saw.
#[derive(Debug)]
enum Event {
    /// A response packet: request ID and record.
    Response(u64, Bytes),
    /// The server closed the connection (or it failed).
    Closed,
    /// The server sent something that is not a packet.
    Garbage(String),
}

/// One connection: requests are queued and written by the caller's thread;
/// a reader thread decodes responses onto a channel, so that any number of
/// requests can be in flight.
struct Conn {
    writer: Box<dyn Socket>,
    events: mpsc::Receiver<Event>,
    reader: Option<std::thread::JoinHandle<()>>,
    out: BytesMut,
}

impl Conn {
    fn new(socket: Box<dyn Socket>) -> Conn {
        let mut rd = socket.try_clone_socket();
        let (tx, events) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut decoder = PacketDecoder::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match rd.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => decoder.push(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
                loop {
                    match decoder.next_packet() {
                        Ok(Some(p)) => {
                            if tx.send(Event::Response(p.id, p.record)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(Event::Garbage(e.to_string()));
                            return;
                        }
                    }
                }
            }
            let _ = tx.send(Event::Closed);
        });
        Conn { writer: socket, events, reader: Some(reader), out: BytesMut::new() }
    }

    fn queue(&mut self, id: u64, req: &KvldsRequest) {
        req.encode(id, &mut self.out);
    }

    fn queue_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let result = self.writer.write_all(&self.out);
        self.out.clear();
        result
    }

    /// The next event; panics after [`TIMEOUT`].
    fn next_event(&self) -> Event {
        self.events.recv_timeout(TIMEOUT).unwrap_or_else(|_| panic!("no response within {TIMEOUT:?}"))
    }

    fn try_event(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Sends one request and waits for its response.
    fn call(&mut self, id: u64, req: &KvldsRequest) -> KvldsResponse {
        self.queue(id, req);
        self.flush().expect("send a request");
        match self.next_event() {
            Event::Response(got, record) => {
                assert_eq!(got, id, "response to another request");
                KvldsResponse::decode(req.kind(), record).expect("a well-formed response")
            }
            other => panic!("{req:?}: expected a response, got {other:?}"),
        }
    }

    /// Waits until the server closes the connection, with no response
    /// before that.
    fn expect_closed(&self, what: &str) {
        match self.next_event() {
            Event::Closed => {}
            other => panic!("{what}: expected the server to drop the connection, got {other:?}"),
        }
    }

    /// Closes our side and collects what arrived before that.
    fn close(mut self) -> Vec<Event> {
        self.writer.shutdown_both();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.events.try_iter().filter(|e| !matches!(e, Event::Closed)).collect()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.writer.shutdown_both();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn key(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn set(k: &str, v: &str) -> KvldsRequest {
    KvldsRequest::Set { key: key(k), value: key(v) }
}

fn get(k: &str) -> KvldsRequest {
    KvldsRequest::Get { key: key(k) }
}

fn range(max_bytes: u32, start: &str, end: &str) -> KvldsRequest {
    KvldsRequest::Range { max_bytes, start: key(start), end: key(end) }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(Bytes, Bytes)> {
    list.iter().map(|(k, v)| (key(k), key(v))).collect()
}

// ----- the daemons -------------------------------------------------------------

/// A daemon started by a test in the foreground (`-F`); killed (SIGKILL)
/// when dropped, so that a failing test leaves no server behind.
struct Daemon(Option<Child>);

impl Daemon {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    /// Its exit status, once it has exited; None after `timeout`.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child().try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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

/// Connects to a unix path or a `host:port`.
fn try_connect(addr: &str) -> Option<Box<dyn Socket>> {
    if addr.contains('/') {
        UnixStream::connect(addr).ok().map(|s| Box::new(s) as Box<dyn Socket>)
    } else {
        let s = TcpStream::connect(addr).ok()?;
        s.set_nodelay(true).unwrap();
        Some(Box::new(s))
    }
}

fn free_tcp_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(4000);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// An lbs and a kvlds on a temp directory; each daemon's stderr is
/// appended to a log file there, shown if the test fails.
struct Cluster {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    lbs_addr: String,
    kvlds_addr: String,
    block_size: u32,
    lbs: Option<Daemon>,
    kvlds: Option<Daemon>,
}

impl Cluster {
    fn new(block_size: u32) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let lbs_addr = tmp.path().join("lbs.sock").to_str().unwrap().to_string();
        let kvlds_addr = tmp.path().join("kvlds.sock").to_str().unwrap().to_string();
        Cluster::with_addrs(tmp, block_size, lbs_addr, kvlds_addr)
    }

    fn new_tcp(block_size: u32) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        Cluster::with_addrs(tmp, block_size, free_tcp_addr(), free_tcp_addr())
    }

    fn with_addrs(tmp: tempfile::TempDir, block_size: u32, lbs_addr: String, kvlds_addr: String) -> Cluster {
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        Cluster { tmp, dir, lbs_addr, kvlds_addr, block_size, lbs: None, kvlds: None }
    }

    fn lbs_log(&self) -> PathBuf {
        self.tmp.path().join("lbs.log")
    }

    fn kvlds_log(&self) -> PathBuf {
        self.tmp.path().join("kvlds.log")
    }

    fn stderr_to(path: &Path) -> Stdio {
        Stdio::from(OpenOptions::new().create(true).append(true).open(path).unwrap())
    }

    fn logs(&self) -> String {
        format!(
            "--- lbs log (tail) ---\n{}--- kvlds log (tail) ---\n{}",
            log_tail(&self.lbs_log()),
            log_tail(&self.kvlds_log())
        )
    }

    /// Starts lbs (fsync on) and waits until it listens.
    fn start_lbs(&mut self) {
        assert!(self.lbs.is_none(), "lbs is already running");
        let child = Command::new(LBS_BIN)
            .args(["-F", "-s", &self.lbs_addr, "-b", &self.block_size.to_string(), "-d"])
            .arg(&self.dir)
            // (The default, `<socket>.pid`, would be in the current
            // directory for a TCP socket.)
            .arg("-p")
            .arg(self.tmp.path().join("lbs.pid"))
            .stderr(Cluster::stderr_to(&self.lbs_log()))
            .spawn()
            .unwrap();
        let mut lbs = Daemon(Some(child));
        // A probe connection: lbs takes it, sees it closed, and goes on to
        // the next one (kvlds's).
        let deadline = Instant::now() + TIMEOUT;
        while try_connect(&self.lbs_addr).is_none() {
            if let Some(status) = lbs.child().try_wait().unwrap() {
                panic!("lbs exited during startup ({status})\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "lbs did not listen on {}\n{}", self.lbs_addr, self.logs());
            std::thread::sleep(Duration::from_millis(5));
        }
        self.lbs = Some(lbs);
    }

    /// The kvlds command line for this cluster, plus `extra` flags.
    fn kvlds_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(KVLDS_BIN);
        cmd.args(["-s", &self.kvlds_addr, "-l", &self.lbs_addr]).args(extra);
        if !self.kvlds_addr.contains('/') {
            // Not `<socket>.pid` in the current directory.
            cmd.arg("-p").arg(self.tmp.path().join("kvlds.pid"));
        }
        cmd.stderr(Cluster::stderr_to(&self.kvlds_log()));
        cmd
    }

    /// Starts kvlds in the foreground; [`Cluster::connect`] waits for it.
    fn start_kvlds(&mut self, extra: &[&str]) {
        assert!(self.kvlds.is_none(), "kvlds is already running");
        let child = self.kvlds_command(extra).arg("-F").spawn().unwrap();
        self.kvlds = Some(Daemon(Some(child)));
    }

    fn start(&mut self) {
        self.start_lbs();
        self.start_kvlds(&[]);
    }

    /// A connection to kvlds, once it listens.
    fn connect(&mut self) -> Conn {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = try_connect(&self.kvlds_addr) {
                return Conn::new(s);
            }
            if let Some(kvlds) = self.kvlds.as_mut() {
                if let Some(status) = kvlds.child().try_wait().unwrap() {
                    panic!("kvlds exited during startup ({status})\n{}", self.logs());
                }
            }
            assert!(
                Instant::now() < deadline,
                "kvlds did not listen on {}\n{}",
                self.kvlds_addr,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill_kvlds(&mut self) {
        drop(self.kvlds.take().expect("kvlds is running"));
    }

    fn kill_lbs(&mut self) {
        drop(self.lbs.take().expect("lbs is running"));
    }

    /// Waits for kvlds to exit by itself and returns its status.
    fn wait_kvlds_exit(&mut self, why: &str) -> ExitStatus {
        let status = self.kvlds.as_mut().expect("kvlds is running").wait_timeout(TIMEOUT);
        match status {
            Some(status) => {
                self.kvlds = None;
                status
            }
            None => panic!("kvlds did not exit within {TIMEOUT:?} {why}\n{}", self.logs()),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Runs `cmd` until it exits (panicking after [`TIMEOUT`]); returns its
/// status and what it wrote to stderr.
fn run_to_exit(mut cmd: Command, stderr_path: &Path) -> (ExitStatus, String) {
    let mut daemon = Daemon(Some(cmd.stderr(Cluster::stderr_to(stderr_path)).spawn().unwrap()));
    let status = daemon.wait_timeout(TIMEOUT).unwrap_or_else(|| panic!("{cmd:?} did not exit"));
    daemon.0 = None;
    (status, std::fs::read_to_string(stderr_path).unwrap_or_default())
}

// ----- a. the basics -----------------------------------------------------------

#[test]
fn params_default_to_the_block_size() {
    for (block_size, max_key, max_value) in [(512, 64, 96), (1024, 128, 192), (2048, 255, 255)] {
        let mut cluster = Cluster::new(block_size);
        cluster.start();
        let mut c = cluster.connect();
        assert_eq!(
            c.call(1, &KvldsRequest::Params),
            KvldsResponse::Params { max_key_len: max_key, max_value_len: max_value },
            "lbs -b {block_size}"
        );
    }
}

#[test]
fn every_request_kind_against_the_real_daemons() {
    let mut cluster = Cluster::new(512);
    cluster.start();
    let mut c = cluster.connect();
    let done = KvldsResponse::Done;
    assert_eq!(c.call(1, &get("k")), KvldsResponse::Get(None));
    assert_eq!(c.call(2, &set("k", "v1")), done(true));
    assert_eq!(c.call(3, &get("k")), KvldsResponse::Get(Some(key("v1"))));
    // ADD only sets an absent key; MODIFY only a present one.
    assert_eq!(c.call(4, &KvldsRequest::Add { key: key("k"), value: key("x") }), done(false));
    assert_eq!(c.call(5, &KvldsRequest::Add { key: key("k2"), value: key("a") }), done(true));
    assert_eq!(c.call(6, &KvldsRequest::Modify { key: key("k"), value: key("v2") }), done(true));
    assert_eq!(c.call(7, &KvldsRequest::Modify { key: key("nope"), value: key("x") }), done(false));
    assert_eq!(c.call(8, &get("nope")), KvldsResponse::Get(None));
    // CAS and CAD compare the current value.
    let cas =
        |old: &str, new: &str| KvldsRequest::Cas { key: key("k"), old_value: key(old), new_value: key(new) };
    assert_eq!(c.call(9, &cas("v1", "v3")), done(false));
    assert_eq!(c.call(10, &get("k")), KvldsResponse::Get(Some(key("v2"))));
    assert_eq!(c.call(11, &cas("v2", "v3")), done(true));
    assert_eq!(c.call(12, &get("k")), KvldsResponse::Get(Some(key("v3"))));
    assert_eq!(c.call(13, &KvldsRequest::Cad { key: key("k"), old_value: key("v2") }), done(false));
    assert_eq!(c.call(14, &KvldsRequest::Cad { key: key("k"), old_value: key("v3") }), done(true));
    assert_eq!(c.call(15, &get("k")), KvldsResponse::Get(None));
    assert_eq!(c.call(16, &KvldsRequest::Cad { key: key("k"), old_value: key("v3") }), done(false));
    // DELETE succeeds whether or not the key is there.
    assert_eq!(c.call(17, &KvldsRequest::Delete { key: key("k2") }), done(true));
    assert_eq!(c.call(18, &KvldsRequest::Delete { key: key("k2") }), done(true));
    assert_eq!(c.call(19, &get("k2")), KvldsResponse::Get(None));
    // Empty keys and values are keys and values.
    assert_eq!(c.call(20, &set("", "")), done(true));
    assert_eq!(c.call(21, &get("")), KvldsResponse::Get(Some(Bytes::new())));
    assert_eq!(c.call(22, &KvldsRequest::Delete { key: Bytes::new() }), done(true));
    // The longest key and value the block size allows.
    let (long_key, long_value) = (Bytes::from(vec![0xffu8; 64]), Bytes::from(vec![0xeeu8; 96]));
    assert_eq!(
        c.call(23, &KvldsRequest::Set { key: long_key.clone(), value: long_value.clone() }),
        done(true)
    );
    assert_eq!(
        c.call(24, &KvldsRequest::Get { key: long_key.clone() }),
        KvldsResponse::Get(Some(long_value))
    );
    assert_eq!(c.call(25, &KvldsRequest::Delete { key: long_key }), done(true));
    // A GET of a key over the limit is answered "absent".
    assert_eq!(c.call(26, &KvldsRequest::Get { key: Bytes::from(vec![1u8; 65]) }), KvldsResponse::Get(None));

    // RANGE: start <= key < end, in key order, paged with `next`.
    for (i, k) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        assert_eq!(c.call(100 + i as u64, &set(k, &k.repeat(2))), done(true));
    }
    let KvldsResponse::Range { next, pairs: got } = c.call(200, &range(1000, "b", "d")) else { panic!() };
    assert_eq!(got, pairs(&[("b", "bb"), ("c", "cc")]));
    // (`next` is past "c"; a server may clamp it to the end or leave it
    // empty.)
    assert!(next.is_empty() || next.as_ref() > b"c".as_ref(), "next {next:?}");
    let KvldsResponse::Range { next, pairs: got } = c.call(201, &range(1000, "", "")) else { panic!() };
    assert_eq!(got, pairs(&[("a", "aa"), ("b", "bb"), ("c", "cc"), ("d", "dd"), ("e", "ee")]));
    assert!(next.is_empty() || next.as_ref() > b"e".as_ref(), "next {next:?}");
    // A budget of 0 still returns the first pair, with next just after it.
    let KvldsResponse::Range { next, pairs: got } = c.call(202, &range(0, "b", "")) else { panic!() };
    assert_eq!(got, pairs(&[("b", "bb")]));
    assert!(next.as_ref() > b"b".as_ref() && next.as_ref() <= b"c".as_ref(), "next {next:?}");
    // start >= end: nothing, and next = end.
    assert_eq!(
        c.call(203, &range(1000, "d", "b")),
        KvldsResponse::Range { next: key("b"), pairs: Vec::new() }
    );
    // The end key itself is excluded (kivaloo's off-by-one is not followed).
    let KvldsResponse::Range { pairs: got, .. } = c.call(204, &range(1000, "a", "c")) else { panic!() };
    assert_eq!(got, pairs(&[("a", "aa"), ("b", "bb")]));
    // Paging with a small budget visits every pair exactly once.
    let mut start = Bytes::new();
    let mut seen = Vec::new();
    for id in 300.. {
        let req = KvldsRequest::Range { max_bytes: 8, start: start.clone(), end: Bytes::new() };
        let KvldsResponse::Range { next, pairs: got } = c.call(id, &req) else { panic!() };
        seen.extend(got);
        if next.is_empty() {
            break;
        }
        assert!(next > start, "RANGE makes progress");
        start = next;
        assert!(id < 400, "paging does not end");
    }
    assert_eq!(seen, pairs(&[("a", "aa"), ("b", "bb"), ("c", "cc"), ("d", "dd"), ("e", "ee")]));

    // Acknowledged writes survive kill -9 of kvlds.
    drop(c);
    cluster.kill_kvlds();
    cluster.start_kvlds(&[]);
    let mut c = cluster.connect();
    assert_eq!(c.call(1, &get("c")), KvldsResponse::Get(Some(key("cc"))));
    assert_eq!(c.call(2, &get("k")), KvldsResponse::Get(None));
    // And kill -9 of both.
    drop(c);
    cluster.kill_kvlds();
    cluster.kill_lbs();
    cluster.start();
    let mut c = cluster.connect();
    let KvldsResponse::Range { pairs: got, .. } = c.call(3, &range(1000, "", "")) else { panic!() };
    assert_eq!(got, pairs(&[("a", "aa"), ("b", "bb"), ("c", "cc"), ("d", "dd"), ("e", "ee")]));
}

#[test]
fn bad_requests_drop_the_connection_and_the_next_one_is_served() {
    let mut cluster = Cluster::new(512);
    cluster.start();
    let mut c = cluster.connect();
    assert_eq!(c.call(1, &set("kept", "value")), KvldsResponse::Done(true));
    drop(c);

    let mut bad_crc = BytesMut::new();
    KvldsRequest::Params.encode(1, &mut bad_crc);
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x55;
    let mut long_key = BytesMut::new();
    KvldsRequest::Set { key: Bytes::from(vec![b'k'; 65]), value: key("v") }.encode(2, &mut long_key);
    let mut long_value = BytesMut::new();
    KvldsRequest::Set { key: key("k"), value: Bytes::from(vec![b'v'; 97]) }.encode(3, &mut long_value);
    let mut unknown_type = BytesMut::new();
    encode_packet(&mut unknown_type, 4, &0x0000_0199u32.to_be_bytes());
    let mut lbs_params2 = BytesMut::new();
    encode_packet(&mut lbs_params2, 5, &0x0000_0004u32.to_be_bytes());
    let mut truncated = BytesMut::new();
    encode_packet(&mut truncated, 6, &[0, 0, 1, 0x10, 5, b'a']);
    let mut trailing = BytesMut::new();
    encode_packet(&mut trailing, 7, &[0, 0, 1, 0x30, 1, b'a', 0]);

    let cases: [(&str, &[u8]); 7] = [
        ("a bad CRC", &bad_crc),
        ("a SET with a 65-byte key (max 64)", &long_key),
        ("a SET with a 97-byte value (max 96)", &long_value),
        ("an unknown request type", &unknown_type),
        ("an lbs request type", &lbs_params2),
        ("a truncated record", &truncated),
        ("bytes after the last field", &trailing),
    ];
    for (what, bytes) in cases {
        let mut c = cluster.connect();
        c.queue_raw(bytes);
        c.flush().unwrap();
        c.expect_closed(what);
        drop(c);
        // The daemon is still there, serves the next connection, and the
        // stored data is intact.
        let mut next = cluster.connect();
        assert_eq!(next.call(10, &get("kept")), KvldsResponse::Get(Some(key("value"))), "after {what}");
    }

    // A client that closes with thousands of requests pending: the work is
    // discarded and the next connection is served at once.
    let mut c = cluster.connect();
    for i in 0..3000u64 {
        c.queue(i, &KvldsRequest::Set { key: Bytes::from(format!("abandoned{i}")), value: key("x") });
        if i % 500 == 499 {
            c.flush().unwrap();
        }
    }
    c.flush().unwrap();
    drop(c);
    let mut next = cluster.connect();
    assert_eq!(next.call(1, &get("kept")), KvldsResponse::Get(Some(key("value"))));
    assert_eq!(next.call(2, &set("after", "abandon")), KvldsResponse::Done(true));
    assert_eq!(next.call(3, &get("after")), KvldsResponse::Get(Some(key("abandon"))));
}

#[test]
fn dash_1_exits_after_one_connection() {
    let mut cluster = Cluster::new(512);
    cluster.start_lbs();
    cluster.start_kvlds(&["-1"]);
    let mut c = cluster.connect();
    assert_eq!(c.call(1, &set("a", "b")), KvldsResponse::Done(true));
    drop(c);
    let status = cluster.wait_kvlds_exit("after its one connection (-1)");
    assert!(status.success(), "-1 exits cleanly: {status}");
}

#[test]
fn limits_that_do_not_fit_the_block_size_are_refused() {
    let mut cluster = Cluster::new(512);
    cluster.start_lbs();
    let log = cluster.tmp.path().join("refused.log");
    let cmd = cluster.kvlds_command(&["-F", "-k", "255", "-v", "255"]);
    let (status, stderr) = run_to_exit(cmd, &log);
    assert!(!status.success(), "kvlds started with -k 255 -v 255 on 512-byte blocks\n{stderr}");
    assert!(stderr.contains("kivaloo-kvlds: error: exiting:"), "the reason is logged: {stderr}");
    assert!(stderr.contains("512"), "the reason names the block size: {stderr}");
    // The lbs is still usable with limits that fit.
    cluster.start_kvlds(&["-k", "64", "-v", "96"]);
    let mut c = cluster.connect();
    assert_eq!(
        c.call(1, &KvldsRequest::Params),
        KvldsResponse::Params { max_key_len: 64, max_value_len: 96 }
    );
}

#[test]
fn explicit_limits_are_reported_and_enforced() {
    let mut cluster = Cluster::new(2048);
    cluster.start_lbs();
    cluster.start_kvlds(&["-k", "10", "-v", "20"]);
    let mut c = cluster.connect();
    assert_eq!(
        c.call(1, &KvldsRequest::Params),
        KvldsResponse::Params { max_key_len: 10, max_value_len: 20 }
    );
    assert_eq!(c.call(2, &set("0123456789", "01234567890123456789")), KvldsResponse::Done(true));
    c.queue(3, &set("0123456789x", "v"));
    c.flush().unwrap();
    c.expect_closed("a key over -k");
}

#[test]
fn kvlds_exits_when_lbs_dies() {
    let mut cluster = Cluster::new(512);
    cluster.start();
    let mut c = cluster.connect();
    assert_eq!(c.call(1, &set("a", "b")), KvldsResponse::Done(true));
    cluster.kill_lbs();
    let status = cluster.wait_kvlds_exit("after lbs was killed");
    assert!(!status.success(), "losing lbs is a failure: {status}");
    c.expect_closed("kvlds exited");
    let log = std::fs::read_to_string(cluster.kvlds_log()).unwrap();
    assert!(log.contains("kivaloo-kvlds: error: exiting:"), "the reason is logged: {log}");
}

#[test]
fn refuses_to_start_without_its_lbs() {
    let cluster = Cluster::new(512);
    for foreground in [true, false] {
        let log = cluster.tmp.path().join(format!("nolbs-{foreground}.log"));
        let cmd = cluster.kvlds_command(if foreground { &["-F"] } else { &[] });
        let (status, stderr) = run_to_exit(cmd, &log);
        assert!(!status.success());
        assert!(stderr.contains("cannot connect to lbs at"), "{stderr}");
    }
}

#[test]
fn flags_are_checked() {
    let cluster = Cluster::new(512);
    let log = cluster.tmp.path().join("flags.log");
    for (flags, expect) in [
        (&["-C", "100", "-c", "1M"][..], "cannot be used with"),
        (&["-k", "256"][..], "-k"),
        (&["-w", "soon"][..], "-w"),
        (&["-c", "12x"][..], "-c"),
        (&["-g", "0"][..], "-g"),
        (&["-S", "x"][..], "-S"),
    ] {
        let mut cmd = cluster.kvlds_command(flags);
        cmd.arg("-F");
        let _ = std::fs::remove_file(&log);
        let (status, stderr) = run_to_exit(cmd, &log);
        assert!(!status.success(), "{flags:?} accepted");
        assert!(stderr.contains(expect), "{flags:?}: {stderr}");
    }
    let out = Command::new(KVLDS_BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("kivaloo-kvlds "));
}

#[test]
fn daemon_mode_returns_once_ready_and_writes_the_pidfile() {
    let mut cluster = Cluster::new(1024);
    cluster.start_lbs();
    let mut parent = Daemon(Some(
        cluster.kvlds_command(&["-w", "0.001", "-g", "64", "-C", "1000", "-S", "2"]).spawn().unwrap(),
    ));
    let status = parent.wait_timeout(TIMEOUT).expect("the command returns once kvlds is ready");
    parent.0 = None;
    assert!(status.success(), "{status}\n{}", cluster.logs());
    // Listening already: connect without waiting.
    let mut c = Conn::new(try_connect(&cluster.kvlds_addr).expect("listening when the command returned"));
    assert_eq!(c.call(1, &set("x", "y")), KvldsResponse::Done(true));
    drop(c);
    let pidfile = format!("{}.pid", cluster.kvlds_addr);
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(Command::new("kill").arg(pid.to_string()).status().unwrap().success());
    let deadline = Instant::now() + TIMEOUT;
    while Path::new(&pidfile).exists() {
        assert!(Instant::now() < deadline, "kvlds did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = std::fs::read_to_string(cluster.kvlds_log()).unwrap();
    assert!(log.contains("exiting: stopping on SIGTERM"), "{log}");
}

#[test]
fn serves_over_tcp_with_lbs_over_tcp() {
    let mut cluster = Cluster::new_tcp(1024);
    cluster.start();
    let mut c = cluster.connect();
    assert_eq!(
        c.call(1, &KvldsRequest::Params),
        KvldsResponse::Params { max_key_len: 128, max_value_len: 192 }
    );
    assert_eq!(c.call(2, &set("tcp", "yes")), KvldsResponse::Done(true));
    assert_eq!(c.call(3, &get("tcp")), KvldsResponse::Get(Some(key("yes"))));
}

// ----- b. random operations, kill -9 and a model -------------------------------

/// Operations sent in the crash test (acknowledged or not).
const CRASH_TEST_OPS: u64 = 100_000;
/// Distinct keys the crash test works on.
const CRASH_TEST_KEYS: usize = 3000;
/// Requests in flight at once on the crash test's connection.
const CRASH_TEST_IN_FLIGHT_MAX: usize = 256;
/// Operations between two faults: drawn in this range.
const CRASH_TEST_FAULT_EVERY: (u64, u64) = (1_000, 7_000);

/// xorshift64*, seeded through splitmix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.below(hi - lo)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// 1 to 40 random bytes.
    fn short_bytes(&mut self) -> Bytes {
        let len = 1 + self.below(40) as usize;
        Bytes::from((0..len).map(|_| self.next() as u8).collect::<Vec<u8>>())
    }
}

/// A request of the crash test, with what the model needs to judge its
/// response. Keys are indexes into the sorted key list.
#[derive(Debug, Clone)]
enum Op {
    Set {
        k: usize,
        v: Bytes,
    },
    Delete {
        k: usize,
    },
    Add {
        k: usize,
        v: Bytes,
    },
    Modify {
        k: usize,
        v: Bytes,
    },
    Cas {
        k: usize,
        old: Bytes,
        new: Bytes,
    },
    Cad {
        k: usize,
        old: Bytes,
    },
    /// `during`: when a write on `k` was in flight as this GET was sent,
    /// the values `k` could have before that write.
    Get {
        k: usize,
        during: Option<Vec<Value>>,
    },
    /// keys[first..end]; `end == keys.len()` means an open end.
    Range {
        first: usize,
        end: usize,
        max_bytes: u32,
    },
}

impl Op {
    fn keys(&self) -> std::ops::Range<usize> {
        match *self {
            Op::Set { k, .. }
            | Op::Delete { k }
            | Op::Add { k, .. }
            | Op::Modify { k, .. }
            | Op::Cas { k, .. }
            | Op::Cad { k, .. }
            | Op::Get { k, .. } => k..k + 1,
            Op::Range { first, end, .. } => first..end,
        }
    }

    fn is_modifying(&self) -> bool {
        !matches!(self, Op::Get { .. } | Op::Range { .. })
    }
}

type Value = Option<Bytes>;

/// What the store may hold: for each key, the set of values it may have
/// (one when certain; more after requests whose outcome is unknown).
///
/// Concurrency per key: at most one write in flight, and nothing else with
/// it but one GET; a write is sent only to a key with nothing in flight. So
/// the acknowledgements of writes to a key come in the order of their
/// effects, and a GET that overlaps a write sees either the value before
/// it or the write's own; if it sees the write's, the write happened (a
/// read sees only committed, durable data), whatever becomes of its
/// acknowledgement.
struct Model {
    keys: Vec<Bytes>,
    possible: Vec<Vec<Value>>,
    /// Keys with an unknown write from a connection we closed while kvlds
    /// lived on: that write may still land, so reads check but do not
    /// narrow. Cleared when kvlds dies or an acknowledged write resolves it.
    loose: Vec<bool>,
    /// The write in flight on each key (its request ID).
    writer: Vec<Option<u64>>,
    /// Whether a GET or RANGE covering each key is in flight.
    reading: Vec<bool>,
    /// Keys written lately, for GETs that overlap a write.
    recent_writes: std::collections::VecDeque<usize>,
}

fn describe(v: &Value) -> String {
    match v {
        None => "absent".into(),
        Some(b) => format!("{:02x?}", &b[..]),
    }
}

fn describe_set(p: &[Value]) -> String {
    p.iter().map(describe).collect::<Vec<_>>().join(" or ")
}

impl Model {
    fn new(rng: &mut Rng, key_count: usize) -> Model {
        let mut set = BTreeSet::new();
        while set.len() < key_count {
            set.insert(rng.short_bytes());
        }
        let keys: Vec<Bytes> = set.into_iter().collect();
        Model {
            possible: vec![vec![None]; keys.len()],
            loose: vec![false; keys.len()],
            writer: vec![None; keys.len()],
            reading: vec![false; keys.len()],
            recent_writes: std::collections::VecDeque::new(),
            keys,
        }
    }

    /// Whether nothing is in flight on `keys`.
    fn idle(&self, keys: std::ops::Range<usize>) -> bool {
        keys.clone().all(|k| self.writer[k].is_none()) && !self.reading[keys].iter().any(|&r| r)
    }

    /// Records that request `id` is in flight (`on`) or not any more.
    fn track(&mut self, id: u64, op: &Op, on: bool) {
        for k in op.keys() {
            if op.is_modifying() {
                assert_eq!(self.writer[k], if on { None } else { Some(id) }, "key {k}: writers overlap");
                self.writer[k] = if on { Some(id) } else { None };
            } else {
                assert_ne!(self.reading[k], on, "key {k}: readers overlap");
                self.reading[k] = on;
            }
        }
        if on && op.is_modifying() {
            self.recent_writes.push_back(op.keys().start);
            if self.recent_writes.len() > 64 {
                self.recent_writes.pop_front();
            }
        }
    }

    /// A random operation allowed by the rules above, or None if the few
    /// keys tried were all busy.
    fn choose(&self, rng: &mut Rng) -> Option<Op> {
        for _ in 0..8 {
            let roll = rng.below(100);
            if roll < 5 {
                let first = rng.below(self.keys.len() as u64) as usize;
                let end = (first + 1 + rng.below(16) as usize).min(self.keys.len());
                if self.idle(first..end) {
                    let max_bytes = if rng.chance(10) { 0 } else { rng.below(800) as u32 };
                    return Some(Op::Range { first, end, max_bytes });
                }
                continue;
            }
            if roll < 30 {
                // A GET, often of a key just written (overlapping the
                // write if it is still in flight).
                let k = match self.recent_writes.len() {
                    n if n > 0 && rng.chance(40) => self.recent_writes[rng.below(n as u64) as usize],
                    _ => rng.below(self.keys.len() as u64) as usize,
                };
                if self.reading[k] {
                    continue;
                }
                let during = self.writer[k].map(|_| self.possible[k].clone());
                return Some(Op::Get { k, during });
            }
            let k = rng.below(self.keys.len() as u64) as usize;
            if !self.idle(k..k + 1) {
                continue;
            }
            // An old value for CAS and CAD: usually one it may have.
            let present: Vec<&Bytes> = self.possible[k].iter().flatten().collect();
            let mut old = || {
                if !present.is_empty() && rng.chance(70) {
                    present[rng.below(present.len() as u64) as usize].clone()
                } else {
                    rng.short_bytes()
                }
            };
            return Some(match roll {
                30..=54 => Op::Set { k, v: rng.short_bytes() },
                55..=64 => Op::Delete { k },
                65..=74 => Op::Add { k, v: rng.short_bytes() },
                75..=81 => Op::Modify { k, v: rng.short_bytes() },
                82..=91 => {
                    let old = old();
                    Op::Cas { k, old, new: rng.short_bytes() }
                }
                _ => Op::Cad { k, old: old() },
            });
        }
        None
    }

    fn request(&self, op: &Op) -> KvldsRequest {
        let key = |k: usize| self.keys[k].clone();
        match op.clone() {
            Op::Set { k, v } => KvldsRequest::Set { key: key(k), value: v },
            Op::Delete { k } => KvldsRequest::Delete { key: key(k) },
            Op::Add { k, v } => KvldsRequest::Add { key: key(k), value: v },
            Op::Modify { k, v } => KvldsRequest::Modify { key: key(k), value: v },
            Op::Cas { k, old, new } => KvldsRequest::Cas { key: key(k), old_value: old, new_value: new },
            Op::Cad { k, old } => KvldsRequest::Cad { key: key(k), old_value: old },
            Op::Get { k, .. } => KvldsRequest::Get { key: key(k) },
            Op::Range { first, end, max_bytes } => KvldsRequest::Range {
                max_bytes,
                // From the very beginning sometimes: no key is empty.
                start: if first == 0 { Bytes::new() } else { key(first) },
                end: if end == self.keys.len() { Bytes::new() } else { key(end) },
            },
        }
    }

    fn may_be(&self, k: usize, v: &Value) -> bool {
        self.possible[k].contains(v)
    }

    fn add_possible(&mut self, k: usize, v: Value) {
        if !self.may_be(k, &v) {
            self.possible[k].push(v);
        }
    }

    /// The value write `op` gives its key if it takes effect from some value
    /// the key may have now; None if it can change nothing.
    fn may_produce(&self, op: &Op) -> Option<Value> {
        match op.clone() {
            Op::Set { v, .. } => Some(Some(v)),
            Op::Delete { .. } => Some(None),
            Op::Add { k, v } => self.may_be(k, &None).then_some(Some(v)),
            Op::Modify { k, v } => self.possible[k].iter().any(|cur| cur.is_some()).then_some(Some(v)),
            Op::Cas { k, old, new } => self.may_be(k, &Some(old)).then_some(Some(new)),
            Op::Cad { k, old } => self.may_be(k, &Some(old)).then_some(None),
            Op::Get { .. } | Op::Range { .. } => None,
        }
    }

    fn unexpected(&self, k: usize, v: &Value, allowed: &[Value]) -> String {
        format!(
            "key {k} ({:02x?}) holds {}, but it may only be {}",
            &self.keys[k][..],
            describe(v),
            describe_set(allowed)
        )
    }

    /// The store was seen to hold `v` at `k`, with nothing in flight on it.
    fn observe(&mut self, k: usize, v: Value) -> Result<(), String> {
        if !self.may_be(k, &v) {
            return Err(self.unexpected(k, &v, &self.possible[k]));
        }
        if !self.loose[k] {
            self.possible[k] = vec![v];
        }
        Ok(())
    }

    /// The condition of a conditional write held (`held`) or not; `holds`
    /// says for each possible value whether the condition holds there.
    fn conditional(
        &mut self,
        k: usize,
        held: bool,
        holds: impl Fn(&Value) -> bool,
        new: Value,
    ) -> Result<(), String> {
        if !self.possible[k].iter().any(|v| holds(v) == held) {
            return Err(format!(
                "key {k} ({:02x?}): the condition {} but the key may only be {}",
                &self.keys[k][..],
                if held { "held" } else { "did not hold" },
                describe_set(&self.possible[k])
            ));
        }
        if held {
            self.possible[k] = vec![new];
            self.loose[k] = false;
        } else if !self.loose[k] {
            self.possible[k].retain(|v| !holds(v));
        }
        Ok(())
    }

    /// Judges the acknowledgement of write `op` and updates the model.
    fn on_write_response(&mut self, op: &Op, resp: KvldsResponse) -> Result<(), String> {
        let some = |v: &Bytes| Some(v.clone());
        match (op, resp) {
            (Op::Set { k, v }, KvldsResponse::Done(true)) => {
                self.possible[*k] = vec![some(v)];
                self.loose[*k] = false;
                Ok(())
            }
            (Op::Delete { k }, KvldsResponse::Done(true)) => {
                self.possible[*k] = vec![None];
                self.loose[*k] = false;
                Ok(())
            }
            (Op::Add { k, v }, KvldsResponse::Done(held)) => {
                self.conditional(*k, held, |cur| cur.is_none(), some(v))
            }
            (Op::Modify { k, v }, KvldsResponse::Done(held)) => {
                self.conditional(*k, held, |cur| cur.is_some(), some(v))
            }
            (Op::Cas { k, old, new }, KvldsResponse::Done(held)) => {
                self.conditional(*k, held, |cur| cur.as_ref() == Some(old), some(new))
            }
            (Op::Cad { k, old }, KvldsResponse::Done(held)) => {
                self.conditional(*k, held, |cur| cur.as_ref() == Some(old), None)
            }
            (op, resp) => Err(format!("{op:?} was answered {resp:?}")),
        }
    }

    fn on_range(
        &mut self,
        first: usize,
        end: usize,
        next: Bytes,
        pairs: Vec<(Bytes, Bytes)>,
    ) -> Result<(), String> {
        let what = format!("RANGE over keys {first}..{end}");
        let start: &[u8] = if first == 0 { b"" } else { &self.keys[first] };
        // A `next` past the end (or empty) means the whole range was
        // covered; keys past the end are not this RANGE's business.
        if !next.is_empty() && next.as_ref() <= start {
            return Err(format!("{what}: next {next:02x?} makes no progress"));
        }
        let mut returned = HashMap::new();
        let mut last: Option<usize> = None;
        for (k, v) in pairs {
            let Ok(j) = self.keys.binary_search(&k) else {
                return Err(format!("{what}: returned {k:02x?}, a key never written"));
            };
            if j < first || j >= end || last.is_some_and(|l| l >= j) {
                return Err(format!("{what}: returned key {j} out of range or out of order"));
            }
            if !next.is_empty() && k >= next {
                return Err(format!("{what}: returned key {j} at or past next {next:02x?}"));
            }
            last = Some(j);
            returned.insert(j, v);
        }
        for j in first..end {
            if !next.is_empty() && self.keys[j] >= next {
                break;
            }
            let v = returned.remove(&j);
            self.observe(j, v).map_err(|e| format!("{what}: {e}"))?;
        }
        Ok(())
    }

    /// Write `op` was sent and its outcome will never be known; `seen` is
    /// the value a GET saw it give its key, if one did.
    fn on_indeterminate(&mut self, op: &Op, seen: Option<Value>, may_still_land: bool) {
        let k = op.keys().start;
        if let Some(v) = seen {
            // It happened: a read saw it.
            self.possible[k] = vec![v];
        } else if let Some(v) = self.may_produce(op) {
            self.add_possible(k, v);
            if may_still_land {
                self.loose[k] = true;
            }
        }
    }
}

#[derive(Debug, Default)]
struct CrashStats {
    acked_writes: u64,
    reads_checked: u64,
    reads_during_writes: u64,
    reads_saw_unacked_write: u64,
    indeterminate_writes: u64,
    kvlds_kills: u64,
    lbs_kills: u64,
    both_kills: u64,
    disconnects: u64,
}

/// A request in flight in the crash test.
struct Pending {
    op: Op,
    /// For a write: the value a GET overlapping it saw it give the key.
    seen: Option<Value>,
}

/// The crash test's driver: the cluster, the connection, the requests in
/// flight and the model.
struct CrashRun {
    seed: u64,
    rng: Rng,
    model: Model,
    cluster: Cluster,
    conn: Option<Conn>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    stats: CrashStats,
}

impl CrashRun {
    fn fail(&self, message: &str) -> ! {
        panic!("seed {} (rerun with KVLDS_CRASH_SEED={}): {message}", self.seed, self.seed)
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connected")
    }

    fn send(&mut self, op: Op) {
        let id = self.next_id;
        self.next_id += 1;
        self.model.track(id, &op, true);
        let req = self.model.request(&op);
        self.conn().queue(id, &req);
        self.pending.insert(id, Pending { op, seen: None });
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Response(id, record) => {
                let Some(Pending { op, seen }) = self.pending.remove(&id) else {
                    self.fail(&format!("a response to request {id}, which is not in flight"))
                };
                self.model.track(id, &op, false);
                let kind = self.model.request(&op).kind();
                let resp = match KvldsResponse::decode(kind, record) {
                    Ok(r) => r,
                    Err(e) => self.fail(&format!("{op:?}: malformed response: {e}")),
                };
                if let Err(e) = self.judge(&op, seen, resp) {
                    self.fail(&e);
                }
            }
            Event::Closed => self.fail("kvlds closed the connection unexpectedly"),
            Event::Garbage(e) => self.fail(&format!("kvlds sent garbage: {e}")),
        }
    }

    /// Checks a response against the model and updates it.
    fn judge(&mut self, op: &Op, seen: Option<Value>, resp: KvldsResponse) -> Result<(), String> {
        let model = &mut self.model;
        match (op, resp) {
            (Op::Get { k, during: None }, KvldsResponse::Get(v)) => {
                self.stats.reads_checked += 1;
                model.observe(*k, v)
            }
            (Op::Get { k, during: Some(before) }, KvldsResponse::Get(v)) => {
                self.stats.reads_checked += 1;
                self.stats.reads_during_writes += 1;
                let k = *k;
                if before.contains(&v) {
                    return Ok(());
                }
                match model.writer[k] {
                    // The write is still in flight: the GET saw its effect.
                    Some(writer) => {
                        let w = &self.pending[&writer].op;
                        if model.may_produce(w).as_ref() != Some(&v) {
                            let mut allowed = before.clone();
                            allowed.extend(model.may_produce(w));
                            return Err(model.unexpected(k, &v, &allowed));
                        }
                        self.stats.reads_saw_unacked_write += 1;
                        self.pending.get_mut(&writer).expect("in flight").seen = Some(v);
                        Ok(())
                    }
                    // The write was acknowledged first: its value.
                    None if model.may_be(k, &v) => Ok(()),
                    None => {
                        let mut allowed = before.clone();
                        allowed.extend(model.possible[k].iter().cloned());
                        Err(model.unexpected(k, &v, &allowed))
                    }
                }
            }
            (Op::Range { first, end, .. }, KvldsResponse::Range { next, pairs }) => {
                self.stats.reads_checked += 1;
                model.on_range(*first, *end, next, pairs)
            }
            (Op::Get { .. } | Op::Range { .. }, resp) => Err(format!("{op:?} was answered {resp:?}")),
            (_, resp) => {
                self.stats.acked_writes += 1;
                model.on_write_response(op, resp)?;
                let k = op.keys().start;
                match seen {
                    Some(v) if !model.may_be(k, &v) => Err(format!(
                        "{op:?} was answered as it was, yet a GET overlapping it saw it give {}",
                        describe(&v)
                    )),
                    _ => Ok(()),
                }
            }
        }
    }

    /// After the connection ended: responses that arrived count;
    /// everything else in flight is indeterminate.
    fn connection_lost(&mut self, events: Vec<Event>, may_still_land: bool) {
        for event in events {
            self.handle(event);
        }
        for (id, Pending { op, seen }) in std::mem::take(&mut self.pending) {
            self.model.track(id, &op, false);
            if op.is_modifying() {
                self.stats.indeterminate_writes += 1;
                self.model.on_indeterminate(&op, seen, may_still_land);
            }
        }
    }

    /// Collects every event until the server's side closes.
    fn drain_until_closed(&mut self) -> Vec<Event> {
        let conn = self.conn.take().expect("connected");
        let mut events = Vec::new();
        loop {
            match conn.events.recv_timeout(TIMEOUT) {
                Ok(Event::Closed) => break,
                Ok(e) => events.push(e),
                Err(_) => self.fail("the connection stayed open after the kill"),
            }
        }
        drop(conn);
        events
    }

    /// Nothing from before can land any more: kvlds died.
    fn after_kvlds_died(&mut self) {
        self.model.loose.iter_mut().for_each(|l| *l = false);
    }

    fn fault(&mut self) {
        if self.rng.chance(50) {
            std::thread::sleep(Duration::from_micros(self.rng.below(3000)));
        }
        let roll = self.rng.below(100);
        if roll < 10 {
            // We close the connection with requests in flight.
            self.stats.disconnects += 1;
            let events = self.conn.take().expect("connected").close();
            self.connection_lost(events, true);
        } else if roll < 50 {
            self.stats.kvlds_kills += 1;
            self.cluster.kill_kvlds();
            let events = self.drain_until_closed();
            self.connection_lost(events, false);
            self.after_kvlds_died();
            self.start_kvlds();
        } else if roll < 90 {
            self.stats.lbs_kills += 1;
            self.cluster.kill_lbs();
            let events = self.drain_until_closed();
            self.cluster.wait_kvlds_exit("after lbs was killed");
            self.connection_lost(events, false);
            self.after_kvlds_died();
            self.cluster.start_lbs();
            self.start_kvlds();
        } else {
            self.stats.both_kills += 1;
            if self.rng.chance(50) {
                self.cluster.kill_kvlds();
                self.cluster.kill_lbs();
            } else {
                self.cluster.kill_lbs();
                self.cluster.kill_kvlds();
            }
            let events = self.drain_until_closed();
            self.connection_lost(events, false);
            self.after_kvlds_died();
            self.cluster.start_lbs();
            self.start_kvlds();
        }
        self.conn = Some(self.cluster.connect());
    }

    /// Starts kvlds, now and then with a small page cache (so that
    /// requests wait for pages from lbs and pages are evicted) or with a
    /// commit delay.
    fn start_kvlds(&mut self) {
        let flags: &[&str] = match self.rng.below(4) {
            0 => &["-C", "32"],
            1 => &["-w", "0.002", "-g", "64"],
            _ => &[],
        };
        self.cluster.start_kvlds(flags);
    }

    /// Waits for at least one event, then takes all that are there.
    fn receive(&mut self) {
        let Ok(first) = self.conn().events.recv_timeout(TIMEOUT) else {
            let mut waiting: Vec<(&u64, &Pending)> = self.pending.iter().collect();
            waiting.sort_by_key(|(id, _)| **id);
            let oldest: Vec<&Op> = waiting.iter().take(3).map(|(_, p)| &p.op).collect();
            let alive = |d: &mut Option<Daemon>| match d.as_mut().map(|d| d.child().try_wait()) {
                Some(Ok(None)) => "running",
                Some(_) => "exited",
                None => "not started",
            };
            let (lbs, kvlds) = (alive(&mut self.cluster.lbs), alive(&mut self.cluster.kvlds));
            self.fail(&format!(
                "no response within {TIMEOUT:?} with {} requests in flight (lbs {lbs}, kvlds {kvlds}); \
                 the oldest: {oldest:?}",
                self.pending.len()
            ))
        };
        self.handle(first);
        while let Some(event) = self.conn().try_event() {
            self.handle(event);
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.conn().flush() {
            self.fail(&format!("sending failed: {e}"));
        }
    }

    /// Sends `ops` (on distinct keys), at most `in_flight` at a time, and
    /// judges every response; no faults.
    fn run_all(&mut self, ops: Vec<Op>, in_flight: usize) {
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() || !self.pending.is_empty() {
            while self.pending.len() < in_flight {
                let Some(op) = ops.next() else { break };
                self.send(op);
            }
            self.flush();
            self.receive();
        }
    }
}

fn crash_test_seed() -> u64 {
    match std::env::var("KVLDS_CRASH_SEED") {
        Ok(s) => s.parse().expect("KVLDS_CRASH_SEED is a u64"),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 40)
        }
    }
}

/// 100,000 random pipelined operations over a few thousand keys, with
/// kvlds, lbs or both killed (SIGKILL) at random moments and restarted, and
/// the connection sometimes closed by us with requests in flight. Every
/// answer is checked against the model as it arrives; at the end
/// everything is restarted once more and every key read back.
#[test]
fn random_operations_survive_kill_9_of_kvlds_and_lbs() {
    let seed = crash_test_seed();
    eprintln!(
        "kvlds crash test: seed {seed} (KVLDS_CRASH_SEED={seed} reuses it: the same keys and random draws, though real timing differs)"
    );
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let model = Model::new(&mut rng, CRASH_TEST_KEYS);
    let mut cluster = Cluster::new(512);
    cluster.start();
    let conn = Some(cluster.connect());
    let mut run = CrashRun {
        seed,
        rng,
        model,
        cluster,
        conn,
        pending: HashMap::new(),
        next_id: 1,
        stats: CrashStats::default(),
    };

    let mut sent = 0u64;
    let mut next_fault_at = run.rng.range(CRASH_TEST_FAULT_EVERY);
    while sent < CRASH_TEST_OPS || !run.pending.is_empty() {
        if sent >= next_fault_at && sent < CRASH_TEST_OPS {
            run.fault();
            next_fault_at = sent + run.rng.range(CRASH_TEST_FAULT_EVERY);
            continue;
        }
        let mut queued = 0;
        while sent < CRASH_TEST_OPS && sent < next_fault_at && run.pending.len() < CRASH_TEST_IN_FLIGHT_MAX {
            let Some(op) = run.model.choose(&mut run.rng) else { break };
            run.send(op);
            sent += 1;
            queued += 1;
        }
        if queued > 0 {
            run.flush();
        }
        if sent >= next_fault_at && sent < CRASH_TEST_OPS {
            continue; // the fault strikes with requests in flight
        }
        run.receive();
    }
    let workload_secs = started.elapsed().as_secs_f64();

    // Restart everything once more and read every key back.
    drop(run.conn.take());
    run.cluster.kill_kvlds();
    run.cluster.kill_lbs();
    run.after_kvlds_died();
    run.cluster.start();
    run.conn = Some(run.cluster.connect());
    let uncertain = run.model.possible.iter().filter(|p| p.len() > 1).count();
    let gets = (0..CRASH_TEST_KEYS).map(|k| Op::Get { k, during: None }).collect();
    run.run_all(gets, CRASH_TEST_IN_FLIGHT_MAX);
    for (k, p) in run.model.possible.iter().enumerate() {
        assert_eq!(p.len(), 1, "key {k} is still uncertain after a GET");
    }
    // A full scan in pages agrees with the GETs and holds nothing else.
    let mut start = Bytes::new();
    let mut scanned = Vec::new();
    let mut id = 1u64 << 60;
    loop {
        let req = KvldsRequest::Range { max_bytes: 4096, start: start.clone(), end: Bytes::new() };
        let KvldsResponse::Range { next, pairs } = run.conn().call(id, &req) else { unreachable!() };
        id += 1;
        scanned.extend(pairs);
        if next.is_empty() {
            break;
        }
        if next <= start {
            run.fail(&format!("a full scan makes no progress at {next:02x?}"));
        }
        start = next;
    }
    let expected: Vec<(Bytes, Bytes)> = run
        .model
        .keys
        .iter()
        .zip(&run.model.possible)
        .filter_map(|(k, p)| p[0].as_ref().map(|v| (k.clone(), v.clone())))
        .collect();
    if scanned != expected {
        run.fail(&format!(
            "a full scan returned {} pairs, the GETs {} (first difference at {:?})",
            scanned.len(),
            expected.len(),
            scanned.iter().zip(&expected).position(|(a, b)| a != b)
        ));
    }

    let stats = &run.stats;
    eprintln!(
        "kvlds crash test: seed {seed}: {CRASH_TEST_OPS} ops in {workload_secs:.1} s ({:.1} s in all); {stats:?}; \
         {uncertain} keys uncertain before the final reads; {} keys present at the end",
        started.elapsed().as_secs_f64(),
        expected.len()
    );
    assert!(stats.kvlds_kills + stats.lbs_kills + stats.both_kills >= 4, "too few kills to mean anything");
    assert!(stats.acked_writes > CRASH_TEST_OPS / 3, "too few acknowledged writes to mean anything");
    assert!(!expected.is_empty());
}
