//! `tollgate`: check a policy, simulate a trace of requests through it, or generate the Envoy
//! routes and clusters its aliases need.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::NonEmptyStringValueParser;
use clap::{Parser, Subcommand};
use tollgate_cli::{check, envoy, load, simulate, store, usage};

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
    /// Totals, invoices or billing events from usage records (docs/usage-records.md): Envoy's
    /// usage access log, or any JSON lines that carry a record under "record". Reads standard
    /// input when no FILE is given; constant memory in the number of records.
    Usage {
        /// Group totals by these, comma-separated: identity, tier, model, day, month.
        #[arg(long, value_name = "DIMS", default_value = "identity,model,month")]
        by: String,
        /// table, csv or json.
        #[arg(long, value_name = "FORMAT", default_value = "table")]
        format: String,
        /// Print invoice lines per identity for this month (YYYY-MM, UTC) instead of totals.
        #[arg(long, value_name = "YYYY-MM")]
        invoice: Option<String>,
        /// Invoice: multiply a tier's cost by FACTOR (TIER=FACTOR; repeat).
        #[arg(long, value_name = "TIER=FACTOR")]
        markup: Vec<String>,
        /// Invoice: add this many USD per served request.
        #[arg(long, value_name = "USD", default_value_t = 0.0)]
        per_request_usd: f64,
        /// Print each record as a billing event instead: `cloudevents` (JSON lines, as OpenMeter ingests).
        #[arg(long, value_name = "FORMAT")]
        events: Option<String>,
        /// The CloudEvents `source`.
        #[arg(long, value_name = "URI", default_value = "tollgate")]
        source: String,
        /// Record files (JSON lines).
        files: Vec<PathBuf>,
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
        Command::Usage { by, format, invoice, markup, per_request_usd, events, source, files } => {
            run_usage(UsageArgs { by, format, invoice, markup, per_request_usd, events, source, files })
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

struct UsageArgs {
    by: String,
    format: String,
    invoice: Option<String>,
    markup: Vec<String>,
    per_request_usd: f64,
    events: Option<String>,
    source: String,
    files: Vec<PathBuf>,
}

fn run_usage(a: UsageArgs) -> ExitCode {
    match usage_command(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage_command(a: UsageArgs) -> Result<(), String> {
    use std::io::{BufRead, BufReader, IsTerminal, Write};
    let format = usage::Format::parse(&a.format)?;
    let by = a.by.split(',').map(usage::Dim::parse).collect::<Result<Vec<_>, _>>()?;
    let mut inputs: Vec<(String, Box<dyn BufRead>)> = Vec::new();
    if a.files.is_empty() {
        inputs.push(("standard input".into(), Box::new(BufReader::new(std::io::stdin()))));
    }
    for f in &a.files {
        let file = std::fs::File::open(f).map_err(|e| format!("{}: cannot read: {e}", f.display()))?;
        inputs.push((f.display().to_string(), Box::new(BufReader::with_capacity(1 << 16, file))));
    }
    // A progress line on a terminal only (stderr), every 100 000 lines.
    let every = if std::io::stderr().is_terminal() { 100_000 } else { 0 };
    let mut progress = std::io::stderr();
    // Several files read as one stream.
    let mut chained: Box<dyn BufRead> = Box::new(std::io::empty());
    for (_, input) in inputs {
        chained = Box::new(std::io::Read::chain(chained, input));
    }
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let io = |e: std::io::Error| e.to_string();
    let read = if let Some(kind) = &a.events {
        if kind != "cloudevents" {
            return Err(format!("unknown event format {kind:?}: use cloudevents"));
        }
        let mut failed = None;
        let read = usage::read_records(
            &mut chained,
            |r, line| {
                if failed.is_none() {
                    if let Err(e) = writeln!(out, "{}", usage::cloud_event(r, line, &a.source)) {
                        failed = Some(e);
                    }
                }
            },
            &mut progress,
            every,
        )
        .map_err(io)?;
        if let Some(e) = failed {
            return Err(e.to_string());
        }
        read
    } else if let Some(month) = &a.invoice {
        if jiff::civil::Date::strptime("%Y-%m-%d", format!("{month}-01")).is_err() || month.len() != 7 {
            return Err(format!("--invoice {month:?}: expected YYYY-MM"));
        }
        let mut pricing = usage::Pricing { per_request_micro_usd: usd_micros(a.per_request_usd)?, ..Default::default() };
        for m in &a.markup {
            let (tier, factor) = m.split_once('=').ok_or_else(|| format!("--markup {m:?}: expected TIER=FACTOR"))?;
            let factor: f64 = factor.trim().parse().ok().filter(|f: &f64| f.is_finite() && *f >= 0.0).ok_or_else(|| format!("--markup {m:?}: the factor must be a number ≥ 0"))?;
            pricing.markup.insert(tier.trim().to_owned(), factor);
        }
        let (text, read) = usage::invoice(&mut chained, month, &pricing, format, &mut progress, every).map_err(io)?;
        out.write_all(text.as_bytes()).map_err(io)?;
        read
    } else {
        let (groups, read) = usage::summarize(&mut chained, &by, &|_| true, &mut progress, every).map_err(io)?;
        out.write_all(usage::render(&groups, &by, format).as_bytes()).map_err(io)?;
        read
    };
    out.flush().map_err(io)?;
    if read.skipped > 0 {
        eprintln!("{} records; {} lines without a record skipped", read.records, read.skipped);
    }
    Ok(())
}

fn usd_micros(usd: f64) -> Result<u64, String> {
    if !usd.is_finite() || !(0.0..=1e9).contains(&usd) {
        return Err(format!("--per-request-usd {usd}: must be between 0 and 1e9"));
    }
    Ok((usd * 1e6).round() as u64)
}
