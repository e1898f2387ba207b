//! Times every [`tollgate_bench::CASES`] case natively and under wasmtime 48, translation and
//! `serde_json` baseline, and prints a markdown table (details on stderr).
//!
//! ```text
//! bench-translation [--reps N] [--ms MS] [--wasm PATH] [--no-wasm] [--callgrind] [--only TEXT]
//! ```
//! - `--reps N` (5): timed runs per cell; the table shows the median ns per unit.
//! - `--ms MS` (80): the length one run aims at (iterations are calibrated to it).
//! - `--wasm PATH`: the guest module, by default
//!   `target/wasm32-unknown-unknown/wasm/tollgate_bench.wasm` (built by
//!   `scripts/bench-translation.sh`).
//! - `--callgrind`: also count native instructions per unit with
//!   `valgrind --tool=callgrind`, collecting only inside `tollgate_bench::timed` (the timed
//!   part), in two runs of this binary per cell (`--one`) whose difference cancels the rest.
//! - `--one CASE MODE ITERS`: internal; runs one cell natively, once, for callgrind.
//!
//! The clock, natively and the one the guest imports, is this thread's CPU time
//! (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`), not wall time: on a shared 2-core machine the
//! benchmark is often descheduled, and time spent waiting for a core is not the code's cost.
//! (What it does not remove — caches and branch predictors disturbed by the other processes —
//! is why the median of several runs is shown, and why `--callgrind` exists.) Runs are
//! interleaved (every cell of round 1, then of round 2, …) so a burst of load spreads over
//! cells instead of landing on one.

use tollgate_bench::runner::{calibrate, count, loadavg, median, ns, runs, thread_cpu_ns};
use std::path::{Path, PathBuf};
use std::process::Command;

use tollgate_bench::{prepare, Case, Input, Mode, Prepared, CASES};
use wasmtime::{Engine, Instance, Linker, Memory, Module, Store, TypedFunc};

