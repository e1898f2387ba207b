//! Running the edge worker in real workerd (`wrangler dev`, local mode, offline).
//!
//! Every wrangler gets its own loopback ports, `--persist-to` state dir and `XDG_CONFIG_HOME`
//! (in a [`Scratch`] directory), runs under the Node 22 in node_modules, never rebuilds the
//! worker (`TOLLGATE_WORKER_PREBUILT=1` for wrangler's build step: build it first with
//! `scripts/build-worker.sh`), and is stopped with its whole process group (wrangler → workerd)
//! when the test ends, pass or fail.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::proc::{free_port, wait_for_http, workspace_root, Server};

/// A scratch directory (with an `xdg/` config dir inside) removed when the test ends.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("tollgate-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(dir.join("xdg")).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `wrangler dev`; prints its log if the test fails.
pub struct Wrangler {
    pub server: Server,
    pub url: String,
    pub log: PathBuf,
}

impl Drop for Wrangler {
    fn drop(&mut self) {
        self.server.stop();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("----- wrangler dev log ({}) -----\n{log}\n-----", self.log.display());
        }
    }
}

fn node_and_wrangler() -> (PathBuf, PathBuf) {
    let root = workspace_root();
    let node = root.join("node_modules/.bin/node");
    let wrangler = root.join("node_modules/wrangler/bin/wrangler.js");
    assert!(
        node.exists() && wrangler.exists(),
        "{} or {} is missing: run `scripts/setup.sh all` in {}",
        node.display(),
        wrangler.display(),
        root.display()
    );
    for built in ["edge-worker/build/index.js", "edge-worker/build/index_bg.wasm"] {
        assert!(root.join(built).exists(), "{built} is missing: build the worker first with scripts/build-worker.sh");
    }
    (node, wrangler)
}

/// `node wrangler.js <args>` from the workspace root (where wrangler.toml is), with nothing
/// written to the home directory and no telemetry or cf-fetch.
pub fn wrangler_command(scratch: &Path) -> Command {
    let (node, wrangler) = node_and_wrangler();
    let mut cmd = Command::new(node);
    cmd.arg(wrangler)
        .current_dir(workspace_root())
        .env("WRANGLER_SEND_METRICS", "false")
        .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
        .env("XDG_CONFIG_HOME", scratch.join("xdg"))
        .env("TOLLGATE_WORKER_PREBUILT", "1")
        .env("NO_COLOR", "1");
    cmd
}

/// Writes `policy` to the local KV namespace `TOLLGATE_CONFIG` in `scratch/state`.
pub fn seed_policy(scratch: &Path, policy: &str) {
    let out = wrangler_command(scratch)
        .args(["kv", "key", "put", "--local", "--binding", "TOLLGATE_CONFIG", "policy", policy, "--persist-to"])
        .arg(scratch.join("state"))
        .output()
        .expect("run wrangler kv key put");
    assert!(
        out.status.success(),
        "wrangler kv key put failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `wrangler dev` on free loopback ports with state in `scratch/state`, `vars` as
/// `--var NAME:VALUE`, and `env_file` (if any) as its secrets (`--env-file`).
pub fn start_wrangler(scratch: &Path, vars: &[(&str, &str)], env_file: Option<&Path>) -> Wrangler {
    let port = free_port();
    let inspector = free_port();
    let log = scratch.join("wrangler.log");
    let out = File::create(&log).expect("create wrangler log");
    let err = out.try_clone().expect("clone log handle");
    let mut cmd = wrangler_command(scratch);
    cmd.args(["dev", "--ip", "127.0.0.1", "--port", &port.to_string(), "--inspector-port", &inspector.to_string()])
        .arg("--persist-to")
        .arg(scratch.join("state"))
        .arg("--show-interactive-dev-session=false")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(file) = env_file {
        cmd.arg("--env-file").arg(file);
    }
    for (name, value) in vars {
        cmd.arg("--var").arg(format!("{name}:{value}"));
    }
    let started = Instant::now();
    let server = Server::spawn("wrangler dev", &mut cmd);
    let mut wrangler = Wrangler { server, url: format!("http://127.0.0.1:{port}"), log };
    // Any answer will do: the probe is forwarded upstream (the mock's 404).
    wait_for_http(&format!("{}/__probe", wrangler.url), Duration::from_secs(90), &mut wrangler.server);
    eprintln!("wrangler dev ready in {:?}", started.elapsed());
    wrangler
}
