//! Integration tests: weights. Random weights for the graphs the real builder makes from
//! `models/tiny.toml`, stored as single-file and sharded safetensors checkpoints and bound back to
//! the graph, plus the extra tensors a DeepSeek checkpoint carries that kiln must tolerate; and the
//! golden checkpoint (f32 safetensors) bound without copies: its parameters are views into the
//! file's mapping, and a compiled model running on them computes exactly what one running on copies
//! computes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_compiler::build::{build_graph, build_layer};
use kiln_compiler::spec::load;
use kiln_ir::{DType, Graph};
use kiln_runtime::artifact;
use kiln_runtime::cpu::{CpuModel, CpuOptions};
use kiln_runtime::generate::{generate, GenerateOptions, Sampling};
use kiln_runtime::weights::{
    bf16_to_f32, bind, bind_mapped, bind_params, f32_to_bf16, graph_params, manifest_params, open_checkpoint,
    random_params, write_safetensors, HostData, HostTensor, Param, StoreFloats, WeightError,
};

use crate::util::{kiln, root, Scratch};

const GOLDEN: &str = "tests/goldens/v3_tiny_yarn";

fn tiny() -> kiln_ir::ModelSpec {
    load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny.toml")).unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("kiln-it-weights-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn by_name(ts: &[HostTensor]) -> BTreeMap<&str, &HostTensor> {
    ts.iter().map(|t| (t.name.as_str(), t)).collect()
}

fn tiny_graph_and_weights() -> (Graph, Vec<HostTensor>) {
    let g = build_graph(&tiny()).unwrap();
    let w = random_params(&g, 2024, 0.02).unwrap();
    (g, w)
}

#[test]
fn random_tiny_weights_round_trip_through_a_checkpoint() {
    let (g, weights) = tiny_graph_and_weights();
    assert_eq!(weights.len(), g.params().len(), "the builder shares nodes, so each name appears once");
    let dir = TempDir::new("f32");
    write_safetensors(&dir.0.join("model.safetensors"), &weights, StoreFloats::F32).unwrap();
    let ckpt = open_checkpoint(&dir.0).unwrap();
    assert_eq!(ckpt.len(), weights.len());
    assert_eq!(bind(&g, &ckpt).unwrap(), weights);
}

#[test]
fn bf16_storage_binds_as_rounded_values() {
    let (g, weights) = tiny_graph_and_weights();
    let dir = TempDir::new("bf16");
    write_safetensors(&dir.0.join("model.safetensors"), &weights, StoreFloats::BF16).unwrap();
    let bound = bind(&g, &open_checkpoint(&dir.0).unwrap()).unwrap();
    for (b, w) in bound.iter().zip(&weights) {
        // The graph's params are f32: the bf16 values convert exactly and keep the param's dtype.
        assert_eq!((b.name.as_str(), b.dtype), (w.name.as_str(), DType::F32));
        let (HostData::F32(b), HostData::F32(w)) = (&b.data, &w.data) else { panic!("float params") };
        assert!(b.iter().zip(w).all(|(&b, &w)| b == bf16_to_f32(f32_to_bf16(w))));
    }
}

#[test]
fn sharded_tiny_checkpoint_binds() {
    let (g, weights) = tiny_graph_and_weights();
    let dir = TempDir::new("sharded");
    // Main layers in one shard, embedding, head and MTP in the other, as HF's sharding splits by size.
    let (layers, rest): (Vec<HostTensor>, Vec<HostTensor>) = weights
        .iter()
        .cloned()
        .partition(|t| t.name.starts_with("model.layers.") && !t.name.starts_with("model.layers.4."));
    let mut map = BTreeMap::new();
    for (file, part) in
        [("model-00001-of-00002.safetensors", &layers), ("model-00002-of-00002.safetensors", &rest)]
    {
        write_safetensors(&dir.0.join(file), part, StoreFloats::F32).unwrap();
        map.extend(part.iter().map(|t| (t.name.clone(), file.to_string())));
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.0.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let ckpt = open_checkpoint(&dir.0).unwrap();
    assert_eq!(ckpt.files().len(), 2);
    assert_eq!(bind(&g, &ckpt).unwrap(), weights);
}

#[test]
fn random_weights_depend_on_the_param_name_not_the_graph() {
    let spec = tiny();
    let (_, whole) = tiny_graph_and_weights();
    let whole = by_name(&whole);
    // Layer 2 alone (a MoE layer) and the MTP layer alone get exactly the whole model's values.
    for layer in [2, 4] {
        let part = random_params(&build_layer(&spec, layer).unwrap(), 2024, 0.02).unwrap();
        for t in &part {
            assert_eq!(&t, whole.get(t.name.as_str()).unwrap(), "{}", t.name);
        }
    }
    let other = random_params(&build_graph(&spec).unwrap(), 2025, 0.02).unwrap();
    let q = "model.layers.1.self_attn.q_a_proj.weight";
    assert_ne!(by_name(&other)[q], whole[q]);
    assert_eq!(whole["model.layers.1.self_attn.q_a_layernorm.weight"].data, HostData::F32(vec![1.0; 32]));
    assert_eq!(whole["model.layers.4.enorm.weight"].data, HostData::F32(vec![1.0; 64]));
}

#[test]
fn deepseek_extras_are_tolerated_and_nothing_else() {
    let (g, weights) = tiny_graph_and_weights();
    let w = by_name(&weights);
    let copy = |from: &str, to: &str| HostTensor { name: to.to_string(), ..w[from].clone() };
    // The tiny model has 4 layers; its MTP module is layer 4 and stores copies of the shared
    // embedding and head, as DeepSeek-V3's layer 61 does; old HF code also saved rotary buffers.
    let mut stored = weights.clone();
    stored.push(copy("model.embed_tokens.weight", "model.layers.4.embed_tokens.weight"));
    stored.push(copy("lm_head.weight", "model.layers.4.shared_head.head.weight"));
    stored.push(HostTensor {
        name: "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        dtype: DType::F32,
        shape: vec![4],
        data: HostData::F32(vec![1.0, 0.1, 0.01, 0.001]),
    });
    let dir = TempDir::new("extras");
    let path = dir.0.join("model.safetensors");
    write_safetensors(&path, &stored, StoreFloats::F32).unwrap();
    assert_eq!(bind(&g, &open_checkpoint(&dir.0).unwrap()).unwrap(), weights);

    // Layer 3 is a main layer: a copy there is unexplained.
    stored.push(copy("model.embed_tokens.weight", "model.layers.3.embed_tokens.weight"));
    write_safetensors(&path, &stored, StoreFloats::F32).unwrap();
    let e = bind(&g, &open_checkpoint(&dir.0).unwrap()).unwrap_err();
    assert!(
        matches!(&e, WeightError::Extra { count: 1, names } if names == &["model.layers.3.embed_tokens.weight"])
    );

    // Dropping a param's tensor is reported by name.
    let missing: Vec<HostTensor> =
        weights.iter().filter(|t| t.name != "model.norm.weight").cloned().collect();
    write_safetensors(&path, &missing, StoreFloats::F32).unwrap();
    let e = bind(&g, &open_checkpoint(&dir.0).unwrap()).unwrap_err();
    assert_eq!(e.to_string(), "the checkpoint lacks 1 tensor(s) the graph needs: `model.norm.weight`");
}

/// The KV-cache programs leave the MTP module out, so a whole one is skipped; one missing a tensor
/// names that tensor (it was taken for a layer of 65 stray tensors, each reported as unused).
#[test]
fn an_unused_mtp_module_is_skipped_whole_or_its_missing_tensor_named() {
    let (_, weights) = tiny_graph_and_weights();
    let prefill = kiln_compiler::build::build_cached(&tiny(), kiln_compiler::build::Phase::Prefill).unwrap();
    let dir = TempDir::new("mtp");
    let path = dir.0.join("model.safetensors");
    let bound = |stored: &[HostTensor]| {
        write_safetensors(&path, stored, StoreFloats::F32).unwrap();
        bind(&prefill, &open_checkpoint(&dir.0).unwrap())
    };
    let main = bound(&weights).unwrap();
    assert!(main.iter().all(|t| !t.name.starts_with("model.layers.4.")), "the MTP module is not bound");
    let without_mtp: Vec<HostTensor> =
        weights.iter().filter(|t| !t.name.starts_with("model.layers.4.")).cloned().collect();
    assert_eq!(bound(&without_mtp).unwrap(), main);
    for dropped in ["model.layers.4.eh_proj.weight", "model.layers.4.mlp.experts.3.up_proj.weight"] {
        let stored: Vec<HostTensor> = weights.iter().filter(|t| t.name != dropped).cloned().collect();
        let e = bound(&stored).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the checkpoint's MTP module `model.layers.4` lacks 1 tensor(s) it needs: `{dropped}`; the \
                 programs here do not run it, but a checkpoint missing part of a module is damaged: restore \
                 the tensor(s), or leave the whole module out"
            )
        );
    }
}

