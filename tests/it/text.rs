//! Integration tests of the text IR (`.kir`), driven by the files in `tests/kir/`: every file in `bad/`
//! must fail to read as `kiln check` reads it (UTF-8, parse, verifier), at a line and column, with
//! the diagnostics snapshotted together in `bad_kir_diagnostics`; every file in `good/` is in
//! canonical form and must print back byte for byte.

use std::fmt::Write;
use std::path::Path;

use kiln_ir::text::{parse, parse_file, print, read_file};

/// `(path relative to the repository, bytes)` of every `.kir` file in `dir`, sorted by name.
fn kir_files(dir: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(root.join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("readable directory entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".kir"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no .kir files in {dir}");
    names
        .into_iter()
        .map(|name| {
            let rel = format!("{dir}/{name}");
            let src = std::fs::read(root.join(&rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
            (rel, src)
        })
        .collect()
}

#[test]
fn bad_kir_files_are_diagnosed() {
    let mut rendered = String::new();
    let mut parsed = Vec::new();
    for (name, src) in kir_files("tests/kir/bad") {
        match read_file(&name, &src) {
            Ok(_) => parsed.push(name),
            Err(d) => {
                assert_eq!(d.file, name);
                assert!(d.line >= 1 && d.col >= 1, "{name}: {d:?}");
                writeln!(rendered, "{d}\n").unwrap();
            }
        }
    }
    assert!(parsed.is_empty(), "these files should not be accepted: {parsed:?}");
    insta::assert_snapshot!("bad_kir_diagnostics", rendered);
}

#[test]
fn good_kir_files_print_back_unchanged() {
    for (name, bytes) in kir_files("tests/kir/good") {
        let src = String::from_utf8(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let g = parse_file(&name, &src).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(print(&g), src, "{name} is not in printed form");
        assert_eq!(g.to_string(), src, "{name}: Display differs from print");
        let again = parse(&print(&g)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(again == g, "{name}: re-parsing the printed graph changed it");
    }
}
