//! WebSocket load generator for the benchmark harness. Prints one JSON object per run.
//!
//! wsload pingpong --url ws://127.0.0.1:18080/agents/bench/c{i} --conns 64 --size 64
//!                 --warmup 1 --duration 5 [--cpu-pids 1,2]
//!     Closed loop: each connection sends a message and waits for its echo, again and again.
//!     One "message" is one echoed round trip (the proxy forwards two frames for it).
//! wsload rate --url ... --conns 100 --rate 20000 --size 64 --warmup 1 --duration 5 [--cpu-pids]
//!     Open loop at a fixed total rate, spread evenly over the connections by a sender thread;
//!     each payload carries its send time, so every echo gives a round-trip latency.
//! wsload hold --url ... --conns 9000 --hold 10 [--mem-pids 1,2] [--concurrency 64]
//!            [--cpu-pids 1,2] [--backend-stats 127.0.0.1:18001]
//!     Opens N sockets and checks each echoes, reads the proxy's PSS, holds them idle, reads
//!     PSS again, checks every socket still echoes, and reports. Idle is not deaf: from the
//!     moment they are open until the hold ends, every socket is read and a Ping gets its
//!     Pong, as a browser's would (counted). With --cpu-pids, the proxy's CPU time over the
//!     hold; with --backend-stats, the Pings the echo backend answered over the hold.
//! wsload storm --url ws://.../agents/bench/s{i} --rate 500 --warmup 1 --duration 4 [--size 64]
//!             [--token T | --tokens FILE | --mint-alg ALG (--mint-key PEM | --mint-secret-env VAR)]
//!             [--cpu-pids 1,2] [--timeout 10]
//!     The reconnect storm: `rate` new upgrades per second (open loop), each over a fresh TCP
//!     connection: connect, upgrade (with `Authorization: Bearer` when a token is given), 101,
//!     one message and its echo, Close, the proxy's close. --token: the same token every time
//!     ("seen before"); --tokens: line k for upgrade k; --mint-*: that many distinct tokens
//!     minted here before the run (each new to the proxy). Reports the achieved rate, failures,
//!     handshake times (connect to 101) and the proxy's CPU per upgrade over the window.
//! wsload mint --alg HS256|ES256|RS256 (--key PEM | --secret-env VAR) [--kid K] [--sub bench]
//!            [--ttl 3600] [--count 1]
//!     Prints JWTs (one a line), each with its own jti, signed with jsonwebtoken.
//! wsload jwks --keys KID=PRIVATE.pem[,KID=PRIVATE.pem]
//!     Prints the JWKS of the public halves (RSA: RS256, EC P-256: ES256).
//! wsload sse --url http://127.0.0.1:18080/agents/hello/s{i}/events?size=64 --conns 16
//!            --warmup 0.5 --duration 5 [--cpu-pids 1,2]
//!     Server-sent events, closed loop: N streams (GET, `text/event-stream`, no Content-Length),
//!     each read as fast as it comes (chunked framing decoded), event boundaries (`\n\n`)
//!     counted; reports events/s over the window, the proxy's CPU per event, and how many
//!     events each read brought (how coalesced the stream arrives).
//! wsload probe --url ...       one connection, one echo: exit 0 when it works.
//! wsload exec --out FILE -- cmd args...
//!     Runs cmd and writes its CPU time (getrusage of children) to FILE, for the noise check.
//!
//! `{i}` in the URL's path is replaced by the connection's index, so every connection is
//! its own agent instance.

use gateway_bench_loadgen::args::{die, Args};
use gateway_bench_loadgen::sse;
use gateway_bench_loadgen::storm::{self, pct_us, Storm, Tokens};
use gateway_bench_loadgen::tokens::{public_jwk, Minter};
use gateway_bench_loadgen::procfs::{sum_cpu_ticks, sum_pss_kib, ticks_per_second};
use gateway_bench_loadgen::{
    client_frame, push_frame, run_local, WsClient, CLIENT_MASK, STATS_PATH,
};
use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  wsload pingpong --url ws://127.0.0.1:PORT/path/c{i} [--conns 64] [--size 64] [--warmup 1] [--duration 5] [--cpu-pids P,..] [--token T]
  wsload rate     --url ... [--conns 100] [--rate 20000] [--size 64] [--warmup 1] [--duration 5] [--cpu-pids P,..]
  wsload hold     --url ... [--conns 1000] [--hold 10] [--settle 1] [--concurrency 64] [--mem-pids P,..]
                  [--cpu-pids P,..] [--backend-stats IP:PORT]
  wsload storm    --url ... [--rate 500] [--warmup 1] [--duration 4] [--size 64] [--cpu-pids P,..] [--timeout 10]
                  [--token T | --tokens FILE | --mint-alg ALG (--mint-key PEM | --mint-secret-env VAR) [--mint-kid K]]
  wsload mint     --alg ALG (--key PEM | --secret-env VAR) [--kid K] [--sub bench] [--ttl 3600] [--count 1]
  wsload jwks     --keys KID=PRIVATE.pem[,KID=PRIVATE.pem]
  wsload sse      --url http://IP:PORT/path/s{i}/events [--conns 16] [--warmup 0.5] [--duration 5] [--cpu-pids P,..]
  wsload probe    --url ... [--token T]
  wsload exec     --out FILE -- command args...
