//! A real PostgreSQL server (Debian's `postgresql` package) in a temporary folder on an
//! ephemeral loopback port, trusting local connections; stopped and removed when dropped.
//! PostgreSQL refuses to run as root: as root, it runs as the `postgres` user.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, TempDir};

pub struct PostgresServer {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

/// The folder of the newest PostgreSQL's server programs.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run `make deps`")
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .expect("no PostgreSQL server under /usr/lib/postgresql")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `program` run as the user PostgreSQL accepts.
fn as_owner(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    pub fn start() -> PostgresServer {
        let dir = TempDir::new("postgres");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir.0)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot give {} to the postgres user", dir.0.display());
        }
        let out = as_owner(bin_dir().join("initdb"))
            .args(["-D"])
            .arg(dir.0.join("data"))
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdin(Stdio::null())
            .output()
            .expect("initdb did not run");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = PostgresServer {
            child: None,
            port: free_port(),
            dir,
        };
        server.spawn();
        server
    }

    /// The URL the service's `--ledger` takes.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn spawn(&mut self) {
        let child = as_owner(bin_dir().join("postgres"))
            .arg("-D")
            .arg(self.dir.0.join("data"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.0.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres did not start");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.sql("SELECT 1").is_ok_and(|r| r.trim() == "1") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("postgres on port {} did not start", self.port);
    }

    /// Runs `query` with `psql`; its rows, `|`-separated, one per line.
    pub fn sql(&self, query: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", query])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Stops the server at once, as a crash does (SIGQUIT: no checkpoint, recovery at the next
    /// start); `start_again` brings it back with its data.
    pub fn kill(&mut self) {
        // The postmaster's pid file names the server (under runuser it is not our child).
        let pid = std::fs::read_to_string(self.dir.0.join("data/postmaster.pid")).ok();
        if let Some(pid) = pid.as_deref().and_then(|p| p.lines().next()) {
            let _ = Command::new("kill").args(["-QUIT", pid.trim()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline
                && std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.0.join("data/postmaster.pid"));
        self.spawn();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
    }
}
