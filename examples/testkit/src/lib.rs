//! Shared pieces of the end-to-end tests: a real Envoy with the plugin, real `redis-server`
//! instances, stand-in HTTP servers and a client. Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod envoy;
pub mod http;
pub mod postgres;
pub mod redis;
pub mod rls;
pub mod service;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The service-owned rules of ASM's documented example (`RATE_LIMIT_CONFIG`), as written there
/// and shipped with the service as `examples/ratelimit-service/asm-example-rules.json`.
pub const ASM_EXAMPLE_RULES: &str = include_str!("../../ratelimit-service/asm-example-rules.json");

/// The workspace root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh temporary folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "ltr-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    // The kernel may hand a port just released to the next caller: tests running in parallel
    // in one process would then be given the same one. Never hand out a port twice.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// CPU time all of a process's live threads have run (from each thread's `schedstat`, in
/// nanoseconds: finer than the 10 ms ticks of `/proc/<pid>/stat`); zero where the kernel
/// keeps no schedstat.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    std::time::Duration::from_nanos(nanos)
}

/// A process's resident memory in bytes (`VmRSS` in `/proc/<pid>/status`), 0 if unknown.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