Each run prints one JSON object; {i} in the path becomes the connection's index.";

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    /// Extra header lines of every upgrade (`Authorization: Bearer` with --token).
    extra: String,
}

impl Target {
    /// The target of `--url`, with `--token` when given.
    fn of(args: &Args) -> Target {
        let mut t = Target::parse(args.required("url"));
        if let Some(token) = args.str("token") {
            t.extra = format!("Authorization: Bearer {token}\r\n");
        }
        t
    }

    fn parse(url: &str) -> Target {
        let rest = url
            .strip_prefix("ws://")
            .unwrap_or_else(|| die("--url must start with ws://"));
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let addr = host
            .parse()
            .unwrap_or_else(|_| die("--url host must be ip:port (loopback only)"));
        Target {
            addr,
            host: host.to_owned(),
            path: if path.is_empty() { "/".into() } else { path.into() },
            extra: String::new(),
        }
    }

    fn path(&self, i: usize) -> String {
        self.path.replace("{i}", &i.to_string())
    }

    async fn connect(&self, i: usize) -> io::Result<WsClient> {
        tokio::time::timeout(
            Duration::from_secs(10),
            WsClient::connect_with(self.addr, &self.host, &self.path(i), &self.extra),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
    }
}

/// Opens `n` connections, `concurrency` at a time; each must echo one message first.
/// Returns them by index (None where opening failed) and the first error seen.
async fn open_all(
    target: Rc<Target>,
    n: usize,
    concurrency: usize,
    check_size: usize,
) -> (Vec<Option<WsClient>>, Option<String>) {
    let slots: Rc<RefCell<Vec<Option<WsClient>>>> =
        Rc::new(RefCell::new((0..n).map(|_| None).collect()));
    let next = Rc::new(Cell::new(0usize));
    let first_error: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
    let frame = Rc::new(client_frame(&vec![b'o'; check_size]));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1).min(n.max(1)) {
        let (slots, next, first_error, target, frame) = (
            slots.clone(),
            next.clone(),
            first_error.clone(),
            target.clone(),
            frame.clone(),
        );
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= n {
                    break;
                }
                next.set(i + 1);
                let result = async {
                    let mut c = target.connect(i).await?;
                    tokio::time::timeout(Duration::from_secs(10), c.round_trip(&frame, check_size))
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no echo"))??;
                    Ok::<_, io::Error>(c)
                }
                .await;
                match result {
                    Ok(c) => slots.borrow_mut()[i] = Some(c),
                    Err(e) => {
                        first_error
                            .borrow_mut()
                            .get_or_insert_with(|| format!("connection {i}: {e}"));
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let slots = std::mem::take(&mut *slots.borrow_mut());
    let error = first_error.borrow_mut().take();
    (slots, error)
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn emit(fields: &[(&str, String)]) {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{}", json_str(k), v))
        .collect();
    println!("{{{}}}", body.join(","));
    let _ = io::stdout().flush();
}

fn us_per(ticks: u64, ops: u64) -> f64 {
    if ops == 0 {
        return f64::NAN;
    }
    ticks as f64 * 1e6 / ticks_per_second() as f64 / ops as f64
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

async fn pingpong(args: &Args) {
    let target = Rc::new(Target::of(args));
    let conns: usize = args.get("conns", 64);
    let size: usize = args.get("size", 64);
    let warmup = args.secs("warmup", 1.0);
    let duration = args.secs("duration", 5.0);
    let cpu_pids = args.pids("cpu-pids");
    let (clients, error) = open_all(target, conns, 64, size).await;
    if let Some(e) = error {
        die(&format!("pingpong: {e}"));
    }
    let count = Rc::new(Cell::new(0u64));
    let errors = Rc::new(Cell::new(0u64));
    let stop = Rc::new(Cell::new(false));
    let frame = Rc::new(client_frame(&vec![b'x'; size]));
    let mut tasks = Vec::new();
    for mut c in clients.into_iter().flatten() {
        let (count, errors, stop, frame) =
            (count.clone(), errors.clone(), stop.clone(), frame.clone());
        tasks.push(tokio::task::spawn_local(async move {
            while !stop.get() {
                match c.round_trip(&frame, size).await {
                    Ok(()) => count.set(count.get() + 1),
                    Err(_) => {
                        errors.set(errors.get() + 1);
                        return;
                    }
                }
            }
            c.close().await;
        }));
    }
    tokio::time::sleep(warmup).await;
    let (c0, cpu0, t0) = (count.get(), sum_cpu_ticks(&cpu_pids), Instant::now());
    tokio::time::sleep(duration).await;
    let (c1, cpu1, elapsed) = (count.get(), sum_cpu_ticks(&cpu_pids), t0.elapsed());
    stop.set(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    let messages = c1 - c0;
    emit(&[
        ("mode", json_str("pingpong")),
        ("conns", conns.to_string()),
        ("size", size.to_string()),
        ("seconds", num(elapsed.as_secs_f64())),
        ("messages", messages.to_string()),
        ("rate", num(messages as f64 / elapsed.as_secs_f64())),
        ("proxy_cpu_ticks", (cpu1 - cpu0).to_string()),
        ("proxy_cpu_us_per_msg", num(us_per(cpu1 - cpu0, messages))),
        ("errors", errors.get().to_string()),
    ]);
}

async fn rate(args: &Args) {
    let target = Rc::new(Target::of(args));
    let conns: usize = args.get("conns", 100);
    let size: usize = args.get::<usize>("size", 64).max(8);
    let rate: f64 = args.get("rate", 20000.0);
    let warmup = args.secs("warmup", 1.0);
    let duration = args.secs("duration", 5.0);
    let cpu_pids = args.pids("cpu-pids");
    let (clients, error) = open_all(target, conns, 64, size).await;
    if let Some(e) = error {
        die(&format!("rate: {e}"));
    }
    let sockets: Vec<(std::net::TcpStream, Vec<u8>)> = clients
        .into_iter()
        .flatten()
        .map(|c| {
            let (stream, rest) = c.into_parts();
            (stream.into_std().expect("a std socket"), rest)
        })
        .collect();
    let r = open_loop(sockets, rate, warmup, duration, size, &cpu_pids);
    let mut s = r.samples;
    s.sort_unstable();
    let pct = |p: f64| -> f64 {
        if s.is_empty() {
            return f64::NAN;
        }
        let idx = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
        s[idx] as f64 / 1000.0
    };
    let in_window = (rate * duration.as_secs_f64()).round() as u64;
    emit(&[
        ("mode", json_str("rate")),
        ("conns", conns.to_string()),
        ("size", size.to_string()),
        ("target_rate", num(rate)),
        ("seconds", num(r.window.as_secs_f64())),
        ("sent", r.sent.to_string()),
        ("received", r.received.to_string()),
        ("lost", r.sent.saturating_sub(r.received).to_string()),
        ("samples", s.len().to_string()),
        ("p50_us", num(pct(0.50))),
        ("p90_us", num(pct(0.90))),
        ("p99_us", num(pct(0.99))),
        ("p999_us", num(pct(0.999))),
        ("max_us", num(pct(1.0))),
        ("sender_late_p99_us", num(r.late_p99_us)),
        ("sender_late_over_1ms", r.late_over_1ms.to_string()),
        ("sender_partial_writes", r.partial_writes.to_string()),
        ("proxy_cpu_ticks", (r.cpu1 - r.cpu0).to_string()),
        ("proxy_cpu_us_per_msg", num(us_per(r.cpu1 - r.cpu0, in_window))),
        ("errors", r.errors.to_string()),
    ]);
}

struct OpenLoop {
    samples: Vec<u32>,
    sent: u64,
    received: u64,
    errors: u64,
    late_p99_us: f64,
    late_over_1ms: u64,
    partial_writes: u64,
    window: Duration,
    cpu0: u64,
    cpu1: u64,
}

struct Conn {
    stream: std::net::TcpStream,
    inb: Vec<u8>,
    start: usize,
    /// Bytes of frames the socket did not take yet (rare: only under back-pressure).
    pending: Vec<u8>,
    dead: bool,
}

/// The open-loop client: one thread, one epoll set, sends on a schedule with nanosecond
/// timeouts (epoll_pwait2, timer slack 1 ns), so neither a timer wheel nor a second thread
/// adds its jitter to the latencies. Message k goes at t0 + k/rate on connection k mod n and
/// carries its actual send time; the echo's arrival gives its round trip.
fn open_loop(
    sockets: Vec<(std::net::TcpStream, Vec<u8>)>,
    rate: f64,
    warmup: Duration,
    duration: Duration,
    size: usize,
    cpu_pids: &[u32],
) -> OpenLoop {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscalls on descriptors this function owns; buffers outlive the calls.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epfd >= 0, "epoll_create1");
    let mut conns: Vec<Conn> = sockets
        .into_iter()
        .map(|(stream, rest)| Conn {
            stream,
            inb: {
                let mut v = rest;
                v.reserve(4096);
                v
            },
            start: 0,
            pending: Vec::new(),
            dead: false,
        })
        .collect();
    for (i, c) in conns.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        let rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, c.stream.as_raw_fd(), &mut ev) };
        assert!(rc == 0, "epoll_ctl");
    }
    let n = conns.len() as u64;
    let period_ns = 1e9 / rate;
    let t0 = Instant::now();
    let warm_ns = warmup.as_nanos() as u64;
    let end_ns = (warmup + duration).as_nanos() as u64;
    let template = client_frame(&vec![b'r'; size]);
    let header = template.len() - size;
    let mut frame = template.clone();
    let mut samples: Vec<u32> = Vec::with_capacity((rate * duration.as_secs_f64() * 1.05) as usize);
    let mut late: Vec<u32> = Vec::with_capacity((rate * (warmup + duration).as_secs_f64()) as usize + 1);
    let (mut sent, mut received, mut errors, mut partial_writes) = (0u64, 0u64, 0u64, 0u64);
    let (mut cpu0, mut cpu1) = (None, None);
    let mut window_start = t0;
    let mut window = Duration::ZERO;
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut drain_deadline: Option<u64> = None;
    let now_ns = || t0.elapsed().as_nanos() as u64;
    loop {
        let now = now_ns();
        if cpu0.is_none() && now >= warm_ns {
            cpu0 = Some(sum_cpu_ticks(cpu_pids));
            window_start = Instant::now();
        }
        if cpu1.is_none() && now >= end_ns {
            cpu1 = Some(sum_cpu_ticks(cpu_pids));
            window = window_start.elapsed();
            drain_deadline = Some(now + 2_000_000_000);
        }
        // Send everything that is due.
        let mut due = (sent as f64 * period_ns) as u64;
        while due < end_ns && due <= now_ns() {
            let t = now_ns();
            late.push((t - due).min(u32::MAX as u64) as u32);
            for (i, b) in t.to_le_bytes().iter().enumerate() {
                frame[header + i] = b ^ CLIENT_MASK[i & 3];
            }
            let c = &mut conns[(sent % n) as usize];
            if !c.dead {
                if c.pending.is_empty() {
                    match io::Write::write(&mut c.stream, &frame) {
                        Ok(m) if m == frame.len() => {}
                        Ok(m) => {
                            partial_writes += 1;
                            c.pending.extend_from_slice(&frame[m..]);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            partial_writes += 1;
                            c.pending.extend_from_slice(&frame);
                        }
                        Err(_) => {
                            c.dead = true;
                            errors += 1;
                        }
                    }
                } else {
                    c.pending.extend_from_slice(&frame);
                }
            }
            sent += 1;
            due = (sent as f64 * period_ns) as u64;
        }
        // Back-pressured sockets: try again (the loop then polls without sleeping).
        let mut any_pending = false;
        for c in conns.iter_mut().filter(|c| !c.pending.is_empty() && !c.dead) {
            match io::Write::write(&mut c.stream, &c.pending) {
                Ok(m) => {
                    c.pending.drain(..m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    c.dead = true;
                    errors += 1;
                }
            }
            any_pending |= !c.pending.is_empty();
        }
        if let Some(deadline) = drain_deadline {
            if received >= sent || now_ns() >= deadline {
                break;
            }
        }
        let wait_ns = if any_pending {
            0
        } else if due < end_ns {
            due.saturating_sub(now_ns())
        } else {
            match drain_deadline {
                Some(d) => d.saturating_sub(now_ns()).min(10_000_000),
                None => end_ns.saturating_sub(now_ns()),
            }
        };
        let ts = libc::timespec {
            tv_sec: (wait_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (wait_ns % 1_000_000_000) as libc::c_long,
        };
        let ready = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                epfd,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            die(&format!("epoll_pwait2: {e}"));
        }
        for ev in &events[..ready as usize] {
            let c = &mut conns[ev.u64 as usize];
            loop {
                if c.inb.capacity() - c.inb.len() < 1024 {
                    c.inb.reserve(4096);
                }
                let len = c.inb.len();
                let cap = c.inb.capacity();
                // SAFETY: reading into the spare capacity, then setting the length to match.
                let spare = unsafe { std::slice::from_raw_parts_mut(c.inb.as_mut_ptr().add(len), cap - len) };
                match c.stream.read(spare) {
                    Ok(0) => {
                        if !c.dead {
                            c.dead = true;
                            errors += 1;
                        }
                        unsafe {
                            libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), std::ptr::null_mut());
                        }
                        break;
                    }
                    Ok(m) => unsafe { c.inb.set_len(len + m) },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        c.dead = true;
                        errors += 1;
                        unsafe {
                            libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), std::ptr::null_mut());
                        }
                        break;
                    }
                }
            }
            let arrived = now_ns();
            while let Ok(Some(head)) = gateway_bench_loadgen::parse_frame_head(&c.inb[c.start..]) {
                if c.inb.len() - c.start < head.total() {
                    break;
                }
                let p = c.start + head.header_len;
                if matches!(head.opcode(), 0x1 | 0x2) && head.payload_len >= 8 {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&c.inb[p..p + 8]);
                    let ts = u64::from_le_bytes(b);
                    received += 1;
                    if ts >= warm_ns && ts < end_ns {
                        samples.push(arrived.saturating_sub(ts).min(u32::MAX as u64) as u32);
                    }
                }
                c.start += head.total();
            }
            if c.start == c.inb.len() {
                c.inb.clear();
                c.start = 0;
            } else if c.start > 8192 {
                c.inb.drain(..c.start);
                c.start = 0;
            }
        }
    }
    unsafe {
        libc::close(epfd);
    }
    late.sort_unstable();
    let late_p99_us = late
        .get(((late.len() as f64 * 0.99) as usize).min(late.len().saturating_sub(1)))
        .map_or(f64::NAN, |v| *v as f64 / 1000.0);
    OpenLoop {
        samples,
        sent,
        received,
        errors,
        late_p99_us,
        late_over_1ms: late.iter().filter(|v| **v > 1_000_000).count() as u64,
        partial_writes,
        window,
        cpu0: cpu0.unwrap_or(0),
        cpu1: cpu1.unwrap_or(0),
    }
}

