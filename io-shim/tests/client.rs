//! The async kvlds client against fake servers over in-process pipes: a
//! server keeping a `BTreeMap` that answers each batch of requests in
//! reverse order (so every match is by ID), and hand-written servers that
//! close mid-flight or send garbage.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::packet::PacketDecoder;
use kivaloo_io_shim::addr::SocketAddr;
use kivaloo_io_shim::client::{Client, Effect, Error};

/// What the fake server saw.
#[derive(Debug, Default)]
struct Stats {
    requests: usize,
    /// The most requests received and not yet answered at once.
    max_in_flight: usize,
    ranges: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Opts {
    /// Return a pair whose key is `end` too, as kivaloo's kvlds does.
    range_includes_end: bool,
}

/// A kvlds over a `BTreeMap`. It gathers whatever the client sends until
/// the client has nothing more to send, applies the requests in order, and
/// answers them in reverse order.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, opts: Opts, stats: Arc<Mutex<Stats>>) {
    let mut store = BTreeMap::new();
    let mut decoder = PacketDecoder::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => decoder.push(&buf[..n]),
        }
        // Let the client's tasks run, and take whatever more they send.
        let (mut idle, mut eof) = (0, false);
        while idle < 4 && !eof {
            tokio::task::yield_now().await;
            match s.read(&mut buf).now_or_never() {
                Some(Ok(0)) | Some(Err(_)) => eof = true,
                Some(Ok(n)) => {
                    decoder.push(&buf[..n]);
                    idle = 0;
                }
                None => idle += 1,
            }
        }
        let mut batch = Vec::new();
        while let Some(p) = decoder.next_packet().expect("the client sent a bad packet") {
            batch.push((p.id, KvldsRequest::decode(p.record).expect("the client sent a bad request")));
        }
        let answers: Vec<_> = {
            let mut stats = stats.lock().unwrap();
            stats.requests += batch.len();
            stats.max_in_flight = stats.max_in_flight.max(batch.len());
            batch.into_iter().map(|(id, req)| (id, apply(&mut store, req, opts, &mut stats))).collect()
        };
        let mut out = BytesMut::new();
        for (id, resp) in answers.iter().rev() {
            resp.encode(*id, &mut out);
        }
        if s.write_all(&out).await.is_err() || eof {
            return;
        }
    }
}

fn apply(
    store: &mut BTreeMap<Bytes, Bytes>,
    req: KvldsRequest,
    opts: Opts,
    stats: &mut Stats,
) -> KvldsResponse {
    use KvldsResponse::Done;
    match req {
        KvldsRequest::Params => KvldsResponse::Params { max_key_len: 255, max_value_len: 255 },
        KvldsRequest::Set { key, value } => {
            store.insert(key, value);
            Done(true)
        }
        KvldsRequest::Add { key, value } => {
            let absent = !store.contains_key(&key);
            if absent {
                store.insert(key, value);
            }
            Done(absent)
        }
        KvldsRequest::Modify { key, value } => {
            let present = store.contains_key(&key);
            if present {
                store.insert(key, value);
            }
            Done(present)
        }
        KvldsRequest::Cas { key, old_value, new_value } => {
            let matches = store.get(&key) == Some(&old_value);
            if matches {
                store.insert(key, new_value);
            }
            Done(matches)
        }
        KvldsRequest::Delete { key } => {
            store.remove(&key);
            Done(true)
        }
        KvldsRequest::Cad { key, old_value } => {
            let matches = store.get(&key) == Some(&old_value);
            if matches {
                store.remove(&key);
            }
            Done(matches)
        }
        KvldsRequest::Get { key } => KvldsResponse::Get(store.get(&key).cloned()),
        KvldsRequest::Range { max_bytes, start, end } => {
            stats.ranges += 1;
            if !end.is_empty() && start >= end {
                return KvldsResponse::Range { next: end, pairs: Vec::new() };
            }
            let upper = match () {
                _ if end.is_empty() => Bound::Unbounded,
                _ if opts.range_includes_end => Bound::Included(end.clone()),
                _ => Bound::Excluded(end.clone()),
            };
            let (mut pairs, mut bytes, mut next) = (Vec::new(), 0, end);
            for (k, v) in store.range((Bound::Included(start), upper)) {
                let n = k.len() + v.len() + 2;
                if !pairs.is_empty() && bytes + n > max_bytes as usize {
                    next = k.clone();
                    break;
                }
                bytes += n;
                pairs.push((k.clone(), v.clone()));
            }
            KvldsResponse::Range { next, pairs }
        }
    }
}