struct Args {
    reps: usize,
    ms: u64,
    wasm: Option<PathBuf>,
    callgrind: bool,
    only: Option<String>,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bench-translation: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--one") {
        return one(&argv[1..]);
    }
    let args = parse_args(&argv)?;
    let fixtures = fixtures_dir()?;
    let clock = thread_cpu_ns;

    let mut guest = match &args.wasm {
        Some(path) => Some(Guest::load(path)?),
        None => None,
    };

    // Cells: (case, mode) with their input, native preparation and calibrated iterations.
    struct Cell {
        case: usize,
        mode: Mode,
        input: Vec<u8>,
        native: Prepared,
        native_iters: u64,
        wasm_iters: u64,
        native_ns: Vec<f64>,
        wasm_ns: Vec<f64>,
        instructions: Option<f64>,
    }
    let mut cells = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        if args.only.as_ref().is_some_and(|o| !case.name.contains(o.as_str())) {
            continue;
        }
        let input = read_input(&fixtures, case)?;
        for mode in [Mode::Translate, Mode::Baseline] {
            let (native, said) = prepare(case, mode, &input).map_err(|e| format!("{}: {e}", case.name))?;
            eprintln!("{:<50} {:<9} {said}", case.name, label(mode));
            cells.push(Cell {
                case: i,
                mode,
                input: input.clone(),
                native,
                native_iters: 0,
                wasm_iters: 0,
                native_ns: vec![],
                wasm_ns: vec![],
                instructions: None,
            });
        }
    }

    let target_ns = args.ms * 1_000_000;
    for c in &mut cells {
        c.native_iters = calibrate(target_ns, |n| c.native.run(n, &clock))?;
        if let Some(g) = guest.as_mut() {
            let units = g.units(c.case, c.mode, &c.input)?;
            if units != c.native.units {
                return Err(format!("{}: {} units in wasm, {} natively", CASES[c.case].name, units, c.native.units));
            }
            c.wasm_iters = calibrate(target_ns, |n| g.run(c.case, c.mode, &c.input, n))?;
        }
    }
    let load_before = loadavg();
    for round in 0..args.reps {
        eprintln!("round {}/{}", round + 1, args.reps);
        for c in &mut cells {
            let units = (c.native_iters * c.native.units) as f64;
            c.native_ns.push(c.native.run(c.native_iters, &clock)? as f64 / units);
            if let Some(g) = guest.as_mut() {
                let units = (c.wasm_iters * c.native.units) as f64;
                c.wasm_ns.push(g.run(c.case, c.mode, &c.input, c.wasm_iters)? as f64 / units);
            }
        }
    }
    let load_after = loadavg();

    if args.callgrind {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        for c in &mut cells {
            c.instructions = Some(callgrind(&exe, c.case, c.mode, c.native.units)?);
        }
    }

    // Details: every run, so the spread is visible.
    eprintln!();
    for c in &cells {
        eprintln!(
            "{:<50} {:<9} native {:>6} iters: {}",
            CASES[c.case].name,
            label(c.mode),
            c.native_iters,
            runs(&c.native_ns)
        );
        if guest.is_some() {
            eprintln!("{:<50} {:<9} wasm   {:>6} iters: {}", "", "", c.wasm_iters, runs(&c.wasm_ns));
        }
    }

    let na = |v: Option<f64>, f: fn(f64) -> String| v.map(f).unwrap_or_else(|| "–".to_owned());
    println!(
        "| operation | unit | native ns | wasmtime ns | baseline serde_json native ns | baseline wasmtime ns | ×baseline native / wasmtime |{}",
        if args.callgrind { " native instructions | baseline instructions |" } else { "" }
    );
    println!("|---|---|---:|---:|---:|---:|---:|{}", if args.callgrind { "---:|---:|" } else { "" });
    for pair in cells.chunks(2) {
        let [t, b] = pair else { continue };
        let case: &Case = &CASES[t.case];
        let (tn, tw, bn, bw) = (median(&t.native_ns), median(&t.wasm_ns), median(&b.native_ns), median(&b.wasm_ns));
        let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => format!("{:.1}", x / y),
            _ => "–".to_owned(),
        };
        let mut row = format!(
            "| {} | {} | {} | {} | {} | {} | {} / {} |",
            case.name,
            case.unit(),
            na(tn, ns),
            na(tw, ns),
            na(bn, ns),
            na(bw, ns),
            ratio(tn, bn),
            ratio(tw, bw),
        );
        if args.callgrind {
            row += &format!(" {} | {} |", na(t.instructions, count), na(b.instructions, count));
        }
        println!("{row}");
    }
    eprintln!("load average (1 min): {load_before} before the timed rounds, {load_after} after");
    Ok(())
}

fn label(mode: Mode) -> &'static str {
    match mode {
        Mode::Translate => "translate",
        Mode::Baseline => "baseline",
    }
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args { reps: 5, ms: 80, wasm: Some(default_wasm()), callgrind: false, only: None };
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
            _ => return Err(format!("unknown argument {a} (see the binary's docs)")),
        }
    }
    if args.reps == 0 {
        return Err("--reps must be at least 1".to_owned());
    }
    Ok(args)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn default_wasm() -> PathBuf {
    workspace().join("target/wasm32-unknown-unknown/wasm/tollgate_bench.wasm")
}

/// `$TOLLGATE_FIXTURES`, else `../shared/fixtures` beside the repository (as core's tests).
fn fixtures_dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("TOLLGATE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => workspace().join("../shared/fixtures"),
    };
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(format!("fixtures directory {} is missing (set TOLLGATE_FIXTURES)", dir.display()))
    }
}

fn read_input(fixtures: &Path, case: &Case) -> Result<Vec<u8>, String> {
    match case.input {
        Input::ChatRequest => Ok(Vec::new()),
        Input::Fixture(rel) => {
            let p = fixtures.join(rel);
            std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
        }
    }
}









// ---------------------------------------------------------------------------------------------
// callgrind

/// `--one CASE MODE ITERS`: one native run, nothing printed.
fn one(argv: &[String]) -> Result<(), String> {
    let [case, mode, iters] = argv else {
        return Err("--one CASE MODE ITERS".to_owned());
    };
    let case: usize = case.parse().map_err(|e| format!("case: {e}"))?;
    let mode = mode.parse().ok().and_then(Mode::from_u32).ok_or("mode: 0 or 1")?;
    let iters: u64 = iters.parse().map_err(|e| format!("iters: {e}"))?;
    let case = CASES.get(case).ok_or("no such case")?;
    let input = read_input(&fixtures_dir()?, case)?;
    let (p, _) = prepare(case, mode, &input)?;
    p.run(iters, &|| 0)?;
    Ok(())
}

