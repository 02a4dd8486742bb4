//! `kiln inspect`: a model's size and per-token cost, read off its forward graph.
//!
//! Everything is counted from the graph's nodes (param types, `linear`, `moe_experts` and `attention`
//! operands), not from closed formulas over the spec, so the numbers describe the graph kiln compiles.
//! Only the MLA latent width comes from the spec. Definitions:
//!
//! - **Parameters** (main model): elements of every param outside the MTP layers; embedding and head
//!   are included, each once (once in total when tied).
//! - **MTP parameters** (unique): params named `model.layers.{j}.*` with `j >= num_hidden_layers`; the
//!   shared embedding and head are not counted again.
//! - **Routed experts**: the expert weights of the main model's `moe_experts` ops.
//! - **Activated per token**: all parameters except the routed experts, plus `top_k / E` of them (the
//!   experts one token runs). Embedding and head included.
//! - **Forward FLOPs per token** at context `c` = `2 x activated matmul weights` (every `linear`
//!   weight, the router and head included, plus `top_k / E` of the routed expert weights; the
//!   embedding is a lookup and not counted) `+ 2 x H x c x (dqk + dv)` per layer (scores and the
//!   weighted sum of values for one token attending to `c` keys, naive MLA form). Norms, rope,
//!   softmax and activations are not counted. Main model only.
//! - **KV cache bytes per token**, main-model layers, in the model dtype: the naive MHA cache
//!   `L x H x (dqk + dv)` elements against MLA's latent cache `L x (kv_lora_rank + qk_rope_head_dim)`.

use std::fmt;

use kiln_ir::op::Op;
use kiln_ir::spec::ModelSpec;
use kiln_ir::{DType, Graph, TensorType};
use serde::Serialize;

