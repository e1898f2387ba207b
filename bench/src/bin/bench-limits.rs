//! Times every [`tollgate_bench::limits::LIMITS_CASES`] case natively and under wasmtime 48 and
//! prints a markdown table (details on stderr); or, with `--keyspace`, measures the shared data
//! that many anonymous identities leave behind.
//!
//! ```text
//! bench-limits [--reps N] [--ms MS] [--wasm PATH] [--no-wasm] [--callgrind] [--only TEXT]
//! bench-limits --keyspace 1000000,2000000,5000000 [--step-ms MS]
//! ```
//! - `--reps N` (5), `--ms MS` (80), `--wasm PATH`, `--no-wasm`, `--only TEXT`: as
//!   `bench-translation`. Each case keeps one store and clock for all its runs (natively and,
//!   separately, inside the guest), so later runs see the records earlier ones left.
//! - `--callgrind`: native instructions per request, counted by `valgrind --tool=callgrind`
//!   inside `tollgate_bench::timed` only, as the difference of two runs (`--one`), so the
//!   untimed warm-up of the pool cancels out.
//! - `--keyspace N,N,…`: admits and settles that many distinct client-IP identities
//!   ([`tollgate_bench::limits::keyspace`]) one request each, `--step-ms` apart (default 1),
//!   and reports the store at each count.
//!
//! The clock is this thread's CPU time, as in `bench-translation`.

use tollgate_bench::runner::{calibrate, count, group, loadavg, median, ns, runs, thread_cpu_ns};
use std::path::{Path, PathBuf};
use std::process::Command;

use tollgate_bench::limits::keyspace::{self, Snapshot};
use tollgate_bench::limits::{LimitsBench, LimitsOp, LIMITS_CASES};
use wasmtime::{Engine, Instance, Linker, Module, Store, TypedFunc};

struct Args {
    reps: usize,
    ms: u64,
    wasm: Option<PathBuf>,
    callgrind: bool,
    only: Option<String>,
    keyspace: Option<Vec<u64>>,
    step_ms: u64,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bench-limits: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--one") {
        return one(&argv[1..]);
    }
    let args = parse_args(&argv)?;
    if let Some(counts) = &args.keyspace {
        return keyspace_report(counts, args.step_ms);
    }
    let clock = thread_cpu_ns;
    let mut guest = match &args.wasm {
        Some(path) => Some(Guest::load(path)?),
        None => None,
    };

    struct Cell {
        case: usize,
        native: LimitsBench,
        native_iters: u64,
        wasm_iters: u64,
        native_ns: Vec<f64>,
        wasm_ns: Vec<f64>,
        instructions: Option<f64>,
    }
    let mut cells = Vec::new();
    for (i, case) in LIMITS_CASES.iter().enumerate() {
        if args.only.as_ref().is_some_and(|o| !case.name.contains(o.as_str())) {
            continue;
        }
        let (native, said) = LimitsBench::prepare(case).map_err(|e| format!("{}: {e}", case.name))?;
        eprintln!("{:<70} {said}", case.name);
        if let Some(g) = guest.as_mut() {
            g.prepare(i)?;
        }
        cells.push(Cell { case: i, native, native_iters: 0, wasm_iters: 0, native_ns: vec![], wasm_ns: vec![], instructions: None });
    }

    let target_ns = args.ms * 1_000_000;
    for c in &mut cells {
        c.native_iters = calibrate(target_ns, |n| c.native.run(n, &clock))?;
        if let Some(g) = guest.as_mut() {
            c.wasm_iters = calibrate(target_ns, |n| g.run(c.case, n))?;
        }
    }
    let load_before = loadavg();
    for round in 0..args.reps {
        eprintln!("round {}/{}", round + 1, args.reps);
        for c in &mut cells {
            c.native_ns.push(c.native.run(c.native_iters, &clock)? as f64 / c.native_iters as f64);
            if let Some(g) = guest.as_mut() {
                c.wasm_ns.push(g.run(c.case, c.wasm_iters)? as f64 / c.wasm_iters as f64);
            }
        }
    }
    let load_after = loadavg();

    if args.callgrind {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        for c in &mut cells {
            eprintln!("callgrind: {}", LIMITS_CASES[c.case].name);
            c.instructions = Some(callgrind(&exe, c.case)?);
        }
    }

    eprintln!();
    for c in &cells {
        eprintln!("{:<70} native {:>7} iters: {}", LIMITS_CASES[c.case].name, c.native_iters, runs(&c.native_ns));
        if guest.is_some() {
            eprintln!("{:<70} wasm   {:>7} iters: {}", "", c.wasm_iters, runs(&c.wasm_ns));
        }
    }

    let baseline = cells.iter().find(|c| LIMITS_CASES[c.case].op == LimitsOp::Baseline);
    let (bn, bw) = baseline.map_or((None, None), |b| (median(&b.native_ns), median(&b.wasm_ns)));
    let na = |v: Option<f64>, f: fn(f64) -> String| v.map(f).unwrap_or_else(|| "–".to_owned());
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => format!("{:.1}", x / y),
        _ => "–".to_owned(),
    };
    println!(
        "| operation | native ns/request | wasmtime ns/request | wasmtime / native | × baseline parse native / wasmtime |{}",
        if args.callgrind { " native instructions/request |" } else { "" }
    );
    println!("|---|---:|---:|---:|---:|{}", if args.callgrind { "---:|" } else { "" });
    for c in &cells {
        let (n, w) = (median(&c.native_ns), median(&c.wasm_ns));
        let mut row = format!(
            "| {} | {} | {} | {} | {} / {} |",
            LIMITS_CASES[c.case].name,
            na(n, ns),
            na(w, ns),
            ratio(w, n),
            ratio(n, bn),
            ratio(w, bw)
        );
        if args.callgrind {
            row += &format!(" {} |", na(c.instructions, count));
        }
        println!("{row}");
    }
    eprintln!("load average (1 min): {load_before} before the timed rounds, {load_after} after");
    Ok(())
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args =
        Args { reps: 5, ms: 80, wasm: Some(default_wasm()), callgrind: false, only: None, keyspace: None, step_ms: 1 };
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--reps" => args.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--ms" => args.ms = value()?.parse().map_err(|e| format!("--ms: {e}"))?,
            "--wasm" => args.wasm = Some(PathBuf::from(value()?)),
            "--no-wasm" => args.wasm = None,
            "--callgrind" => args.callgrind = true,
            "--only" => args.only = Some(value()?),
            "--keyspace" => {
                let v = value()?;
                let counts = v
                    .split(',')
                    .map(|s| s.trim().replace('_', "").parse::<u64>().map_err(|e| format!("--keyspace {s}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                args.keyspace = Some(counts);
            }
            "--step-ms" => args.step_ms = value()?.parse().map_err(|e| format!("--step-ms: {e}"))?,
            _ => return Err(format!("unknown argument {a} (see the binary's docs)")),
        }
    }
    if args.reps == 0 {
        return Err("--reps must be at least 1".to_owned());
    }
    Ok(args)
}

