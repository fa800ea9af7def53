//! Plain HTTP to agents through the gateway (issue 17's acceptance, on the path in force):
//! server-sent events flow event by event, a client that stops reading holds the upstream
//! back without losing a byte, and upstream keep-alive connections are reused.

mod common;

use common::auth::{answer, read_request, serve};
use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Opens a plain GET of `path` through the gateway and returns the stream past the head.
async fn open_get(gateway: &Gateway, path: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(gateway.address())
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: agents\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let head = read_head(&mut stream).await;
    (stream, head)
}

#[tokio::test]
async fn events_flow_one_at_a_time() {
    // The node sends the next event only once the client has read the last: if anything on
    // the way held events back, this would wait forever (and fail at its bound).
    let (read_one, was_read) = mpsc::channel::<()>(1);
    let was_read = Arc::new(tokio::sync::Mutex::new(was_read));
    let (node, _accepting) = serve(move |mut stream| {
        let was_read = Arc::clone(&was_read);
        async move {
            read_request(&mut stream, &mut Vec::new())
                .await
                .expect("a request");
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).await.expect("head");
            let mut was_read = was_read.lock().await;
            for event in 0..20 {
                let text = format!("data: event-{event}\n\n");
                stream.write_all(text.as_bytes()).await.expect("event");
                if was_read.recv().await.is_none() {
                    return;
                }
            }
        }
    })
    .await;
    let gateway = start_gateway(&local_config(&[node]));
    let (mut stream, head) = open_get(&gateway, "/agents/CoderAgent/events").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut seen = String::new();
    for event in 0..20 {
        let wanted = format!("data: event-{event}\n\n");
        while !seen.contains(&wanted) {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("event {event} held back; seen {seen:?}"))
                .expect("read");
            assert!(n > 0, "ended before event {event}");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
        read_one.send(()).await.ok();
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_holds_the_upstream_back_and_loses_nothing() {
    const TOTAL: usize = 256 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let written = Arc::new(AtomicUsize::new(0));
    let progress = Arc::clone(&written);
    let (node, _accepting) = serve(move |mut stream| {
        let progress = Arc::clone(&progress);
        async move {
            read_request(&mut stream, &mut Vec::new())
                .await
                .expect("a request");
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {TOTAL}\r\n\r\n");
            stream.write_all(head.as_bytes()).await.expect("head");
            let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
            for _ in 0..TOTAL / CHUNK {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
                progress.fetch_add(CHUNK, Ordering::SeqCst);
            }
        }
    })
    .await;
    let gateway = start_gateway(&local_config(&[node]));
    let (mut stream, head) = open_get(&gateway, "/agents/CoderAgent/download").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // The client reads nothing: the node's writes stall once the buffers on the way (socket
    // buffers on three sockets and the gateway's) are full, far short of the whole body.
    let mut last = usize::MAX;
    let stalled = wait_stalled(&written, &mut last).await;
    eprintln!("the node stalled after {stalled} bytes");
    assert!(
        stalled < TOTAL / 4,
        "{stalled} of {TOTAL} bytes left the node while the client read nothing"
    );

    // Reading again, every byte arrives, in order.
    let mut received = 0usize;
    let mut buffer = vec![0u8; CHUNK];
    while received < TOTAL {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buffer))
            .await
            .expect("data in time")
            .expect("read");
        assert!(n > 0, "ended after {received} of {TOTAL} bytes");
        for (i, byte) in buffer[..n].iter().enumerate() {
            let at = received + i;
            assert_eq!(*byte, ((at % CHUNK) % 251) as u8, "byte {at}");
        }
        received += n;
    }
}

/// Waits until `written` stops growing for a while and returns it.
async fn wait_stalled(written: &AtomicUsize, last: &mut usize) -> usize {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        // Stalling is the absence of progress: only time can show it.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = written.load(Ordering::SeqCst);
        if now == *last {
            return now;
        }
        *last = now;
        assert!(
            std::time::Instant::now() < deadline,
            "the node never stalled"
        );
    }
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let (node, _accepting) = serve(move |mut stream| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buffer = Vec::new();
            while read_request(&mut stream, &mut buffer).await.is_some() {
                let ok = answer(200, &[], "ok");
                if stream.write_all(ok.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let gateway = start_gateway(&local_config(&[node]));
    for i in 0..20 {
        let answer = get(gateway.address(), &format!("/agents/CoderAgent/r{i}"), &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    // One connection per proxy thread at the most (each thread keeps its own pool).
    let connects = accepted.load(Ordering::SeqCst);
    assert!(
        connects <= 2,
        "{connects} upstream connections for 20 sequential requests"
    );
}