/// A client with a window of `window` on a fake server.
fn fake(window: usize, opts: Opts) -> (Client, Arc<Mutex<Stats>>) {
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let stats = Arc::new(Mutex::new(Stats::default()));
    tokio::spawn(serve(theirs, opts, stats.clone()));
    (Client::from_stream(Box::new(ours), window), stats)
}

/// Reads from a hand-written server's end until `n` requests arrived.
async fn read_requests(
    s: &mut DuplexStream,
    decoder: &mut PacketDecoder,
    n: usize,
) -> Vec<(u64, KvldsRequest)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(p) = decoder.next_packet().unwrap() {
            got.push((p.id, KvldsRequest::decode(p.record).unwrap()));
        }
        if got.len() >= n {
            assert_eq!(got.len(), n, "more requests than expected");
            return got;
        }
        let r = s.read(&mut buf).await.unwrap();
        assert!(r > 0, "the client closed the connection");
        decoder.push(&buf[..r]);
    }
}

/// Fails a test that would otherwise hang.
async fn soon<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("timed out")
}

/// Whether `r` is `ConnectionLost` with `effect`.
fn lost<T>(r: &Result<T, Error>, effect: Effect) -> bool {
    matches!(r, Err(Error::ConnectionLost { effect: e, .. }) if *e == effect)
}

#[tokio::test]
async fn every_method_against_the_fake_server() {
    let (c, _) = fake(8, Opts::default());
    soon(async {
        assert_eq!(c.params().await.unwrap(), (255, 255));
        assert_eq!(c.get("k").await.unwrap(), None);
        c.set("k", "v1").await.unwrap();
        assert_eq!(c.get(b"k").await.unwrap(), Some(Bytes::from_static(b"v1")));
        assert!(!c.add("k", "x").await.unwrap());
        assert!(c.add("k2", b"a".to_vec()).await.unwrap());
        assert!(c.modify("k", "v2").await.unwrap());
        assert!(!c.modify("absent", "v").await.unwrap());
        assert!(!c.cas("k", "wrong", "v3").await.unwrap());
        assert!(c.cas("k", "v2", "v3").await.unwrap());
        assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"v3"[..]));
        assert!(!c.cad("k", "v2").await.unwrap());
        assert!(c.cad("k", "v3").await.unwrap());
        assert_eq!(c.get("k").await.unwrap(), None);
        c.delete("k2").await.unwrap();
        c.delete("k2").await.unwrap(); // absent: still fine
        assert_eq!(c.get("k2").await.unwrap(), None);
        // Empty keys and values, and the longest ones, are allowed.
        c.set("", "").await.unwrap();
        assert_eq!(c.get("").await.unwrap(), Some(Bytes::new()));
        let long = vec![7u8; 255];
        c.set(&long, &long).await.unwrap();
        assert_eq!(c.get(&long).await.unwrap().as_deref(), Some(&long[..]));

        for k in ["a", "b", "c", "d"] {
            c.set(k, k.repeat(2)).await.unwrap();
        }
        // One page: [b, d) holds b and c, and `next` = end says it is done.
        let (pairs, next) = c.range("b", "d", 1000).await.unwrap();
        assert_eq!(pairs, vec![(Bytes::from("b"), Bytes::from("bb")), (Bytes::from("c"), Bytes::from("cc"))]);
        assert_eq!(next, Bytes::from("d"));
        // A budget of 1 still returns one pair, with `next` after it.
        let (pairs, next) = c.range("b", "", 1).await.unwrap();
        assert_eq!(pairs, vec![(Bytes::from("b"), Bytes::from("bb"))]);
        assert_eq!(next, Bytes::from("c"));
        // start >= end: nothing.
        let (pairs, next) = c.range("d", "b", 1000).await.unwrap();
        assert!(pairs.is_empty());
        assert_eq!(next, Bytes::from("b"));
    })
    .await;
}

