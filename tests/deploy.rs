//! Every deployable artefact is checked: each manifest parses as YAML, the Envoy configs pass
//! `envoy --mode validate` (which also loads the plugin and its configuration), every plugin
//! configuration in the repository validates against the JSON Schema and loads in Envoy, and the
//! OCI image `make oci` writes is read back the way Istio reads a Wasm image.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use testkit::envoy::{plugin_wasm, validate, validate_plugin_config};
use testkit::{repo, TempDir};

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join(dir)];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every YAML document of a file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_manifest_parses_as_yaml() {
    let manifests = files("deploy", "yaml");
    assert!(manifests.len() >= 7, "{manifests:?}");
    for path in &manifests {
        let docs = yaml_documents(path);
        assert!(!docs.is_empty(), "{}", path.display());
        if !path.starts_with(repo().join("deploy/envoy")) {
            for doc in docs {
                assert!(
                    doc["apiVersion"].is_string() && doc["kind"].is_string(),
                    "{}: not a Kubernetes object: {doc}",
                    path.display()
                );
            }
        }
    }
}

/// The Envoy configs, with the plugin path (and the demo's placeholders) filled in.
fn rendered_envoy_configs(dir: &TempDir) -> Vec<PathBuf> {
    let wasm = plugin_wasm().display().to_string();
    files("deploy/envoy", "yaml")
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("/etc/envoy/llm_token_ratelimit.wasm", &wasm)
                .replace("@PLUGIN_WASM@", &wasm)
                .replace("@ENVOY_PORT@", "10000")
                .replace("@ADMIN_PORT@", "9901")
                .replace("@SERVICE_PORT@", "8080")
                .replace("@LLM_PORT@", "8081");
            let out = dir.0.join(path.file_name().unwrap());
            std::fs::write(&out, text).unwrap();
            out
        })
        .collect()
}

#[test]
fn envoy_configs_validate() {
    let dir = TempDir::new("deploy");
    let configs = rendered_envoy_configs(&dir);
    assert!(configs.len() >= 2);
    for path in configs {
        validate(&path).unwrap_or_else(|log| panic!("{}:\n{log}", path.display()));
    }
}

/// Every plugin configuration the repository ships, with where it comes from.
fn plugin_configs() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for path in files("examples/configs", "json") {
        let v = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        out.push((path.display().to_string(), v));
    }
    for path in files("deploy/envoy", "yaml") {
        let doc = &yaml_documents(&path)[0];
        for listener in doc["static_resources"]["listeners"].as_array().unwrap() {
            let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
            for filter in hcm["http_filters"].as_array().unwrap() {
                if let Some(text) =
                    filter["typed_config"]["config"]["configuration"]["value"].as_str()
                {
                    out.push((
                        path.display().to_string(),
                        serde_json::from_str(text).unwrap(),
                    ));
                }
            }
        }
    }
    for path in files("deploy/istio", "yaml") {
        for doc in yaml_documents(&path) {
            if doc["kind"] == "WasmPlugin" {
                out.push((
                    path.display().to_string(),
                    doc["spec"]["pluginConfig"].clone(),
                ));
            }
        }
    }
    for path in files("deploy/higress", "yaml") {
        for doc in yaml_documents(&path) {
            if doc["kind"] == "WasmPlugin" {
                out.push((
                    path.display().to_string(),
                    higress_plugin_config(&doc["spec"]),
                ));
            }
        }
    }
    out
}

/// What Higress hands the plugin for a `WasmPlugin`: `defaultConfig`, with `matchRules` as
/// `_rules_` entries (`ingress` → `_match_route_`, `domain` → `_match_domain_`, `service` →
/// `_match_service_`).
fn higress_plugin_config(spec: &Value) -> Value {
    let mut config = spec["defaultConfig"].clone();
    let rules: Vec<Value> = spec["matchRules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|rule| {
            let mut r = rule["config"].clone();
            for (from, to) in [
                ("ingress", "_match_route_"),
                ("domain", "_match_domain_"),
                ("service", "_match_service_"),
            ] {
                if !rule[from].is_null() {
                    r[to] = rule[from].clone();
                }
            }
            r
        })
        .collect();
    if !rules.is_empty() {
        config["_rules_"] = json!(rules);
    }
    config
}

