//! The real `ratelimit-service` binary as a child process on an ephemeral port.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::repo;

/// The service binary: `RATELIMIT_SERVICE_BIN`, else the workspace's release build.
pub fn binary() -> PathBuf {
    release_binary("RATELIMIT_SERVICE_BIN", "ratelimit-service")
}

/// The mock LLM binary: `MOCK_LLM_BIN`, else the workspace's release build.
pub fn mock_llm_binary() -> PathBuf {
    release_binary("MOCK_LLM_BIN", "mock-llm")
}

fn release_binary(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release").join(name));
    assert!(
        path.exists(),
        "no {name} binary at {}: run `make build` (or set {var})",
        path.display()
    );
    path
}

/// The mock LLM upstream (`examples/mock-llm`) on an ephemeral port.
pub fn mock_llm() -> Service {
    Service::start_binary(mock_llm_binary(), &[], &[])
}

pub struct Service {
    child: Child,
    pub port: u16,
    log: Arc<Mutex<String>>,
}

impl Service {
    /// Starts the service with `args` (plus `--listen 127.0.0.1:0`) and `env`, and waits
    /// until it listens.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Service {
        Service::start_binary(binary(), args, env)
    }

    pub fn start_binary(bin: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Service {
        Service::start_at(bin, "127.0.0.1:0", args, env)
    }

    /// Starts `bin` listening on `listen` (a fixed port, to restart a service in place).
    pub fn start_at(bin: PathBuf, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", listen])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for var in [
            "RATE_LIMIT_CONFIG",
            "REDIS_ADDRESS",
            "REDIS_PASSWORD",
            "REDIS_DB_INDEX",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let port = rest
                        .split([' ', ')'])
                        .next()
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse::<u16>().ok());
                    let _ = tx.send(port);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(port)) => Service { child, port, log },
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the service did not start:\n{}", log.lock().unwrap());
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// What `/v1/quota` says is left of the first rate of counter (`limit`, `value`); `None`
    /// when the service holds no such counter.
    pub fn remaining(&self, limit: &str, value: &str) -> Option<u64> {
        let path = format!(
            "/v1/quota?limit={}&value={}",
            crate::http::percent_encode(limit),
            crate::http::percent_encode(value)
        );
        crate::http::send(self.port, "GET", &path, &[], b"").json()["meters"][0]["remaining"]
            .as_u64()
    }

    /// Waits (reports are asynchronous) until counter (`limit`, `value`) has `want` left, and
    /// fails the test with what it has after 20 s.
    pub fn await_remaining(&self, limit: &str, value: &str, want: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.remaining(limit, value) != Some(want) {
            assert!(
                std::time::Instant::now() < deadline,
                "{limit}/{value}: {:?} left, want {want}",
                self.remaining(limit, value)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL): whatever it was doing is lost.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a service binary to completion (for `--help` and bad configurations).
pub fn run(bin: PathBuf, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}