async fn hold(args: &Args) {
    let target = Rc::new(Target::of(args));
    let conns: usize = args.get("conns", 1000);
    let hold = args.secs("hold", 10.0);
    let settle = args.secs("settle", 1.0);
    let concurrency: usize = args.get("concurrency", 64);
    let mem_pids = args.pids("mem-pids");
    let cpu_pids = args.pids("cpu-pids");
    let backend = args.str("backend-stats").map(|a| {
        a.parse::<SocketAddr>()
            .unwrap_or_else(|_| die("--backend-stats must be ip:port"))
    });
    let pss_before = sum_pss_kib(&mem_pids);
    let opened_at = Instant::now();
    let (slots, error) = open_all(target, conns, concurrency, 16).await;
    let open_seconds = opened_at.elapsed().as_secs_f64();
    let opened = slots.iter().filter(|s| s.is_some()).count();
    // From here to the end of the hold every socket answers Pings (a proxy's heartbeats).
    let end = tokio::time::Instant::now() + settle + hold;
    let pongs = Rc::new(Cell::new(0u64));
    let readers: Vec<_> = slots
        .into_iter()
        .flatten()
        .map(|c| tokio::task::spawn_local(answer_pings(c, end, pongs.clone())))
        .collect();
    tokio::time::sleep(settle).await;
    let pss_open = sum_pss_kib(&mem_pids);
    eprintln!("hold: {opened}/{conns} open and echoing; holding {hold:?}");
    // The measured window: the hold.
    let (cpu0, pongs0, t0) = (sum_cpu_ticks(&cpu_pids), pongs.get(), Instant::now());
    let backend0 = backend_pings(backend).await;
    tokio::time::sleep_until(end).await;
    let (cpu1, pongs1, window) = (sum_cpu_ticks(&cpu_pids), pongs.get(), t0.elapsed());
    let backend1 = backend_pings(backend).await;
    let pss_held = sum_pss_kib(&mem_pids);
    // Every socket must still echo after the idle hold.
    let mut clients: Vec<WsClient> = Vec::with_capacity(readers.len());
    for r in readers {
        if let Ok(Some(c)) = r.await {
            clients.push(c);
        }
    }
    let queue = Rc::new(RefCell::new(clients));
    let alive = Rc::new(Cell::new(0usize));
    let frame = Rc::new(client_frame(b"still-there?"));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (queue, alive, frame) = (queue.clone(), alive.clone(), frame.clone());
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let Some(mut c) = queue.borrow_mut().pop() else { break };
                let ok = tokio::time::timeout(Duration::from_secs(10), c.round_trip(&frame, 12))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if ok {
                    alive.set(alive.get() + 1);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let per_conn = |pss: u64| (pss as f64 - pss_before as f64) / conns as f64;
    emit(&[
        ("mode", json_str("hold")),
        ("conns", conns.to_string()),
        ("opened", opened.to_string()),
        ("open_seconds", num(open_seconds)),
        ("alive_after_hold", alive.get().to_string()),
        ("hold_seconds", num(hold.as_secs_f64())),
        ("pss_before_kib", pss_before.to_string()),
        ("pss_open_kib", pss_open.to_string()),
        ("pss_held_kib", pss_held.to_string()),
        ("kib_per_conn_open", num(per_conn(pss_open))),
        ("kib_per_conn_held", num(per_conn(pss_held))),
        ("window_seconds", num(window.as_secs_f64())),
        ("pings_answered", (pongs1 - pongs0).to_string()),
        ("pings_answered_total", pongs.get().to_string()),
        (
            "backend_pings_answered",
            match (backend0, backend1) {
                (Some(a), Some(b)) => b.saturating_sub(a).to_string(),
                _ => "null".into(),
            },
        ),
        (
            "proxy_cpu_ticks",
            if cpu_pids.is_empty() {
                "null".into()
            } else {
                (cpu1 - cpu0).to_string()
            },
        ),
        ("error", error.map_or("null".into(), |e| json_str(&e))),
    ]);
}

/// Reads a held socket until `end`, answering every Ping with its Pong; gives the socket
/// back, or None if it closed (it would not echo any more).
async fn answer_pings(
    mut c: WsClient,
    end: tokio::time::Instant,
    pongs: Rc<Cell<u64>>,
) -> Option<WsClient> {
    use tokio::io::AsyncWriteExt;
    let mut pong = Vec::with_capacity(32);
    loop {
        // read_frame only awaits the socket's read, which loses nothing when cut short.
        match tokio::time::timeout_at(end, c.read_frame()).await {
            Err(_) => return Some(c),
            Ok(Ok((0x9, range))) => {
                pong.clear();
                push_frame(&mut pong, 0x8a, c.payload(range), None, Some(CLIENT_MASK));
                if c.stream.write_all(&pong).await.is_err() {
                    return None;
                }
                pongs.set(pongs.get() + 1);
            }
            Ok(Ok((0x8, _))) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
        }
    }
}

/// The echo backend's count of Pings answered (GET STATS_PATH on the backend itself).
async fn backend_pings(addr: Option<SocketAddr>) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = addr?;
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let request =
            format!("GET {STATS_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&answer);
    let value = text.split("\"pings_answered\":").nth(1)?;
    value
        .trim_start()
        .split(|ch: char| !ch.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The tokens of a storm run, and how long minting them took.
fn storm_tokens(args: &Args, count: u64) -> (Tokens, f64) {
    if let Some(t) = args.str("token") {
        return (Tokens::Fixed(t.to_owned()), 0.0);
    }
    if let Some(file) = args.str("tokens") {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| die(&format!("--tokens {file}: {e}")));
        let tokens: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
        if (tokens.len() as u64) < count {
            die(&format!("--tokens {file}: {} tokens for {count} upgrades", tokens.len()));
        }
        return (Tokens::PerUpgrade(tokens), 0.0);
    }
    let Some(alg) = args.str("mint-alg") else {
        return (Tokens::None, 0.0);
    };
    let minter = minter(args, alg, "mint-key", "mint-secret-env", "mint-kid");
    let started = Instant::now();
    let tokens = (0..count)
        .map(|k| minter.mint(k).unwrap_or_else(|e| die(&e)))
        .collect();
    (Tokens::PerUpgrade(tokens), started.elapsed().as_secs_f64())
}

fn minter(args: &Args, alg: &str, key: &str, secret_env: &str, kid: &str) -> Minter {
    let material = match (args.str(key), args.str(secret_env)) {
        (Some(pem), None) => {
            std::fs::read(pem).unwrap_or_else(|e| die(&format!("--{key} {pem}: {e}")))
        }
        (None, Some(var)) => std::env::var(var)
            .unwrap_or_else(|_| die(&format!("--{secret_env}: {var} is not set")))
            .into_bytes(),
        _ => die(&format!("give one of --{key} and --{secret_env}")),
    };
    let sub = args.str("sub").unwrap_or("bench");
    Minter::new(alg, &material, args.str(kid), sub, args.get("ttl", 3600))
        .unwrap_or_else(|e| die(&e))
}

async fn storm_mode(args: &Args) {
    let target = Target::parse(args.required("url"));
    let rate: f64 = args.get("rate", 500.0);
    let warmup = args.secs("warmup", 1.0);
    let duration = args.secs("duration", 4.0);
    if rate.is_nan() || rate <= 0.0 || duration.is_zero() {
        die("storm needs --rate > 0 and --duration > 0");
    }
    let count = (rate * (warmup + duration).as_secs_f64()).ceil() as u64;
    let (tokens, mint_seconds) = storm_tokens(args, count);
    let token_kind = match &tokens {
        Tokens::None => "none",
        Tokens::Fixed(_) => "fixed",
        Tokens::PerUpgrade(_) => "per_upgrade",
    };
    let size: usize = args.get("size", 64);
    let r = storm::run(Storm {
        addr: target.addr,
        host: target.host,
        path: target.path,
        rate,
        warmup,
        duration,
        size,
        tokens,
        cpu_pids: args.pids("cpu-pids"),
        timeout: args.secs("timeout", 10.0),
    })
    .await;
    let secs = r.window.as_secs_f64();
    emit(&[
        ("mode", json_str("storm")),
        ("target_rate", num(rate)),
        ("token", json_str(token_kind)),
        ("size", size.to_string()),
        ("warmup_seconds", num(warmup.as_secs_f64())),
        ("seconds", num(secs)),
        ("started", r.started.to_string()),
        ("upgrades", r.in_window.to_string()),
        ("ok", r.ok_in_window.to_string()),
        ("failed", r.failed_in_window.to_string()),
        ("failed_total", r.failed_total.to_string()),
        ("unfinished", r.unfinished.to_string()),
        ("no_eof", r.no_eof.to_string()),
        ("rate", num(r.ok_in_window as f64 / secs)),
        ("handshake_p50_us", num(pct_us(&r.handshake_ns, 0.50))),
        ("handshake_p90_us", num(pct_us(&r.handshake_ns, 0.90))),
        ("handshake_p99_us", num(pct_us(&r.handshake_ns, 0.99))),
        ("handshake_max_us", num(pct_us(&r.handshake_ns, 1.0))),
        ("total_p50_us", num(pct_us(&r.total_ns, 0.50))),
        ("total_p99_us", num(pct_us(&r.total_ns, 0.99))),
        ("proxy_cpu_ticks", r.cpu_ticks.to_string()),
        ("proxy_cpu_ns", r.cpu_ns.to_string()),
        (
            "proxy_cpu_us_per_upgrade",
            num(r.cpu_ns as f64 / 1000.0 / r.in_window.max(1) as f64),
        ),
        ("proxy_cpu_us_per_upgrade_ticks", num(us_per(r.cpu_ticks, r.in_window))),
        ("sender_late_p99_us", num(r.late_p99_us)),
        ("mint_seconds", num(mint_seconds)),
        ("error", r.first_error.map_or("null".into(), |e| json_str(&e))),
    ]);
}

/// Server-sent events: `conns` streams read as fast as they come, events counted over the
/// window (see `gateway_bench_loadgen::sse`).
async fn sse_mode(args: &Args) {
    let url = args.required("url");
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| die("--url must start with http://"));
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = host
        .parse()
        .unwrap_or_else(|_| die("--url host must be ip:port (loopback only)"));
    let path = if path.is_empty() { "/" } else { path };
    let conns: usize = args.get::<usize>("conns", 16).max(1);
    let warmup = args.secs("warmup", 0.5);
    let duration = args.secs("duration", 5.0);
    let cpu_pids = args.pids("cpu-pids");
    let opening: Vec<_> = (0..conns)
        .map(|i| {
            let (host, path) = (host.to_owned(), path.replace("{i}", &i.to_string()));
            tokio::task::spawn_local(async move {
                tokio::time::timeout(Duration::from_secs(10), sse::open_stream(addr, &host, &path))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response head"))?
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(conns);
    for (i, o) in opening.into_iter().enumerate() {
        match o.await {
            Ok(Ok(s)) => streams.push(s),
            Ok(Err(e)) => die(&format!("sse: stream {i}: {e}")),
            Err(e) => die(&format!("sse: stream {i}: {e}")),
        }
    }
    let chunked = streams.iter().filter(|(_, h, _)| h.chunked).count();
    let events = Rc::new(Cell::new(0u64));
    let bytes = Rc::new(Cell::new(0u64));
    let reads = Rc::new(Cell::new(0u64));
    let ended = Rc::new(Cell::new(0u64));
    let first_error: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, (stream, head, first))| {
            let (events, bytes, reads, ended, first_error) =
                (events.clone(), bytes.clone(), reads.clone(), ended.clone(), first_error.clone());
            tokio::task::spawn_local(async move {
                let e = sse::read_events(stream, head, first, |n, b| {
                    events.set(events.get() + n);
                    bytes.set(bytes.get() + b);
                    reads.set(reads.get() + 1);
                })
                .await;
                ended.set(ended.get() + 1);
                first_error
                    .borrow_mut()
                    .get_or_insert_with(|| format!("stream {i}: {e}"));
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let (e0, b0, r0, cpu0, t0) = (events.get(), bytes.get(), reads.get(), sum_cpu_ticks(&cpu_pids), Instant::now());
    tokio::time::sleep(duration).await;
    let (e1, b1, r1, cpu1, elapsed) = (events.get(), bytes.get(), reads.get(), sum_cpu_ticks(&cpu_pids), t0.elapsed());
    let ended_in_run = ended.get();
    for t in tasks {
        t.abort();
    }
    let (n, secs) = (e1 - e0, elapsed.as_secs_f64());
    if n == 0 {
        die(&format!(
            "sse: no event in the window ({})",
            first_error.borrow().as_deref().unwrap_or("the streams stalled")
        ));
    }
    emit(&[
        ("mode", json_str("sse")),
        ("conns", conns.to_string()),
        ("seconds", num(secs)),
        ("events", n.to_string()),
        ("rate", num(n as f64 / secs)),
        ("bytes", (b1 - b0).to_string()),
        ("mib_per_s", num((b1 - b0) as f64 / secs / (1024.0 * 1024.0))),
        ("bytes_per_event", num((b1 - b0) as f64 / n as f64)),
        ("reads", (r1 - r0).to_string()),
        ("events_per_read", num(n as f64 / (r1 - r0).max(1) as f64)),
        ("chunked_streams", chunked.to_string()),
        ("proxy_cpu_ticks", (cpu1 - cpu0).to_string()),
        ("proxy_cpu_us_per_msg", num(us_per(cpu1 - cpu0, n))),
        ("errors", ended_in_run.to_string()),
        ("error", first_error.borrow().as_ref().map_or("null".into(), |e| json_str(e))),
    ]);
}

fn mint(args: &Args) {
    let alg = args.required("alg");
    let m = minter(args, alg, "key", "secret-env", "kid");
    let count: u64 = args.get("count", 1);
    let mut out = io::BufWriter::new(io::stdout().lock());
    for k in 0..count {
        let t = m.mint(k).unwrap_or_else(|e| die(&e));
        let _ = writeln!(out, "{t}");
    }
}

fn jwks(args: &Args) {
    let keys: Vec<String> = args
        .required("keys")
        .split(',')
        .map(|entry| {
            let (kid, path) = entry
                .split_once('=')
                .unwrap_or_else(|| die("--keys takes KID=PRIVATE.pem entries"));
            let pem = std::fs::read_to_string(path)
                .unwrap_or_else(|e| die(&format!("{path}: {e}")));
            public_jwk(&pem, kid)
                .unwrap_or_else(|e| die(&format!("{path}: {e}")))
                .to_string()
        })
        .collect();
    println!("{{\"keys\":[{}]}}", keys.join(","));
}

async fn probe(args: &Args) {
    let target = Rc::new(Target::of(args));
    let (slots, error) = open_all(target, 1, 1, 64).await;
    match (slots.into_iter().flatten().next(), error) {
        (Some(c), _) => {
            c.close().await;
            println!("probe ok");
        }
        (None, e) => die(&format!("probe failed: {}", e.unwrap_or_default())),
    }
}

fn exec(args: &Args) -> i32 {
    let out = args.required("out").to_owned();
    let Some((cmd, rest)) = args.rest.split_first() else {
        die("exec needs -- command args")
    };
    let status = std::process::Command::new(cmd)
        .args(rest)
        .status()
        .unwrap_or_else(|e| die(&format!("cannot run {cmd}: {e}")));
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    let line = format!(
        "{{\"client_user_us\":{},\"client_sys_us\":{}}}\n",
        us(usage.ru_utime),
        us(usage.ru_stime)
    );
    if let Err(e) = std::fs::write(&out, line) {
        die(&format!("cannot write {out}: {e}"));
    }
    status.code().unwrap_or(1)
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let mode = argv.next().unwrap_or_else(|| die(USAGE));
    if matches!(mode.as_str(), "-h" | "--help" | "help") {
        println!("{USAGE}");
        return;
    }
    let args = Args::parse(argv);
    match mode.as_str() {
        "pingpong" => run_local(pingpong(&args)),
        "rate" => run_local(rate(&args)),
        "hold" => run_local(hold(&args)),
        "probe" => run_local(probe(&args)),
        "sse" => run_local(sse_mode(&args)),
        "storm" => run_local(storm_mode(&args)),
        "mint" => mint(&args),
        "jwks" => jwks(&args),
        "exec" => std::process::exit(exec(&args)),
        other => die(&format!("unknown mode {other:?}")),
    }
}
