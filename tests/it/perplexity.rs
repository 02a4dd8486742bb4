//! `kiln perplexity` and the `score` program against Hugging Face transformers' own next-token loss
//! (`model(input_ids, labels=input_ids).loss`, `tests/goldens/perplexity`, made by
//! `tools/goldens/make_perplexity.py` on `kiln export-hf models/tiny.toml --random-weights 3`):
//! compiled on the CPU, and on the reference interpreter from the spec and from the artifact; both
//! data formats; and every bad data file refused with its reason.
//!
//! Measured (printed with `--nocapture`): the compiled mean loss is within 1e-7 relative of
//! transformers', the per-token losses within 2e-6 absolute. Asserted: 1e-5 relative for the mean
//! (the bound) and 1e-4 absolute per token.

use std::path::Path;

use kiln_runtime::artifact;
use kiln_runtime::cpu::{CpuModel, CpuOptions};
use kiln_runtime::data::{self, TokenFormat};
use kiln_runtime::score::score;
use kiln_runtime::weights;

use crate::util::{kiln, Scratch};

const GOLDEN: &str = "tests/goldens/perplexity";

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{GOLDEN}/golden.json")).unwrap()).unwrap()
}

/// `kiln perplexity ... --json`, parsed.
fn perplexity(args: &[&str]) -> serde_json::Value {
    let out = kiln(&[&["perplexity"], args, &["--random-weights", "3", "--json"]].concat());
    assert!(out.ok, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[track_caller]
fn close(what: &str, got: f64, want: f64) {
    let rel = (got - want).abs() / want.abs();
    eprintln!("{what}: mean loss {got} vs transformers {want} (relative {rel:e})");
    assert!(rel <= 1e-5, "{what}: {got} vs {want} ({rel:e} relative)");
}

#[test]
fn perplexity_matches_transformers_compiled_and_interpreted() {
    let g = golden();
    let (rows_loss, stream_loss) =
        (g["rows"]["mean_loss"].as_f64().unwrap(), g["stream"]["mean_loss"].as_f64().unwrap());
    let s = Scratch::new();
    let dir = s.str("tiny");
    let out = kiln(&[
        "compile",
        "models/tiny.toml",
        "--target",
        "cpu",
        "-o",
        &dir,
        "--max-batch",
        "2",
        "--max-context",
        "32",
    ]);
    assert!(out.ok, "{}", out.stderr);
    let rows = format!("{GOLDEN}/tokens.safetensors");
    let stream = format!("{GOLDEN}/tokens_u16.bin");

    let compiled = perplexity(&[&dir, "--data", &rows, "--batch", "2"]);
    close("compiled, rows", compiled["mean_loss"].as_f64().unwrap(), rows_loss);
    assert_eq!(compiled["tokens"], 96);
    assert_eq!(compiled["sequences"], 3);
    let ppl = compiled["perplexity"].as_f64().unwrap();
    assert!((ppl - rows_loss.exp()).abs() / ppl < 1e-5, "{ppl}");
    for (got, want) in
        compiled["row_loss"].as_array().unwrap().iter().zip(g["rows"]["row_mean_loss"].as_array().unwrap())
    {
        close("compiled, one row", got.as_f64().unwrap(), want.as_f64().unwrap());
    }
    // One row at a time gives the same mean.
    let one = perplexity(&[&dir, "--data", &rows]);
    close("compiled, batch 1", one["mean_loss"].as_f64().unwrap(), rows_loss);

    let stream_args = ["--data", &stream, "--dtype", "u16", "--seq-len", "16"];
    let compiled = perplexity(&[&[dir.as_str()], &stream_args[..]].concat());
    close("compiled, u16 stream", compiled["mean_loss"].as_f64().unwrap(), stream_loss);
    assert_eq!((compiled["tokens"].as_u64(), compiled["dropped"].as_u64()), (Some(96), Some(3)));

    let spec = perplexity(&["models/tiny.toml", "--interp", "--data", &rows]);
    close("interpreter on the spec, rows", spec["mean_loss"].as_f64().unwrap(), rows_loss);
    let on_artifact = perplexity(&[&dir, "--interp", "--data", &rows, "--batch", "3"]);
    close("interpreter on module.kir, rows", on_artifact["mean_loss"].as_f64().unwrap(), rows_loss);
    assert_eq!(on_artifact["engine"], "reference interpreter on module.kir");

    // Token by token, through the library: the score program's losses are transformers'.
    let art = artifact::load(Path::new(&dir)).unwrap();
    let params = weights::random_tensors(weights::manifest_params(art.manifest()).unwrap(), 3, 0.02);
    let mut model = CpuModel::load(&art, params.map(Ok), &CpuOptions::default()).unwrap();
    let tokens = data::load_tokens(Path::new(&rows), &TokenFormat::Safetensors).unwrap();
    let got = score(&mut model, &tokens, 2).unwrap();
    let want = weights::open_checkpoint(&Path::new(GOLDEN).join("golden.safetensors"))
        .unwrap()
        .read("token_loss")
        .unwrap();
    let kiln_runtime::weights::HostData::F32(want) = want.data else { panic!("token_loss is f32") };
    assert_eq!(got.token_loss.len(), want.len());
    let worst = got.token_loss.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("per-token loss: max abs diff vs transformers {worst:e}");
    assert!(worst <= 1e-4, "{worst:e}");
}

#[test]
fn bad_data_is_refused_with_its_reason() {
    let s = Scratch::new();
    let dir = s.str("tiny");
    let out = kiln(&["compile", "models/tiny.toml", "--target", "cpu", "-o", &dir, "--max-context", "16"]);
    assert!(out.ok, "{}", out.stderr);
    let refused = |data: &str, extra: &[&str], want: &str| {
        let out =
            kiln(&[&["perplexity", dir.as_str(), "--random-weights", "1", "--data", data], extra].concat());
        assert!(!out.ok && out.stderr.contains(want), "want `{want}`:\n{}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        assert_eq!(out.stdout, "");
    };
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(s.path(name), bytes).unwrap();
        s.str(name)
    };
    // A float tensor, ids out of the vocabulary, rows longer than the compiled context, an empty
    // file, a stream without its element type, an odd number of bytes.
    let floats = s.path("floats.safetensors");
    let t = |name: &str, dtype, shape: Vec<u64>, data| kiln_runtime::weights::HostTensor {
        name: name.into(),
        dtype,
        shape,
        data,
    };
    weights::write_safetensors(
        &floats,
        &[t("tokens", kiln_ir::DType::F32, vec![1, 4], kiln_runtime::weights::HostData::F32(vec![1.0; 4]))],
        weights::StoreFloats::AsDeclared,
    )
    .unwrap();
    refused(&floats.to_string_lossy(), &[], "tensor `tokens` is F32; token ids must be one of");
    let ids: Vec<u8> = [5u16, 700, 3, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let big = write("big.bin", &ids);
    refused(
        &big,
        &["--dtype", "u16", "--seq-len", "3"],
        "row 0, position 1: token 700 is outside the vocabulary 0..512",
    );
    let long: Vec<u8> = (0..40u16).flat_map(|v| v.to_le_bytes()).collect();
    let long = write("long.bin", &long);
    refused(&long, &["--dtype", "u16", "--seq-len", "20"], "rows have T = 20 new tokens but");
    refused(&write("empty.bin", &[]), &["--dtype", "u16", "--seq-len", "4"], "the file is empty");
    refused(&big, &[], "needs --dtype u16|u32 and --seq-len N");
    refused(
        &write("odd.bin", &[1, 2, 3]),
        &["--dtype", "u16", "--seq-len", "1"],
        "3 bytes is not a whole number of u16 tokens",
    );
    refused(&big, &["--dtype", "u8", "--seq-len", "3"], "--dtype u8: use u16 or u32");
    // An artifact compiled without its score program says how to get one.
    let plain = s.str("plain");
    assert!(kiln(&["compile", "models/tiny.toml", "--target", "cpu", "-o", &plain, "--no-score"]).ok);
    let out = kiln(&[
        "perplexity",
        &plain,
        "--random-weights",
        "1",
        "--data",
        &format!("{GOLDEN}/tokens.safetensors"),
    ]);
    assert!(!out.ok && out.stderr.contains("has no `score` program"), "{}", out.stderr);
}
