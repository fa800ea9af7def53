//! Debian's headless Chromium, driven by a node script of `tests/browser/` (playwright-core,
//! pinned in `tests/browser/package-lock.json`) that prints one JSON line per check.
//! `tests/browser/setup.sh` installs Chromium (apt-get) and the npm packages when missing;
//! without node, npm or a working Chromium the tests that use this fail, saying so. They
//! never skip.

use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// apt-get installing Chromium on a cold machine, or npm ci on a cold cache.
const SETUP_WAIT: Duration = Duration::from_secs(600);
/// The driver's bound on each browser-side wait.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than the driver's own deadline a test waits for it, in case the driver
/// cannot even report and exit when that passes.
const DRIVER_GRACE: Duration = Duration::from_secs(30);

pub fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `command` to its end, reading both pipes as it goes. Past `limit` it asks the process
/// to stop (SIGTERM: the driver's Playwright closes Chromium on it), then kills it.
fn run_bounded(mut command: Command, limit: Duration, what: &str) -> Result<Finished, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline && !timed_out {
            timed_out = true;
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let grace = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let finished = Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if timed_out {
        return Err(format!(
            "{what} took over {limit:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            finished.stdout, finished.stderr
        ));
    }
    Ok(finished)
}

/// Reads a pipe to its end on a thread of its own, so a chatty child never blocks on it.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Runs `tests/browser/setup.sh` once per test binary; every caller sees its outcome.
pub fn setup() {
    static SETUP: OnceLock<Result<Duration, String>> = OnceLock::new();
    let outcome = SETUP.get_or_init(|| {
        let started = Instant::now();
        let mut command = Command::new("bash");
        command.arg(browser_dir().join("setup.sh"));
        let finished = run_bounded(command, SETUP_WAIT, "tests/browser/setup.sh")?;
        if !finished.status.success() {
            return Err(format!(
                "tests/browser/setup.sh failed ({}):\n{}{}",
                finished.status, finished.stdout, finished.stderr
            ));
        }
        Ok(started.elapsed())
    });
    match outcome {
        Ok(took) => eprintln!("browser setup took {took:?}"),
        Err(why) => panic!("the real-browser test cannot run: {why}"),
    }
}

/// The driver's output: its checks by name, and everything it printed, for failure messages.
pub struct DriverRun {
    checks: HashMap<String, Value>,
    transcript: String,
}

impl DriverRun {
    /// The check `name`, which must be present and passed.
    pub fn passed(&self, name: &str) -> &Value {
        let check = self.checks.get(name).unwrap_or_else(|| {
            panic!("the driver reported no {name:?} check\n{}", self.transcript)
        });
        assert_eq!(
            check["ok"], true,
            "check {name} failed: {check:#}\n{}",
            self.transcript
        );
        check
    }
}

/// Runs the driver `script` of `tests/browser/` with `args` and `env`, bounded by `deadline`
/// (which the driver is told, with the bound on each of its checks), and reads its checks.
pub async fn run_driver(
    script: &str,
    args: &[(&str, String)],
    env: &[(&str, &str)],
    deadline: Duration,
) -> DriverRun {
    let mut command = Command::new("node");
    command.current_dir(browser_dir()).arg(script);
    for (name, value) in args {
        command.arg(format!("--{name}")).arg(value);
    }
    command
        .args(["--timeout-ms", &CHECK_TIMEOUT.as_millis().to_string()])
        .args(["--deadline-ms", &deadline.as_millis().to_string()])
        .envs(env.iter().copied());
    let what = format!("tests/browser/{script}");
    let finished =
        tokio::task::spawn_blocking(move || run_bounded(command, deadline + DRIVER_GRACE, &what))
            .await
            .expect("driver thread")
            .unwrap_or_else(|why| panic!("{why}"));
    let transcript = format!(
        "--- driver ({}) stdout ---\n{}--- driver stderr ---\n{}",
        finished.status, finished.stdout, finished.stderr
    );
    let mut checks = HashMap::new();
    for line in finished.stdout.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("driver line is not JSON ({e}): {line}\n{transcript}"));
        let name = value["check"]
            .as_str()
            .unwrap_or_else(|| panic!("driver line names no check: {line}"))
            .to_owned();
        checks.insert(name, value);
    }
    DriverRun { checks, transcript }
}
