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

use crate::proc::{wait_for_http, workspace_root, Server};

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

/// Starts `wrangler dev` with state in `scratch/state`, `vars` as `--var NAME:VALUE`, and
/// `env_file` (if any) as its secrets (`--env-file`). It binds its own free loopback ports
/// (`--port 0`, `--inspector-port 0`) and says which in its log (`Ready on http://…`), so no
/// test races another process for a port; if it exits early, the failure shows its log's tail.
pub fn start_wrangler(scratch: &Path, vars: &[(&str, &str)], env_file: Option<&Path>) -> Wrangler {
    let log = scratch.join("wrangler.log");
    let out = File::create(&log).expect("create wrangler log");
    let err = out.try_clone().expect("clone log handle");
    let mut cmd = wrangler_command(scratch);
    cmd.args(["dev", "--ip", "127.0.0.1", "--port", "0", "--inspector-port", "0"])
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
    let mut server = Server::spawn("wrangler dev", &mut cmd).with_log(&log);
    let url = loop {
        server.assert_running();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(url) = text.lines().find_map(|l| l.split("Ready on ").nth(1)).map(|u| u.trim().to_owned()).filter(|u| u.starts_with("http://127.0.0.1:")) {
            break url;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "wrangler dev was not ready in 90 s\n{}", server.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut wrangler = Wrangler { server, url, log };
    // Any answer will do: the probe is a path no surface has (Tollgate's own 404).
    wait_for_http(&format!("{}/__probe", wrangler.url), Duration::from_secs(90), &mut wrangler.server);
    eprintln!("wrangler dev ready in {:?}", started.elapsed());
    wrangler
}

/// GETs `url` with extra headers; 4xx/5xx are answers, not errors.
pub fn get_with(url: &str, headers: &[(&str, &str)]) -> crate::proc::Reply {
    let mut req = crate::proc::agent().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    crate::proc::reply(req.call().unwrap_or_else(|e| panic!("GET {url}: {e}")))
}

/// A small upstream the test controls, on a free loopback port:
/// - `POST /v1/chat/completions` answers an OpenAI SSE stream: its first chunk at once, the
///   rest (usage chunk, `data: [DONE]`) only once [`SlowUpstream::release`] is called (or after
///   30 s), so a request stays in flight as long as the test wants;
/// - `POST /hook` records the body (webhook events) and answers 200;
/// - anything else: 404.
pub struct SlowUpstream {
    pub url: String,
    released: std::sync::Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>,
    pub hooks: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub streams_started: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SlowUpstream {
    pub fn start() -> SlowUpstream {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Condvar, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind slow upstream");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let released = Arc::new((Mutex::new(0u64), Condvar::new()));
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let streams_started = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (r, h, s) = (released.clone(), hooks.clone(), streams_started.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (released, hooks, started) = (r.clone(), h.clone(), s.clone());
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    if path == "/hook" {
                        hooks.lock().unwrap().push(body);
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                        return;
                    }
                    if path != "/v1/chat/completions" {
                        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                        return;
                    }
                    let generation = *released.0.lock().unwrap();
                    started.fetch_add(1, Ordering::SeqCst);
                    let event = |data: &str| {
                        let e = format!("data: {data}\n\n");
                        format!("{:x}\r\n{e}\r\n", e.len())
                    };
                    let first = event(r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}"#);
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                    if conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(first.as_bytes())).is_err() {
                        return;
                    }
                    let _ = conn.flush();
                    let (lock, cv) = &*released;
                    let guard = lock.lock().unwrap();
                    let _ = cv.wait_timeout_while(guard, Duration::from_secs(30), |g| *g == generation);
                    let rest = event(r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}"#)
                        + &event("[DONE]")
                        + "0\r\n\r\n";
                    let _ = conn.write_all(rest.as_bytes());
                });
            }
        });
        SlowUpstream { url, released, hooks, streams_started }
    }

    /// Lets every stream started so far finish.
    pub fn release(&self) {
        let (lock, cv) = &*self.released;
        *lock.lock().unwrap() += 1;
        cv.notify_all();
    }
}

/// A streaming chat request over a raw connection: returns once the response head and the
/// first bytes of the body have arrived, with the connection still open (drop it to go away
/// mid-stream, as a client that gives up does). The status line is the first line of `.1`.
pub fn open_stream(base: &str, headers: &[(&str, &str)], body: &str) -> (std::net::TcpStream, String) {
    use std::io::{Read, Write};
    let authority = base.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(authority).expect("connect to the worker");
    conn.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(body.as_bytes())).expect("send");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !(String::from_utf8_lossy(&got).contains("\r\n\r\n") && String::from_utf8_lossy(&got).contains("data:")) {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
        if String::from_utf8_lossy(&got).starts_with("HTTP/1.1 4") && String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            break;
        }
    }
    (conn, String::from_utf8_lossy(&got).into_owned())
}

/// Reads the rest of an [`open_stream`] response until the server closes it.
pub fn read_rest(mut conn: std::net::TcpStream) -> String {
    use std::io::Read;
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    String::from_utf8_lossy(&rest).into_owned()
}
