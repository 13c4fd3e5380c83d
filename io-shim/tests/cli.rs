//! The client subcommands of `kivaloo` as a script runs them: the real
//! binary against `kivaloo serve` (over a unix socket and TCP), checking
//! stdout, stderr and exit statuses; against nothing (exit 3); against fake
//! stores that drop the connection (the message says whether the request
//! may have taken effect); and the data across a clean stop and restart.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::packet::PacketDecoder;

const KIVALOO: &str = env!("CARGO_BIN_EXE_kivaloo");

/// A `kivaloo serve` in the foreground; SIGKILLed if the test fails.
struct Serve {
    child: Option<Child>,
    log: PathBuf,
}

impl Serve {
    /// Starts `kivaloo serve --data <dir>/data` listening on `<dir>/kv.sock`
    /// and on `tcp` if given, and waits until both accept connections.
    fn start(dir: &Path, tcp: Option<&str>) -> Serve {
        let log = dir.join("serve.log");
        let mut cmd = Command::new(KIVALOO);
        cmd.arg("serve").arg("--data").arg(dir.join("data")).arg("--listen").arg(dir.join("kv.sock"));
        if let Some(tcp) = tcp {
            cmd.args(["--listen", tcp]);
        }
        let stderr = File::options().create(true).append(true).open(&log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn().unwrap();
        let mut serve = Serve { child: Some(child), log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let unix_up = UnixStream::connect(dir.join("kv.sock")).is_ok();
            let tcp_up = tcp.is_none_or(|a| TcpStream::connect(a).is_ok());
            if unix_up && tcp_up {
                return serve;
            }
            if let Some(status) = serve.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kivaloo serve exited with {status}: {}", serve.log());
            }
            assert!(Instant::now() < deadline, "kivaloo serve does not listen after 10 s: {}", serve.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGINT (Ctrl-C) and returns how it exited.
    fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kivaloo serve did not stop within 10 s of SIGINT: {}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How a client command ended.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `kivaloo <sub> --socket <addr> <args...>`.
fn kv<A: AsRef<OsStr>>(sub: &str, addr: &str, args: impl IntoIterator<Item = A>) -> Out {
    let out =
        Command::new(KIVALOO).args([sub, "--socket", addr]).args(args).stdin(Stdio::null()).output().unwrap();
    Out {
        code: out.status.code().expect("killed by a signal"),
        stdout: String::from_utf8(out.stdout).expect("the output is not text"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a command that must exit with `code` and print nothing on stdout;
/// returns its stderr.
#[track_caller]
fn expect_code(code: i32, sub: &str, addr: &str, args: &[&str]) -> String {
    let out = kv(sub, addr, args);
    assert_eq!(out.code, code, "{sub} {args:?}: {out:?}");
    assert_eq!(out.stdout, "", "{sub} {args:?}: {out:?}");
    out.stderr
}

/// Runs a command that must exit 0 and print `stdout`.
#[track_caller]
fn expect_out(stdout: &str, sub: &str, addr: &str, args: &[&str]) {
    let out = kv(sub, addr, args);
    assert_eq!((out.code, out.stdout.as_str()), (0, stdout), "{sub} {args:?}: {out:?}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A free TCP port on 127.0.0.1 (free when this returns).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every command against the store at `addr`, on keys starting with `p`
/// (one character and a `/`), which nobody else uses.
fn check_commands(addr: &str, p: &str) {
    let k = |s: &str| format!("{p}{s}");
    expect_code(0, "set", addr, &[&k("k"), "v1"]);
    expect_out("v1\n", "get", addr, &[&k("k")]);
    expect_code(1, "get", addr, &[&k("absent")]);

    expect_code(1, "add", addr, &[&k("k"), "x"]);
    expect_out("v1\n", "get", addr, &[&k("k")]);
    expect_code(0, "add", addr, &[&k("a"), "1"]);
    expect_out("1\n", "get", addr, &[&k("a")]);

    expect_code(1, "modify", addr, &[&k("absent"), "x"]);
    expect_code(1, "get", addr, &[&k("absent")]);
    expect_code(0, "modify", addr, &[&k("k"), "v2"]);
    expect_out("v2\n", "get", addr, &[&k("k")]);

    expect_code(1, "cas", addr, &[&k("k"), "wrong", "v3"]);
    expect_code(1, "cas", addr, &[&k("absent"), "v2", "v3"]);
    expect_out("v2\n", "get", addr, &[&k("k")]);
    expect_code(0, "cas", addr, &[&k("k"), "v2", "v3"]);
    expect_out("v3\n", "get", addr, &[&k("k")]);

    expect_code(1, "cad", addr, &[&k("k"), "v2"]);
    expect_out("v3\n", "get", addr, &[&k("k")]);
    expect_code(0, "cad", addr, &[&k("k"), "v3"]);
    expect_code(1, "get", addr, &[&k("k")]);
    expect_code(1, "cad", addr, &[&k("k"), "v3"]);

    expect_code(0, "delete", addr, &[&k("a")]);
    expect_code(1, "get", addr, &[&k("a")]);
    expect_code(0, "delete", addr, &[&k("a")]);

    // Values that look like flags, after `--`; empty values.
    expect_code(0, "set", addr, &["--", &k("-k"), "-v"]);
    expect_out("-v\n", "get", addr, &["--", &k("-k")]);
    expect_code(0, "set", addr, &[&k("empty"), ""]);
    expect_out("\n", "get", addr, &[&k("empty")]);

    // Binary keys and values: in with --hex or as raw bytes, out as hex or
    // escaped.
    let (bin_key, bin_value) = ([p.as_bytes(), b"\x00\xff"].concat(), b"\n\\\t\x7f".to_vec());
    expect_code(0, "set", addr, &["--hex", &hex(&bin_key), &hex(&bin_value)]);
    expect_out("0a5c097f\n", "get", addr, &["--hex", &hex(&bin_key)]);
    expect_code(0, "set", addr, &[&k("tab\tkey"), "héllo wörld"]);
    expect_out("h\\xc3\\xa9llo w\\xc3\\xb6rld\n", "get", addr, &[&k("tab\tkey")]);
    let raw_key = [p.as_bytes(), b"raw\x80"].concat();
    let raw = kv("set", addr, [OsStr::from_bytes(&raw_key), OsStr::from_bytes(b"\x01")]);
    assert_eq!(raw.code, 0, "{raw:?}");
    expect_out("01\n", "get", addr, &["--hex", &hex(&raw_key)]);
    let raw = kv("get", addr, [OsStr::from_bytes(&raw_key)]);
    assert_eq!((raw.code, raw.stdout.as_str()), (0, "\\x01\n"), "{raw:?}");

    // Every pair with the prefix, in key order: "p/" to "p0" ('0' follows '/').
    let end = format!("{}0", &p[..1]);
    expect_out(
        &format!(
            "{p}\\x00\\xff\t\\x0a\\x5c\\x09\\x7f\n{p}-k\t-v\n{p}empty\t\n{p}raw\\x80\t\\x01\n\
             {p}tab\\x09key\th\\xc3\\xa9llo w\\xc3\\xb6rld\n"
        ),
        "range",
        addr,
        &[p, &end],
    );
    let pairs: [(&[u8], &[u8]); 5] = [
        (b"\x00\xff", b"\n\\\t\x7f"),
        (b"-k", b"-v"),
        (b"empty", b""),
        (b"raw\x80", b"\x01"),
        (b"tab\tkey", "héllo wörld".as_bytes()),
    ];
    let expected: String = pairs
        .iter()
        .map(|(key, value)| format!("{}\t{}\n", hex(&[p.as_bytes(), key].concat()), hex(value)))
        .collect();
    expect_out(&expected, "range", addr, &["--hex", &hex(p.as_bytes()), &hex(end.as_bytes())]);
    // From a key within, and an empty range.
    expect_out(&format!("{p}raw\\x80\t\\x01\n"), "range", addr, &[&k("e~"), &k("s")]);
    expect_out("", "range", addr, &[&k("s"), &k("e")]);

    expect_out("max key length: 255\nmax value length: 255\n", "params", addr, &[] as &[&str]);

    // Usage errors, before any request.
    let long = "k".repeat(256);
    let stderr = expect_code(2, "set", addr, &[&long, "v"]);
    assert!(stderr.contains("KEY of 256 bytes is over the 255-byte maximum"), "{stderr}");
    let stderr = expect_code(2, "get", addr, &["--hex", &"00".repeat(256)]);
    assert!(stderr.contains("KEY of 256 bytes"), "{stderr}");
    let stderr = expect_code(2, "cas", addr, &[&k("k"), "old", &long]);
    assert!(stderr.contains("NEW of 256 bytes"), "{stderr}");
    expect_code(0, "set", addr, &[&k("k"), &"v".repeat(255)]);
    expect_out(&format!("{}\n", "v".repeat(255)), "get", addr, &[&k("k")]);
    let stderr = expect_code(2, "get", addr, &["--hex", "abc"]);
    assert!(stderr.contains("KEY \"abc\" is not valid hex"), "{stderr}");
    let stderr = expect_code(2, "set", addr, &["--hex", "00", "zz"]);
    assert!(stderr.contains("VALUE \"zz\" is not valid hex"), "{stderr}");
    expect_code(2, "set", addr, &[&k("only a key")]);
    expect_code(2, "cas", addr, &[&k("k"), "v1", "v2", "extra"]);
}

#[test]
fn every_command_over_a_unix_socket_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let tcp = format!("127.0.0.1:{}", free_port());
    let serve = Serve::start(dir.path(), Some(&tcp));
    let sock = dir.path().join("kv.sock");
    let sock = sock.to_str().unwrap();
    check_commands(sock, "u/");
    check_commands(&tcp, "t/");
    // Both listeners reach one store: the whole range, from either.
    let all = kv("range", sock, [] as [&str; 0]);
    assert_eq!(all.code, 0, "{all:?}");
    assert_eq!(all.stdout.lines().count(), 12, "{all:?}");
    expect_out(&all.stdout, "range", &tcp, &[] as &[&str]);
    expect_out(&all.stdout, "range", &tcp, &["", ""]);
    // In key order: lowercase hex sorts as the bytes do (escapes do not).
    let all = kv("range", &tcp, ["--hex"]);
    let keys: Vec<&str> = all.stdout.lines().map(|l| l.split_once('\t').unwrap().0).collect();
    assert_eq!(keys.len(), 12, "{all:?}");
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    assert!(keys[0].starts_with(&hex(b"t/")) && keys[11].starts_with(&hex(b"u/")), "{keys:?}");
    assert!(serve.stop().success());
}

#[test]
fn no_store_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    // No socket file.
    let missing = dir.path().join("missing.sock");
    let stderr = expect_code(3, "get", missing.to_str().unwrap(), &["k"]);
    assert!(stderr.contains("cannot connect to the store at"), "{stderr}");
    assert!(stderr.contains("missing.sock"), "{stderr}");
    // A socket file nobody listens on.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    for (sub, args) in [("set", &["k", "v"][..]), ("range", &[]), ("params", &[]), ("delete", &["k"])] {
        let stderr = expect_code(3, sub, stale.to_str().unwrap(), args);
        assert!(stderr.contains("cannot connect"), "{stderr}");
    }
    // A TCP port nobody listens on.
    let stderr = expect_code(3, "get", &format!("127.0.0.1:{}", free_port()), &["k"]);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    // The default socket is kivaloo.sock in the current directory.
    let out = Command::new(KIVALOO).args(["get", "k"]).current_dir(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kivaloo.sock"), "{out:?}");
}

/// What a fake store does on a connection.
#[derive(Clone, Copy)]
enum Fake {
    /// Closes it at once.
    Close,
    /// Answers PARAMS with these limits, and closes it on any other request
    /// without answering.
    ParamsThenClose(u32, u32),
}

/// A fake store on a unix socket in `dir`, serving `conns` connections one
/// after the other.
fn fake_store(dir: &Path, conns: Vec<Fake>) -> (PathBuf, thread::JoinHandle<()>) {
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        for fake in conns {
            let (mut s, _) = listener.accept().unwrap();
            let Fake::ParamsThenClose(max_key_len, max_value_len) = fake else { continue };
            let (mut decoder, mut buf) = (PacketDecoder::new(), [0u8; 4096]);
            'conn: loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => decoder.push(&buf[..n]),
                }
                while let Some(p) = decoder.next_packet().unwrap() {
                    if KvldsRequest::decode(p.record).unwrap() != KvldsRequest::Params {
                        break 'conn;
                    }
                    let mut out = BytesMut::new();
                    KvldsResponse::Params { max_key_len, max_value_len }.encode(p.id, &mut out);
                    s.write_all(&out).unwrap();
                }
            }
        }
    });
    (path, handle)
}

#[test]
fn a_lost_connection_says_whether_the_request_may_have_taken_effect() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = fake_store(
        dir.path(),
        vec![
            Fake::ParamsThenClose(255, 255),
            Fake::ParamsThenClose(255, 255),
            Fake::Close,
            Fake::ParamsThenClose(4, 8),
            Fake::ParamsThenClose(4, 8),
            Fake::ParamsThenClose(255, 255),
        ],
    );
    let sock = path.to_str().unwrap();
    // Sent, unanswered: unknown.
    let stderr = expect_code(3, "set", sock, &["k", "v"]);
    assert!(stderr.contains("the set may or may not have taken effect"), "{stderr}");
    let stderr = expect_code(3, "cas", sock, &["k", "v", "w"]);
    assert!(stderr.contains("the cas may or may not have taken effect"), "{stderr}");
    // Lost before it was sent: none.
    let stderr = expect_code(3, "delete", sock, &["k"]);
    assert!(stderr.contains("before the delete was sent; it had no effect"), "{stderr}");
    // Over the store's own limits: a usage error, nothing sent.
    let stderr = expect_code(2, "set", sock, &["12345", "v"]);
    assert!(stderr.contains("key of 5 bytes is over the limit of 4"), "{stderr}");
    let stderr = expect_code(2, "cad", sock, &["k", "123456789"]);
    assert!(stderr.contains("value of 9 bytes is over the limit of 8"), "{stderr}");
    // A read: no effect either way.
    let stderr = expect_code(3, "get", sock, &["k"]);
    assert!(stderr.contains("was lost") && stderr.contains("it had no effect"), "{stderr}");
    server.join().unwrap();
}

#[test]
fn data_survives_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kv.sock");
    let sock = sock.to_str().unwrap();
    let serve = Serve::start(dir.path(), None);
    for i in 0..20 {
        expect_code(0, "set", sock, &[&format!("key{i:02}"), &format!("value {i}")]);
    }
    expect_code(0, "set", sock, &["--hex", "00ff00", "ff00ff"]);
    expect_code(0, "delete", sock, &["key07"]);
    expect_code(0, "cas", sock, &["key08", "value 8", "eight"]);
    let before = kv("range", sock, ["--hex"]);
    assert_eq!(before.code, 0, "{before:?}");
    assert_eq!(before.stdout.lines().count(), 20);
    let status = serve.stop();
    assert!(status.success(), "kivaloo serve exited with {status}");

    let serve = Serve::start(dir.path(), None);
    expect_out(&before.stdout, "range", sock, &["--hex"]);
    expect_out("ff00ff\n", "get", sock, &["--hex", "00ff00"]);
    expect_out("eight\n", "get", sock, &["key08"]);
    expect_code(1, "get", sock, &["key07"]);
    expect_out("value 19\n", "get", sock, &["key19"]);
    let status = serve.stop();
    assert!(status.success(), "kivaloo serve exited with {status}");
}

#[test]
fn range_reads_every_page_and_stops_on_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kv.sock");
    let serve = Serve::start(dir.path(), None);
    // About 1.4 MB of pairs, more than one RANGE page (1 MiB at most),
    // loaded with the library: pipelined, unlike one process per request.
    let n = 5000;
    let key = |i: usize| format!("key{i:05}");
    let value = |i: usize| format!("{i:05}{}", "v".repeat(250));
    let rt = kivaloo_io_shim::runtime::build_runtime().unwrap();
    rt.block_on(async {
        let addr = kivaloo_io_shim::addr::SocketAddr::parse(sock.to_str().unwrap());
        let client = kivaloo_io_shim::client::Client::connect(&addr).await.unwrap();
        let sets = (0..n).map(|i| {
            let client = client.clone();
            async move { client.set(key(i), value(i)).await }
        });
        for r in futures::future::join_all(sets).await {
            r.unwrap();
        }
    });
    let sock = sock.to_str().unwrap();
    let expected: String = (0..n).map(|i| format!("{}\t{}\n", key(i), value(i))).collect();
    expect_out(&expected, "range", sock, &[] as &[&str]);
    let expected: String = (1234..4321).map(|i| format!("{}\t{}\n", key(i), value(i))).collect();
    expect_out(&expected, "range", sock, &[&key(1234), &key(4321)]);

    // A reader that goes away after one line: exit 4, silently.
    let mut child = Command::new(KIVALOO)
        .args(["range", "--socket", sock])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 9];
    child.stdout.take().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"key00000\t");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(serve.stop().success());
}
