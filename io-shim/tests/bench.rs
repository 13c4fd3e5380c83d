//! `kivaloo bench`: its data against digests computed independently, every
//! workload end to end against `kivaloo serve` (tiny sizes, short runs; no
//! assertion on speed), and failures (no store, a store answering garbage,
//! one closing mid-run, usage errors) reported with an exit status instead
//! of a panic.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use bytes::BytesMut;
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::packet::PacketDecoder;
use kivaloo_io_shim::bench::{make_key, make_value, Pairs, GROUP_LEN};

mod common;
use common::{Store, KIVALOO};

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// The digests below were computed with coreutils, independently of this
// crate, e.g. for X = 1, Y = 0x1234:
//   printf '\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x12\x34' | sha256sum
// (17 bytes: the tag byte, X and Y 8 bytes big-endian each).

/// SHA-256 of 17 zero bytes: tag 0x00, X = 0, Y = 0.
const DIGEST_0_0_0: &str = "0a88111852095cae045340ea1f0b279944b2a756a213d9b50107d7489771e159";
/// Tag 0x00, X = 0, Y = 1.
const DIGEST_0_0_1: &str = "bd839e8f98c7bf2b8f2bf476f25ffc4ca923273ec4160ff74469c8715d0a698a";
/// Tag 0x00, X = 0, Y = 2.
const DIGEST_0_0_2: &str = "1a38f71835ae56cce0b1e44af2b5acfcb05a64f96621945cd42d1a2d343a59b7";
/// Tag 0x00, X = 0, Y = 0xffff.
const DIGEST_0_0_FFFF: &str = "fc14fba19e666ddc38a3b453e555fb6efc67be96070fc3b9493b2bde75d8e790";
/// Tag 0x00, X = 1, Y = 0x1234.
const DIGEST_0_1_1234: &str = "417b735098bfd163fe34257722163403da6a27ebd5350d85f5b2662cfd74bd7e";
/// Tag 0x01, X = 1, Y = 0x1234: what kivaloo's comment on mkval promises,
/// and not what its code (which hashes with 0x00) computes.
const DIGEST_1_1_1234: &str = "12d2737657e1a0bcac3e1db6ca420b695141a38fd25f7e18ed94bbe7433ed8d9";

#[test]
fn keys_and_values_are_kivaloos() {
    assert_eq!(to_hex(&make_key(0, 0)), format!("0000000000000000{DIGEST_0_0_0}"));
    assert_eq!(to_hex(&make_key(0, 0xffff)), format!("0000000000000000{DIGEST_0_0_FFFF}"));
    assert_eq!(to_hex(&make_key(1, 0x1234)), format!("0000000000000001{DIGEST_0_1_1234}"));
    // The value: X * 2^16 + Y, then the key's own digest (kivaloo's code).
    assert_eq!(to_hex(&make_value(0, 0)), format!("0000000000000000{DIGEST_0_0_0}"));
    assert_eq!(to_hex(&make_value(0, 0xffff)), format!("000000000000ffff{DIGEST_0_0_FFFF}"));
    assert_eq!(to_hex(&make_value(1, 0x1234)), format!("0000000000011234{DIGEST_0_1_1234}"));
    assert_ne!(to_hex(&make_value(1, 0x1234)[8..]), DIGEST_1_1_1234);
}

#[test]
fn pairs_come_in_key_order() {
    // Digests of Y = 0, 1, 2 begin 0a, bd, 1a: key order is Y = 0, 2, 1.
    let p = Pairs::generate(3);
    assert_eq!(p.len(), 3);
    let keys: Vec<String> = (0..3).map(|i| to_hex(p.key(i))).collect();
    assert_eq!(
        keys,
        [
            format!("0000000000000000{DIGEST_0_0_0}"),
            format!("0000000000000000{DIGEST_0_0_2}"),
            format!("0000000000000000{DIGEST_0_0_1}"),
        ]
    );
    assert_eq!((0..3).map(|i| p.number(i)).collect::<Vec<_>>(), [0, 2, 1]);
    assert_eq!(p.value(1), make_value(0, 2));

    // Past one group: sorted throughout, the second group last, every pair
    // number once.
    let n = GROUP_LEN + 3;
    let p = Pairs::generate(n);
    assert!((1..n).all(|i| p.key(i - 1) < p.key(i)));
    assert!((GROUP_LEN..n).all(|i| p.key(i)[..8] == 1u64.to_be_bytes()));
    let mut numbers: Vec<u64> = (0..n).map(|i| p.number(i)).collect();
    numbers.sort_unstable();
    assert!(numbers.iter().enumerate().all(|(i, &x)| i as u64 == x));
    for i in [0, 1000, GROUP_LEN + 2] {
        let (x, y) = (p.number(i) >> 16, p.number(i) & 0xffff);
        assert_eq!(p.key(i), make_key(x, y));
        assert_eq!(p.value(i), make_value(x, y));
    }
}

