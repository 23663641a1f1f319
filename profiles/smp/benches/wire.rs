//! Encode and decode of full blocks of transmissions (no crypto).

#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use muxd_smp::block::{BLOCK_SIZE, BatchBuilder, decode_batch, pad_block, unpad_block};
use muxd_smp::command::{Command, Response};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};

const SID: [u8; 32] = [1; 32];

/// 135 Ed25519-signed SUBs (v18), each with its own corrId and queue id.
fn sub_block() -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for i in 0..135u8 {
        let mut cmd = Vec::new();
        Command::Sub.encode(18, &mut cmd).unwrap();
        let a = Authorized::new(&SID, &[i; 24], &[i; 24], &cmd).unwrap();
        let mut t = Vec::new();
        encode_transmission(18, &[0x55; 64], &a, &mut t).unwrap();
        assert!(b.push(&t));
    }
    let mut block = Vec::new();
    pad_block(&b.take(), &mut block).unwrap();
    block
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("block");
    g.throughput(Throughput::Bytes(BLOCK_SIZE as u64));

    g.bench_function("encode_135_signed_subs", |bench| {
        let sig = [0x55u8; 64];
        bench.iter(|| {
            let mut b = BatchBuilder::new();
            let mut cmd = Vec::with_capacity(8);
            let mut t = Vec::with_capacity(128);
            for i in 0..135u8 {
                cmd.clear();
                Command::Sub.encode(18, &mut cmd).unwrap();
                let a = Authorized::new(&SID, &[i; 24], &[i; 24], &cmd).unwrap();
                t.clear();
                encode_transmission(18, &sig, &a, &mut t).unwrap();
                b.push(&t);
            }
            let mut block = Vec::with_capacity(BLOCK_SIZE);
            pad_block(&b.take(), &mut block).unwrap();
            block
        });
    });

    let subs = sub_block();
    g.bench_function("decode_135_signed_subs", |bench| {
        bench.iter(|| {
            let content = unpad_block(&subs).unwrap();
            let mut n = 0;
            for t in decode_batch(content).unwrap() {
                let t = Transmission::decode(18, &SID, t).unwrap();
                if matches!(Command::decode(18, t.command), Ok(Command::Sub)) {
                    n += 1;
                }
            }
            assert_eq!(n, 135);
        });
    });

    let mut b = BatchBuilder::new();
    for i in 0..255u8 {
        let a = Authorized::new(&SID, b"", &[i; 24], b"END").unwrap();
        let mut t = Vec::new();
        encode_transmission(18, b"", &a, &mut t).unwrap();
        assert!(b.push(&t));
    }
    let mut ends = Vec::new();
    pad_block(&b.take(), &mut ends).unwrap();
    g.bench_function("decode_255_ends", |bench| {
        bench.iter(|| {
            let content = unpad_block(&ends).unwrap();
            let mut n = 0;
            for t in decode_batch(content).unwrap() {
                let t = Transmission::decode(18, &SID, t).unwrap();
                if matches!(Response::decode(18, t.command), Ok(Response::End)) {
                    n += 1;
                }
            }
            assert_eq!(n, 255);
        });
    });

    // One MSG of 16122 bytes: the body copy dominates.
    let mut cmd = Vec::new();
    Response::Msg {
        msg_id: vec![3; 24],
        body: vec![7; 16122],
    }
    .encode(18, &mut cmd)
    .unwrap();
    let a = Authorized::new(&SID, b"", &[4; 24], &cmd).unwrap();
    let mut t = Vec::new();
    encode_transmission(18, b"", &a, &mut t).unwrap();
    let mut b = BatchBuilder::new();
    assert!(b.push(&t));
    let mut msg = Vec::new();
    pad_block(&b.take(), &mut msg).unwrap();
    g.bench_function("decode_msg", |bench| {
        bench.iter(|| {
            let content = unpad_block(&msg).unwrap();
            let items = decode_batch(content).unwrap();
            let t = Transmission::decode(18, &SID, items[0]).unwrap();
            Response::decode(18, t.command).unwrap()
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
