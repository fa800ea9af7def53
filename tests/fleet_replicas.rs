//! Issue 16 acceptance: three gateway replicas in front of three reference nodes of one
//! `local` upstream. A thousand instances connected through random replicas each live on one
//! node, the same from every replica; killing a node moves only its instances, restarting it
//! moves them back with 1012, and a fourth node added by reload takes about a quarter. After
//! every step no instance has live connections on two nodes, by the nodes' own reports.
//! The real binaries on 127.0.0.1, real WebSockets, bounded waits.

mod common;

use common::fleet::*;
use common::*;
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

const INSTANCES: usize = 1000;
/// Every tenth instance also has a second connection, through another replica.
const SAMPLE_EVERY: usize = 10;
/// How long one step may take to settle.
const SETTLE: Duration = Duration::from_secs(30);
/// WebSocket handshakes in flight at once, so that a thousand start without a SYN storm.
const HANDSHAKES: usize = 64;
/// A client's pause between refused reconnection attempts, and how long it keeps trying.
const BACKOFF: Duration = Duration::from_millis(50);
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// What one client connection has seen, shared between its task and the test.
#[derive(Default)]
struct Seen {
    /// Greeted by the agent on its current socket.
    open: bool,
    /// The Close codes its sockets ended with, in order (1006: ended without a Close).
    closes: Vec<u16>,
    /// Data other than the greeting: nobody sends to these clients, so there must be none.
    unexpected: Vec<String>,
    /// Why it gave up reconnecting, if it did.
    failed: Option<String>,
}

/// A client connection of instance `room`, always through replica `replica`.
struct Client {
    room: String,
    replica: usize,
    seen: Arc<Mutex<Seen>>,
}

impl Client {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A seeded linear congruential generator: "random" replicas, the same on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// A client's life: connect (retrying refusals), read until the socket ends, record how,
/// and connect again, as an agent client whose server restarted does.
async fn run_client(url: String, room: String, seen: Arc<Mutex<Seen>>, gate: Arc<Semaphore>) {
    let lock = || seen.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let mut ws = match open(&url, &gate).await {
            Ok(ws) => ws,
            Err(why) => {
                lock().failed = Some(why);
                return;
            }
        };
        let mut greeted = false;
        let code = loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if !greeted => {
                    let identity: serde_json::Value =
                        serde_json::from_str(&text).unwrap_or_default();
                    if identity["type"] == "cf_agent_identity" && identity["name"] == *room {
                        greeted = true;
                        lock().open = true;
                    } else {
                        lock().unexpected.push(text.to_string());
                    }
                }
                Some(Ok(Message::Text(text))) => lock().unexpected.push(text.to_string()),
                Some(Ok(Message::Binary(b))) => lock().unexpected.push(format!("{b:?}")),
                Some(Ok(Message::Close(frame))) => {
                    // Let the Close handshake finish before counting the socket gone.
                    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
                    break frame.map_or(1005, |f| u16::from(f.code));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => break 1006,
            }
        };
        let mut seen = lock();
        seen.open = false;
        seen.closes.push(code);
    }
}

/// A WebSocket through `url`, retrying any refusal (502 or 503 while the replica still routes
/// to a dead node or sees none up, a refused connection) every [`BACKOFF`] for a bounded time.
async fn open(url: &str, gate: &Semaphore) -> Result<Ws, String> {
    let deadline = Instant::now() + RECONNECT_FOR;
    loop {
        let attempt = {
            let _permit = gate.acquire().await.expect("the gate stays open");
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await
        };
        let why = match attempt {
            Ok(Ok((ws, _))) => return Ok(ws),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "handshake timed out".to_owned(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "{url}: still refused after {RECONNECT_FOR:?}: {why}"
            ));
        }
        tokio::time::sleep(BACKOFF).await;
    }
}

/// How many closes each client had seen so far: a step's closes are the ones after it.
fn marks(clients: &[Client]) -> Vec<usize> {
    clients.iter().map(|c| c.seen().closes.len()).collect()
}