/// How a command ended.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn kivaloo(args: &[&str]) -> Out {
    let out = Command::new(KIVALOO).args(args).stdin(Stdio::null()).output().unwrap();
    let out = Out {
        code: out.status.code().expect("killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!out.stderr.contains("panicked"), "{out:?}");
    out
}

/// Runs `kivaloo bench <workload> --socket <socket> <args...>`, which must
/// succeed; returns its output.
#[track_caller]
fn bench_ok(workload: &str, socket: &str, args: &[&str]) -> Out {
    let mut all = vec!["bench", workload, "--socket", socket];
    all.extend_from_slice(args);
    let out = kivaloo(&all);
    assert_eq!(out.code, 0, "kivaloo {all:?}: {out:?}");
    out
}

/// The one result line of a timed workload.
#[track_caller]
fn assert_result_line(out: &Out, workload: &str, unit: &str) {
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    let prefix = format!("{workload}: ");
    let rest = lines[0].strip_prefix(&prefix).unwrap_or_else(|| panic!("{out:?}"));
    let (rate, rest) = rest.split_once(' ').unwrap();
    rate.parse::<u64>().unwrap_or_else(|_| panic!("no rate in {out:?}"));
    assert!(rest.starts_with(&format!("{unit}/s (")), "{out:?}");
}

#[test]
fn every_workload_runs_against_kivaloo_serve() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::start(dir.path(), &["--block-size", "2048"]);
    let socket = store.socket();
    let n = GROUP_LEN;
    let pairs_arg = n.to_string();

    // Nothing to extract yet: said, with status 1.
    let out =
        kivaloo(&["bench", "bulk-extract", "--socket", socket, "--pairs", &pairs_arg, "--seconds", "1"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("the store is empty"), "{out:?}");

    let out = bench_ok("bulk-insert", socket, &["--pairs", &pairs_arg]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let last = lines.last().unwrap();
    assert!(last.starts_with(&format!("bulk-insert: {n} pairs in ")), "{out:?}");
    assert!(last.ends_with(" inserts/s overall"), "{out:?}");
    for line in &lines[..lines.len() - 1] {
        assert!(line.starts_with("bulk-insert: at ") && line.contains(" inserts/s ("), "{out:?}");
    }

    // The store holds exactly the pairs, in key order...
    let generated = Pairs::generate(n);
    let stored = store.pairs();
    assert_eq!(stored.len() as u64, n);
    for (i, (key, value)) in stored.iter().enumerate() {
        assert_eq!((&key[..], &value[..]), (generated.key(i as u64), generated.value(i as u64)), "pair {i}");
    }
    // ...as `kivaloo get` sees them.
    for (x, y) in [(0, 0), (0, 0x1234), (0, 0xffff)] {
        let out = kivaloo(&["get", "--hex", "--socket", socket, &to_hex(&make_key(x, y))]);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.stdout.trim_end(), to_hex(&make_value(x, y)));
    }
    let out = kivaloo(&["get", "--hex", "--socket", socket, &to_hex(&make_key(1, 0))]);
    assert_eq!(out.code, 1, "pair {} is not there: {out:?}", GROUP_LEN);

    // The reads find every key: no warning of missing values.
    for (workload, unit) in [("random-read", "reads"), ("hotspot-read", "reads"), ("bulk-extract", "pairs")] {
        let out = bench_ok(workload, socket, &["--pairs", &pairs_arg, "--seconds", "1"]);
        assert_result_line(&out, workload, unit);
        assert!(!out.stderr.contains("warning"), "{out:?}");
    }
    for (workload, unit) in [("bulk-update", "updates"), ("random-mixed", "requests")] {
        let out =
            bench_ok(workload, socket, &["--pairs", &pairs_arg, "--seconds", "1", "--in-flight", "100"]);
        assert_result_line(&out, workload, unit);
    }
    // Still the same keys, and random-read over fewer pairs than stored.
    assert_eq!(store.pairs().len() as u64, n);
    let out = bench_ok("random-read", socket, &["--pairs", "1000", "--seconds", "1"]);
    assert_result_line(&out, "random-read", "reads");
}

#[test]
fn usage_errors_are_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let socket = socket.to_str().unwrap();
    for args in [
        &["hotspot-read", "--pairs", "65535"][..],
        &["bulk-extract", "--in-flight", "8"],
        &["random-read", "--seconds", "0"],
        &["random-read", "--seconds", "-1"],
        &["random-read", "--seconds", "0.01"],
        &["bulk-insert", "--pairs", "0"],
        &["bulk-insert", "--in-flight", "0"],
        &["no-such-workload"],
    ] {
        let mut all = vec!["bench", "--socket", socket];
        all.extend_from_slice(args);
        let out = kivaloo(&all);
        assert_eq!(out.code, 2, "kivaloo {all:?}: {out:?}");
        assert_eq!(out.stdout, "");
    }
}