fn schema() -> jsonschema::Validator {
    let text =
        std::fs::read_to_string(repo().join("deploy/schema/plugin-config.schema.json")).unwrap();
    jsonschema::draft202012::new(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[test]
fn every_shipped_plugin_config_matches_the_schema_and_loads_in_envoy() {
    let schema = schema();
    let configs = plugin_configs();
    assert!(configs.len() >= 12, "{}", configs.len());
    for (origin, config) in &configs {
        let errors: Vec<String> = schema
            .iter_errors(config)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{origin}: {errors:?}\n{config}");
        validate_plugin_config(&config.to_string())
            .unwrap_or_else(|log| panic!("{origin} does not load:\n{log}"));
    }
}

#[test]
fn the_schema_refuses_what_the_plugin_refuses() {
    let schema = schema();
    for bad in [
        json!({"limits": [{"name": "a", "key": ""}]}),
        json!({"service": {"cluster": "r"}, "limits": []}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": "", "tokens": 1, "window": "1 fortnight"}]}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": ""}], "limts": []}),
        json!({"service": {"cluster": "r", "host": "h"}, "limits": [{"name": "a", "key": ""}]}),
        json!({"service": {"cluster": "r", "failure_mode": "open"}, "limits": [{"name": "a", "key": ""}]}),
        json!({"rule_name": "r", "global_threshold": {"token_per_minute": 1}, "redis": {"service_name": "redis.static"}}),
        json!({"rule_name": "r", "service": {"cluster": "r"}, "rule_items": [{"limit_by_header": "x", "limit_by_param": "y", "limit_keys": [{"key": "a", "token_per_minute": 1}]}]}),
        json!({"rule_name": "r", "service": {"cluster": "r"}, "rule_items": [{"limit_by_per_ip": "from-somewhere", "limit_keys": [{"key": "1.1.1.1", "token_per_minute": 1}]}]}),
        json!({"rateLimitKeys": ["{{request.headers.user-type}}"]}),
        json!({"service": {"cluster": "r", "protocol": "envoy-rls"}, "limits": [{"name": "a", "key": ""}]}),
        json!({"service": {"cluster": "r", "domain": "llm"}, "limits": [{"name": "a", "key": ""}]}),
        json!({"service": ["r"], "limits": [{"name": "a", "key": ""}]}),
        json!({"service": null, "limits": [{"name": "a", "key": ""}]}),
        json!({"service": {"cluster": "r", "port": 80}, "limits": [{"name": "a", "key": ""}]}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": ""}], "matches": [{"model": {"exact": "gpt-4o"}}]}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": ""}], "matches": [{"path": {"prefix": "/", "exact": "/"}}]}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": "", "tokens": 5}]}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": ""}], "usage": {"count": {"prompt": -1}}}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": ""}], "reserve": {"tokens": "lots"}}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": ""}], "client_ip": {"header": "bad header"}}),
        json!({"rateLimitKeys": [], "rateLimitService": {"service": "s"}}),
        json!({"service": {"cluster": "r"}, "prices": {"currency": "USD", "models": []}, "limits": [{"name": "a", "key": "", "unit": "cost", "tokens": 5, "window": "day"}]}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": "", "budget": "5", "window": "day"}]}),
        json!({"service": {"cluster": "r"}, "prices": {"currency": "usd", "models": []}, "limits": [{"name": "a", "key": ""}]}),
        json!({"service": {"cluster": "r"}, "limits": [{"name": "a", "key": "", "tokens": 5, "window": "monthly"}]}),
        json!({"rule_name": "r", "service": {"cluster": "r"}, "rule_items": [{"limit_by_header": "x", "limit_keys": [{"key": "a"}]}]}),
    ] {
        assert!(!schema.is_valid(&bad), "the schema accepts {bad}");
        assert!(
            validate_plugin_config(&bad.to_string()).is_err(),
            "the plugin accepts {bad}"
        );
    }
}