fn default_wasm() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-unknown-unknown/wasm/tollgate_bench.wasm")
}

// ---------------------------------------------------------------------------------------------
// key space

fn keyspace_report(counts: &[u64], step_ms: u64) -> Result<(), String> {
    let slots = 65_536usize;
    let per_slot = 64usize;
    let (max_member, idle_member) = (keyspace::max_member_len(), keyspace::idle_member_len());
    let bound = |member: usize| slots * (keyspace::RECORD_HEADER_LEN + per_slot * member);
    eprintln!(
        "policy: client-IP identities, free tier requests/minute, requests/day, total_tokens/day, concurrent 2; \
         store.slots {slots}, members_per_slot {per_slot}; one request per identity, {step_ms} ms apart"
    );
    eprintln!(
        "max member {max_member} B (12 header + 3 counters × 15 + 2 leases × 16); idle member {idle_member} B; \
         bound {} B values (all leases held), {} B with no request in flight",
        bound(max_member),
        bound(idle_member)
    );
    let mut counts = counts.to_vec();
    counts.sort_unstable();
    counts.dedup();
    let snaps = keyspace::run(&counts, step_ms, &thread_cpu_ns, &mut |s| {
        eprintln!(
            "{} identities: {} keys, {} B values, {} members, max {} in a slot, {} evicted, {:.0} ns/request",
            s.identities, s.keys, s.value_bytes, s.members, s.max_members, s.evicted, s.ns_per_request
        )
    })?;
    println!(
        "| identities | keys | value bytes | key bytes | B/identity values | B/identity values + keys | members stored | largest slot (members) | largest value (B) | evicted | Envoy estimate (B) | native ns/request (admit + settle) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &snaps {
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
            group(s.identities),
            group(s.keys as u64),
            group(s.value_bytes as u64),
            group(s.key_bytes as u64),
            s.value_bytes as f64 / s.identities as f64,
            (s.value_bytes + s.key_bytes) as f64 / s.identities as f64,
            group(s.members),
            s.max_members,
            group(s.largest_value as u64),
            group(s.evicted),
            group(envoy_estimate(s) as u64),
            group(s.ns_per_request.round() as u64),
        );
    }
    println!();
    println!(
        "Bound: {slots} slots × (3 + {per_slot} × {max_member} B) = {} B values with every member holding {} leases; \
         {slots} × (3 + {per_slot} × {idle_member} B) = {} B with no request in flight; keys ≤ {slots} × {} B.",
        group(bound(max_member) as u64),
        keyspace::MAX_LEASES,
        group(bound(idle_member) as u64),
        "tg2:i:ffff".len()
    );
    Ok(())
}

