//! Using kiln as a library: load a model spec, build its graph, print one layer of IR, and run a
//! forward pass of the whole model with seeded random weights on the reference interpreter.
//!
//! ```sh
//! cargo run --example tiny_forward
//! ```

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use kiln_compiler::{build, spec};
use kiln_ir::interp::{self, Tensor};
use kiln_ir::DType;
use kiln_runtime::weights::{self, HostData};

fn main() -> Result<()> {
    let spec = spec::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny.toml")))?;
    let graph = build::build_graph(&spec)?;
    println!("{}: {} nodes, {} parameters", spec.model.name, graph.node_count(), graph.params().len());
    let layer = kiln_ir::print(&build::build_layer(&spec, 0)?);
    println!("{}", layer.lines().take(8).collect::<Vec<_>>().join("\n"));

    let mut params = HashMap::new();
    for t in weights::random_params(&graph, 42, 0.02)? {
        let tensor = match t.data {
            HostData::F32(v) => Tensor::from_f32(t.dtype, t.shape, v)?,
            HostData::I64(v) => Tensor::from_i64(t.dtype, t.shape, v)?,
        };
        params.insert(t.name, tensor);
    }
    let tokens = vec![1, 7, 42, 99];
    let t = tokens.len() as u64;
    // The MTP module reads the token after each position; the last one is unknown here.
    let next: Vec<i64> = tokens[1..].iter().copied().chain([0]).collect();
    let inputs = HashMap::from([
        ("tokens".to_string(), Tensor::from_i64(DType::I32, [1, t], tokens)?),
        ("positions".to_string(), Tensor::from_i64(DType::I32, [1, t], (0..t as i64).collect())?),
        ("mtp_tokens".to_string(), Tensor::from_i64(DType::I32, [1, t], next)?),
    ]);
    let out = interp::run(&graph, &inputs, &params)?;
    for (name, tensor) in &out {
        let v = tensor.as_f32().unwrap_or_default();
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        println!("{name}: shape {:?}, max {max:.4}", tensor.shape());
    }
    Ok(())
}
