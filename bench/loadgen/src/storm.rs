//! The reconnect storm: new WebSocket upgrades at a fixed rate (open loop), each over a fresh
//! TCP connection: connect, upgrade (with an optional `Authorization: Bearer` token), read the
//! 101, send one message and read its echo, send a Close, read the Close back and wait for the
//! proxy to close the TCP connection (as a server does first after a Close), then drop it.
//!
//! Upgrade k is due at t0 + k / rate, whether or not the earlier ones have finished. The
//! measured window is [warmup, warmup + duration]: the proxy's CPU time is read when the first
//! upgrade due in it starts and at its end; in the steady state the work of the upgrades due in
//! the window is what the proxy does in it, so CPU per upgrade = CPU in the window / upgrades
//! due in it.

use crate::procfs::{sum_cpu_ns, sum_cpu_ticks};
use crate::{client_frame, push_frame, WsClient, CLIENT_MASK};
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Storm {
    pub addr: SocketAddr,
    pub host: String,
    /// `{i}` becomes the upgrade's index.
    pub path: String,
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Bytes of the one message each connection sends.
    pub size: usize,
    pub tokens: Tokens,
    pub cpu_pids: Vec<u32>,
    /// Longest an upgrade may take, from connect to the proxy's close.
    pub timeout: Duration,
}

pub enum Tokens {
    None,
    /// One token for every upgrade: verified once, then "seen before".
    Fixed(String),
    /// Token k for upgrade k: each one new to the proxy.
    PerUpgrade(Vec<String>),
}

/// How one upgrade went.
#[derive(Clone, Default)]
struct Outcome {
    done: bool,
    /// From connect to the parsed 101, ns.
    handshake_ns: u64,
    /// From connect to the proxy's close, ns.
    total_ns: u64,
    /// The Close came back but the proxy did not close the connection in time (not a failure).
    no_eof: bool,
    error: Option<String>,
}

pub struct StormResult {
    /// Upgrades started (warm-up included) and due in the window.
    pub started: u64,
    pub in_window: u64,
    pub ok_in_window: u64,
    pub failed_in_window: u64,
    pub failed_total: u64,
    pub unfinished: u64,
    pub no_eof: u64,
    pub first_error: Option<String>,
    /// Handshake (connect to 101) and whole-life times of the window's successful upgrades, ns.
    pub handshake_ns: Vec<u64>,
    pub total_ns: Vec<u64>,
    pub window: Duration,
    /// The proxy's CPU time over the window: utime+stime in clock ticks, and the sum of its
    /// threads' run time in ns (the precise figure).
    pub cpu_ticks: u64,
    pub cpu_ns: u64,
    /// How late the sender started upgrades against the schedule, p99, µs.
    pub late_p99_us: f64,
}

/// Percentile `p` (0..=1) of sorted `v` in µs (NaN when empty).
pub fn pct_us(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let idx = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[idx] as f64 / 1000.0
}

async fn one_upgrade(
    addr: SocketAddr,
    host: Rc<str>,
    path: String,
    auth: String,
    frame: Rc<Vec<u8>>,
    size: usize,
    started: Instant,
) -> Outcome {
    let mut out = Outcome::default();
    let result = async {
        let mut c = WsClient::connect_with(addr, &host, &path, &auth).await?;
        out.handshake_ns = started.elapsed().as_nanos() as u64;
        c.round_trip(&frame, size).await?;
        let mut close = Vec::with_capacity(8);
        push_frame(
            &mut close,
            0x88,
            &1000u16.to_be_bytes(),
            None,
            Some(CLIENT_MASK),
        );
        c.stream.write_all(&close).await?;
        loop {
            let (op, _) = c.read_frame().await?;
            if op == 0x8 {
                break;
            }
        }
        // The server closes first after the Close exchange (RFC 6455 §7.1.1): wait for it,
        // so that the TIME_WAIT is the proxy's, as with real clients.
        let (mut stream, _) = c.into_parts();
        let mut buf = [0u8; 256];
        let eof = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        Ok::<bool, io::Error>(eof.is_err())
    };
    match result.await {
        Ok(no_eof) => {
            out.no_eof = no_eof;
            out.done = true;
            out.total_ns = started.elapsed().as_nanos() as u64;
        }
        Err(e) => out.error = Some(e.to_string()),
    }
    out
}

