//! What the harness measures about processes and the machine, read from /proc.

use std::fs;

/// utime + stime of a process (all its threads, live and exited), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from its end.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state(0) ... utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// User ticks only (to tell our processes' work from other load on the box).
pub fn user_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(11)?.parse().ok()
}

pub fn sum_cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
}

/// CPU time of every live thread of a process, in ns: the sum of each thread's
/// `sum_exec_runtime` (the first field of /proc/PID/task/TID/schedstat), which utime+stime are
/// the clock-tick form of. For windows too short for 10 ms ticks. A thread that exits within
/// the window takes its time with it (the proxies measured with it keep their threads).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(entry) = entry else { continue };
        if let Ok(text) = fs::read_to_string(entry.path().join("schedstat")) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

pub fn sum_cpu_ns(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ns(*p)).sum()
}

/// Proportional set size, in KiB, from smaps_rollup.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn sum_pss_kib(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| pss_kib(*p)).sum()
}

/// Clock ticks per second (USER_HZ).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}