/// A model's size and per-token cost. See the module documentation for the definitions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub model: String,
    pub dtype: DType,
    pub layers: Layers,
    /// Routed experts per MoE layer and how many each token runs; absent without MoE layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
    pub params: Params,
    pub flops: Flops,
    pub kv_cache: KvCache,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Layers {
    /// Main-model decoder layers.
    pub decoder: u64,
    pub dense: u64,
    pub moe: u64,
    /// MTP modules.
    pub mtp: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Routing {
    pub experts: u64,
    pub top_k: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Params {
    /// Main model, embedding and head included.
    pub total: u64,
    /// Routed-expert weights of the main model.
    pub routed_experts: u64,
    /// Per token: everything but the routed experts, plus `top_k / E` of them.
    pub activated: u64,
    /// MTP modules, without the shared embedding and head.
    pub mtp_unique: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flops {
    /// Keys each token attends to.
    pub context: u64,
    /// `2 x` activated matmul weights.
    pub matmul: u64,
    /// `2 x H x context x (dqk + dv)` summed over the layers.
    pub attention: u64,
    pub total: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KvCache {
    /// `L x (kv_lora_rank + qk_rope_head_dim)` elements.
    pub mla_bytes_per_token: u64,
    /// `L x H x (dqk + dv)` elements.
    pub naive_bytes_per_token: u64,
    /// `naive / mla`.
    pub ratio: f64,
    /// Elements per token and layer of the KV-cache inputs of the decode program, as built (the
    /// naive per-head cache) and after `fuse-mla-latent` (the latent cache): counted from the
    /// graphs, so they say what the compiled program really keeps.
    pub decode_graph_elements: Option<(u64, u64)>,
}

/// Elements per token and layer of a cached program's KV caches (the inputs its `cache_update`s
/// write, shaped `[B, S, ...]`): the product of their non-symbolic dimensions, over the layers.
pub fn cache_elements_per_token_layer(g: &Graph, layers: u64) -> u64 {
    let total: u64 = crate::pack::cache_states(g)
        .iter()
        .map(|s| s.ty.shape[2..].iter().filter_map(|d| d.as_known()).product::<u64>())
        .sum();
    total / layers.max(1)
}

/// [`cache_elements_per_token_layer`] of the decode program before and after `fuse-mla-latent`.
fn decode_cache_elements(spec: &ModelSpec) -> Option<(u64, u64)> {
    let mut g = crate::build::build_cached(spec, crate::build::Phase::Decode).ok()?;
    let layers = spec.model.num_hidden_layers;
    let before = cache_elements_per_token_layer(&g, layers);
    let pass = crate::passes::find("fuse-mla-latent").ok()?;
    let opts = crate::passes::Options::of_kind(spec, kiln_ir::ProgramKind::Decode);
    crate::passes::run_pass(&mut g, pass, &opts).ok()?;
    Some((before, cache_elements_per_token_layer(&g, layers)))
}

/// Which main-model or MTP layer a scope or param name belongs to (`model.layers.{i}...`).
fn layer_of(path: &str) -> Option<u64> {
    let rest = path.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

fn numel(t: &TensorType) -> u64 {
    t.known_numel().unwrap_or(0)
}

/// Counts the size and cost of `graph`, as [`crate::build::build_graph`] returns it for `spec`, for
/// one token attending to `context` keys.
pub fn summarize(spec: &ModelSpec, graph: &Graph, context: u64) -> Summary {
    let main_layers = spec.model.num_hidden_layers;
    let is_mtp = |path: Option<&str>| path.and_then(layer_of).is_some_and(|l| l >= main_layers);
    let mut layers = Layers { decoder: 0, dense: 0, moe: 0, mtp: 0 };
    let mut routing = None;
    let (mut total, mut mtp_unique, mut routed, mut routed_active) = (0u64, 0u64, 0u64, 0u64);
    let (mut linear_weights, mut attention, mut naive_elems) = (0u64, 0u64, 0u64);
    let dtype_bytes = spec.model.dtype.size_bytes();

    for n in graph.nodes() {
        let node = graph.node(n);
        let ty = |i: usize| graph.ty(node.inputs[i]);
        match &node.op {
            Op::Param { name } => {
                let size = numel(graph.ty(node.results[0]));
                if is_mtp(Some(name)) {
                    mtp_unique += size;
                } else {
                    total += size;
                }
            }
            _ if is_mtp(node.scope.as_deref()) => {
                if matches!(node.op, Op::Attention { .. }) {
                    layers.mtp += 1;
                }
            }
            Op::Linear => linear_weights += numel(ty(1)),
            Op::MoeExperts { num_experts } => {
                let weights: u64 = (3..node.inputs.len()).map(|i| numel(ty(i))).sum();
                let top_k = ty(1).shape.last().and_then(|d| d.as_known()).unwrap_or(0);
                routed += weights;
                // Every expert has the same shape, so top_k / E of the weights is exact.
                routed_active +=
                    (u128::from(weights) * u128::from(top_k) / u128::from((*num_experts).max(1))) as u64;
                layers.moe += 1;
                routing = Some(Routing { experts: *num_experts, top_k });
            }
            Op::Attention { .. } => {
                let (q, v) = (ty(0), ty(2));
                let known = |t: &TensorType, i: usize| t.shape.get(i).and_then(|d| d.as_known()).unwrap_or(0);
                let (heads, dqk, dv) = (known(q, 2), known(q, 3), known(v, 3));
                layers.decoder += 1;
                naive_elems += heads * (dqk + dv);
                attention =
                    attention.saturating_add(context.saturating_mul(dqk + dv).saturating_mul(2 * heads));
            }
            _ => {}
        }
    }
    layers.dense = layers.decoder.saturating_sub(layers.moe);

    let matmul = linear_weights.saturating_add(routed_active).saturating_mul(2);
    let latent =
        layers.decoder * (spec.attention.kv_lora_rank + spec.attention.qk_rope_head_dim) * dtype_bytes;
    let naive = naive_elems * dtype_bytes;
    Summary {
        model: spec.model.name.clone(),
        dtype: spec.model.dtype,
        layers,
        routing,
        params: Params {
            total,
            routed_experts: routed,
            activated: total.saturating_sub(routed).saturating_add(routed_active),
            mtp_unique,
        },
        flops: Flops { context, matmul, attention, total: matmul.saturating_add(attention) },
        kv_cache: KvCache {
            mla_bytes_per_token: latent,
            naive_bytes_per_token: naive,
            ratio: if latent == 0 { 0.0 } else { naive as f64 / latent as f64 },
            decode_graph_elements: decode_cache_elements(spec),
        },
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `n` with a decimal suffix and two decimals: `671.03B`, `926.68M`; `suffixes` from 10^3 up. Empty
/// below 1000, where the exact number says it all.
fn scaled(n: u64, suffixes: [&str; 4]) -> String {
    let x = n as f64;
    for (i, s) in suffixes.iter().enumerate().rev() {
        let unit = 1e3f64.powi(i as i32 + 1);
        if x >= unit {
            return format!("{:.2}{s}", x / unit);
        }
    }
    String::new()
}

/// A parameter count: `671.03B`.
fn count(n: u64) -> String {
    scaled(n, ["K", "M", "B", "T"])
}

/// A FLOP count: `93.95 GFLOP`.
fn flop(n: u64) -> String {
    let s = scaled(n, [" K", " M", " G", " T"]);
    if s.is_empty() {
        s
    } else {
        format!("{s}FLOP")
    }
}

/// A byte count in binary units: `68.62 KiB`; empty below 1 KiB.
fn bytes(n: u64) -> String {
    let x = n as f64;
    for (i, s) in ["KiB", "MiB", "GiB"].iter().enumerate().rev() {
        let unit = 1024f64.powi(i as i32 + 1);
        if x >= unit {
            return format!("{:.2} {s}", x / unit);
        }
    }
    String::new()
}

/// One line of the table: a section heading, or a label, an exact number, a short form and a note.
enum Row {
    Heading(String),
    Item { label: String, exact: String, short: String, note: String },
}

fn item(label: &str, exact: String, short: String, note: impl Into<String>) -> Row {
    Row::Item { label: label.to_string(), exact, short, note: note.into() }
}

impl Summary {
    fn rows(&self) -> Vec<Row> {
        let p = &self.params;
        let f = &self.flops;
        let kv = &self.kv_cache;
        let share = match &self.routing {
            Some(r) => format!("all but the routed experts, plus {}/{} of them", r.top_k, r.experts),
            None => "all parameters".to_string(),
        };
        let with_bytes = |n: u64| format!("{} B", thousands(n));
        let dtype_bytes = self.dtype.size_bytes();
        let mut rows = vec![
            Row::Heading("parameters".into()),
            item("main model", thousands(p.total), count(p.total), "embedding and head included"),
            item("  routed experts", thousands(p.routed_experts), count(p.routed_experts), ""),
            item(
                "  activated per token",
                thousands(p.activated),
                count(p.activated),
                format!("{share}; embedding and head included"),
            ),
            item(
                "MTP (unique)",
                thousands(p.mtp_unique),
                count(p.mtp_unique),
                "shared embedding and head not counted again",
            ),
            Row::Heading(format!("forward FLOPs per token at context {}", thousands(f.context))),
            item(
                "matmuls",
                thousands(f.matmul),
                flop(f.matmul),
                "2 x activated matmul weights (head included, embedding lookup excluded)",
            ),
            item(
                "attention",
                thousands(f.attention),
                flop(f.attention),
                "2 x H x context x (dqk + dv) per layer",
            ),
            item("total", thousands(f.total), flop(f.total), ""),
            Row::Heading(format!("KV cache per token ({}, {} layers)", self.dtype, self.layers.decoder)),
            item(
                "MLA latent",
                with_bytes(kv.mla_bytes_per_token),
                bytes(kv.mla_bytes_per_token),
                format!("L x (kv_lora_rank + qk_rope_head_dim) x {dtype_bytes} B"),
            ),
            item(
                "naive MHA",
                with_bytes(kv.naive_bytes_per_token),
                bytes(kv.naive_bytes_per_token),
                format!("L x H x (dqk + dv) x {dtype_bytes} B: {:.2}x the latent cache", kv.ratio),
            ),
        ];
        if let Some((before, after)) = kv.decode_graph_elements {
            rows.push(item(
                "decode program",
                format!("{} -> {}", thousands(before), thousands(after)),
                String::new(),
                "elements per token and layer of the cache inputs: as built -> after fuse-mla-latent",
            ));
        }
        rows
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.layers;
        write!(
            f,
            "{} ({}): {} decoder layers ({} dense, {} MoE)",
            self.model, self.dtype, l.decoder, l.dense, l.moe
        )?;
        if let Some(r) = &self.routing {
            write!(f, ", {} of {} routed experts per token", r.top_k, r.experts)?;
        }
        if l.mtp > 0 {
            write!(f, ", {} MTP layer{}", l.mtp, if l.mtp == 1 { "" } else { "s" })?;
        }
        writeln!(f)?;

        let rows = self.rows();
        let (mut lw, mut ew, mut sw) = (0, 0, 0);
        for r in &rows {
            if let Row::Item { label, exact, short, .. } = r {
                lw = lw.max(label.len());
                ew = ew.max(exact.len());
                sw = sw.max(short.len());
            }
        }
        for r in &rows {
            match r {
                Row::Heading(h) => write!(f, "\n{h}\n")?,
                Row::Item { label, exact, short, note } => {
                    let line = format!("  {label:<lw$}  {exact:>ew$}  {short:>sw$}  {note}");
                    writeln!(f, "{}", line.trim_end())?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_and_scaled() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(671_026_419_200), "671,026,419,200");
        assert_eq!(count(671_026_419_200), "671.03B");
        assert_eq!(count(926_679_040), "926.68M");
        assert_eq!(count(512), "");
        assert_eq!(flop(93_950_000_000), "93.95 GFLOP");
        assert_eq!(flop(12), "");
        assert_eq!(bytes(70_272), "68.62 KiB");
        assert_eq!(bytes(1000), "");
    }

    #[test]
    fn layer_indices_come_from_paths() {
        assert_eq!(layer_of("model.layers.61.shared_head.norm.weight"), Some(61));
        assert_eq!(layer_of("model.layers.3"), Some(3));
        assert_eq!(layer_of("model.norm.weight"), None);
        assert_eq!(layer_of("lm_head.weight"), None);
    }
}