/// The closes each client saw since `marks`, and the step's count of 1012s.
fn closes_since(clients: &[Client], marks: &[usize]) -> (Vec<Vec<u16>>, usize) {
    let closes: Vec<Vec<u16>> = clients
        .iter()
        .zip(marks)
        .map(|(c, mark)| c.seen().closes[*mark..].to_vec())
        .collect();
    let restarts = closes
        .iter()
        .flatten()
        .filter(|code| **code == 1012)
        .count();
    (closes, restarts)
}

/// Asserts that exactly the clients of `moved` instances saw a close in the step (one each,
/// with `code` when given) and that nobody saw anything else; returns the codes' histogram.
fn assert_only_moved_closed(
    step: &str,
    clients: &[Client],
    closes: &[Vec<u16>],
    moved: &BTreeSet<String>,
    code: Option<u16>,
) -> BTreeMap<u16, usize> {
    let mut histogram = BTreeMap::new();
    for (client, seen) in clients.iter().zip(closes) {
        let unexpected = &client.seen().unexpected;
        assert!(
            unexpected.is_empty(),
            "{step}: {} got {unexpected:?}",
            client.room
        );
        for c in seen {
            *histogram.entry(*c).or_default() += 1;
        }
        if moved.contains(&client.room) {
            assert_eq!(
                seen.len(),
                1,
                "{step}: {} (replica {}) saw {seen:?}",
                client.room,
                client.replica
            );
            if let Some(code) = code {
                assert_eq!(
                    seen[0], code,
                    "{step}: {} closed with {seen:?}",
                    client.room
                );
            }
        } else {
            assert!(
                seen.is_empty(),
                "{step}: {} did not move but saw {seen:?}",
                client.room
            );
        }
    }
    histogram
}

/// Waits until every client is open again and the nodes' own reports show each instance on
/// its home under `placement` with all its connections, and nowhere else.
async fn settle(
    step: &str,
    clients: &[Client],
    nodes: &[SocketAddr],
    placement: &agent_gateway::fleet::placement::Placement,
    per_room: &BTreeMap<String, u64>,
) -> Vec<NodeReport> {
    let reports = wait_until(step, SETTLE, || async move {
        if let Some((c, why)) = clients
            .iter()
            .find_map(|c| Some((c, c.seen().failed.clone()?)))
        {
            panic!(
                "{step}: client of {} via replica {} gave up: {why}",
                c.room, c.replica
            );
        }
        let closed = clients.iter().filter(|c| !c.seen().open).count();
        if closed > 0 {
            return Err(format!("{closed} clients are not connected yet"));
        }
        let reports = node_reports(nodes).await;
        let mut wrong = Vec::new();
        for report in &reports {
            for (room, held) in &report.rooms {
                if !per_room.contains_key(room) {
                    wrong.push(format!(
                        "{room} on {}: {held}, not a test instance",
                        report.node
                    ));
                }
            }
        }
        for (room, count) in per_room {
            let at = home(placement, room);
            for report in &reports {
                let held = report.rooms.get(room).copied().unwrap_or(0);
                let want = if report.node == at { *count } else { 0 };
                if held != want {
                    wrong.push(format!("{room} on {}: {held} (want {want})", report.node));
                }
            }
        }
        if wrong.is_empty() {
            Ok(reports)
        } else {
            Err(format!(
                "{} differences, such as {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(5)]
            ))
        }
    })
    .await;
    // After each step settles: zero instances with live connections on two nodes, all 1000
    // somewhere, counted from the nodes' own reports.
    assert_eq!(instances_on_two_nodes(&reports), 0, "{step}: {reports:?}");
    assert_eq!(instances_total(&reports), INSTANCES, "{step}");
    reports
}

