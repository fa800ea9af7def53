//! Plain HTTP bodies of 1 GiB through the gateway, each way: every byte arrives intact and in
//! order, and the gateway streams them, its resident memory growing by less than
//! [`RSS_BUDGET`] while they pass.

mod common;

use common::auth::{answer, read_request, serve};
use common::*;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const GIB: u64 = 1 << 30;
/// The first transfer, so that what the gateway allocates lazily exists before measuring.
const WARM_UP: u64 = 8 << 20;
/// The application's read and write buffers on the client and the node.
const BLOCK: usize = 256 * 1024;
/// How much the gateway's resident set may grow while 1 GiB passes.
const RSS_BUDGET: u64 = 16 << 20;
/// Upper bound on one 1 GiB transfer (a debug build).
const TRANSFER: Duration = Duration::from_secs(120);
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_upload_streams_through_in_bounded_memory() {
    assert_streams("upload", upload).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_download_streams_through_in_bounded_memory() {
    assert_streams("download", download).await;
}

/// Runs `transfer` of [`WARM_UP`] bytes, then of 1 GiB while sampling the gateway's resident
/// set, and asserts it grew by less than [`RSS_BUDGET`].
async fn assert_streams<F, Fut>(direction: &str, transfer: F)
where
    F: Fn(SocketAddr, u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let (node, _accepting) = serve(node).await;
    let limits = format!("\n[limits]\nmax_request_body_bytes = {}\n", 2 * GIB);
    let gateway = start_gateway(&(local_config(&[node]) + &limits));
    tokio::time::timeout(WAIT, transfer(gateway.address(), WARM_UP))
        .await
        .unwrap_or_else(|_| panic!("the warm-up {direction} took over {WAIT:?}"));

    let pid = gateway.proc.child.id();
    let before = rss(pid);
    let sampler = RssSampler::start(pid);
    let started = Instant::now();
    tokio::time::timeout(TRANSFER, transfer(gateway.address(), GIB))
        .await
        .unwrap_or_else(|_| panic!("the 1 GiB {direction} took over {TRANSFER:?}"));
    let elapsed = started.elapsed();
    let (peak, samples) = sampler.stop();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "1 GiB {direction}: {elapsed:.1?}, gateway RSS {} KiB before, {} KiB at the most, \
         growth {} KiB ({} samples)",
        before >> 10,
        peak >> 10,
        growth >> 10,
        samples,
    );
    assert!(
        growth < RSS_BUDGET,
        "the gateway's RSS grew by {growth} bytes during the 1 GiB {direction}"
    );
}

/// POSTs `total` bytes of the pattern to the node through the gateway; the node answers with
/// the count of pattern bytes it checked.
async fn upload(gateway: SocketAddr, total: u64) {
    let mut stream = TcpStream::connect(gateway).await.expect("connect");
    let head = format!(
        "POST /agents/CoderAgent/upload HTTP/1.1\r\nHost: agents\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    if let Err(e) = send_pattern(&mut stream, total).await {
        let mut early = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut early)).await;
        let early = String::from_utf8_lossy(&early);
        panic!("the upload of {total} bytes stopped ({e}); the gateway said {early:?}");
    }
    let head = read_head(&mut stream).await;
    let mut body = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut body))
        .await
        .expect("the answer's body in time")
        .expect("the answer's body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}{body}");
    assert_eq!(body, total.to_string(), "bytes the node checked");
}

/// GETs `total` bytes of the pattern from the node through the gateway and checks them all.
async fn download(gateway: SocketAddr, total: u64) {
    let mut stream = TcpStream::connect(gateway).await.expect("connect");
    let request = format!(
        "GET /agents/CoderAgent/download?bytes={total} HTTP/1.1\r\nHost: agents\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length = format!("\r\ncontent-length: {total}\r\n");
    assert!(head.to_ascii_lowercase().contains(&length), "{head}");
    receive_pattern(&mut stream, &[], total).await;
    let mut more = [0u8; 1];
    let after = tokio::time::timeout(WAIT, stream.read(&mut more))
        .await
        .expect("the end of the answer in time");
    assert!(matches!(after, Ok(0)), "after the body: {after:?} {more:?}");
}

/// The node: a POST's body is checked against the pattern and answered with its length, a GET
/// of `…?bytes=N` is answered with `N` bytes of the pattern; connections are kept alive.
async fn node(mut stream: TcpStream) {
    let mut buffer = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buffer).await {
        if request.method == "POST" {
            let length = request
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("an upload without a Content-Length: {request:?}"));
            let start = std::mem::take(&mut buffer);
            let count = receive_pattern(&mut stream, &start, length).await;
            let ok = answer(200, &[], &count.to_string());
            if stream.write_all(ok.as_bytes()).await.is_err() {
                return;
            }
        } else {
            let length: u64 = request
                .target
                .split_once("bytes=")
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or_else(|| panic!("a GET without bytes=N: {}", request.target));
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
            let sent = stream.write_all(head.as_bytes()).await;
            if sent.is_err() || send_pattern(&mut stream, length).await.is_err() {
                return;
            }
        }
    }
}