#[test]
fn no_store_is_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = kivaloo(&["bench", "random-read", "--socket", socket.to_str().unwrap(), "--pairs", "10"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("cannot connect"), "{out:?}");
    assert_eq!(out.stdout, "");
}

/// A fake store on `<dir>/fake.sock` serving one connection: it answers
/// PARAMS, then `answer` decides what to do with each request (its
/// number, from 0): `Some(bytes)` to send, `None` to close.
fn fake_store(
    dir: &Path,
    answer: impl Fn(u64, u64) -> Option<Vec<u8>> + Send + 'static,
) -> (PathBuf, thread::JoinHandle<()>) {
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (mut decoder, mut buf, mut n) = (PacketDecoder::new(), vec![0u8; 64 << 10], 0u64);
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(len) => decoder.push(&buf[..len]),
            }
            let mut out = BytesMut::new();
            while let Some(p) = decoder.next_packet().unwrap() {
                if KvldsRequest::decode(p.record).unwrap() == KvldsRequest::Params {
                    KvldsResponse::Params { max_key_len: 255, max_value_len: 255 }.encode(p.id, &mut out);
                    continue;
                }
                match answer(n, p.id) {
                    Some(bytes) => out.extend_from_slice(&bytes),
                    None => {
                        let _ = s.write_all(&out);
                        return;
                    }
                }
                n += 1;
            }
            if s.write_all(&out).is_err() {
                return;
            }
        }
    });
    (path, handle)
}

#[test]
fn garbage_from_the_store_is_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = fake_store(dir.path(), |_, _| Some(vec![0xa5; 64]));
    let out = kivaloo(&["bench", "random-read", "--socket", socket.to_str().unwrap(), "--pairs", "10"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("bad packet header CRC"), "{out:?}");
    assert_eq!(out.stdout, "");
    server.join().unwrap();
}

#[test]
fn an_answer_to_no_request_is_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = fake_store(dir.path(), |_, id| {
        let mut out = BytesMut::new();
        KvldsResponse::Done(true).encode(id + 1_000_000, &mut out);
        Some(out.to_vec())
    });
    let out = kivaloo(&["bench", "bulk-insert", "--socket", socket.to_str().unwrap(), "--pairs", "10"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("not in flight"), "{out:?}");
    server.join().unwrap();
}

#[test]
fn a_refused_set_is_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = fake_store(dir.path(), |_, id| {
        let mut out = BytesMut::new();
        KvldsResponse::Done(false).encode(id, &mut out);
        Some(out.to_vec())
    });
    let out = kivaloo(&["bench", "bulk-update", "--socket", socket.to_str().unwrap(), "--pairs", "10"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("invalid answer to Set"), "{out:?}");
    server.join().unwrap();
}

#[test]
fn a_store_closing_mid_run_is_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = fake_store(dir.path(), |n, id| {
        (n < 5000).then(|| {
            let mut out = BytesMut::new();
            KvldsResponse::Done(true).encode(id, &mut out);
            out.to_vec()
        })
    });
    let out = kivaloo(&["bench", "bulk-insert", "--socket", socket.to_str().unwrap(), "--pairs", "20000"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("the store closed the connection"), "{out:?}");
    // No result line, whatever points were measured before.
    assert!(!out.stdout.contains("overall"), "{out:?}");
    server.join().unwrap();
}

#[test]
fn answers_in_any_order_are_matched() {
    // A store that answers each batch of requests it reads in reverse, and
    // every GET with the value of pair 0: bulk-insert completes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (mut decoder, mut buf) = (PacketDecoder::new(), vec![0u8; 64 << 10]);
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(len) => decoder.push(&buf[..len]),
            }
            let mut answers = Vec::new();
            while let Some(p) = decoder.next_packet().unwrap() {
                let response = match KvldsRequest::decode(p.record).unwrap() {
                    KvldsRequest::Params => KvldsResponse::Params { max_key_len: 255, max_value_len: 255 },
                    _ => KvldsResponse::Done(true),
                };
                answers.push((p.id, response));
            }
            let mut out = BytesMut::new();
            for (id, response) in answers.into_iter().rev() {
                response.encode(id, &mut out);
            }
            if s.write_all(&out).is_err() {
                return;
            }
        }
    });
    let out = kivaloo(&["bench", "bulk-insert", "--socket", path.to_str().unwrap(), "--pairs", "30000"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("bulk-insert: 30000 pairs in "), "{out:?}");
    server.join().unwrap();
}

#[test]
fn help_says_the_store_must_hold_the_pairs() {
    let out = kivaloo(&["bench", "--help"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("expect the store to hold the same --pairs pairs already"), "{out:?}");
}
