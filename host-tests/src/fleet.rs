//! A fleet on this machine: a real Redis (Debian's `redis-server`, on a unix socket in a temp
//! dir: no port to race for), `tollgate store` replicas (port 0, the bound address read back)
//! and Envoys running examples/envoy/fleet.yaml pointed at them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::envoy::{self, render, Envoy, Rendered, TempDir};
use crate::proc::{target_dir, Server};

/// A Redis with AOF on every write (`appendfsync always`: an acknowledged count survives a
/// restart), listening on a unix socket only.
pub struct Redis {
    server: Option<Server>,
    dir: TempDir,
}

impl Redis {
    /// Starts one and waits for its PONG.
    pub fn start() -> Redis {
        let dir = TempDir::new("redis");
        let mut redis = Redis { server: None, dir };
        redis.launch();
        redis
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    fn launch(&mut self) {
        let log = self.dir.path().join("redis.log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("redis log");
        let err = out.try_clone().expect("log handle");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut server = Server::spawn("redis-server", &mut cmd).with_log(&log);
        let started = Instant::now();
        while !self.ping() {
            server.assert_running();
            assert!(started.elapsed() < Duration::from_secs(10), "redis did not answer in 10 s\n{}", server.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server = Some(server);
    }

    /// `redis+unix://…`, for `tollgate store --redis`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// Whether it answers PING.
    pub fn ping(&self) -> bool {
        self.cli(&["ping"]).is_some_and(|o| o.trim() == "PONG")
    }

    /// Runs `redis-cli` against it; its output, or `None` when it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli").arg("-s").arg(self.socket()).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops it (SIGTERM: the AOF is flushed, as after any acknowledged write with
    /// `appendfsync always`).
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
    }

    /// Kills it (SIGKILL: nothing is flushed that was not already).
    pub fn kill(&mut self) {
        if let Some(s) = self.server.take() {
            // SAFETY: kill(2) on the process group we created.
            unsafe { libc::kill(-(s.pid() as i32), libc::SIGKILL) };
            drop(s);
        }
    }

    /// Starts it again on the same socket and data directory.
    pub fn restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.socket());
        self.launch();
    }
}

/// A `tollgate store` replica.
pub struct StoreService {
    pub server: Server,
    pub port: u16,
}

/// Starts `tollgate store` (the release binary) for `policy` on a free port.
pub fn start_store(redis_url: &str, policy: &str, dir: &TempDir, name: &str) -> StoreService {
    let bin = target_dir().join("release").join("tollgate");
    assert!(bin.exists(), "{} is missing: cargo build --release -p tollgate-cli", bin.display());
    let policy_path = dir.path().join(format!("{name}-policy.json"));
    std::fs::write(&policy_path, policy).expect("write the policy");
    let log = dir.path().join(format!("{name}.log"));
    let err = std::fs::File::create(&log).expect("store log");
    let mut cmd = Command::new(bin);
    cmd.args(["store", "--redis", redis_url, "--listen", "127.0.0.1:0"]).arg(&policy_path).stdout(Stdio::piped()).stderr(err);
    let mut server = Server::spawn(name, &mut cmd).with_log(&log);
    let stdout = server.stdout().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("the store prints its address");
    if line.is_empty() {
        server.assert_running();
        panic!("{name} printed no address\n{}", server.log_tail());
    }
    let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("unexpected store output {line:?}"));
    StoreService { server, port }
}

/// examples/envoy/fleet.yaml with `policy`, the mock provider on `provider_port` and the store
/// replicas on `store_ports` (every other port bound by Envoy itself).
pub fn fleet_config(policy: &str, provider_port: u16, store_ports: &[u16]) -> Rendered {
    let mut rendered = render("examples/envoy/fleet.yaml", Some(provider_port), Some(policy));
    let endpoints: String = store_ports
        .iter()
        .map(|p| format!("        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}\n"))
        .collect();
    let start = rendered.yaml.find("        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 8089 } } }\n").expect("store endpoints");
    let end = rendered.yaml[start..].find("port_value: 8090 } } }\n").expect("second endpoint") + start + "port_value: 8090 } } }\n".len();
    rendered.yaml.replace_range(start..end, &endpoints);
    rendered
}

/// Starts `n` Envoys on the same fleet config.
pub fn start_envoys(rendered: &Rendered, n: usize) -> Vec<Envoy> {
    (0..n).map(|_| envoy::start(rendered, &[])).collect()
}