#[test]
fn the_golden_checkpoint_is_mapped_not_copied() {
    let golden = root().join(GOLDEN);
    let g = build_graph(&load(&golden.join("config.json")).unwrap()).unwrap();
    let decls = graph_params(&g).unwrap();
    assert!(decls.iter().all(|d| d.dtype == DType::F32), "the golden model is f32");
    let ckpt = open_checkpoint(&golden).unwrap();
    let copied: Vec<HostTensor> =
        bind_params(decls.clone(), &ckpt).unwrap().collect::<Result<_, _>>().unwrap();
    let mapped: Vec<Param> = bind_mapped(decls.clone(), &ckpt).unwrap().collect::<Result<_, _>>().unwrap();
    let file = ckpt.mappings()[0].address_range();
    let mut bytes = 0;
    for (m, c) in mapped.iter().zip(&copied) {
        let Param::Mapped(v) = m else { panic!("`{}` was copied, not mapped", m.name()) };
        let at = v.as_ptr() as usize;
        assert!(file.contains(&at) && at + v.len() <= file.end, "`{}` lies outside the mapping", v.name);
        assert_eq!(at % 4, 0, "`{}` is not aligned for f32", v.name);
        let values: Vec<f32> =
            v.bytes().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(
            (&v.name, v.dtype, &v.shape, HostData::F32(values)),
            (&c.name, c.dtype, &c.shape, c.data.clone())
        );
        bytes += v.len();
    }
    assert_eq!(bytes, decls.iter().map(|d| d.numel * 4).sum::<usize>());
}