#[tokio::test]
async fn keys_and_values_over_255_bytes_are_refused_before_sending() {
    let (c, stats) = fake(8, Opts::default());
    let long = vec![0u8; 256];
    assert_eq!(c.set(&long, "v").await, Err(Error::TooLong { field: "key", len: 256 }));
    assert_eq!(c.set("k", &long).await, Err(Error::TooLong { field: "value", len: 256 }));
    assert_eq!(c.cas("k", "a", &long).await, Err(Error::TooLong { field: "new value", len: 256 }));
    assert_eq!(c.cad("k", &long).await, Err(Error::TooLong { field: "old value", len: 256 }));
    assert_eq!(c.range("", &long, 10).await, Err(Error::TooLong { field: "end key", len: 256 }));
    assert!(matches!(c.range_iter(&long, ""), Err(Error::TooLong { field: "start key", len: 256 })));
    let e = c.get(&long).await.unwrap_err();
    assert_eq!(e.to_string(), "key of 256 bytes is over the 255-byte maximum");
    // Nothing was sent, and the connection is fine.
    soon(c.set("k", "v")).await.unwrap();
    assert_eq!(stats.lock().unwrap().requests, 1);
}

#[tokio::test]
async fn ten_thousand_concurrent_requests_stay_within_a_window_of_64() {
    const N: usize = 10_000;
    let (c, stats) = fake(64, Opts::default());
    soon(async {
        let sets = (0..N).map(|i| {
            let c = &c;
            async move { c.set(format!("key{i:05}"), format!("value{i}")).await }
        });
        for r in futures::future::join_all(sets).await {
            r.unwrap();
        }
        let gets = (0..N).map(|i| {
            let c = &c;
            async move { (i, c.get(format!("key{i:05}")).await) }
        });
        for (i, r) in futures::future::join_all(gets).await {
            assert_eq!(r.unwrap(), Some(Bytes::from(format!("value{i}"))));
        }
    })
    .await;
    let stats = stats.lock().unwrap();
    assert_eq!(stats.requests, 2 * N);
    assert!(stats.max_in_flight <= 64, "the server saw {} requests in flight", stats.max_in_flight);
    assert!(stats.max_in_flight > 32, "only {} in flight at once: no pipelining", stats.max_in_flight);
}

#[tokio::test]
async fn clones_share_the_connection_from_several_tasks() {
    let (c, stats) = fake(16, Opts::default());
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    let key = format!("t{t}-{i}");
                    c.set(&key, &key).await.unwrap();
                    assert_eq!(c.get(&key).await.unwrap(), Some(Bytes::from(key)));
                }
            })
        })
        .collect();
    for t in tasks {
        soon(t).await.unwrap();
    }
    assert_eq!(stats.lock().unwrap().requests, 8 * 50 * 2);
    assert!(stats.lock().unwrap().max_in_flight > 1);
}

#[tokio::test]
async fn range_iter_follows_next_over_several_pages() {
    let (c, stats) = fake(8, Opts::default());
    soon(async {
        for i in 0..100 {
            c.set(format!("key{i:03}"), "v").await.unwrap();
        }
        c.set("other", "o").await.unwrap();
        let key = |i: usize| Bytes::from(format!("key{i:03}"));

        // Each pair counts 6 + 1 + 2 bytes: about 5 per 50-byte page.
        let before = stats.lock().unwrap().ranges;
        let mut it = c.range_iter("key010", "key090").unwrap().with_page_bytes(50);
        let mut seen = Vec::new();
        while let Some((k, v)) = it.next().await.unwrap() {
            assert_eq!(v, Bytes::from("v"));
            seen.push(k);
        }
        assert_eq!(seen, (10..90).map(key).collect::<Vec<_>>());
        assert!(it.next().await.unwrap().is_none());
        let pages = stats.lock().unwrap().ranges - before;
        assert!((15..=17).contains(&pages), "{pages} pages");

        // An empty end: to the last key; pages by page.
        let mut it = c.range_iter("key095", "").unwrap().with_page_bytes(20);
        let mut pages = Vec::new();
        while let Some(page) = it.next_page().await.unwrap() {
            pages.push(page.into_iter().map(|(k, _)| k).collect::<Vec<_>>());
        }
        assert_eq!(
            pages,
            vec![vec![key(95), key(96)], vec![key(97), key(98)], vec![key(99), Bytes::from("other")]]
        );

        // Everything, in one page of the default size.
        let all = c.range_iter("", "").unwrap().collect_all().await.unwrap();
        assert_eq!(all.len(), 101);
        // Nothing in range, and start >= end (no request at all).
        assert!(c.range_iter("x", "").unwrap().collect_all().await.unwrap().is_empty());
        let before = stats.lock().unwrap().ranges;
        assert!(c.range_iter("key050", "key050").unwrap().next().await.unwrap().is_none());
        assert_eq!(stats.lock().unwrap().ranges, before);
    })
    .await;
}

