//! WebSocket echo backend (plain HTTP requests get "Hello, world"; `GET /_bench/stats` gets
//! the count of Pings it answered). Ignores every header it does not need, x-partykit-*
//! included. Usage: echo-backend --listen 127.0.0.1:18001
use gateway_bench_loadgen::{args::Args, listen, run_local, serve};

fn main() {
    let args = Args::parse(std::env::args().skip(1));
    if args.str("help").is_some() || args.str("h").is_some() {
        println!("usage: echo-backend [--listen 127.0.0.1:18001]\n  WebSocket echo (data frames come back unmasked, pings get pongs, Close is answered);\n  plain HTTP requests get 200 \"Hello, world\", except GET /_bench/stats: {{\"pings_answered\":N}}.\n  Single-threaded; serves until killed.");
        return;
    }
    let addr = args.str("listen").unwrap_or("127.0.0.1:18001").to_owned();
    run_local(async move {
        let listener = listen(&addr).unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
        println!("echo-backend listening on {addr}");
        serve(listener, true).await
    })
    .expect("serve");
}
