//! What kiln writes and what it refuses to overwrite (issue 16's data-loss reproducers): `-o FILE`
//! writes only a new path or a regular file, a command never writes over its own input, `compile -o
//! DIR` replaces only an artifact (and refuses before compiling), and the temporaries of a killed
//! compile are removed by the next one. Each refusal leaves the path exactly as it was.

use std::path::Path;
use std::process::Command;

use crate::util::{kiln, kiln_env, Scratch};

const SMALL: &str = "tests/compile/small.kir";

/// What is at `path`, for "left as it was": its type, and a regular file's contents.
fn state(path: &Path) -> String {
    let meta = std::fs::symlink_metadata(path).unwrap();
    let t = meta.file_type();
    if t.is_symlink() {
        format!("link to {}", std::fs::read_link(path).unwrap().display())
    } else if t.is_file() {
        format!("file {:?}", std::fs::read_to_string(path).unwrap())
    } else if t.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        format!("dir {names:?}")
    } else {
        format!("special {:?}", t)
    }
}

#[track_caller]
fn refused(args: &[&str], path: &Path, want: &str) {
    let before = state(path);
    let out = kiln(args);
    assert!(!out.ok, "{args:?} succeeded: {}", out.stdout);
    assert!(out.stderr.starts_with("error: ") && out.stderr.contains(want), "want `{want}`:\n{}", out.stderr);
    assert_eq!(state(path), before, "{} was changed", path.display());
}

#[test]
fn minus_o_writes_only_a_new_path_or_a_regular_file() {
    let s = Scratch::new();
    let fifo = s.path("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    refused(
        &["ir", "models/tiny.toml", "-o", &s.str("fifo")],
        &fifo,
        "is a FIFO (named pipe), not a regular file",
    );
    // A device node, as `mknod x c 1 3` makes it: only root may make one.
    let dev = s.path("x");
    if Command::new("mknod").arg(&dev).args(["c", "1", "3"]).status().is_ok_and(|s| s.success()) {
        refused(
            &["ir", "models/tiny.toml", "-o", &s.str("x")],
            &dev,
            "is a character device, not a regular file",
        );
    } else {
        eprintln!("mknod needs root here: the device-node case is covered by /dev/null's check in kiln-ir");
    }
    std::fs::create_dir(s.path("dir")).unwrap();
    refused(
        &["ir", "models/tiny.toml", "-o", &s.str("dir")],
        &s.path("dir"),
        "is a directory, not a regular file",
    );
    std::fs::write(s.path("target.kir"), "kept").unwrap();
    std::os::unix::fs::symlink("target.kir", s.path("link.kir")).unwrap();
    refused(
        &["import-hf", "tests/fixtures/hf/deepseek_v3_config.json", "-o", &s.str("link.kir")],
        &s.path("link.kir"),
        "is a symbolic link to `target.kir`, not a regular file",
    );
    assert_eq!(std::fs::read_to_string(s.path("target.kir")).unwrap(), "kept");

    // A regular file is replaced, a new path created, and nothing else is left behind.
    let out = kiln(&["ir", "models/tiny.toml", "-o", &s.str("target.kir")]);
    assert!(out.ok, "{}", out.stderr);
    assert!(std::fs::read_to_string(s.path("target.kir")).unwrap().starts_with("graph @tiny {"));
    let out = kiln(&["ir", "models/tiny.toml", "-o", &s.str("new.kir")]);
    assert!(out.ok, "{}", out.stderr);
    let mut want = vec!["dir", "fifo", "link.kir", "new.kir", "target.kir"];
    if dev.symlink_metadata().is_ok() {
        want.push("x");
    }
    assert_eq!(s.entries(), want);
}

#[test]
fn a_command_never_writes_over_its_own_input() {
    let s = Scratch::new();
    std::fs::copy("models/tiny.toml", s.path("x.toml")).unwrap();
    std::fs::copy("tests/fixtures/hf/deepseek_v3_config.json", s.path("c.json")).unwrap();
    let x = s.str("x.toml");
    refused(
        &["ir", &x, "-o", &x],
        &s.path("x.toml"),
        &format!("{x} is the input {x}: writing the output there"),
    );
    // The same file by another spelling.
    let dotted = s.0.join(".").join("x.toml").to_string_lossy().into_owned();
    refused(&["ir", &x, "-o", &dotted], &s.path("x.toml"), "would destroy the input");
    let c = s.str("c.json");
    refused(&["import-hf", &c, "-o", &c], &s.path("c.json"), &format!("{c} is the input {c}"));
    // An artifact directory holding the graph it would be compiled from.
    let art = s.path("art");
    let out = kiln(&["compile", SMALL, "--target", "cpu", "-o", &s.str("art")]);
    assert!(out.ok, "{}", out.stderr);
    let kir = art.join("module.kir").to_string_lossy().into_owned();
    refused(&["compile", &kir, "--target", "cpu", "-o", &s.str("art")], &art, "holds the input");
}

