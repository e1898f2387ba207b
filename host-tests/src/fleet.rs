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

/// A Redis Cluster of three primaries on 127.0.0.1 (AOF on every write), its slots spread
/// over all of them. Cluster nodes announce TCP ports to their clients, so each node takes a
/// probed free port (and one for its cluster bus), retried on another when it cannot bind.
pub struct RedisCluster {
    nodes: Vec<Server>,
    /// The nodes' client ports.
    pub ports: Vec<u16>,
    _dir: TempDir,
}

impl RedisCluster {
    /// Starts three nodes, joins them (`redis-cli --cluster create`), waits for `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let dir = TempDir::new("redis-cluster");
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let (server, port) = Self::node(&dir, i);
            nodes.push(server);
            ports.push(port);
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "redis-cli --cluster create failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let cluster = RedisCluster { nodes, ports, _dir: dir };
        let started = Instant::now();
        while !cluster.ports.iter().all(|p| cluster.cli(*p, &["cluster", "info"]).is_some_and(|o| o.contains("cluster_state:ok"))) {
            assert!(started.elapsed() < Duration::from_secs(20), "the cluster did not reach cluster_state:ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn node(dir: &TempDir, i: usize) -> (Server, u16) {
        let mut last_log = String::new();
        for attempt in 0..5 {
            let (port, bus) = (crate::proc::free_port(), crate::proc::free_port());
            let node_dir = dir.path().join(format!("node-{i}-{attempt}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let log = node_dir.join("redis.log");
            let out = std::fs::File::create(&log).expect("redis log");
            let err = out.try_clone().expect("log handle");
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--cluster-enabled", "yes", "--cluster-port", &bus.to_string()])
                .arg("--cluster-config-file")
                .arg(node_dir.join("nodes.conf"))
                .arg("--dir")
                .arg(&node_dir)
                .args(["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            let mut server = Server::spawn(&format!("redis-node-{i}"), &mut cmd).with_log(&log);
            let started = Instant::now();
            loop {
                if Command::new("redis-cli").args(["-p", &port.to_string(), "ping"]).output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG") {
                    return (server, port);
                }
                if !server.is_running() || started.elapsed() > Duration::from_secs(10) {
                    last_log = server.log_tail();
                    server.stop();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis cluster node {i} did not start in 5 attempts\n{last_log}");
    }

    /// Runs `redis-cli -p PORT` (`-c`: following redirections); its output, or `None`.
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli").args(["-c", "-p", &port.to_string()]).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.ports.iter().map(|p| self.cli(*p, &["dbsize"]).and_then(|o| o.trim().parse().ok()).unwrap_or(0)).collect()
    }

    /// Stops every node.
    pub fn stop(&mut self) {
        for mut n in self.nodes.drain(..) {
            n.stop();
        }
    }
}

/// A `tollgate store` replica.
pub struct StoreService {
    pub server: Server,
    pub port: u16,
}

/// Starts `tollgate store` (the release binary) for `policy` on a free port.
pub fn start_store(redis_url: &str, policy: &str, dir: &TempDir, name: &str) -> StoreService {
    start_store_on(&["--redis", redis_url], policy, dir, name, &[])
}

/// [`start_store`] with environment variables (the store key).
pub fn start_store_with_env(redis_url: &str, policy: &str, dir: &TempDir, name: &str, env: &[(&str, &str)]) -> StoreService {
    start_store_on(&["--redis", redis_url], policy, dir, name, env)
}

/// Starts `tollgate store` on `cluster` (`--cluster`).
pub fn start_cluster_store(cluster: &RedisCluster, policy: &str, dir: &TempDir, name: &str) -> StoreService {
    let nodes = cluster.ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    start_store_on(&["--cluster", "--redis", &nodes], policy, dir, name, &[])
}

fn start_store_on(redis: &[&str], policy: &str, dir: &TempDir, name: &str, env: &[(&str, &str)]) -> StoreService {
    let bin = target_dir().join("release").join("tollgate");
    assert!(bin.exists(), "{} is missing: cargo build --release -p tollgate-cli", bin.display());
    let policy_path = dir.path().join(format!("{name}-policy.json"));
    std::fs::write(&policy_path, policy).expect("write the policy");
    let log = dir.path().join(format!("{name}.log"));
    let err = std::fs::File::create(&log).expect("store log");
    let mut cmd = Command::new(bin);
    cmd.arg("store").args(redis).args(["--listen", "127.0.0.1:0"]).arg(&policy_path).stdout(Stdio::piped()).stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
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

/// `rendered` with the filter VM's environment set to `vars` (`vm_config.environment_variables`).
pub fn with_vm_env(rendered: &Rendered, vars: &[(&str, &str)]) -> Rendered {
    let mut r = rendered.clone();
    let values: Vec<String> = vars.iter().map(|(k, v)| format!("{k}: {v:?}")).collect();
    let at = r.yaml.find("                  vm_id: tollgate\n").expect("the filter's vm_config");
    r.yaml.insert_str(at, &format!("                  environment_variables: {{ key_values: {{ {} }} }}\n", values.join(", ")));
    r
}

/// Starts `n` Envoys on the same fleet config.
pub fn start_envoys(rendered: &Rendered, n: usize) -> Vec<Envoy> {
    (0..n).map(|_| envoy::start(rendered, &[])).collect()
}
