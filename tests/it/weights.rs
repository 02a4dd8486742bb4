//! Integration tests: weights. Random weights for the graphs the real builder makes from
//! `models/tiny.toml`, stored as single-file and sharded safetensors checkpoints and bound back to
//! the graph, plus the extra tensors a DeepSeek checkpoint carries that kiln must tolerate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_compiler::build::{build_graph, build_layer};
use kiln_compiler::spec::load;
use kiln_ir::{DType, Graph};
use kiln_runtime::weights::{
    bf16_to_f32, bind, f32_to_bf16, open_checkpoint, random_params, write_safetensors, HostData, HostTensor,
    StoreFloats, WeightError,
};

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
