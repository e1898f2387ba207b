//! Core's modules import each other in one direction only: no cycles between top-level
//! modules (`config` does not import back from its sections, the fault classification is a
//! leaf, provider kinds and routes do not import each other both ways …). Read from the
//! sources: every `crate::<module>` outside comments and test modules is an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// module → the modules it uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_owned();
        if matches!(module.as_str(), "lib" | "test_support") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // The test module (by convention the file's last item) is not part of the layering;
        // items marked `#[cfg(test)]` elsewhere are read like any other code.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let uses = edges.entry(module.clone()).or_default();
        for line in code.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let name: String = line[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != module {
                    uses.insert(name);
                }
            }
        }
    }
    edges
}

#[test]
fn core_modules_have_no_import_cycles() {
    let edges = graph();
    assert!(edges.len() > 20, "{edges:?}");
    // Depth-first search for a back edge; report the cycle.
    fn visit(m: &str, edges: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        if let Some(cycle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
    // The leaves the layering rests on import nothing of core's.
    for leaf in ["error", "fault", "headers", "usage", "duration"] {
        let uses: Vec<&String> = edges[leaf].iter().filter(|m| !matches!(m.as_str(), "render")).collect();
        assert!(uses.is_empty(), "{leaf} imports {uses:?}");
    }
}