#[tokio::test]
async fn a_pair_at_end_from_kivaloos_off_by_one_is_dropped() {
    let (c, _) = fake(8, Opts { range_includes_end: true });
    soon(async {
        for k in ["a", "b", "c"] {
            c.set(k, k).await.unwrap();
        }
        let (pairs, _) = c.range("a", "c", 1000).await.unwrap();
        assert_eq!(pairs.len(), 2, "{pairs:?}");
        let all = c.range_iter("a", "c").unwrap().with_page_bytes(3).collect_all().await.unwrap();
        assert_eq!(all.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), vec!["a", "b"]);
    })
    .await;
}

#[tokio::test]
async fn the_server_closing_mid_flight_loses_writes_with_unknown_effect_and_reads_with_none() {
    let (ours, mut theirs) = tokio::io::duplex(64 << 10);
    // A window of 3: the DELETE and the CAD wait for a slot.
    let c = Client::from_stream(Box::new(ours), 3);
    let server = async move {
        let mut d = PacketDecoder::new();
        let reqs = read_requests(&mut theirs, &mut d, 3).await;
        // Answer the ADD only, which lets the DELETE in (the CAD waits on),
        // then close.
        let (add_id, _) = reqs.iter().find(|(_, r)| matches!(r, KvldsRequest::Add { .. })).unwrap();
        let mut out = BytesMut::new();
        KvldsResponse::Done(true).encode(*add_id, &mut out);
        theirs.write_all(&out).await.unwrap();
        let reqs = read_requests(&mut theirs, &mut d, 1).await;
        assert!(matches!(reqs[0].1, KvldsRequest::Delete { .. }));
        drop(theirs);
    };
    let (set, get, add, delete, cad, ()) = soon(async {
        tokio::join!(c.set("k", "v"), c.get("k"), c.add("a", "1"), c.delete("d"), c.cad("k", "v"), server)
    })
    .await;
    assert!(lost(&set, Effect::Unknown), "{set:?}");
    assert!(lost(&get, Effect::None), "{get:?}");
    assert_eq!(add, Ok(true));
    assert!(lost(&delete, Effect::Unknown), "{delete:?}");
    assert!(lost(&cad, Effect::None), "never sent: {cad:?}");
    let e = set.unwrap_err();
    assert!(e.to_string().contains("may or may not have taken effect"), "{e}");
    assert!(e.to_string().contains("closed the connection"), "{e}");

    // Every later call fails at once.
    assert!(c.lost_reason().is_some());
    let later = soon(c.set("k", "v")).await;
    assert!(lost(&later, Effect::None), "{later:?}");
    let later = soon(c.params()).await;
    assert!(lost(&later, Effect::None), "{later:?}");
}

#[tokio::test]
async fn garbage_from_the_server_is_a_protocol_error_for_every_request_in_flight() {
    let (ours, mut theirs) = tokio::io::duplex(64 << 10);
    let c = Client::from_stream(Box::new(ours), 8);
    let server = async move {
        let mut d = PacketDecoder::new();
        read_requests(&mut theirs, &mut d, 2).await;
        theirs.write_all(b"this is not a kvlds packet at all").await.unwrap();
        theirs // keep it open: the client must drop the connection itself
    };
    let (set, get, mut theirs) = soon(async { tokio::join!(c.set("k", "v"), c.get("k"), server) }).await;
    assert!(matches!(&set, Err(Error::Protocol(m)) if m.contains("CRC")), "{set:?}");
    assert!(matches!(get, Err(Error::Protocol(_))), "{get:?}");
    // The client closed the connection...
    let mut rest = Vec::new();
    soon(theirs.read_to_end(&mut rest)).await.unwrap();
    // ...and fails every later call at once.
    let later = soon(c.get("k")).await;
    assert!(lost(&later, Effect::None), "{later:?}");
    assert!(later.unwrap_err().to_string().contains("protocol error"));
}