#[test]
fn the_oci_image_holds_the_plugin_as_istio_reads_it() {
    let dir = TempDir::new("oci");
    let layout = dir.0.join("layout");
    let bin = std::env::var_os("OCI_IMAGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release/oci-image"));
    let status = Command::new(&bin)
        .arg("--wasm")
        .arg(plugin_wasm())
        .arg("--out")
        .arg(&layout)
        .args(["--tag", "0.1.0"])
        .status()
        .unwrap_or_else(|e| panic!("{}: {e} (run `make build`)", bin.display()));
    assert!(status.success());

    let read_json =
        |p: PathBuf| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let blob = |digest: &str| -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
        assert_eq!(format!("{:x}", Sha256::digest(&bytes)), hex, "blob digest");
        bytes
    };
    assert_eq!(
        read_json(layout.join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let index = read_json(layout.join("index.json"));
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "0.1.0"
    );
    let manifest: Value = serde_json::from_slice(&blob(entry["digest"].as_str().unwrap())).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();

    // Istio's "compat" image variant: the last layer, tar + gzip, holds plugin.wasm.
    let layer = manifest["layers"].as_array().unwrap().last().unwrap();
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let gz = blob(layer["digest"].as_str().unwrap());
    assert_eq!(layer["size"], gz.len());
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{:x}", Sha256::digest(&tar_bytes))
    );
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut found = None;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some("plugin.wasm") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            found = Some(bytes);
        }
    }
    assert_eq!(
        found.expect("no plugin.wasm in the last layer"),
        std::fs::read(plugin_wasm()).unwrap(),
        "the image holds exactly the built plugin"
    );

    // Reproducible: a second run writes the same manifest.
    let again = dir.0.join("again");
    assert!(Command::new(&bin)
        .arg("--wasm")
        .arg(plugin_wasm())
        .arg("--out")
        .arg(&again)
        .args(["--tag", "0.1.0"])
        .status()
        .unwrap()
        .success());
    assert_eq!(read_json(again.join("index.json")), index);
}

/// The ASM manifest is ASM's own: its `pluginConfig` is the example `compat.rs` runs end to end,
/// and it sits where ASM puts the plugin (sidecar outbound traffic on port 80).
#[test]
fn the_asm_manifest_is_the_exercised_example_in_asms_placement() {
    let doc = &yaml_documents(&repo().join("deploy/istio/wasmplugin-asm.yaml"))[0];
    let example: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/configs/asm/plugin-config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc["spec"]["pluginConfig"], example);
    assert_eq!(
        doc["spec"]["match"],
        json!([{"mode": "CLIENT", "ports": [{"number": 80}]}])
    );
    assert!(doc["spec"]["priority"].is_u64(), "{doc}");
    assert_eq!(doc["spec"]["phase"], "STATS");
}

/// The book's "Budgets in money" example is the shipped configuration (which the schema and
/// Envoy check above), so the example a reader copies loads.
#[test]
fn the_documented_budget_example_is_the_shipped_one() {
    let readme = std::fs::read_to_string(repo().join("docs/src/configuration.md")).unwrap();
    let after = readme
        .split_once("(`examples/configs/native/budgets-in-money.json`):\n\n```json\n")
        .unwrap()
        .1;
    let example: Value = serde_json::from_str(after.split_once("```").unwrap().0).unwrap();
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/configs/native/budgets-in-money.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(example, shipped);
}

/// The shipped Redis keeps counters: AOF fsynced every second on a persistent volume, and
/// `noeviction`. Run with the manifest's own arguments (its `--dir` swapped for a temporary
/// folder), a counter written more than a second before Redis is killed outright is there
/// after the restart.
#[test]
fn the_shipped_redis_keeps_counters_across_a_crash() {
    let docs = yaml_documents(&repo().join("deploy/kubernetes/redis.yaml"));
    let set = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .expect("Redis runs as a StatefulSet");
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    assert_eq!(flag("--appendonly").as_deref(), Some("yes"));
    assert_eq!(flag("--appendfsync").as_deref(), Some("everysec"));
    assert_eq!(flag("--maxmemory-policy").as_deref(), Some("noeviction"));
    let dir = flag("--dir").unwrap();
    assert!(
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == dir.as_str()),
        "{dir} is on the persistent volume"
    );
    assert!(
        set["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .is_string()
    );

    // The same arguments, but --dir: a real redis-server, killed with SIGKILL.
    let mut run: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--dir" {
            i += 2;
            continue;
        }
        run.push(&args[i]);
        i += 1;
    }
    let mut redis = testkit::redis::RedisServer::start_with(&run);
    let key = "ltr:{0000000000000001}:v:4:team:3:red";
    testkit::redis::command(redis.port, &["HSET", key, "used", "48000000"]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    redis.start_again();
    assert_eq!(
        testkit::redis::command(redis.port, &["HGET", key, "used"])
            .unwrap()
            .trim(),
        "48000000",
        "the counter survived the crash"
    );
}
