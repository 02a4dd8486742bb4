//! The crate layering that Cargo enforces, checked from `cargo metadata`: `ir` depends on no other kiln
//! crate, `runtime` never depends on `compiler` (nor links MLIR or LLVM), and only `compiler` pulls in
//! melior and inkwell.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Every package's full set of normal (non-dev) dependencies, transitively, by package name.
fn closures() -> BTreeMap<String, BTreeSet<String>> {
    // Filtered to the host platform: the layering is the same everywhere, and the unfiltered graph
    // would need every Windows-only crate downloaded.
    let host =
        if cfg!(target_arch = "aarch64") { "aarch64-unknown-linux-gnu" } else { "x86_64-unknown-linux-gnu" };
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--filter-platform", host, "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let mut names = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        names.insert(p["id"].as_str().unwrap().to_string(), p["name"].as_str().unwrap().to_string());
    }
    let mut direct: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null() || k["kind"] == "build")
            })
            .map(|d| names[d["pkg"].as_str().unwrap()].clone())
            .collect();
        direct.insert(names[node["id"].as_str().unwrap()].clone(), deps);
    }
    let mut closure = BTreeMap::new();
    for name in direct.keys() {
        let mut seen = BTreeSet::new();
        let mut work = direct[name].clone();
        while let Some(d) = work.pop() {
            if seen.insert(d.clone()) {
                work.extend(direct.get(&d).cloned().unwrap_or_default());
            }
        }
        closure.insert(name.clone(), seen);
    }
    closure
}

#[test]
fn crates_are_layered() {
    let c = closures();
    let deps = |k: &str| c.get(k).unwrap_or_else(|| panic!("package {k} missing from cargo metadata"));
    let ir = deps("kiln-ir");
    for forbidden in ["kiln-compiler", "kiln-runtime", "melior", "inkwell", "cudarc", "toml"] {
        assert!(!ir.contains(forbidden), "kiln-ir must not depend on {forbidden}");
    }
    let runtime = deps("kiln-runtime");
    for forbidden in ["kiln-compiler", "melior", "inkwell", "mlir-sys", "llvm-sys"] {
        assert!(!runtime.contains(forbidden), "kiln-runtime must not depend on {forbidden}");
    }
    assert!(runtime.contains("kiln-ir") && runtime.contains("cudarc"));
    let compiler = deps("kiln-compiler");
    assert!(compiler.contains("melior") && compiler.contains("inkwell") && compiler.contains("kiln-ir"));
    assert!(!compiler.contains("kiln-runtime"), "kiln-compiler must not depend on kiln-runtime");
    assert!(!compiler.contains("cudarc"), "only the runtime talks to CUDA");
}