#[tokio::test]
async fn a_response_to_an_unknown_id_is_a_protocol_error() {
    let (ours, mut theirs) = tokio::io::duplex(64 << 10);
    let c = Client::from_stream(Box::new(ours), 8);
    let server = async move {
        let mut d = PacketDecoder::new();
        let reqs = read_requests(&mut theirs, &mut d, 1).await;
        let mut out = BytesMut::new();
        KvldsResponse::Get(None).encode(reqs[0].0 ^ 0xdead_beef, &mut out);
        theirs.write_all(&out).await.unwrap();
        theirs
    };
    let (get, _theirs) = soon(async { tokio::join!(c.get("k"), server) }).await;
    assert!(matches!(&get, Err(Error::Protocol(m)) if m.contains("no request in flight")), "{get:?}");
}

#[tokio::test]
async fn an_invalid_answer_is_a_protocol_error() {
    let (ours, mut theirs) = tokio::io::duplex(64 << 10);
    let c = Client::from_stream(Box::new(ours), 8);
    let server = async move {
        let mut d = PacketDecoder::new();
        let reqs = read_requests(&mut theirs, &mut d, 1).await;
        // SET cannot fail: status 1 is not an answer to it.
        let mut out = BytesMut::new();
        KvldsResponse::Done(false).encode(reqs[0].0, &mut out);
        theirs.write_all(&out).await.unwrap();
        theirs
    };
    let (set, _theirs) = soon(async { tokio::join!(c.set("k", "v"), server) }).await;
    assert!(matches!(&set, Err(Error::Protocol(m)) if m.contains("status")), "{set:?}");
}

#[tokio::test]
async fn a_range_page_going_backwards_ends_the_iteration_with_a_protocol_error() {
    let (ours, mut theirs) = tokio::io::duplex(64 << 10);
    let c = Client::from_stream(Box::new(ours), 8);
    let server = async move {
        let mut d = PacketDecoder::new();
        let reqs = read_requests(&mut theirs, &mut d, 1).await;
        let mut out = BytesMut::new();
        let pairs = vec![(Bytes::from("b"), Bytes::from("1"))];
        KvldsResponse::Range { next: Bytes::from("a"), pairs }.encode(reqs[0].0, &mut out);
        theirs.write_all(&out).await.unwrap();
        theirs
    };
    let mut it = c.range_iter("b", "z").unwrap();
    let (first, _theirs) = soon(async { tokio::join!(it.next(), server) }).await;
    assert!(matches!(&first, Err(Error::Protocol(m)) if m.contains("no progress")), "{first:?}");
    assert_eq!(soon(it.next()).await, Ok(None));
    assert!(c.lost_reason().is_none(), "the connection is kept");
}

#[tokio::test]
async fn dropping_every_handle_closes_the_connection() {
    let (ours, mut theirs) = tokio::io::duplex(64 << 10);
    let c = Client::from_stream(Box::new(ours), 8);
    let c2 = c.clone();
    drop(c);
    tokio::task::yield_now().await;
    let mut buf = [0u8; 16];
    assert!(theirs.read(&mut buf).now_or_never().is_none(), "closed while a handle is left");
    drop(c2);
    assert_eq!(soon(theirs.read(&mut buf)).await.unwrap(), 0);
}

#[tokio::test]
async fn connects_to_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvlds.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let stats = Arc::new(Mutex::new(Stats::default()));
    let server_stats = stats.clone();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        serve(s, Opts::default(), server_stats).await;
    });
    let c = soon(Client::connect(&SocketAddr::parse(path.to_str().unwrap()))).await.unwrap();
    assert_eq!(c.in_flight_max(), kivaloo_io_shim::client::DEFAULT_IN_FLIGHT_MAX);
    soon(c.set("k", "v")).await.unwrap();
    assert_eq!(soon(c.get("k")).await.unwrap(), Some(Bytes::from("v")));
    assert!(c.lost_reason().is_none());
}
