//! HTTP/2 on the TLS listener (ALPN `h2`, `http/1.1`), with curl as the client: eight
//! server-sent-event streams at once on one connection, where HTTP/1.1 would need eight; and
//! the gateway's own answers the same as over HTTP/1.1.

mod common;

use common::auth::{read_request, serve};
use common::*;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::Barrier;

const STREAMS: usize = 8;
const NAME: &str = "agents.test";

/// An agent node that answers every request with an event stream, and sends its events only
/// once [`STREAMS`] requests are open at the same time.
async fn event_node() -> SocketAddr {
    let all_open = Arc::new(Barrier::new(STREAMS));
    let (address, _accepting) = serve(move |mut stream| {
        let all_open = Arc::clone(&all_open);
        async move {
            if read_request(&mut stream, &mut Vec::new()).await.is_none() {
                return;
            }
            let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          cache-control: no-cache\r\nconnection: close\r\n\r\n";
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            all_open.wait().await;
            for event in 0..3 {
                let text = format!("data: event-{event}\n\n");
                if stream.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    address
}

/// A gateway over `node` with its TLS listener and `sections` added to its configuration,
/// and the CA file curl trusts.
fn gateway_with_tls(node: SocketAddr, sections: &str) -> (Gateway, std::path::PathBuf) {
    let ca = TestCa::new();
    let leaf = ca.issue(&[NAME]);
    let config = local_config(&[node])
        + "\n[tls]\nlisten = \"{tls}\"\n[[tls.certificates]]\ncert = \"leaf.pem\"\nkey = \"leaf.key\"\n"
        + sections;
    let gateway = start_gateway_with(&config, &[], |dir| {
        std::fs::write(dir.join("leaf.pem"), &leaf.cert_pem).expect("cert");
        std::fs::write(dir.join("leaf.key"), &leaf.key_pem).expect("key");
        std::fs::write(dir.join("ca.pem"), &ca.pem).expect("ca");
    });
    let ca_file = gateway.dir.path().join("ca.pem");
    (gateway, ca_file)
}

/// curl over TLS to the gateway's TLS listener on `port`, `args` after the common ones;
/// bounded in time.
fn curl(port: u16, ca_file: &std::path::Path, args: &[String]) -> Output {
    let resolve = format!("{NAME}:{port}:127.0.0.1");
    Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca_file)
        .args(["--resolve", &resolve])
        .args(args)
        .output()
        .expect("curl runs")
}

fn url(gateway: &Gateway, path: &str) -> String {
    format!("https://{NAME}:{}{path}", gateway.tls.port())
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_event_streams_share_one_http2_connection() {
    let node = event_node().await;
    let (gateway, ca_file) = gateway_with_tls(node, "");
    let dir = gateway.dir.path().to_owned();
    let mut args: Vec<String> = ["--http2", "--parallel", "--parallel-max", "8"]
        .map(str::to_owned)
        .to_vec();
    args.extend([
        "-w".to_owned(),
        "%{http_version} %{num_connects}\\n".to_owned(),
    ]);
    for stream in 0..STREAMS {
        let output = dir.join(format!("stream-{stream}.txt"));
        args.push("-o".to_owned());
        args.push(output.display().to_string());
        args.push(url(
            &gateway,
            &format!("/agents/CoderAgent/stream-{stream}"),
        ));
    }
    // curl blocks; the node and the gateway keep running on the test's other threads.
    let port = gateway.tls.port();
    let output = tokio::task::spawn_blocking(move || curl(port, &ca_file, &args))
        .await
        .expect("curl joined");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), STREAMS, "{report}");
    assert!(
        lines.iter().all(|l| l.starts_with("2 ")),
        "not all HTTP/2: {report}"
    );
    let connects: u32 = lines
        .iter()
        .map(|l| {
            l.split(' ')
                .nth(1)
                .and_then(|n| n.parse::<u32>().ok())
                .expect("a count")
        })
        .sum();
    assert_eq!(connects, 1, "one connection for all streams: {report}");
    for stream in 0..STREAMS {
        let events = std::fs::read_to_string(dir.join(format!("stream-{stream}.txt")))
            .expect("the stream's events");
        assert_eq!(
            events, "data: event-0\n\ndata: event-1\n\ndata: event-2\n\n",
            "stream {stream}"
        );
    }
}

#[tokio::test]
async fn the_gateways_answers_are_the_same_over_http2() {
    let node = event_node().await;
    let (gateway, ca_file) = gateway_with_tls(node, "");
    for (path, status) in [("/agents/Nobody/x", 404), ("/elsewhere", 404)] {
        let h1 = get(gateway.address(), path, &[]).await;
        assert_eq!(h1.status, status, "{}", h1.body);
        let args = [
            "--http2".to_owned(),
            "-w".to_owned(),
            "\n%{http_version} %{http_code}".to_owned(),
            url(&gateway, path),
        ];
        let output = curl(gateway.tls.port(), &ca_file, &args);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, codes) = text.rsplit_once('\n').expect("the -w line");
        assert_eq!(codes, format!("2 {status}"), "{text}");
        let mut h2: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        let mut h1 = h1.json();
        for answer in [&mut h1, &mut h2] {
            answer.as_object_mut().map(|o| o.remove("request_id"));
        }
        assert_eq!(h2, h1, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_without_a_length_is_bounded_over_http2_too() {
    // The node reads and never answers: the gateway's 413 is the only answer there can be.
    let (node, _accepting) = serve(|mut stream| async move {
        let mut sink = [0u8; 4096];
        while matches!(
            tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await,
            Ok(n) if n > 0
        ) {}
    })
    .await;
    let limits = "\n[limits]\nmax_request_body_bytes = 16\n";
    let (gateway, ca_file) = gateway_with_tls(node, limits);
    // `-T -`: an upload from standard input, of a length curl cannot know, so none is sent.
    let mut upload = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2", "--cacert"])
        .arg(&ca_file)
        .args([
            "--resolve",
            &format!("{NAME}:{}:127.0.0.1", gateway.tls.port()),
        ])
        .args(["-w", "\n%{http_version} %{http_code}", "-T", "-"])
        .arg(url(&gateway, "/agents/CoderAgent/upload"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs");
    let mut stdin = upload.stdin.take().expect("curl's input");
    std::io::Write::write_all(&mut stdin, &[b'x'; 40]).expect("body written");
    drop(stdin);
    let output = upload.wait_with_output().expect("curl ends");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.ends_with("\n2 413"), "{text}");
    assert!(text.contains("request_body_too_large"), "{text}");
}
