//! What the benchmarks read of a process's memory from `/proc/PID/status`.
#![allow(dead_code)]

use std::process::{Child, ExitStatus};
use std::time::Duration;

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Waits for `child`, sampling its peak RSS (VmHWM) every 5 ms; returns how it ended and
/// the peak (the process's own: its children are not counted).
pub fn wait_with_peak(child: &mut Child) -> (ExitStatus, u64) {
    let mut peak = 0;
    loop {
        if let Some(b) = status_bytes(child.id(), "VmHWM") {
            peak = peak.max(b);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            return (status, peak);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
