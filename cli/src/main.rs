//! `tollgate`: check a policy, simulate a trace of requests through it, or generate the Envoy
//! routes and clusters its aliases need.

use std::path::Path;
use std::process::ExitCode;

use tollgate_cli::{check, envoy, load, simulate};

const USAGE: &str = "usage:
  tollgate check CONFIG              validate a policy; print its effective form
  tollgate simulate [--json] CONFIG TRACE
                                     replay a JSON-lines trace through the gate
  tollgate envoy [--deployment-cluster-prefix P] [--wasm PATH] CONFIG
                                     print the Envoy routes and aggregate clusters the
                                     policy's aliases need, as JSON (also YAML); deployment
                                     clusters are named P + the model name; PATH is the
                                     filter's file (default target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm)

CONFIG is a policy JSON file. TRACE is JSON lines, one request each, e.g.
  {\"at\": \"2026-11-22T10:00:00Z\", \"identity\": \"alice\", \"tier\": \"free\", \"ip\": \"10.0.0.1\",
   \"model\": \"scalix-free\", \"input_tokens\": 120, \"output_tokens\": 300, \"max_tokens\": 512,
   \"accept_language\": \"ar\", \"duration_ms\": 2000, \"stream\": false}
(only \"at\" is required: RFC 3339 or epoch milliseconds). Exit status: 0 ok, 1 invalid
policy or trace (or Envoy cluster names that clash), 2 bad usage.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["check", config] => run_check(config),
        ["simulate", rest @ ..] => {
            let json = rest.contains(&"--json");
            let files: Vec<&str> = rest.iter().copied().filter(|a| *a != "--json").collect();
            match files.as_slice() {
                [config, trace] if files.iter().all(|f| !f.starts_with("--")) => run_simulate(config, trace, json),
                _ => usage(),
            }
        }
        ["envoy", rest @ ..] => match envoy_args(rest) {
            Some((config, options)) => run_envoy(config, &options),
            None => usage(),
        },
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

fn run_check(config: &str) -> ExitCode {
    match load(Path::new(config)) {
        Ok(loaded) => {
            println!("{config}: valid");
            print!("{}", check::describe(&loaded));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `[--deployment-cluster-prefix P] [--wasm PATH] CONFIG`, flags also as `--flag=value`.
fn envoy_args<'a>(args: &[&'a str]) -> Option<(&'a str, envoy::Options)> {
    let mut options = envoy::Options::default();
    let mut config = None;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i];
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (arg, None),
        };
        let mut value = || match inline {
            Some(v) => Some(v.to_owned()),
            None => {
                i += 1;
                args.get(i).map(|v| (*v).to_owned())
            }
        };
        match flag {
            "--deployment-cluster-prefix" => options.deployment_cluster_prefix = value()?,
            "--wasm" => options.wasm = value().filter(|v| !v.is_empty())?,
            _ if arg.starts_with("--") => return None,
            _ if config.is_none() => config = Some(arg),
            _ => return None,
        }
        i += 1;
    }
    Some((config?, options))
}

fn run_envoy(config: &str, options: &envoy::Options) -> ExitCode {
    let loaded = match load(Path::new(config)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match envoy::generate(&loaded, options) {
        Ok(generated) => {
            print!("{}", generated.to_json());
            eprint!("{config}: {}", generated.note());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {config}: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_simulate(config: &str, trace: &str, json: bool) -> ExitCode {
    let loaded = match load(Path::new(config)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let text = match std::fs::read_to_string(trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {trace}: cannot read: {e}");
            return ExitCode::from(1);
        }
    };
    match simulate::simulate(&loaded, &text) {
        Ok(lines) => {
            let mut out = String::new();
            for line in &lines {
                out.push_str(&if json { line.to_json() } else { line.to_text() });
                out.push('\n');
            }
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {trace}: {e}");
            ExitCode::from(1)
        }
    }
}
