//! HTTP/1.1 keep-alive backend answering every request with 200 "Hello, world", except
//! `GET .../events[?size=N][&every_ms=M]`: a server-sent event stream, N-byte events (64 by
//! default) written back to back (or M ms apart), one chunk and one write each, until the client
//! goes (see `sse.rs`).
//! Usage: hello-backend --listen 127.0.0.1:18002
use gateway_bench_loadgen::{args::Args, listen, run_local, serve};

fn main() {
    let args = Args::parse(std::env::args().skip(1));
    if args.str("help").is_some() || args.str("h").is_some() {
        println!("usage: hello-backend [--listen 127.0.0.1:18002]\n  HTTP/1.1 keep-alive server answering every request with 200 \"Hello, world\",\n  except GET <path ending in /events>[?size=N][&every_ms=M]: text/event-stream, chunked,\n  N-byte events (64 by default) written back to back (or M ms apart) until the client closes.\n  Single-threaded; serves until killed.");
        return;
    }
    let addr = args.str("listen").unwrap_or("127.0.0.1:18002").to_owned();
    run_local(async move {
        let listener = listen(&addr).unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
        println!("hello-backend listening on {addr}");
        serve(listener, false).await
    })
    .expect("serve");
}