/// A file of an input folder is that input too (the sweep of 2026-12-07 found each of these
/// replaced, rc 0): an artifact's manifest by `--dump-logits` (no kiln could load it after), a
/// checkpoint's config.json by `--trace` or by `kiln ir DIR -o`, a run's log by `kiln report -o`;
/// and `kiln train --out` may not be the model's own folder. A new file beside them is fine.
#[test]
fn a_file_of_an_input_folder_is_not_overwritten() {
    let s = Scratch::new();
    let (art, ckpt) = (s.str("art"), s.str("ckpt"));
    let out = kiln(&["compile", "models/tiny.toml", "--target", "cpu", "--max-context", "16", "-o", &art]);
    assert!(out.ok, "{}", out.stderr);
    let out = kiln(&["export-hf", "models/tiny.toml", "--random-weights", "1", "-o", &ckpt]);
    assert!(out.ok, "{}", out.stderr);
    let manifest = s.path("art").join("manifest.json");
    let m = manifest.to_string_lossy().into_owned();
    let run = |flag: &str, path: &str| {
        let prompt = ["run", art.as_str(), "--random-weights", "1", "--prompt-ids", "1"];
        let mut args = prompt.to_vec();
        args.extend([flag, path]);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args = run("--dump-logits", &m);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&args, &manifest, &format!("{m} is a file of the input {art}: writing the output there"));
    let config = s.path("ckpt").join("config.json");
    let c = config.to_string_lossy().into_owned();
    refused(&["ir", &ckpt, "-o", &c], &config, &format!("{c} is a file of the input {ckpt}"));
    let run_dir = s.path("runs");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::write(run_dir.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 2.5}\n").unwrap();
    let log = run_dir.join("metrics.jsonl").to_string_lossy().into_owned();
    refused(&["report", &s.str("runs"), "-o", &log], &run_dir.join("metrics.jsonl"), "is the input");
    let data = s.str("tokens.bin");
    std::fs::write(&data, [0u8; 64]).unwrap();
    refused(
        &["train", &art, "--random-weights", "1", "--data", &data, "--steps", "1", "--out", &art],
        &s.path("art"),
        &format!("--out {art}: the run's folder would be the model {art} or inside it"),
    );
    // A new file in the artifact's folder overwrites nothing.
    let args = run("--dump-logits", &s.path("art").join("logits.txt").to_string_lossy());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kiln(&args);
    assert!(out.ok, "{}", out.stderr);
}

#[test]
fn compile_replaces_only_an_artifact_and_refuses_before_compiling() {
    let s = Scratch::new();
    let dir = s.path("d");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("manifest.json"), "{}\n").unwrap();
    std::fs::write(dir.join("precious.txt"), "x\n").unwrap();
    let d = s.str("d");
    let want = "d exists and is not a kiln artifact (its manifest.json has no `format_version`, so kiln did \
                not write it); refusing to replace it";
    refused(&["compile", "models/tiny.toml", "--target", "cpu", "-o", &d], &dir, want);
    // Before compiling: the first stage never ran, and a spec that cannot compile is not even read.
    let out = kiln(&["compile", "models/tiny.toml", "--target", "cpu", "--print-after", "build", "-o", &d]);
    assert!(!out.stderr.contains("after build"), "{}", out.stderr);
    let out = kiln(&["compile", "tests/specs/bad/zero_size.toml", "--target", "cpu", "-o", &d]);
    assert!(out.stderr.contains("is not a kiln artifact"), "{}", out.stderr);
    // A file where the directory would go.
    std::fs::write(s.path("f"), "mine").unwrap();
    refused(&["compile", SMALL, "--target", "cpu", "-o", &s.str("f")], &s.path("f"), "it is not a directory");
    assert_eq!(s.entries(), ["d", "f"]);
}

#[test]
fn the_temporaries_of_a_killed_compile_are_removed_by_the_next_one() {
    let s = Scratch::new();
    let tmp = s.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // What a compile killed with SIGKILL leaves: its half-written artifact beside the output and its
    // link directory in the temporary directory, both named after a process that no longer runs.
    let dead = 4_294_967_295u32;
    let live = std::process::id();
    for p in [
        s.path(&format!(".art.tmp-{dead}")),
        s.path(&format!(".art.tmp-{dead}-k3Xq9Z")),
        s.path(&format!(".art.tmp-{live}-running")),
        s.path(&format!(".other.tmp-{dead}")),
        tmp.join(format!("kiln-pack-{dead}-0")),
        tmp.join(format!("kiln-pack-{dead}-Yh2Bn8")),
        tmp.join(format!("kiln-pack-{live}-running")),
    ] {
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("kernels.so"), "half").unwrap();
    }
    let out = kiln_env(
        &["compile", SMALL, "--target", "cpu", "-o", &s.str("art")],
        &[("TMPDIR", tmp.to_str().unwrap())],
    );
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        s.entries(),
        [format!(".art.tmp-{live}-running"), format!(".other.tmp-{dead}"), "art".into(), "tmp".into()]
    );
    let mut left: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [format!("kiln-pack-{live}-running")], "the compile's own link directory is gone too");
}
