//! Starting and stopping the servers the end-to-end tests need, on loopback only.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (where `Cargo.toml`, `envoy.yaml` and `target/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host-tests sits in the workspace").to_path_buf()
}

/// The cargo target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// The release filter built by `scripts/build-wasm.sh`.
pub fn filter_wasm_path() -> PathBuf {
    target_dir().join("wasm32-unknown-unknown/wasm/tollgate_filter.wasm")
}

/// The recorded provider traffic: `$TOLLGATE_FIXTURES`, else `../shared/fixtures` beside the
/// workspace. A missing directory fails the test rather than letting it run on nothing.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("TOLLGATE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/fixtures"));
    assert!(dir.is_dir(), "fixtures directory {} is missing (set TOLLGATE_FIXTURES)", dir.display());
    dir
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// A child process running in its own process group. Dropping it sends SIGTERM to the group,
/// waits briefly, then SIGKILLs the group, so helpers it started (workerd under wrangler) go too.
pub struct Server {
    child: Child,
    name: String,
    /// Where the process logs (shown when it exits early).
    log: Option<PathBuf>,
}

/// How much of a log a failure shows.
const LOG_TAIL: usize = 4000;

impl Server {
    /// Spawns `cmd` in a new process group. Output is inherited unless the caller set it.
    pub fn spawn(name: &str, cmd: &mut Command) -> Server {
        use std::os::unix::process::CommandExt;
        let child = cmd.process_group(0).spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Server { child, name: name.to_owned(), log: None }
    }

    /// Names the file the process logs to: a failure that it exited early shows its tail.
    pub fn with_log(mut self, path: &Path) -> Server {
        self.log = Some(path.to_path_buf());
        self
    }

    /// The last lines of the process's log (when it has one).
    pub fn log_tail(&self) -> String {
        let Some(path) = &self.log else { return String::new() };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let start = text.len().saturating_sub(LOG_TAIL);
        let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
        format!("----- tail of {} -----\n{}\n-----", path.display(), &text[start..])
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout, if it was piped.
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Fails the test if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early: {status}\n{}", self.name, self.log_tail());
        }
    }

    /// Stops the process group: SIGTERM, up to 5 s grace, then SIGKILL.
    pub fn stop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: plain kill(2) on a process group we created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; harmless if the group is already gone.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the mock provider (built by cargo as a workspace binary) on a free port and returns
/// it with its base URL.
pub fn start_mock_provider() -> (Server, String) {
    start_mock_provider_with(&[])
}

/// [`start_mock_provider`] with extra arguments (e.g. `["--require-key", "sk-…"]`).
pub fn start_mock_provider_with(args: &[&str]) -> (Server, String) {
    let bin = target_dir().join(if cfg!(debug_assertions) { "debug" } else { "release" }).join("tollgate-mock-provider");
    assert!(bin.exists(), "{} is missing: build it with `cargo build -p tollgate-mock-provider`", bin.display());
    let mut server = Server::spawn("mock provider", Command::new(&bin).args(args).stdout(Stdio::piped()));
    let stdout = server.stdout().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("mock provider prints its address");
    if line.is_empty() {
        // It exited before binding; its stderr (inherited) is in the test's output above.
        server.assert_running();
        panic!("the mock provider closed its stdout without printing its address (its stderr is above)");
    }
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected mock output {line:?}")).to_owned();
    (server, url)
}

/// Polls `url` until it answers any HTTP status, or panics after `timeout`.
pub fn wait_for_http(url: &str, timeout: Duration, server: &mut Server) {
    let deadline = Instant::now() + timeout;
    let agent = agent();
    loop {
        server.assert_running();
        if agent.get(url).call().is_ok() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{url} did not answer within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP client that returns 4xx/5xx as responses rather than errors.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// A response reduced to what the tests assert on.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// POSTs a JSON body with extra headers.
pub fn post_json(agent: &ureq::Agent, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut req = agent.post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send(body).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    reply(resp)
}

pub fn get(agent: &ureq::Agent, url: &str) -> Reply {
    reply(agent.get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}")))
}

/// An answer as a [`Reply`] (4xx/5xx included).
pub(crate) fn reply(mut resp: ureq::http::Response<ureq::Body>) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    Reply { status, headers, body }
}

/// How many `/v1/` requests the mock provider has served.
pub fn mock_request_count(agent: &ureq::Agent, mock_url: &str) -> u64 {
    get(agent, &format!("{mock_url}/__mock/requests")).json()["count"].as_u64().expect("count")
}

/// Sends `GET path` to `base` (`http://host:port`) with one header whose value is raw bytes
/// (not necessarily UTF-8, which an HTTP client library would refuse to send), and returns the
/// status and body of the answer.
pub fn get_with_raw_header(base: &str, path: &str, name: &str, value: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let authority = base.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(authority).unwrap_or_else(|e| panic!("connect {authority}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n{name}: ").into_bytes();
    request.extend_from_slice(value);
    request.extend_from_slice(b"\r\n\r\n");
    conn.write_all(&request).expect("send");
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}