/// Instructions per unit: what callgrind counts inside [`tollgate_bench::timed`] (exactly the
/// timed part, without the untimed setup such as building exchanges) for `hi` iterations minus
/// for `lo`, per iteration and unit.
fn callgrind(exe: &Path, case: usize, mode: Mode, units: u64) -> Result<f64, String> {
    let (lo, hi) = (10u64, 60u64);
    let count = |iters: u64| -> Result<u64, String> {
        let out = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null", "--toggle-collect=tollgate_bench::timed*"])
            .arg(exe)
            .args(["--one", &case.to_string(), &mode.as_u32().to_string(), &iters.to_string()])
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
    Ok(b.saturating_sub(a) as f64 / ((hi - lo) * units) as f64)
}

// ---------------------------------------------------------------------------------------------
// wasmtime

/// The guest module, instantiated once; inputs are copied into its memory once per case.
struct Guest {
    store: Store<()>,
    memory: Memory,
    alloc: TypedFunc<u32, u32>,
    run: TypedFunc<(u32, u32, u32, u32, u64), i64>,
    units: TypedFunc<(u32, u32, u32, u32), i64>,
    /// The last input copied in: (bytes, guest pointer).
    placed: Option<(Vec<u8>, u32)>,
}

impl Guest {
    fn load(path: &Path) -> Result<Guest, String> {
        let wasm = std::fs::read(path)
            .map_err(|e| format!("{}: {e} (build it with scripts/bench-translation.sh)", path.display()))?;
        // The default engine, as host-tests' proxy-wasm host uses: Cranelift, optimised for speed.
        let engine = Engine::default();
        let module = Module::new(&engine, &wasm).map_err(|e| format!("compile {}: {e:#}", path.display()))?;
        let mut linker: Linker<()> = Linker::new(&engine);
        linker.func_wrap("tollgate_bench", "now_ns", thread_cpu_ns).map_err(|e| e.to_string())?;
        let mut store = Store::new(&engine, ());
        let instance: Instance = linker.instantiate(&mut store, &module).map_err(|e| format!("instantiate: {e:#}"))?;
        let memory = instance.get_memory(&mut store, "memory").ok_or("the guest exports no memory")?;
        let alloc = instance.get_typed_func(&mut store, "bench_alloc").map_err(|e| e.to_string())?;
        let run = instance.get_typed_func(&mut store, "bench_run").map_err(|e| e.to_string())?;
        let units = instance.get_typed_func(&mut store, "bench_units").map_err(|e| e.to_string())?;
        Ok(Guest { store, memory, alloc, run, units, placed: None })
    }

    fn place(&mut self, input: &[u8]) -> Result<(u32, u32), String> {
        if let Some((bytes, ptr)) = &self.placed {
            if bytes == input {
                return Ok((*ptr, input.len() as u32));
            }
        }
        let len = input.len() as u32;
        let ptr = self.alloc.call(&mut self.store, len.max(1)).map_err(|e| format!("bench_alloc: {e:#}"))?;
        self.memory.write(&mut self.store, ptr as usize, input).map_err(|e| e.to_string())?;
        self.placed = Some((input.to_vec(), ptr));
        Ok((ptr, len))
    }

    fn units(&mut self, case: usize, mode: Mode, input: &[u8]) -> Result<u64, String> {
        let (ptr, len) = self.place(input)?;
        let n = self
            .units
            .call(&mut self.store, (case as u32, mode.as_u32(), ptr, len))
            .map_err(|e| format!("bench_units: {e:#}"))?;
        u64::try_from(n).map_err(|_| format!("{}: the guest cannot prepare it", CASES[case].name))
    }

    fn run(&mut self, case: usize, mode: Mode, input: &[u8], iters: u64) -> Result<u64, String> {
        let (ptr, len) = self.place(input)?;
        let ns = self
            .run
            .call(&mut self.store, (case as u32, mode.as_u32(), ptr, len, iters))
            .map_err(|e| format!("{} in wasm: {e:#}", CASES[case].name))?;
        u64::try_from(ns).map_err(|_| format!("{} in wasm: bench_run returned {ns}", CASES[case].name))
    }
}
