//! Real Cloudflare Agents SDK agents in a real workerd: `tests/workerd/start.mjs` serving a
//! Worker with Miniflare on 127.0.0.1, and the node client scripts beside it.
//! `tests/workerd/setup.sh` installs the pinned npm packages once; without Node and npm the
//! tests that use this fail, saying so.

use super::{next_message, Ws, LISTENERS, TEST_KEY};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Installing the npm packages on a cold cache, or starting workerd on a busy machine.
pub const SLOW_WAIT: Duration = Duration::from_secs(300);
pub const STARTUP_WAIT: Duration = Duration::from_secs(30);
/// The node client scripts bound themselves to 30 s; this is the outer bound.
pub const SCRIPT_WAIT: Duration = Duration::from_secs(45);
/// The environment of a Worker whose upstream needs OPENROUTER_API_KEY.
pub const WITH_KEY: [(&str, &str); 1] = [("OPENROUTER_API_KEY", TEST_KEY)];

pub fn workerd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workerd")
}

/// Runs `tests/workerd/setup.sh` once per test binary; every caller sees its outcome.
pub fn setup() {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    let outcome = SETUP.get_or_init(|| {
        let mut child = Command::new("bash")
            .arg(workerd_dir().join("setup.sh"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run tests/workerd/setup.sh with bash: {e}"))?;
        let deadline = Instant::now() + SLOW_WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("tests/workerd/setup.sh took over {SLOW_WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if status.success() {
            return Ok(());
        }
        let mut output = String::new();
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
        ]
        .into_iter()
        .flatten()
        {
            let _ = BufReader::new(pipe).read_to_string(&mut output);
        }
        Err(format!(
            "tests/workerd/setup.sh failed ({status}):\n{output}"
        ))
    });
    if let Err(why) = outcome {
        panic!("the workerd tests cannot run: {why}");
    }
}

/// `start.mjs` serving one worker in workerd. Dropping it closes stdin (Miniflare disposes of
/// workerd), then kills the whole process group, so no workerd outlives a test.
pub struct Workerd {
    child: Child,
    stdin: Option<ChildStdin>,
    pub address: SocketAddr,
    /// Everything the process printed besides the readiness line, shown when a test fails.
    log: Arc<Mutex<String>>,
}

impl Workerd {
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.address)
    }
}

impl Drop for Workerd {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            // The group is this child's own (process_group(0)): node, workerd and esbuild.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(log) = self.log.lock() {
                eprintln!("--- workerd output ({}) ---\n{log}", self.address);
            }
        }
    }
}

/// Starts `start.mjs --worker {worker}` ("current", "agents-011" or "auth") with the Worker's
/// bindings from `env` (OPENROUTER_API_KEY absent unless there), and waits for its readiness
/// line.
pub fn start_workerd(worker: &str, env: &[(&str, &str)]) -> Workerd {
    setup();
    let mut command = Command::new("node");
    command
        .arg(workerd_dir().join("start.mjs"))
        .args(["--worker", worker])
        .current_dir(workerd_dir())
        .env_remove("OPENROUTER_API_KEY")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command.spawn().unwrap_or_else(|e| {
        panic!("cannot run node ({e}): the workerd tests need Node 20+ on PATH")
    });
    let log = Arc::new(Mutex::new(String::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    let stdout_log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match line.strip_prefix("workerd listening on http://") {
                Some(address) => {
                    let _ = ready_tx.send(address.trim().to_owned());
                }
                None => append(&stdout_log, &line),
            }
        }
    });
    let stderr = child.stderr.take().expect("stderr");
    let stderr_log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            append(&stderr_log, &line);
        }
    });
    let stdin = child.stdin.take();
    let mut workerd = Workerd {
        child,
        stdin,
        address: "127.0.0.1:0".parse().expect("address"),
        log,
    };
    match ready_rx.recv_timeout(STARTUP_WAIT) {
        Ok(address) => {
            workerd.address = address
                .parse()
                .unwrap_or_else(|_| panic!("unexpected readiness address {address:?}"));
            workerd
        }
        Err(_) => {
            let log = workerd.log.lock().map(|l| l.clone()).unwrap_or_default();
            panic!("workerd ({worker}) printed no readiness line within {STARTUP_WAIT:?}:\n{log}")
        }
    }
}

fn append(log: &Mutex<String>, line: &str) {
    if let Ok(mut log) = log.lock() {
        log.push_str(line);
        log.push('\n');
    }
}

/// The start of a gateway config with `workerd` as the `worker` upstream `workerd` (no TLS,
/// loopback). The admin listener (`{admin}`, a free port) serves `/metrics`.
pub fn worker_upstream(workerd: SocketAddr) -> String {
    LISTENERS.to_owned()
        + &format!(
            r#"
[upstreams.workerd]
kind = "worker"
address = "{workerd}"
tls = false
host = "localhost"
connect_timeout = "2s"
read_timeout = "10s"
"#
        )
}

/// Runs a node script of `tests/workerd/` and returns the JSON lines it printed.
pub async fn run_script(script: &str, args: &[&str]) -> Vec<Value> {
    run_script_with(script, args, &[]).await
}

/// [`run_script`] with extra environment.
pub async fn run_script_with(script: &str, args: &[&str], env: &[(&str, &str)]) -> Vec<Value> {
    let child = tokio::process::Command::new("node")
        .arg(workerd_dir().join(script))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workerd_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node {script} ({e}): Node 20+ must be on PATH"));
    let output = tokio::time::timeout(SCRIPT_WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {SCRIPT_WAIT:?}"))
        .expect("script output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{script} printed {l:?}: {e}")))
        .collect();
    assert!(
        output.status.success(),
        "{script} {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    lines
}

/// The line of a client script's `step`.
pub fn step<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["step"] == name)
        .unwrap_or_else(|| panic!("no {name} step in {lines:#?}"))
}

/// The next JSON text frame of `kind`, skipping others (such as `peer_closed` reports): as
/// sent, and parsed.
pub async fn next_of_type(ws: &mut Ws, kind: &str) -> (String, Value) {
    for _ in 0..16 {
        if let Message::Text(text) = next_message(ws).await {
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if value["type"] == kind {
                return (text.to_string(), value);
            }
        }
    }
    panic!("no {kind} frame among the next 16");
}

/// The path and query of an absolute URL.
pub fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/').map_or("", |i| &rest[i..])
}
