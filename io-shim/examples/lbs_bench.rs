//! A throughput harness for a running lbs (ours or kivaloo's): pipelined
//! APPENDs of one block each, then pipelined random GETs, over one
//! connection with a bounded number of requests in flight.
//!
//! ```sh
//! cargo run --release --example lbs_bench -- <socket> [appends] [gets] [in flight]
//! ```
//!
//! Prints requests per second for each phase. The store should be fresh
//! (the harness appends at the store's next block).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use kivaloo::lbs_proto::{LbsRequest, LbsRequestKind, LbsResponse};
use kivaloo::packet::PacketDecoder;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sock = args.get(1).expect("usage: lbs_bench <socket> [appends] [gets] [in flight]");
    let appends: u64 = args.get(2).map_or(200_000, |s| s.parse().unwrap());
    let gets: u64 = args.get(3).map_or(200_000, |s| s.parse().unwrap());
    let in_flight: u64 = args.get(4).map_or(4096, |s| s.parse().unwrap());

    let mut stream = UnixStream::connect(sock).expect("connect");
    let mut dec = PacketDecoder::new();
    let mut out = BytesMut::new();
    LbsRequest::Params2.encode(0, &mut out);
    stream.write_all(&out).unwrap();
    let (block_size, first) =
        match LbsResponse::decode(LbsRequestKind::Params2, recv(&mut stream, &mut dec).1) {
            Ok(LbsResponse::Params2 { block_size, next_block, .. }) => (block_size, next_block),
            other => panic!("{other:?}"),
        };
    let block = Bytes::from(vec![0xa5u8; block_size as usize]);

    let t = Instant::now();
    run(&stream, appends, in_flight, LbsRequestKind::Append, |i| LbsRequest::Append {
        count: 1,
        start: first + i,
        data: block.clone(),
    });
    let secs = t.elapsed().as_secs_f64();
    println!("append: {appends} x {block_size} B in {secs:.2} s = {:.0} /s", appends as f64 / secs);

    let t = Instant::now();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let blocks = appends.max(1);
    run(&stream, gets, in_flight, LbsRequestKind::Get, move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        LbsRequest::Get { block: first + x % blocks }
    });
    let secs = t.elapsed().as_secs_f64();
    println!("get:    {gets} random in {secs:.2} s = {:.0} /s", gets as f64 / secs);
}

fn recv(stream: &mut UnixStream, dec: &mut PacketDecoder) -> (u64, Bytes) {
    loop {
        if let Some(p) = dec.next_packet().unwrap() {
            return (p.id, p.record);
        }
        let mut buf = vec![0u8; 1 << 16];
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "server closed");
        dec.push(&buf[..n]);
    }
}

/// Sends `total` requests with at most `in_flight` outstanding; a reader
/// thread checks every response.
fn run(
    stream: &UnixStream,
    total: u64,
    in_flight: u64,
    kind: LbsRequestKind,
    mut make: impl FnMut(u64) -> LbsRequest,
) {
    let done = Arc::new(AtomicU64::new(0));
    let mut rd = stream.try_clone().unwrap();
    let reader_done = done.clone();
    let reader = std::thread::spawn(move || {
        let mut dec = PacketDecoder::new();
        for _ in 0..total {
            let (_, rec) = recv(&mut rd, &mut dec);
            match LbsResponse::decode(kind, rec).unwrap() {
                LbsResponse::Append(Some(_)) | LbsResponse::Get(Some(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
            reader_done.fetch_add(1, Ordering::Release);
        }
    });
    let mut wr = stream.try_clone().unwrap();
    let mut out = BytesMut::new();
    let mut sent = 0;
    while sent < total {
        while sent < total && sent - done.load(Ordering::Acquire) < in_flight && out.len() < 1 << 20 {
            make(sent).encode(sent, &mut out);
            sent += 1;
        }
        if !out.is_empty() {
            wr.write_all(&out).unwrap();
            out.clear();
        } else {
            std::thread::yield_now();
        }
    }
    reader.join().unwrap();
}