/// Each replica's `/fleet` counts, per node, exactly the connections its clients hold there.
async fn assert_fleet_counts(
    step: &str,
    replicas: &[Gateway],
    clients: &[Client],
    placement: &agent_gateway::fleet::placement::Placement,
) {
    for (r, gateway) in replicas.iter().enumerate() {
        let mut want: BTreeMap<String, u64> = BTreeMap::new();
        for c in clients.iter().filter(|c| c.replica == r) {
            *want.entry(home(placement, &c.room)).or_default() += 1;
        }
        wait_until(&format!("{step}: replica {r}'s /fleet"), WAIT, || {
            let want = &want;
            async move {
                let fleet = fleet(gateway).await;
                let nodes = fleet["upstreams"]["local"]["nodes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let got: BTreeMap<String, u64> = nodes
                    .iter()
                    .filter(|n| n["connections"].as_u64() != Some(0))
                    .map(|n| {
                        (
                            n["id"].as_str().unwrap_or("?").to_owned(),
                            n["connections"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                if got == *want {
                    Ok(())
                } else {
                    Err(format!("connections {got:?}, want {want:?}: {fleet}"))
                }
            }
        })
        .await;
    }
}

/// Asserts that migrations of the `local` upstream for `reason`, summed over the replicas,
/// are `expected`: the 1012s the clients saw. Returns the sum.
async fn assert_migrations(step: &str, replicas: &[Gateway], reason: &str, expected: usize) -> f64 {
    let labels = [
        "upstream=\"local\"".to_owned(),
        format!("reason=\"{reason}\""),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    // A connection counts its migration as it ends, just after its Close reached the client:
    // the sum may trail the clients by a moment.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut total = 0.0;
        for gateway in replicas {
            let text = gateway.metrics().await;
            total += metric_sum(&text, "agent_gateway_migrations_total", &labels);
        }
        if total == expected as f64 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let mut total = 0.0;
    let mut evidence = String::new();
    for (r, gateway) in replicas.iter().enumerate() {
        let text = gateway.metrics().await;
        total += metric_sum(&text, "agent_gateway_migrations_total", &labels);
        let lines = text.lines().filter(|l| {
            l.starts_with("agent_gateway_migrations_total{")
                || (l.starts_with("agent_gateway_ws_close_causes_total{") && l.contains("migrated"))
        });
        evidence += &format!(
            "replica {r}:\n  {}\n",
            lines.collect::<Vec<_>>().join("\n  ")
        );
        evidence += &format!("  /fleet {}\n", fleet(gateway).await);
    }
    eprintln!("{step}: migrations_total{{reason=\"{reason}\"}} = {total} over the replicas; the clients saw {expected} 1012s");
    assert_eq!(
        total, expected as f64,
        "{step}: migrations_total{{reason=\"{reason}\"}} over the replicas vs the 1012s the clients saw\n{evidence}"
    );
    total
}

/// How long after `since` each replica's `/fleet` first showed `node` with `healthy`.
async fn convergence(
    replicas: &[Gateway],
    node: SocketAddr,
    healthy: bool,
    since: Instant,
) -> Vec<Duration> {
    let id = node.to_string();
    let each = replicas.iter().enumerate().map(|(r, gateway)| {
        let id = &id;
        async move {
            let what = format!("replica {r} sees {id} healthy={healthy}");
            wait_until(&what, SETTLE, move || async move {
                let health = fleet_health(&fleet(gateway).await);
                match health.get(id) {
                    Some(now) if *now == healthy => Ok(since.elapsed()),
                    other => Err(format!("{id} is {other:?} in {health:?}")),
                }
            })
            .await
        }
    });
    futures_util::future::join_all(each).await
}

/// The soft limit on open files: the test holds over a thousand sockets at once.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files"));
    line.and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_agree_on_homes_and_move_only_what_placement_moves() {
    let limit = open_files_limit();
    assert!(
        limit >= 4096,
        "the open-files soft limit is {limit}; raise it (ulimit -n) to 4096 or more"
    );
    tokio::time::timeout(Duration::from_secs(170), scenario())
        .await
        .expect("the whole scenario within 170 s");
}

async fn scenario() {
    let started = Instant::now();
    let mut backends: Vec<Proc> = (0..3).map(|_| start_backend(Some(TEST_KEY))).collect();
    let mut nodes: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    let replicas: Vec<Gateway> = (0..3)
        .map(|_| start_gateway(&fleet_config(&nodes)))
        .collect();
    for (r, gateway) in replicas.iter().enumerate() {
        let health = fleet_health(&fleet(gateway).await);
        let all_up: BTreeMap<String, bool> = nodes.iter().map(|n| (n.to_string(), true)).collect();
        assert_eq!(health, all_up, "replica {r} at start");
    }

    // 1,000 instances, each through a random replica; every tenth also through another one.
    let mut rng = Lcg(0x5eed_2026);
    let mut clients = Vec::new();
    let mut per_room: BTreeMap<String, u64> = BTreeMap::new();
    let mut add = |room: &str, replica: usize| {
        *per_room.entry(room.to_owned()).or_default() += 1;
        clients.push(Client {
            room: room.to_owned(),
            replica,
            seen: Arc::default(),
        });
    };
    for i in 0..INSTANCES {
        let room = format!("room-{i}");
        let replica = rng.below(3);
        add(&room, replica);
        if i % SAMPLE_EVERY == 0 {
            add(&room, (replica + 1 + rng.below(2)) % 3);
        }
    }
    let gate = Arc::new(Semaphore::new(HANDSHAKES));
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| {
            let url = replicas[c.replica].url(&format!("/agents/CoderAgent/{}", c.room));
            tokio::spawn(run_client(
                url,
                c.room.clone(),
                Arc::clone(&c.seen),
                Arc::clone(&gate),
            ))
        })
        .collect();
    let all_up = placement(&nodes, &[]);
    let step = Instant::now();
    let reports = settle("connect", &clients, &nodes, &all_up, &per_room).await;
    // The same node from every replica: each sampled instance's two connections, opened
    // through two replicas, are both counted by one node.
    for (room, _) in per_room.iter().filter(|(_, n)| **n == 2) {
        let holders: Vec<&NodeReport> = reports
            .iter()
            .filter(|r| r.rooms.contains_key(room))
            .collect();
        assert_eq!(holders.len(), 1, "{room}: {holders:?}");
        assert_eq!(holders[0].rooms[room], 2, "{room} on {}", holders[0].node);
    }
    let (closes, _) = closes_since(&clients, &vec![0; clients.len()]);
    assert_only_moved_closed("connect", &clients, &closes, &BTreeSet::new(), None);
    assert_fleet_counts("connect", &replicas, &clients, &all_up).await;
    let spread: Vec<usize> = reports.iter().map(|r| r.rooms.len()).collect();
    eprintln!(
        "connected {} sockets for {INSTANCES} instances in {:?}; instances per node {spread:?}",
        clients.len(),
        step.elapsed()
    );

    // SIGKILL one node: only its instances move, each to its next choice.
    let killed = nodes[0];
    let without = placement(&nodes, &[killed]);
    let moved: BTreeSet<String> = per_room
        .keys()
        .filter(|room| home(&all_up, room) == killed.to_string())
        .cloned()
        .collect();
    let share = moved.len() as f64 / INSTANCES as f64;
    assert!(
        (0.25..=0.42).contains(&share),
        "the killed node held {share:.3} of the instances"
    );
    for room in per_room.keys().filter(|r| !moved.contains(*r)) {
        assert_eq!(
            home(&all_up, room),
            home(&without, room),
            "{room} would move too"
        );
    }
    let marked = marks(&clients);
    let step = Instant::now();
    backends[0].child.kill().expect("SIGKILL");
    backends[0].child.wait().expect("reaped");
    let seen = convergence(&replicas, killed, false, step).await;
    // A replica counts a node down after `unhealthy_after` failed checks one interval apart,
    // and the first of them may come up to one interval after the kill (the checks are timed
    // from the last round, not from the kill); 500 ms for scheduling and the 100 ms tick.
    let bound = HEALTH_INTERVAL * (UNHEALTHY_AFTER + 1) + Duration::from_millis(500);
    eprintln!("kill: replicas saw {killed} down after {seen:?} (bound {bound:?})");
    for (r, took) in seen.iter().enumerate() {
        assert!(
            *took <= bound,
            "replica {r} took {took:?} to see {killed} down"
        );
    }
    let alive = &nodes[1..];
    settle("kill", &clients, alive, &without, &per_room).await;
    let (closes, kill_restarts) = closes_since(&clients, &marked);
    let codes = assert_only_moved_closed("kill", &clients, &closes, &moved, None);
    assert_fleet_counts("kill", &replicas, &clients, &without).await;
    eprintln!(
        "kill: {} instances ({share:.3}) moved in {:?}; their clients saw closes {codes:?}",
        moved.len(),
        step.elapsed()
    );
    assert_migrations("kill", &replicas, "health", kill_restarts).await;

    // Restart it on the same address: its instances move back with 1012 and the temporary
    // homes empty out.
    let marked = marks(&clients);
    let step = Instant::now();
    backends[0] = start_backend_at(killed, Some(TEST_KEY));
    let seen = convergence(&replicas, killed, true, step).await;
    eprintln!("restart: replicas saw {killed} up after {seen:?}");
    let reports = settle("restart", &clients, &nodes, &all_up, &per_room).await;
    let (closes, restart_restarts) = closes_since(&clients, &marked);
    assert_only_moved_closed("restart", &clients, &closes, &moved, Some(1012));
    for report in reports.iter().filter(|r| r.node != killed.to_string()) {
        let left: Vec<&String> = report
            .rooms
            .keys()
            .filter(|room| moved.contains(*room))
            .collect();
        assert!(
            left.is_empty(),
            "temporary home {} still holds {left:?}",
            report.node
        );
    }
    assert_fleet_counts("restart", &replicas, &clients, &all_up).await;
    eprintln!(
        "restart: {restart_restarts} connections moved back with 1012 in {:?}",
        step.elapsed()
    );
    let health = kill_restarts + restart_restarts;
    assert_migrations("restart", &replicas, "health", health).await;

    // Reload every replica with a fourth node: about a quarter of the instances move to it,
    // and only their connections are closed.
    backends.push(start_backend(Some(TEST_KEY)));
    let fourth = backends[3].address;
    nodes.push(fourth);
    let four = placement(&nodes, &[]);
    let moved: BTreeSet<String> = per_room
        .keys()
        .filter(|room| home(&four, room) != home(&all_up, room))
        .cloned()
        .collect();
    let share = moved.len() as f64 / INSTANCES as f64;
    assert!(
        (0.15..=0.35).contains(&share),
        "the fourth node takes {share:.3} of the instances"
    );
    for room in &moved {
        assert_eq!(
            home(&four, room),
            fourth.to_string(),
            "{room} moves, but not to the new node"
        );
    }
    let marked = marks(&clients);
    let step = Instant::now();
    let config = fleet_config(&nodes);
    for gateway in &replicas {
        reload_with(gateway, &config).await;
    }
    settle("reload", &clients, &nodes, &four, &per_room).await;
    let (closes, reload_restarts) = closes_since(&clients, &marked);
    assert_only_moved_closed("reload", &clients, &closes, &moved, Some(1012));
    assert_fleet_counts("reload", &replicas, &clients, &four).await;
    for (r, gateway) in replicas.iter().enumerate() {
        let health = fleet_health(&fleet(gateway).await);
        assert_eq!(health.len(), 4, "replica {r}: {health:?}");
        assert!(health.values().all(|up| *up), "replica {r}: {health:?}");
    }
    eprintln!(
        "reload: {} instances ({share:.3}) moved to {fourth}, {reload_restarts} connections closed with 1012, in {:?}",
        moved.len(),
        step.elapsed()
    );
    assert_migrations("reload", &replicas, "reload", reload_restarts).await;
    assert_migrations("reload", &replicas, "health", health).await;

    for task in &tasks {
        task.abort();
    }
    eprintln!("fleet scenario took {:?}", started.elapsed());
}