/// The pattern's word `k`, its bytes `8k..8k + 8`: a different one for every `k` (an odd
/// multiplier is a bijection), so a byte lost, repeated or moved shows.
fn word(k: u64) -> [u8; 8] {
    k.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()
}

/// Fills `block` with the pattern from byte `offset`, a multiple of 8.
fn fill(block: &mut [u8], offset: u64) {
    for (i, bytes) in block.chunks_mut(8).enumerate() {
        bytes.copy_from_slice(&word(offset / 8 + i as u64)[..bytes.len()]);
    }
}

/// Writes `total` bytes of the pattern, [`BLOCK`] at a time.
async fn send_pattern(stream: &mut (impl AsyncWrite + Unpin), total: u64) -> std::io::Result<()> {
    let mut block = vec![0u8; BLOCK];
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(BLOCK as u64) as usize;
        fill(&mut block[..n], sent);
        stream.write_all(&block[..n]).await?;
        sent += n as u64;
    }
    Ok(())
}

/// Reads `total` bytes (the first of them already in `start`), checking each against the
/// pattern; the count.
async fn receive_pattern(stream: &mut (impl AsyncRead + Unpin), start: &[u8], total: u64) -> u64 {
    let mut check = PatternCheck {
        received: 0,
        expected: vec![0u8; BLOCK],
    };
    check.feed(start);
    let mut buffer = vec![0u8; BLOCK];
    while check.received < total {
        let want = (total - check.received).min(BLOCK as u64) as usize;
        let n = stream.read(&mut buffer[..want]).await.expect("read");
        assert!(n > 0, "ended after {} of {total} bytes", check.received);
        check.feed(&buffer[..n]);
    }
    assert_eq!(check.received, total, "bytes past the end");
    check.received
}

/// Checks bytes arriving in pieces of any size against the pattern, [`BLOCK`] at a time.
struct PatternCheck {
    received: u64,
    /// The pattern's block that `received` is in.
    expected: Vec<u8>,
}

impl PatternCheck {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let at = (self.received % BLOCK as u64) as usize;
            if at == 0 {
                fill(&mut self.expected, self.received);
            }
            let n = data.len().min(BLOCK - at);
            let expected = &self.expected[at..at + n];
            if let Some(i) = (data[..n] != *expected)
                .then(|| data.iter().zip(expected).position(|(a, b)| a != b))
                .flatten()
            {
                panic!(
                    "byte {} is {:#04x}, expected {:#04x}",
                    self.received + i as u64,
                    data[i],
                    expected[i]
                );
            }
            self.received += n as u64;
            data = &data[n..];
        }
    }
}

/// The resident set of process `pid`, in bytes (`VmRSS` of `/proc/<pid>/status`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// The largest resident set of a process, sampled every [`SAMPLE_EVERY`] until stopped.
struct RssSampler {
    pid: u32,
    /// The largest sample and the number of samples.
    peak: Arc<(AtomicU64, AtomicU64)>,
    task: JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let sampled = Arc::clone(&peak);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            loop {
                every.tick().await;
                sampled.0.fetch_max(rss(pid), Ordering::SeqCst);
                sampled.1.fetch_add(1, Ordering::SeqCst);
            }
        });
        RssSampler { pid, peak, task }
    }

    /// Stops sampling after one last sample: the largest sample, and how many were taken.
    fn stop(self) -> (u64, u64) {
        self.task.abort();
        let last = rss(self.pid);
        let peak = self.peak.0.fetch_max(last, Ordering::SeqCst).max(last);
        (peak, self.peak.1.load(Ordering::SeqCst) + 1)
    }
}
