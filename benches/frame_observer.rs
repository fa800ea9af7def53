//! The frame observer's cost on its own: per MiB of proxied bytes and per frame, for small
//! chat-sized messages and for large ones. The proxied-message cost it is compared with
//! comes from the bench/ harness.

use agent_gateway::websocket::frame::{FrameParser, Sender};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

/// `count` masked client frames of `size` payload bytes each.
fn client_frames(size: usize, count: usize) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut out = Vec::with_capacity(count * (size + 14));
    for _ in 0..count {
        out.push(0x82);
        match size {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        out.extend(std::iter::repeat_n(0xa5, size));
    }
    out
}

fn observer(c: &mut Criterion) {
    const MIB: usize = 1 << 20;
    let mut group = c.benchmark_group("frame_observer");
    for size in [64usize, 1024, 65536] {
        let stream = client_frames(size, MIB / size);
        group.throughput(Throughput::Bytes(stream.len() as u64));
        // Fed in 16 KiB reads, as the pump reads.
        group.bench_with_input(BenchmarkId::new("per_MiB", size), &stream, |b, stream| {
            b.iter(|| {
                let mut parser = FrameParser::new(Sender::Client, false);
                let mut frames = 0u64;
                for chunk in stream.chunks(16 * 1024) {
                    parser.feed(black_box(chunk), |_| frames += 1);
                }
                black_box(frames)
            })
        });
    }
    let one = client_frames(64, 1);
    group.throughput(Throughput::Elements(1));
    group.bench_function("per_frame_64B", |b| {
        let mut parser = FrameParser::new(Sender::Client, false);
        b.iter(|| {
            parser.feed(black_box(&one), |e| {
                black_box(e);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, observer);
criterion_main!(benches);