/// The golden artifact on mapped and on copied parameters: the same logits, bit for bit, and
/// `kiln run` says what was mapped.
#[test]
fn a_model_on_mapped_weights_computes_what_one_on_copies_does() {
    let dir = Scratch::new();
    let art_dir = dir.str("golden");
    let config = format!("{GOLDEN}/config.json");
    let c = kiln(&["compile", &config, "--target", "cpu", "--max-context", "16", "-o", &art_dir]);
    assert!(c.ok, "{}", c.stderr);
    let art = artifact::load(&dir.path("golden")).unwrap();
    let decls = manifest_params(art.manifest()).unwrap();
    let declared: usize = decls.iter().map(|d| d.numel * d.dtype.size_bytes() as usize).sum();
    let one = CpuOptions { threads: 1, ..CpuOptions::default() };
    // Every token with its logit and probability: equal events mean equal logits where they were read.
    let events = |model: &mut CpuModel| {
        let mut seen = Vec::new();
        let opts = GenerateOptions { max_new_tokens: 4, sampling: Sampling::Greedy, stop_tokens: vec![] };
        generate(model, &[vec![0, 17, 42, 255, 3, 128, 77, 9, 200]], &opts, &mut |e| seen.push(*e)).unwrap();
        seen
    };
    let mapped = {
        let ckpt = open_checkpoint(&root().join(GOLDEN)).unwrap();
        let params = bind_mapped(decls.clone(), &ckpt).unwrap();
        CpuModel::load(&art, params, &one).unwrap()
        // The checkpoint is dropped here: the model's views keep the mapping alive.
    };
    let ckpt = open_checkpoint(&root().join(GOLDEN)).unwrap();
    let mut copied = CpuModel::load(&art, bind_params(decls, &ckpt).unwrap(), &one).unwrap();
    let mut mapped = mapped;
    assert_eq!((mapped.mapped_param_bytes(), copied.mapped_param_bytes()), (declared, 0));
    let (a, b) = (events(&mut mapped), events(&mut copied));
    // The transformers continuation of tests/goldens/v3_tiny_yarn/golden.json.
    assert_eq!(a.iter().map(|e| e.token).collect::<Vec<_>>(), [51, 10, 89, 138]);
    assert_eq!(a, b);

    let run =
        kiln(&["run", &art_dir, "--weights", GOLDEN, "--prompt-ids", "0,17,42", "--max-new-tokens", "1"]);
    assert!(run.ok, "{}", run.stderr);
    let report = format!("parameters {declared} bytes ({declared} mapped from the checkpoint, 0 converted)");
    assert!(run.stderr.contains(&report), "{}", run.stderr);
    let random =
        kiln(&["run", &art_dir, "--random-weights", "1", "--prompt-ids", "0,17,42", "--max-new-tokens", "1"]);
    assert!(random.ok, "{}", random.stderr);
    assert!(
        random.stderr.contains(&format!("(0 mapped from the checkpoint, {declared} converted)")),
        "{}",
        random.stderr
    );
}