pub async fn run(s: Storm) -> StormResult {
    let total = (s.rate * (s.warmup + s.duration).as_secs_f64()).ceil() as u64;
    let first_in_window = (s.rate * s.warmup.as_secs_f64()).ceil() as u64;
    if let Tokens::PerUpgrade(t) = &s.tokens {
        assert!(
            t.len() as u64 >= total,
            "{} tokens for {total} upgrades",
            t.len()
        );
    }
    let outcomes: Rc<RefCell<Vec<Outcome>>> =
        Rc::new(RefCell::new(vec![Outcome::default(); total as usize]));
    let frame = Rc::new(client_frame(&vec![b's'; s.size]));
    let host: Rc<str> = s.host.as_str().into();
    let fixed_auth = match &s.tokens {
        Tokens::Fixed(t) => format!("Authorization: Bearer {t}\r\n"),
        _ => String::new(),
    };
    let period = Duration::from_secs_f64(1.0 / s.rate);
    let mut late: Vec<u32> = Vec::with_capacity(total as usize);
    let mut tasks = Vec::with_capacity(total as usize);
    let t0 = tokio::time::Instant::now();
    let (mut cpu0, mut ns0, mut window_start) = (0, 0, Instant::now());
    for k in 0..total {
        let due = t0 + period.mul_f64(k as f64);
        tokio::time::sleep_until(due).await;
        if k == first_in_window {
            cpu0 = sum_cpu_ticks(&s.cpu_pids);
            ns0 = sum_cpu_ns(&s.cpu_pids);
            window_start = Instant::now();
        }
        let now = tokio::time::Instant::now();
        late.push(
            now.saturating_duration_since(due)
                .as_micros()
                .min(u32::MAX as u128) as u32,
        );
        let auth = match &s.tokens {
            Tokens::None => String::new(),
            Tokens::Fixed(_) => fixed_auth.clone(),
            Tokens::PerUpgrade(t) => format!("Authorization: Bearer {}\r\n", t[k as usize]),
        };
        let (outcomes, frame, host) = (outcomes.clone(), frame.clone(), host.clone());
        let path = s.path.replace("{i}", &k.to_string());
        let (addr, size, limit) = (s.addr, s.size, s.timeout);
        tasks.push(tokio::task::spawn_local(async move {
            let started = Instant::now();
            let outcome = tokio::time::timeout(
                limit,
                one_upgrade(addr, host, path, auth, frame, size, started),
            )
            .await
            .unwrap_or_else(|_| Outcome {
                error: Some("timed out".into()),
                ..Outcome::default()
            });
            outcomes.borrow_mut()[k as usize] = outcome;
        }));
    }
    tokio::time::sleep_until(t0 + s.warmup + s.duration).await;
    let cpu1 = sum_cpu_ticks(&s.cpu_pids);
    let ns1 = sum_cpu_ns(&s.cpu_pids);
    let window = window_start.elapsed();
    for t in tasks {
        let _ = t.await;
    }
    let outcomes = std::mem::take(&mut *outcomes.borrow_mut());
    let mut r = StormResult {
        started: total,
        in_window: total - first_in_window,
        ok_in_window: 0,
        failed_in_window: 0,
        failed_total: 0,
        unfinished: 0,
        no_eof: 0,
        first_error: None,
        handshake_ns: Vec::new(),
        total_ns: Vec::new(),
        window,
        cpu_ticks: cpu1.saturating_sub(cpu0),
        cpu_ns: ns1.saturating_sub(ns0),
        late_p99_us: f64::NAN,
    };
    for (k, o) in outcomes.iter().enumerate() {
        let in_window = k as u64 >= first_in_window;
        if let Some(e) = &o.error {
            r.failed_total += 1;
            r.failed_in_window += u64::from(in_window);
            r.first_error
                .get_or_insert_with(|| format!("upgrade {k}: {e}"));
            continue;
        }
        if !o.done {
            r.unfinished += 1;
            continue;
        }
        r.no_eof += u64::from(o.no_eof);
        if in_window {
            r.ok_in_window += 1;
            r.handshake_ns.push(o.handshake_ns);
            r.total_ns.push(o.total_ns);
        }
    }
    r.handshake_ns.sort_unstable();
    r.total_ns.sort_unstable();
    late.sort_unstable();
    if !late.is_empty() {
        r.late_p99_us = late[((late.len() as f64 * 0.99) as usize).min(late.len() - 1)] as f64;
    }
    r
}