/// Envoy's memory for these entries, estimated: proxy-wasm-cpp-host keeps shared data in a
/// `std::unordered_map<std::string, std::pair<std::string, uint32_t>>` per vm_id. Per entry:
/// a node of 96 B (libstdc++: next pointer 8 + key string 32 + value string 32 + cas 4 + padding
/// 4 + cached hash 8 = 88, rounded to a 96 B allocator class), one 8 B bucket pointer (load
/// factor ≤ 1), the key inline (≤ 15 chars: short-string optimisation), and the value's heap
/// buffer (length + 1, rounded up to 16 B).
fn envoy_estimate(s: &Snapshot) -> usize {
    let per_entry = 96 + 8;
    let avg_value = s.value_bytes.checked_div(s.keys).unwrap_or(0);
    s.keys * (per_entry + (avg_value + 1).div_ceil(16) * 16)
}









// ---------------------------------------------------------------------------------------------
// callgrind

/// `--one CASE ITERS`: one native run, nothing printed.
fn one(argv: &[String]) -> Result<(), String> {
    let [case, iters] = argv else {
        return Err("--one CASE ITERS".to_owned());
    };
    let case: usize = case.parse().map_err(|e| format!("case: {e}"))?;
    let iters: u64 = iters.parse().map_err(|e| format!("iters: {e}"))?;
    let case = LIMITS_CASES.get(case).ok_or("no such case")?;
    let (mut b, _) = LimitsBench::prepare(case)?;
    b.run(iters, &|| 0)?;
    Ok(())
}

/// Instructions per request inside `tollgate_bench::timed`: `hi` requests minus `lo`.
fn callgrind(exe: &Path, case: usize) -> Result<f64, String> {
    let (lo, hi) = (16u64, 96u64);
    let count = |iters: u64| -> Result<u64, String> {
        let out = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null", "--toggle-collect=tollgate_bench::timed*"])
            .arg(exe)
            .args(["--one", &case.to_string(), &iters.to_string()])
            .output()
            .map_err(|e| format!("valgrind: {e}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("valgrind failed: {err}"));
        }
        err.lines()
            .find_map(|l| l.split_once("Collected :").map(|(_, n)| n.trim().replace(',', "")))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no instruction count in callgrind's output: {err}"))
    };
    let (a, b) = (count(lo)?, count(hi)?);
    Ok(b.saturating_sub(a) as f64 / (hi - lo) as f64)
}

// ---------------------------------------------------------------------------------------------
// wasmtime

struct Guest {
    store: Store<()>,
    prepare: TypedFunc<u32, i64>,
    run: TypedFunc<(u32, u64), i64>,
}

impl Guest {
    fn load(path: &Path) -> Result<Guest, String> {
        let wasm = std::fs::read(path)
            .map_err(|e| format!("{}: {e} (build it with scripts/bench-limits.sh)", path.display()))?;
        let engine = Engine::default();
        let module = Module::new(&engine, &wasm).map_err(|e| format!("compile {}: {e:#}", path.display()))?;
        let mut linker: Linker<()> = Linker::new(&engine);
        linker.func_wrap("tollgate_bench", "now_ns", thread_cpu_ns).map_err(|e| e.to_string())?;
        let mut store = Store::new(&engine, ());
        let instance: Instance = linker.instantiate(&mut store, &module).map_err(|e| format!("instantiate: {e:#}"))?;
        let prepare = instance
            .get_typed_func(&mut store, "limits_prepare")
            .map_err(|e| format!("{e} (a guest built before bench-limits existed? rebuild it)"))?;
        let run = instance.get_typed_func(&mut store, "limits_run").map_err(|e| e.to_string())?;
        Ok(Guest { store, prepare, run })
    }

    fn prepare(&mut self, case: usize) -> Result<(), String> {
        let r = self.prepare.call(&mut self.store, case as u32).map_err(|e| format!("limits_prepare: {e:#}"))?;
        if r < 0 {
            return Err(format!("{}: the guest cannot prepare it ({r})", LIMITS_CASES[case].name));
        }
        Ok(())
    }

    fn run(&mut self, case: usize, iters: u64) -> Result<u64, String> {
        let ns = self
            .run
            .call(&mut self.store, (case as u32, iters))
            .map_err(|e| format!("{} in wasm: {e:#}", LIMITS_CASES[case].name))?;
        u64::try_from(ns).map_err(|_| format!("{} in wasm: limits_run returned {ns}", LIMITS_CASES[case].name))
    }
}
