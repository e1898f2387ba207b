//! `tollgate`: check a policy, simulate a trace of requests through it, or generate the Envoy
//! routes and clusters its aliases need.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::NonEmptyStringValueParser;
use clap::{Parser, Subcommand};
use tollgate_cli::{check, envoy, load, simulate, store};

/// Tollgate's command line. Exit status: 0 ok, 1 invalid policy or trace (or Envoy cluster names
/// that clash), 2 bad usage.
#[derive(Parser)]
#[command(name = "tollgate", version, about = "Check a Tollgate policy, replay traffic through it, or generate the Envoy config it needs.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a policy and print its effective form.
    Check {
        /// The policy (JSON).
        config: PathBuf,
    },
    /// Replay a JSON-lines trace of requests through the real gate.
    ///
    /// TRACE is JSON lines, one request each, e.g.
    /// {"at": "2026-11-22T10:00:00Z", "identity": "alice", "tier": "free", "ip": "10.0.0.1",
    /// "model": "scalix-free", "input_tokens": 120, "output_tokens": 300, "max_tokens": 512,
    /// "accept_language": "ar", "duration_ms": 2000, "stream": false}
    /// (only "at" is required: RFC 3339 or epoch milliseconds).
    Simulate {
        /// Print one JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// The policy (JSON).
        config: PathBuf,
        /// The trace (JSON lines).
        trace: PathBuf,
    },
    /// Print the Envoy routes and clusters the policy needs (its aliases' aggregate clusters, its
    /// webhook's cluster), as JSON (also YAML).
    Envoy {
        /// Deployment clusters are named PREFIX + the model name.
        #[arg(long, value_name = "PREFIX", default_value = "")]
        deployment_cluster_prefix: String,
        /// The filter's file, for the upstream filter's vm_config.
        #[arg(long, value_name = "PATH", default_value = envoy::DEFAULT_WASM, value_parser = NonEmptyStringValueParser::new())]
        wasm: String,
        /// A `tollgate store` replica's HOST:PORT (repeat for each; `store.redis` policies).
        #[arg(long = "store-address", value_name = "HOST:PORT", default_value = envoy::DEFAULT_STORE_ADDRESS)]
        store_addresses: Vec<String>,
        /// The policy (JSON).
        config: PathBuf,
    },
    /// Run the store service a fleet of Envoys shares its counters through (`store.redis`):
    /// core's store protocol against Redis. Prints `listening on http://ADDR` when ready.
    Store {
        /// The Redis to use: redis://HOST:PORT[/DB] or redis+unix:///PATH; with --cluster, nodes
        /// of a Redis Cluster (repeat, or separate with commas).
        #[arg(long, value_name = "URL", required = true, value_delimiter = ',')]
        redis: Vec<String>,
        /// The --redis URLs are nodes of a Redis Cluster.
        #[arg(long)]
        cluster: bool,
        /// Where to listen (port 0: any free port).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8089")]
        listen: std::net::SocketAddr,
        /// Most pooled Redis connections.
        #[arg(long, value_name = "N", default_value_t = 64)]
        connections: u32,
        /// The policy (JSON): the same document the Envoys run (jobs under another are refused).
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    // Usage errors exit with 2 and help with 0 (clap's own codes, as before).
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => run_check(&config.to_string_lossy()),
        Command::Simulate { json, config, trace } => run_simulate(&config.to_string_lossy(), &trace.to_string_lossy(), json),
        Command::Envoy { deployment_cluster_prefix, wasm, store_addresses, config } => {
            let options = envoy::Options { deployment_cluster_prefix, wasm, store_addresses };
            run_envoy(&config.to_string_lossy(), &options)
        }
        Command::Store { redis, cluster, listen, connections, config } => match load(&config) {
            Ok(loaded) => match store::serve(loaded.policy, store::Options { redis, cluster, listen, connections }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn run_check(config: &str) -> ExitCode {
    match load(Path::new(config)) {
        Ok(loaded) => {
            println!("{config}: valid");
            for w in loaded.policy.warnings() {
                eprintln!("warning: {w}");
            }
            print!("{}", check::describe(&loaded));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
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
