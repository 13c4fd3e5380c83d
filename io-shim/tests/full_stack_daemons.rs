//! End-to-end tests of the whole chain of real daemons: `kivaloo-lbs` <-
//! `kivaloo-kvlds` <- `kivaloo-mux`, each a child process in the foreground
//! (`-F`, fsync on), talking over unix or TCP sockets, with clients of
//! [`kivaloo_io_shim::client::Client`] (and raw sockets for misbehaving
//! ones) connected to the mux; and `kill -9` of each daemon in turn under a
//! random workload of several clients checked against a model.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::future::Future;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use kivaloo::kvlds_proto::KvldsRequest;
use kivaloo::packet::encode_packet;
use kivaloo_io_shim::addr::SocketAddr;
use kivaloo_io_shim::client::{Client, Effect, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LBS_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-lbs");
const KVLDS_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-kvlds");
const MUX_BIN: &str = env!("CARGO_BIN_EXE_kivaloo-mux");

/// How long a test waits for a daemon to listen or exit, or for any one
/// answer, before it fails (generous: the machine is shared).
const TIMEOUT: Duration = Duration::from_secs(30);
/// lbs's block size: keys and values of up to 255 bytes.
const BLOCK_SIZE: u32 = 2048;

// ----- the daemons -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Lbs,
    Kvlds,
    Mux,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Lbs => "lbs",
            Which::Kvlds => "kvlds",
            Which::Mux => "mux",
        }
    }
}

/// A daemon in the foreground; killed (SIGKILL) and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether something listens at `addr` (a unix path or `host:port`).
fn listening(addr: &str) -> bool {
    if addr.contains('/') {
        UnixStream::connect(addr).is_ok()
    } else {
        TcpStream::connect(addr).is_ok()
    }
}

fn free_tcp_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

/// lbs, kvlds and a mux on a temp directory. Each daemon's stderr is
/// appended to `<name>.log` there, shown if the test fails; every daemon
/// still running is killed when the stack is dropped.
struct Stack {
    tmp: tempfile::TempDir,
    lbs_addr: String,
    kvlds_addr: String,
    /// The mux's sources (`-s`), the first one the clients' default.
    mux_addrs: Vec<String>,
    mux_flags: Vec<String>,
    /// Indexed by `Which as usize`.
    daemons: [Option<Daemon>; 3],
}

impl Stack {
    /// Every daemon on a unix socket in the temp directory; the mux also
    /// on `extra_mux_sources`.
    fn unix(extra_mux_sources: &[String], mux_flags: &[&str]) -> Stack {
        let tmp = tempfile::tempdir().unwrap();
        let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
        let (lbs, kvlds) = (path("lbs.sock"), path("kvlds.sock"));
        let mut mux = vec![path("mux.sock")];
        mux.extend_from_slice(extra_mux_sources);
        Stack::with_addrs(tmp, lbs, kvlds, mux, mux_flags)
    }

    fn tcp() -> Stack {
        let tmp = tempfile::tempdir().unwrap();
        Stack::with_addrs(tmp, free_tcp_addr(), free_tcp_addr(), vec![free_tcp_addr()], &[])
    }

    fn with_addrs(
        tmp: tempfile::TempDir,
        lbs_addr: String,
        kvlds_addr: String,
        mux_addrs: Vec<String>,
        mux_flags: &[&str],
    ) -> Stack {
        std::fs::create_dir(tmp.path().join("data")).unwrap();
        let mux_flags = mux_flags.iter().map(|s| s.to_string()).collect();
        Stack { tmp, lbs_addr, kvlds_addr, mux_addrs, mux_flags, daemons: [None, None, None] }
    }

    fn mux_addr(&self) -> SocketAddr {
        SocketAddr::parse(&self.mux_addrs[0])
    }

    fn log_path(&self, w: Which) -> PathBuf {
        self.tmp.path().join(format!("{}.log", w.name()))
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for w in [Which::Lbs, Which::Kvlds, Which::Mux] {
            let text = std::fs::read(self.log_path(w)).unwrap_or_default();
            let tail = String::from_utf8_lossy(&text[text.len().saturating_sub(3000)..]).into_owned();
            out += &format!("--- {} log (tail) ---\n{tail}", w.name());
        }
        out
    }

