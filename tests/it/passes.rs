//! File-driven pass tests. Each `tests/passes/<pass>/*.kir` names its pass on a `// pass: NAME` header
//! line (and optionally a spec on `// spec: PATH`, default `models/tiny.toml`, and the program kind
//! on `// kind: KIND`, default `forward`: a decode program's launches are merged by `decode-phases`). The output of the pass
//! is snapshotted, together with whether it changed the graph; the interpreter-based equivalence
//! check joins these tests when the reference interpreter lands. `*.err.kir` files are negative
//! cases whose diagnostic is snapshotted.

use std::path::{Path, PathBuf};

use kiln_compiler::passes::{self, Options};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn header<'a>(src: &'a str, key: &str) -> Option<&'a str> {
    src.lines()
        .map_while(|l| l.strip_prefix("//"))
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

fn run_file(path: &Path) -> String {
    let rel = path.strip_prefix(root()).unwrap().display().to_string();
    let src = std::fs::read_to_string(path).unwrap();
    let pass_name = header(&src, "pass").unwrap_or_else(|| panic!("{rel}: no `// pass: NAME` header"));
    let spec_path = root().join(header(&src, "spec").unwrap_or("models/tiny.toml"));
    let spec = kiln_compiler::spec::load(&spec_path).unwrap();
    let pass = passes::find(pass_name).unwrap();
    let mut graph = match kiln_ir::text::parse_file(&rel, &src) {
        Ok(g) => g,
        Err(e) => return e.to_string(),
    };
    if let Err(e) = kiln_ir::verify::verify(&graph) {
        return e.to_string();
    }
    let kind = match header(&src, "kind") {
        None => kiln_ir::ProgramKind::Forward,
        Some(k) => kiln_ir::ProgramKind::from_name(k).unwrap_or_else(|| panic!("{rel}: unknown kind `{k}`")),
    };
    match passes::run_pass(&mut graph, pass, &Options::of_kind(&spec, kind)) {
        Ok(changed) => format!("// changed: {changed:?}\n{}", kiln_ir::print(&graph)),
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn pass_files() {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(root().join("tests/passes")).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    assert!(!dirs.is_empty());
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "kir")) {
            let out = run_file(file);
            let name = file.file_name().unwrap().to_string_lossy();
            let is_err = name.ends_with(".err.kir");
            assert_eq!(
                out.starts_with("error"),
                is_err,
                "{}: expected {}:\n{out}",
                file.display(),
                if is_err { "an error" } else { "success" }
            );
            let snap =
                format!("{}__{}", dir.file_name().unwrap().to_string_lossy(), name.trim_end_matches(".kir"));
            insta::with_settings!({ snapshot_suffix => snap, input_file => file, prepend_module_to_snapshot => false }, {
                insta::assert_snapshot!("pass", out);
            });
        }
    }
}