    /// Starts `w` (its upstream must be running) and waits until it listens
    /// on each of its sockets.
    fn start(&mut self, w: Which) {
        assert!(self.daemons[w as usize].is_none(), "{} is already running", w.name());
        let (bin, listen) = match w {
            Which::Lbs => (LBS_BIN, vec![self.lbs_addr.clone()]),
            Which::Kvlds => (KVLDS_BIN, vec![self.kvlds_addr.clone()]),
            Which::Mux => (MUX_BIN, self.mux_addrs.clone()),
        };
        let mut cmd = Command::new(bin);
        cmd.arg("-F").arg("-p").arg(self.tmp.path().join(format!("{}.pid", w.name())));
        match w {
            Which::Lbs => {
                cmd.args(["-s", &self.lbs_addr, "-b", &BLOCK_SIZE.to_string(), "-d"]);
                cmd.arg(self.tmp.path().join("data"));
            }
            Which::Kvlds => {
                cmd.args(["-s", &self.kvlds_addr, "-l", &self.lbs_addr]);
            }
            Which::Mux => {
                cmd.args(["-t", &self.kvlds_addr]).args(&self.mux_flags);
                for s in &self.mux_addrs {
                    cmd.args(["-s", s]);
                }
            }
        }
        let log = OpenOptions::new().create(true).append(true).open(self.log_path(w)).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.daemons[w as usize] = Some(Daemon(child));
        // (A probe connection: the daemon takes it, sees it closed, and
        // goes on to the next one.)
        let deadline = Instant::now() + TIMEOUT;
        for addr in &listen {
            while !listening(addr) {
                if let Some(status) = self.exited(w) {
                    panic!("{} exited during startup ({status})\n{}", w.name(), self.logs());
                }
                assert!(Instant::now() < deadline, "{} did not listen on {addr}\n{}", w.name(), self.logs());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn start_all(&mut self) {
        self.start(Which::Lbs);
        self.start(Which::Kvlds);
        self.start(Which::Mux);
    }

    /// `kill -9`.
    fn kill(&mut self, w: Which) {
        drop(self.daemons[w as usize].take().unwrap_or_else(|| panic!("{} is not running", w.name())));
    }

    /// Its exit status if it has exited (it is then forgotten).
    fn exited(&mut self, w: Which) -> Option<ExitStatus> {
        let daemon = self.daemons[w as usize].as_mut()?;
        let status = daemon.0.try_wait().unwrap()?;
        self.daemons[w as usize] = None;
        Some(status)
    }

    fn assert_running(&mut self, w: Which) {
        if let Some(status) = self.exited(w) {
            panic!("{} exited ({status})\n{}", w.name(), self.logs());
        }
        assert!(self.daemons[w as usize].is_some(), "{} is not running", w.name());
    }

    /// Waits for `w` to exit by itself, `why`.
    fn expect_exit(&mut self, w: Which, why: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while self.exited(w).is_none() {
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {TIMEOUT:?} {why}\n{}",
                w.name(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `kill -9` of `w`, then what must follow: a daemon whose upstream died
    /// exits, and the dead are restarted in order (lbs, kvlds, mux).
    fn crash_and_restart(&mut self, w: Which) {
        self.kill(w);
        let mut dead = vec![w];
        if w == Which::Lbs {
            self.expect_exit(Which::Kvlds, "after lbs was killed");
            dead.push(Which::Kvlds);
        }
        if w != Which::Mux {
            self.expect_exit(Which::Mux, "after kvlds died");
            dead.push(Which::Mux);
        }
        for d in [Which::Lbs, Which::Kvlds, Which::Mux] {
            if dead.contains(&d) {
                self.start(d);
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

// ----- client helpers ----------------------------------------------------------

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

async fn connect(addr: &SocketAddr) -> Client {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match Client::connect(addr).await {
            Ok(c) => return c,
            Err(e) if Instant::now() >= deadline => panic!("cannot connect to {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// `f` within [`TIMEOUT`], or a panic naming `what`.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, f).await.unwrap_or_else(|_| panic!("{what}: no answer within {TIMEOUT:?}"))
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Reads from `s` until the other side closes it (EOF or an error); fails
/// if it answers anything or stays open.
async fn expect_closed_by_peer<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) {
    let mut buf = [0u8; 4096];
    match within(what, s.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{what}: {n} bytes answered instead of the connection being closed"),
    }
}

// ----- 1 to 4: the chain works, limits, misbehaving clients ------------------

#[test]
fn three_daemons_over_unix_sockets() {
    let tcp_source = free_tcp_addr();
    let mut stack = Stack::unix(std::slice::from_ref(&tcp_source), &[]);
    stack.start_all();
    let unix_addr = stack.mux_addr();
    block_on(async {
        let a = connect(&unix_addr).await;
        let c = connect(&unix_addr).await;
        let t = connect(&SocketAddr::parse(&tcp_source)).await;
        let a = &a;
        within("every request kind", async {
            assert_eq!(a.params().await.unwrap(), (255, 255));
            assert_eq!(a.get("k").await.unwrap(), None);
            a.set("k", "v1").await.unwrap();
            assert_eq!(a.get("k").await.unwrap(), Some(b("v1")));
            assert!(!a.add("k", "x").await.unwrap());
            assert!(a.add("k2", "a").await.unwrap());
            assert!(a.modify("k", "v2").await.unwrap());
            assert!(!a.modify("absent", "x").await.unwrap());
            assert!(!a.cas("k", "v1", "v3").await.unwrap());
            assert!(a.cas("k", "v2", "v3").await.unwrap());
            assert_eq!(a.get("k").await.unwrap(), Some(b("v3")));
            assert!(!a.cad("k", "v2").await.unwrap());
            assert!(a.cad("k", "v3").await.unwrap());
            assert_eq!(a.get("k").await.unwrap(), None);
            a.delete("k2").await.unwrap();
            a.delete("k2").await.unwrap();
            assert_eq!(a.get("k2").await.unwrap(), None);
            let (long_key, long_value) = (vec![0xffu8; 255], vec![0xeeu8; 255]);
            a.set(&long_key, &long_value).await.unwrap();
            assert_eq!(a.get(&long_key).await.unwrap().as_deref(), Some(&long_value[..]));
            a.delete(&long_key).await.unwrap();
            // Pipelined: many at once on one connection.
            let sets = (0..200).map(|i| a.set(format!("r{i:03}"), format!("v{i}")));
            for r in futures::future::join_all(sets).await {
                r.unwrap();
            }
            let (pairs, next) = a.range("r010", "r013", 4096).await.unwrap();
            let expect: Vec<(Bytes, Bytes)> =
                (10..13).map(|i| (b(&format!("r{i:03}")), b(&format!("v{i}")))).collect();
            assert_eq!(pairs, expect);
            assert!(next.is_empty() || next.as_ref() >= b"r012".as_ref(), "next {next:?}");
            let all = a.range_iter("r", "s").unwrap().with_page_bytes(100).collect_all().await.unwrap();
            assert_eq!(all.len(), 200);
            assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
        })
        .await;

        within("each client sees the others' writes", async {
            a.set("shared", "from a").await.unwrap();
            assert_eq!(c.get("shared").await.unwrap(), Some(b("from a")));
            assert_eq!(t.get("shared").await.unwrap(), Some(b("from a")));
            assert!(c.cas("shared", "from a", "from c").await.unwrap());
            assert_eq!(a.get("shared").await.unwrap(), Some(b("from c")));
            assert!(t.cas("shared", "from c", "from tcp").await.unwrap());
            assert_eq!(a.get("shared").await.unwrap(), Some(b("from tcp")));
            assert_eq!(c.get("shared").await.unwrap(), Some(b("from tcp")));
            // At once, on all three connections.
            let writes = (0..50).map(|i| {
                let cl = [a, &c, &t][i % 3];
                async move { cl.set(format!("w{i:02}"), format!("{i}")).await }
            });
            for r in futures::future::join_all(writes).await {
                r.unwrap();
            }
            for (i, cl) in [a, &c, &t].into_iter().enumerate() {
                let got = cl.range_iter("w", "x").unwrap().collect_all().await.unwrap();
                assert_eq!(got.len(), 50, "client {i}");
                assert_eq!(got[7], (b("w07"), b("7")));
            }
        })
        .await;
    });
    for w in [Which::Lbs, Which::Kvlds, Which::Mux] {
        stack.assert_running(w);
    }
}

#[test]
fn three_daemons_over_tcp() {
    let mut stack = Stack::tcp();
    stack.start_all();
    let addr = stack.mux_addr();
    assert!(matches!(addr, SocketAddr::Tcp(_)));
    block_on(within("basic operations over TCP", async {
        let c = connect(&addr).await;
        assert_eq!(c.params().await.unwrap(), (255, 255));
        c.set("tcp", "yes").await.unwrap();
        assert_eq!(c.get("tcp").await.unwrap(), Some(b("yes")));
        assert!(c.add("tcp2", "too").await.unwrap());
        assert!(c.cas("tcp", "yes", "indeed").await.unwrap());
        let all = c.range_iter("", "").unwrap().collect_all().await.unwrap();
        assert_eq!(all, vec![(b("tcp"), b("indeed")), (b("tcp2"), b("too"))]);
        c.delete("tcp2").await.unwrap();
        assert_eq!(c.get("tcp2").await.unwrap(), None);
        // A second client sees the first's writes.
        let d = connect(&addr).await;
        assert_eq!(d.get("tcp").await.unwrap(), Some(b("indeed")));
    }));
    for w in [Which::Lbs, Which::Kvlds, Which::Mux] {
        stack.assert_running(w);
    }
}

#[test]
fn mux_limits_connections_with_dash_n() {
    let mut stack = Stack::unix(&[], &["-n", "2"]);
    stack.start_all();
    let addr = stack.mux_addr();
    block_on(async {
        let first = connect(&addr).await;
        let second = connect(&addr).await;
        within("the first two connections are served", async {
            first.set("one", "1").await.unwrap();
            second.set("two", "2").await.unwrap();
            assert_eq!(first.get("two").await.unwrap(), Some(b("2")));
            assert_eq!(second.get("one").await.unwrap(), Some(b("1")));
        })
        .await;

        // The third connects (the kernel queues it) but is not served.
        let third = connect(&addr).await;
        let waiting = tokio::spawn({
            let third = third.clone();
            async move { third.get("one").await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Not served; the mux may also refuse by closing it.
        let waiting = if waiting.is_finished() {
            match waiting.await.unwrap() {
                Err(Error::ConnectionLost { .. }) => None,
                other => panic!("a third connection was served with -n 2: {other:?}"),
            }
        } else {
            Some(waiting)
        };
        // The two are still served meanwhile.
        within("the first two, with a third waiting", async {
            assert_eq!(first.get("two").await.unwrap(), Some(b("2")));
            assert_eq!(second.get("one").await.unwrap(), Some(b("1")));
        })
        .await;

        // Once one of the two closes, the third is served.
        drop(second);
        match waiting {
            Some(waiting) => {
                let got = within("the waiting third connection", waiting).await.unwrap();
                assert_eq!(got.unwrap(), Some(b("1")));
                assert_eq!(within("the third connection", third.get("two")).await.unwrap(), Some(b("2")));
            }
            None => {
                let again = connect(&addr).await;
                assert_eq!(within("a new third connection", again.get("one")).await.unwrap(), Some(b("1")));
            }
        }
        assert_eq!(within("the first connection", first.get("two")).await.unwrap(), Some(b("2")));
    });
    for w in [Which::Lbs, Which::Kvlds, Which::Mux] {
        stack.assert_running(w);
    }
}

#[test]
fn a_client_sending_garbage_or_vanishing_affects_no_other() {
    let tcp_source = free_tcp_addr();
    let mut stack = Stack::unix(std::slice::from_ref(&tcp_source), &[]);
    stack.start_all();
    let addr = stack.mux_addr();
    let unix_path = stack.mux_addrs[0].clone();
    block_on(async {
        let good = connect(&addr).await;
        within("setup", good.set("before", "chaos")).await.unwrap();
        let chaos_over = Arc::new(AtomicBool::new(false));

        // A well-behaved client, 8 requests in flight, checking every
        // answer, for as long as the others misbehave.
        let worker = tokio::spawn({
            let (good, chaos_over) = (good.clone(), chaos_over.clone());
            async move {
                let mut round = 0u64;
                while !chaos_over.load(Ordering::Relaxed) || round < 20 {
                    let ops = (0..8).map(|i| {
                        let good = &good;
                        async move {
                            let (k, v) = (format!("good{i}"), format!("round {round} {i}"));
                            good.set(&k, &v).await.unwrap();
                            assert_eq!(good.get(&k).await.unwrap(), Some(b(&v)), "round {round}");
                            assert!(good.cas(&k, &v, "swapped").await.unwrap(), "round {round}");
                            assert_eq!(good.get(&k).await.unwrap(), Some(b("swapped")), "round {round}");
                        }
                    });
                    within("the good client", futures::future::join_all(ops)).await;
                    round += 1;
                }
                round
            }
        });

        for attempt in 0..6u64 {
            // Garbage: bytes that are no packet, and a packet that is no
            // kvlds request; each on its own connection, which the mux closes.
            let mut garbage = tokio::net::UnixStream::connect(&unix_path).await.unwrap();
            garbage.write_all(&[0xffu8; 64]).await.unwrap();
            expect_closed_by_peer(&mut garbage, "bytes that are no packet").await;
            let mut unknown = BytesMut::new();
            encode_packet(&mut unknown, attempt, &0x0000_0199u32.to_be_bytes());
            let mut garbage = tokio::net::UnixStream::connect(&unix_path).await.unwrap();
            garbage.write_all(&unknown).await.unwrap();
            expect_closed_by_peer(&mut garbage, "an unknown request type").await;

            // Vanishing with hundreds of SETs in flight (and half a packet),
            // over unix or TCP (then with a reset, SO_LINGER 0).
            let mut sets = BytesMut::new();
            for i in 0..500u64 {
                let req = KvldsRequest::Set { key: b(&format!("abandoned{i:03}")), value: b("x") };
                req.encode(i, &mut sets);
            }
            let half = sets.len() - 7;
            if attempt % 2 == 0 {
                let mut s = tokio::net::UnixStream::connect(&unix_path).await.unwrap();
                s.write_all(&sets[..half]).await.unwrap();
            } else {
                let mut s = tokio::net::TcpStream::connect(&tcp_source).await.unwrap();
                linger_zero(&s);
                s.write_all(&sets[..half]).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        chaos_over.store(true, Ordering::Relaxed);
        let rounds = worker.await.unwrap();
        assert!(rounds >= 20);

        within("after the chaos", async {
            assert_eq!(good.get("before").await.unwrap(), Some(b("chaos")));
            let fresh = connect(&addr).await;
            assert_eq!(fresh.get("good3").await.unwrap(), Some(b("swapped")));
            // An abandoned SET happened or not; nothing else.
            let abandoned = fresh.range_iter("abandoned", "abandonee").unwrap().collect_all().await.unwrap();
            assert!(abandoned.iter().all(|(_, v)| v.as_ref() == b"x"), "{abandoned:?}");
            assert!(abandoned.len() <= 500);
        })
        .await;
    });
    stack.assert_running(Which::Mux);
    stack.assert_running(Which::Kvlds);
    stack.assert_running(Which::Lbs);
}

/// SO_LINGER with a zero timeout: closing sends a reset.
fn linger_zero(s: &impl std::os::fd::AsRawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_LINGER)");
}

// ----- 5. many clients, a model, and kill -9 of each daemon --------------------

/// Clients at once, each with its own connection.
const CLIENTS: usize = 8;
/// Keys of each client (disjoint between clients).
const KEYS_PER_CLIENT: usize = 96;
/// Operations each client sends (answered or lost).
const OPS_PER_CLIENT: u64 = 5_000;
/// Requests each client keeps in flight.
const IN_FLIGHT: usize = 64;
/// Rounds of kills, each of the mux, then kvlds, then lbs, spread over the
/// run.
const KILL_ROUNDS: usize = 3;
const KILL_ORDER: [Which; 3] = [Which::Mux, Which::Kvlds, Which::Lbs];

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

    /// Mostly short, sometimes up to the 255-byte limit, sometimes empty.
    fn bytes(&mut self) -> Bytes {
        let len = match self.below(20) {
            0 => 0,
            1 => self.below(256),
            _ => 1 + self.below(24),
        };
        Bytes::from((0..len).map(|_| self.next() as u8).collect::<Vec<u8>>())
    }
}

type Value = Option<Bytes>;

#[derive(Debug, Clone)]
enum Op {
    Get,
    Set(Bytes),
    Add(Bytes),
    Modify(Bytes),
    Cas(Bytes, Bytes),
    Cad(Bytes),
    Delete,
}

/// What a request came back with.
#[derive(Debug)]
enum Outcome {
    Got(Value),
    Done(bool),
}

async fn issue(client: Client, k: usize, key: Bytes, op: Op) -> (usize, Op, Result<Outcome, Error>) {
    let done = |r: Result<bool, Error>| r.map(Outcome::Done);
    let result = match &op {
        Op::Get => client.get(&key).await.map(Outcome::Got),
        Op::Set(v) => done(client.set(&key, v).await.map(|()| true)),
        Op::Add(v) => done(client.add(&key, v).await),
        Op::Modify(v) => done(client.modify(&key, v).await),
        Op::Cas(old, new) => done(client.cas(&key, old, new).await),
        Op::Cad(old) => done(client.cad(&key, old).await),
        Op::Delete => done(client.delete(&key).await.map(|()| true)),
    };
    (k, op, result)
}

/// One key of a client's model: the values it may have (one once certain;
/// more after a write whose effect is unknown, until an acknowledged write
/// settles it), and whether a request on it is in flight (at most one is).
struct Key {
    key: Bytes,
    possible: Vec<Value>,
    busy: bool,
}

impl Key {
    fn may_be(&self, v: &Value) -> bool {
        self.possible.contains(v)
    }

    /// The value `op` gives the key if it takes effect on some value the
    /// key may have; None if it can change nothing.
    fn may_produce(&self, op: &Op) -> Option<Value> {
        match op {
            Op::Set(v) => Some(Some(v.clone())),
            Op::Delete => Some(None),
            Op::Add(v) => self.may_be(&None).then(|| Some(v.clone())),
            Op::Modify(v) => self.possible.iter().any(Option::is_some).then(|| Some(v.clone())),
            Op::Cas(old, new) => self.may_be(&Some(old.clone())).then(|| Some(new.clone())),
            Op::Cad(old) => self.may_be(&Some(old.clone())).then_some(None),
            Op::Get => None,
        }
    }

    /// Whether conditional `op`'s condition holds on `v`; None for others.
    fn condition(op: &Op, v: &Value) -> Option<bool> {
        match op {
            Op::Add(_) => Some(v.is_none()),
            Op::Modify(_) => Some(v.is_some()),
            Op::Cas(old, _) | Op::Cad(old) => Some(v.as_ref() == Some(old)),
            _ => None,
        }
    }

    /// Judges an answer and updates the model. An acknowledged write comes
    /// after every lost one took effect or not (kvlds applies modifying
    /// requests in order, one connection's queue dropped before the next
    /// connection is served), so it settles the key.
    fn judge(&mut self, op: &Op, outcome: Outcome) -> Result<(), String> {
        match (op, outcome) {
            (Op::Get, Outcome::Got(v)) => {
                // No narrowing: a lost write may still be committing.
                if !self.may_be(&v) {
                    return Err(format!("GET answered {}", describe(&v)));
                }
            }
            (Op::Set(_) | Op::Delete, Outcome::Done(true)) => {
                self.possible = vec![self.may_produce(op).expect("SET and DELETE always write")];
            }
            (_, Outcome::Done(held)) if Key::condition(op, &None).is_some() => {
                let holds = |v: &Value| Key::condition(op, v) == Some(true);
                if !self.possible.iter().any(|v| holds(v) == held) {
                    return Err(format!("{op:?}: the condition held: {held}"));
                }
                if held {
                    self.possible = vec![self.may_produce(op).expect("the condition held")];
                } else {
                    self.possible.retain(|v| !holds(v));
                }
            }
            (op, outcome) => return Err(format!("{op:?} was answered {outcome:?}")),
        }
        Ok(())
    }

    /// `op`'s connection was lost and it may or may not have taken effect.
    fn lost(&mut self, op: &Op) {
        if let Some(v) = self.may_produce(op) {
            if !self.may_be(&v) {
                self.possible.push(v);
            }
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        None => "absent".into(),
        Some(b) => format!("{:02x?}", &b[..]),
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    acked_writes: u64,
    gets_checked: u64,
    lost_unknown: u64,
    lost_unsent: u64,
    connections: u64,
}

/// What the client tasks and the killer thread share.
struct Shared {
    seed: u64,
    addr: SocketAddr,
    /// Requests completed (answered or failed), all clients.
    progress: AtomicU64,
    /// Set if the killer thread panicked.
    killer_failed: AtomicBool,
}

/// One client: its keys, its model, and a workload.
struct Worker {
    id: usize,
    rng: Rng,
    keys: Vec<Key>,
    stats: Stats,
    shared: Arc<Shared>,
}

impl Worker {
    fn new(id: usize, seed: u64, shared: Arc<Shared>) -> Worker {
        let mut rng = Rng::new(seed ^ (id as u64).wrapping_mul(0x9E37_79B9));
        let keys = (0..KEYS_PER_CLIENT)
            .map(|i| {
                // Distinct by the prefix; a random tail makes keys of many
                // lengths (up to 255 bytes).
                let mut key = format!("c{id}/{i:03}/").into_bytes();
                let tail = rng.bytes();
                key.extend_from_slice(&tail[..tail.len().min(255 - key.len())]);
                Key { key: Bytes::from(key), possible: vec![None], busy: false }
            })
            .collect();
        Worker { id, rng, keys, stats: Stats::default(), shared }
    }

    fn fail(&self, k: usize, message: &str) -> ! {
        let seed = self.shared.seed;
        let key = &self.keys[k];
        panic!(
            "seed {seed} (rerun with FULL_STACK_SEED={seed}): client {}, key {:02x?}: {message}; \
             it may only be {}",
            self.id,
            &key.key[..],
            key.possible.iter().map(describe).collect::<Vec<_>>().join(" or ")
        )
    }

    /// A random request on an idle key, or None if the keys tried were busy.
    fn choose(&mut self) -> Option<(usize, Op)> {
        for _ in 0..8 {
            let k = self.rng.below(KEYS_PER_CLIENT as u64) as usize;
            if self.keys[k].busy {
                continue;
            }
            // An old value for CAS and CAD: usually one the key may have.
            let present: Vec<Bytes> = self.keys[k].possible.iter().flatten().cloned().collect();
            let old = if !present.is_empty() && self.rng.below(10) < 7 {
                present[self.rng.below(present.len() as u64) as usize].clone()
            } else {
                self.rng.bytes()
            };
            let op = match self.rng.below(100) {
                0..=34 => Op::Get,
                35..=59 => Op::Set(self.rng.bytes()),
                60..=69 => Op::Add(self.rng.bytes()),
                70..=84 => Op::Cas(old, self.rng.bytes()),
                85..=94 => Op::Delete,
                95..=97 => Op::Modify(self.rng.bytes()),
                _ => Op::Cad(old),
            };
            return Some((k, op));
        }
        None
    }

    /// Connects to the mux, retrying while it is down.
    async fn connect(&mut self) -> Client {
        let deadline = Instant::now() + 2 * TIMEOUT;
        loop {
            assert!(!self.shared.killer_failed.load(Ordering::Relaxed), "the killer thread failed");
            match Client::connect(&self.shared.addr).await {
                Ok(c) => {
                    self.stats.connections += 1;
                    return c;
                }
                Err(e) if Instant::now() >= deadline => {
                    panic!("client {}: cannot reconnect within {:?}: {e}", self.id, 2 * TIMEOUT)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    async fn run(mut self) -> Worker {
        let mut sent = 0u64;
        while sent < OPS_PER_CLIENT {
            let client = self.connect().await;
            let mut in_flight = FuturesUnordered::new();
            let mut lost = false;
            loop {
                while !lost && sent < OPS_PER_CLIENT && in_flight.len() < IN_FLIGHT {
                    let Some((k, op)) = self.choose() else { break };
                    self.keys[k].busy = true;
                    sent += 1;
                    in_flight.push(issue(client.clone(), k, self.keys[k].key.clone(), op));
                }
                let Ok(next) = tokio::time::timeout(TIMEOUT, in_flight.next()).await else {
                    panic!(
                        "seed {}: client {}: no answer within {TIMEOUT:?} with {} requests in flight",
                        self.shared.seed,
                        self.id,
                        in_flight.len()
                    )
                };
                let Some((k, op, result)) = next else { break };
                self.shared.progress.fetch_add(1, Ordering::Relaxed);
                self.keys[k].busy = false;
                match result {
                    Ok(outcome) => {
                        if matches!(outcome, Outcome::Got(_)) {
                            self.stats.gets_checked += 1;
                        } else {
                            self.stats.acked_writes += 1;
                        }
                        if let Err(e) = self.keys[k].judge(&op, outcome) {
                            self.fail(k, &e);
                        }
                    }
                    Err(Error::ConnectionLost { effect, .. }) => {
                        lost = true;
                        if effect == Effect::Unknown {
                            self.stats.lost_unknown += 1;
                            self.keys[k].lost(&op);
                        } else {
                            self.stats.lost_unsent += 1;
                        }
                    }
                    Err(e) => self.fail(k, &format!("{op:?} failed: {e}")),
                }
            }
        }
        self
    }
}

fn seed() -> u64 {
    match std::env::var("FULL_STACK_SEED") {
        Ok(s) => s.parse().expect("FULL_STACK_SEED is a u64"),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 40)
        }
    }
}

/// Kills the daemons of [`KILL_ORDER`] in turn, [`KILL_ROUNDS`] times, spread over the clients'
/// progress, and restarts them; returns the stack when done or told to
/// stop.
fn killer(mut stack: Stack, shared: Arc<Shared>, stop: Arc<AtomicBool>) -> Stack {
    struct Failed(Arc<Shared>);
    impl Drop for Failed {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.killer_failed.store(true, Ordering::Relaxed);
            }
        }
    }
    let _failed = Failed(shared.clone());
    let mut rng = Rng::new(shared.seed ^ 0x6b69_6c6c);
    let total = CLIENTS as u64 * OPS_PER_CLIENT;
    let kills = KILL_ORDER.iter().cycle().take(KILL_ROUNDS * KILL_ORDER.len());
    let step = total / (KILL_ROUNDS * KILL_ORDER.len() + 1) as u64;
    for (i, &w) in kills.enumerate() {
        let at = step * (i as u64 + 1) - step / 4 + rng.below(step / 2);
        while shared.progress.load(Ordering::Relaxed) < at {
            if stop.load(Ordering::Relaxed) {
                return stack;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        stack.crash_and_restart(w);
    }
    stack
}

/// Tells the killer thread to stop and joins it (so that its daemons are
/// killed even if the test fails).
struct KillerGuard {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Stack>>,
}

impl Drop for KillerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// 8 clients through the mux, each with 64 random requests in flight on
/// keys of its own, every answer checked against the client's model, while
/// the mux, kvlds and lbs are each killed (SIGKILL) three times and
/// restarted; at the end everything is restarted once more and every key
/// read back.
#[test]
fn many_clients_through_the_mux_survive_kill_9_of_each_daemon() {
    let seed = seed();
    eprintln!("full stack crash test: seed {seed} (FULL_STACK_SEED={seed} reuses it; timing differs)");
    let started = Instant::now();
    let mut stack = Stack::unix(&[], &[]);
    stack.start_all();
    let shared = Arc::new(Shared {
        seed,
        addr: stack.mux_addr(),
        progress: AtomicU64::new(0),
        killer_failed: AtomicBool::new(false),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut guard = KillerGuard {
        stop: stop.clone(),
        handle: Some({
            let shared = shared.clone();
            std::thread::spawn(move || killer(stack, shared, stop))
        }),
    };

    let workers: Vec<Worker> = block_on(async {
        let tasks: Vec<_> =
            (0..CLIENTS).map(|id| tokio::spawn(Worker::new(id, seed, shared.clone()).run())).collect();
        let mut workers = Vec::new();
        for t in tasks {
            match t.await {
                Ok(w) => workers.push(w),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        workers
    });
    let workload_secs = started.elapsed().as_secs_f64();
    let mut stack = match guard.handle.take().unwrap().join() {
        Ok(stack) => stack,
        Err(e) => std::panic::resume_unwind(e),
    };

    // Restart everything once more and read every key back.
    for w in [Which::Mux, Which::Kvlds, Which::Lbs] {
        stack.kill(w);
    }
    stack.start_all();
    let (checked, uncertain, present) = block_on(async {
        let c = connect(&stack.mux_addr()).await;
        let scan = within("a full scan", c.range_iter("", "").unwrap().collect_all()).await.unwrap();
        let mut scanned: HashMap<Bytes, Bytes> = scan.into_iter().collect();
        let (mut checked, mut uncertain) = (0, 0);
        for w in &workers {
            let gets = w.keys.iter().map(|k| c.get(&k.key));
            let values = within("the final GETs", futures::future::join_all(gets)).await;
            for (k, v) in values.into_iter().enumerate() {
                let v = v.unwrap();
                if !w.keys[k].may_be(&v) {
                    w.fail(k, &format!("after the final restart, GET answered {}", describe(&v)));
                }
                if scanned.remove(&w.keys[k].key) != v {
                    w.fail(k, "the full scan and GET disagree");
                }
                checked += 1;
                uncertain += usize::from(w.keys[k].possible.len() > 1);
            }
        }
        assert!(scanned.is_empty(), "seed {seed}: the full scan returned keys never written: {scanned:?}");
        let present = workers.iter().flat_map(|w| &w.keys).filter(|k| k.possible != [None]).count();
        (checked, uncertain, present)
    });

    let mut total = Stats::default();
    for w in &workers {
        total.acked_writes += w.stats.acked_writes;
        total.gets_checked += w.stats.gets_checked;
        total.lost_unknown += w.stats.lost_unknown;
        total.lost_unsent += w.stats.lost_unsent;
        total.connections += w.stats.connections;
    }
    eprintln!(
        "full stack crash test: seed {seed}: {} ops in {workload_secs:.1} s ({:.1} s in all), {} kills; \
         {total:?}; {checked} keys read back, {uncertain} of them uncertain, about {present} present",
        CLIENTS as u64 * OPS_PER_CLIENT,
        started.elapsed().as_secs_f64(),
        KILL_ROUNDS * KILL_ORDER.len(),
    );
    assert!(total.acked_writes > CLIENTS as u64 * OPS_PER_CLIENT / 4, "too few acknowledged writes");
    assert!(total.connections > 3 * CLIENTS as u64, "the kills cost the clients their connections");
    drop(guard);
}
