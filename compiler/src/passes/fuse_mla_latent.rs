//! `fuse-mla-latent`: multi-head latent attention as DeepSeek runs it (reference §2.1-§2.3), from the
//! builder's naive form.
//!
//! Three rules:
//!
//! - [`MERGE_DOWN_PROJ`]: `q_a_proj(x)` and `kv_a_proj_with_mqa(x)` read the same normed hidden
//!   state; they become one GEMM over `concat(W_qa, W_kva)` (rows `q_lora_rank + kv_lora_rank +
//!   qk_rope_head_dim`) whose result is split back. The concatenation reads only weights: the
//!   runtime computes it once at load (see `kiln_runtime::cpu`), so a run reads `x` once and makes
//!   one launch instead of two.
//! - [`LATENT_CACHE`]: in a program with a KV cache, the naive per-head cache (`kv_cache.{i}.k`
//!   `[B, S, H, qk_nope + qk_rope]` and `kv_cache.{i}.v` `[B, S, H, v_head_dim]`, 40,960 elements per
//!   token and layer for DeepSeek-V3) becomes the latent one, `kv_cache.{i}` `[B, S, kv_lora_rank +
//!   qk_rope_head_dim]` (576): the normed `c_kv` and the roped shared key, from which every head's
//!   keys and values are a linear function.
//! - Attention over the cache in one of two forms, chosen per attention by [`absorb_is_cheaper`]
//!   and recorded on the attention as its typed attribute `mla = absorbed | naive` (which later passes
//!   read), and in its scope's suffix (`.absorbed` or `.naive`, for people and profiles):
//!   - [`ABSORB`] (decode): `W_UK` (the key half of `kv_b_proj`, per head `[qk_nope, r]`) is
//!     absorbed into the query, `q_lat = q_nope @ W_UK`, so scores are `q_lat . c_kv + q_pe . k_pe`
//!     over the latent cache (one key/value head shared by all heads); the weighted sum stays in the
//!     latent space and `W_UV` (the value half) is applied after it: `o = (p @ c_kv) @ W_UV^T`.
//!     This is DeepSeek's `attn_impl = "absorb"` (`model.py`, reference §2.3). The attention reads
//!     the whole cache row (`r + dr`) as its value and the rope part of the result is dropped, so no
//!     copy of the cache is made per step.
//!   - [`EXPAND`] (naive over the latent cache): every cached token's keys and values are expanded
//!     by `kv_b_proj` each step. Cheaper only when a step has about as many new tokens as context.
//!
//! Attention over the new tokens alone (the stateless graph, a prefill) is priced at
//! `T = S = max_position_embeddings`, where the naive form wins for every DeepSeek configuration, and
//! is then left as built and named `.naive`; were the absorbed form cheaper, it would run over the new
//! tokens' latent rows.
//!
//! The cost model counts multiply-adds of one attention layer for `T` new tokens over a context of
//! `S` (`H` heads, `dn`/`dr`/`dv` nope/rope/value head dims, `r` = kv_lora_rank):
//!
//! ```text
//! naive    = S*r*H*(dn + dv)            expand keys and values of every position
//!          + T*S*H*(dn + dr + dv)       scores and weighted sum
//! absorbed = T*H*r*(dn + dv)            absorb W_UK into the query, apply W_UV to the result
//!          + T*S*H*(r + dr + r + dr)    scores and weighted sum over latent + rope
//! ```
//!
//! A decode graph (attention with positions) is priced at `T = 1`, `S = max_position_embeddings`;
//! a prefill at `T = S`. For DeepSeek-V3, decode at S = 163,840: absorbed 2.4e10 vs naive 2.8e12
//! (at S = 4096: 6.2e8 vs 6.9e10); prefill at 4096: naive 7.6e11 vs absorbed 2.5e12 (per score the
//! absorbed form reads `2 (r + dr)` = 1152 values against `dn + dr + dv` = 320).
//!
//! Assumes a verified graph as `build_graph` / `build_cached` make it (after no other pass); any
//! attention that does not match that structure is left as it is. Guarantees the same results as
//! before up to f32 rounding (the absorbed form sums in another order: the interpreter's before and
//! after agree within 1e-5 relative on the tiny model). Constants come from the spec.
//!
//! Does not do: an FP8 latent cache, or merging the down-projections of an FP8 model (their
//! 128x128 scale grids would have to be concatenated with the weights; `insert-fp8-casts` keeps
//! them separate). An FP8 `kv_b_proj` used by the absorbed form is dequantised by `insert-fp8-casts`
//! and, being weight-only, computed once at load.

use kiln_ir::infer::infer;
use kiln_ir::op::Op;
use kiln_ir::spec::ModelSpec;
use kiln_ir::MlaForm;
use kiln_ir::{Dim, Graph, NodeId, TensorType, ValueId};

use super::rewrite::Trace;
use super::{Changed, Options, PassError};

const NAME: &str = "fuse-mla-latent";

/// `split(linear(x, concat(W_qa, W_kva)))` for `linear(x, W_qa)`, `linear(x, W_kva)`.
pub const MERGE_DOWN_PROJ: &str = "merge-down-proj";
/// The per-head naive KV cache becomes the latent cache.
pub const LATENT_CACHE: &str = "latent-cache";
/// Decode attention with `W_UK` absorbed into the query and `W_UV` applied after.
pub const ABSORB: &str = "absorb";
/// Attention over the latent cache with keys and values expanded per head.
pub const EXPAND: &str = "expand";

/// The rules of this pass, in the order the trace lists them.
pub const RULES: &[&str] = &[MERGE_DOWN_PROJ, LATENT_CACHE, ABSORB, EXPAND];

pub fn run(graph: &mut Graph, opts: &Options) -> Result<Changed, PassError> {
    Ok(rewrite(graph, opts)?.changed())
}

/// Multiply-adds of the naive and the absorbed form of one attention layer for `t` new tokens per
/// sequence over a context of `s` (see the module documentation).
pub fn attention_cost(spec: &ModelSpec, t: u64, s: u64) -> (f64, f64) {
    let a = &spec.attention;
    let (h, dn, dr, dv, r) = (
        a.num_heads as f64,
        a.qk_nope_head_dim as f64,
        a.qk_rope_head_dim as f64,
        a.v_head_dim as f64,
        a.kv_lora_rank as f64,
    );
    let (t, s) = (t as f64, s as f64);
    let naive = s * r * h * (dn + dv) + t * s * h * (dn + dr + dv);
    let absorbed = t * h * r * (dn + dv) + t * s * h * 2.0 * (r + dr);
    (naive, absorbed)
}

/// Whether the absorbed form is cheaper for `t` new tokens over a context of `s`.
pub fn absorb_is_cheaper(spec: &ModelSpec, t: u64, s: u64) -> bool {
    let (naive, absorbed) = attention_cost(spec, t, s);
    absorbed < naive
}

/// Runs the pass and reports which rules fired.
pub fn rewrite(graph: &mut Graph, opts: &Options) -> Result<Trace, PassError> {
    let mut trace = Trace::new(RULES);
    let spec = opts.spec;
    let mut dead_inputs = Vec::new();
    if spec.quantization.is_none() {
        merge_down_projections(graph, &mut trace)?;
    }
    for n in graph.nodes() {
        if !graph.contains_node(n) || !matches!(graph.node(n).op, Op::Attention { .. }) {
            continue;
        }
        if let Some(m) = Mla::find(graph, n) {
            m.rewrite(graph, spec, &mut trace)?;
            dead_inputs.extend(m.dead_inputs.into_inner());
        }
    }
    super::dce::run(graph, opts)?;
    for n in dead_inputs {
        graph.remove_node(n).map_err(|e| bug(e.to_string()))?;
    }
    Ok(trace)
}

fn bug(message: String) -> PassError {
    PassError::Precondition { pass: NAME, message }
}

/// Adds `op` on `inputs` with inferred result types.
fn add(g: &mut Graph, scope: &str, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>, PassError> {
    let tys: Vec<&TensorType> = inputs.iter().map(|&v| g.ty(v)).collect();
    let name = op.name();
    let types = infer(&op, &tys).map_err(|e| bug(format!("{scope}: `{name}`: {e}")))?;
    let (_, results) = g.add_node(op, inputs, types, Some(scope)).map_err(|e| bug(e.to_string()))?;
    Ok(results)
}

fn add1(g: &mut Graph, scope: &str, op: Op, inputs: &[ValueId]) -> Result<ValueId, PassError> {
    Ok(add(g, scope, op, inputs)?[0])
}

/// The node defining `v` and its op.
fn def(g: &Graph, v: ValueId) -> (NodeId, &Op) {
    let n = g.producer(v);
    (n, &g.node(n).op)
}

fn param_name(g: &Graph, v: ValueId) -> Option<&str> {
    match def(g, v).1 {
        Op::Param { name } => Some(name),
        _ => None,
    }
}

/// `linear(x, W_qa)` and `linear(x, W_kva)` of each attention, merged.
fn merge_down_projections(g: &mut Graph, trace: &mut Trace) -> Result<(), PassError> {
    let linears: Vec<(NodeId, ValueId, ValueId, String)> = g
        .nodes()
        .into_iter()
        .filter(|&n| matches!(g.node(n).op, Op::Linear))
        .filter_map(|n| {
            let node = g.node(n);
            let w = param_name(g, node.inputs[1])?.to_string();
            Some((n, node.inputs[0], node.inputs[1], w))
        })
        .collect();
    for (qa, x, wq, name) in &linears {
        let Some(prefix) = name.strip_suffix("q_a_proj.weight") else { continue };
        let kv_name = format!("{prefix}kv_a_proj_with_mqa.weight");
        let Some((kva, _, wkv, _)) = linears.iter().find(|(_, x2, _, n2)| x2 == x && *n2 == kv_name) else {
            continue;
        };
        let scope = g.node(*qa).scope.clone().unwrap_or_default();
        let (yq, ykv) = (g.node(*qa).results[0], g.node(*kva).results[0]);
        let rows = |v: ValueId| g.ty(v).shape.last().and_then(|d| d.as_known());
        let (Some(q_rows), Some(kv_rows)) = (rows(yq), rows(ykv)) else { continue };
        let w = add1(g, &scope, Op::Concat { axis: 0 }, &[*wq, *wkv])?;
        let y = add1(g, &scope, Op::Linear, &[*x, w])?;
        let axis = g.ty(y).rank() - 1;
        let parts = add(g, &scope, Op::Split { axis, sizes: vec![q_rows, kv_rows] }, &[y])?;
        for (old, new) in [(yq, parts[0]), (ykv, parts[1])] {
            g.replace_all_uses(old, new).map_err(|e| bug(e.to_string()))?;
        }
        trace.fire(MERGE_DOWN_PROJ);
    }
    Ok(())
}

/// One attention of the builder's naive MLA, matched (see `build/mla.rs`).
struct Mla {
    attention: NodeId,
    scope: String,
    scale: f64,
    /// `q_nope [B, T, H, dn]` and the roped `q_pe [B, T, H, dr]`.
    q_nope: ValueId,
    q_pe: ValueId,
    /// The normed latent `c_kv [B, T, r]` and the roped shared key `[B, T, 1, dr]`.
    c_kv: ValueId,
    k_pe: ValueId,
    /// `kv_b_proj.weight [H * (dn + dv), r]`.
    w_kv_b: ValueId,
    /// With a cache: the naive caches' `cache_update` nodes (keys, values) and the positions.
    cache: Option<(NodeId, NodeId, ValueId)>,
    /// Whether the attention reads the cache (decode) rather than the new tokens.
    over_cache: bool,
    /// The naive caches' input nodes, removed once nothing reads them.
    dead_inputs: std::cell::RefCell<Vec<NodeId>>,
}

impl Mla {
    fn find(g: &Graph, att: NodeId) -> Option<Mla> {
        let node = g.node(att);
        // An attention whose form is chosen already is left alone (the pass is idempotent).
        let Op::Attention { scale, causal: true, mla: None } = node.op else { return None };
        let (q, k, v) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let over_cache = node.inputs.len() == 4;
        // Keys and values, through their cache updates when the attention reads the cache.
        let (k_new, v_new, cache) = if over_cache {
            let (ku, kop) = def(g, k);
            let (vu, vop) = def(g, v);
            if !matches!(kop, Op::CacheUpdate) || !matches!(vop, Op::CacheUpdate) {
                return None;
            }
            let pos = g.node(ku).inputs[2];
            (g.node(ku).inputs[1], g.node(vu).inputs[1], Some((ku, vu, pos)))
        } else {
            let updates: Vec<NodeId> = [k, v]
                .iter()
                .filter_map(|&x| g.users(x).into_iter().find(|&u| matches!(g.node(u).op, Op::CacheUpdate)))
                .collect();
            let cache = match updates.as_slice() {
                [ku, vu] => Some((*ku, *vu, g.node(*ku).inputs[2])),
                _ => None,
            };
            (k, v, cache)
        };
        // q = concat(q_nope, q_pe); k = concat(k_nope, broadcast(k_pe)).
        let (Op::Concat { axis: 3 }, Op::Concat { axis: 3 }) = (def(g, q).1, def(g, k_new).1) else {
            return None;
        };
        let qn = g.node(g.producer(q));
        let kn = g.node(g.producer(k_new));
        let (q_nope, q_pe) = (qn.inputs[0], qn.inputs[1]);
        let (k_nope, k_pe_b) = (kn.inputs[0], kn.inputs[1]);
        let Op::Broadcast { .. } = def(g, k_pe_b).1 else { return None };
        let k_pe = g.node(g.producer(k_pe_b)).inputs[0];
        // k_nope, v = split(reshape(linear(c_kv, W_kv_b))).
        let (split, Op::Split { axis: 3, .. }) = def(g, k_nope) else { return None };
        if g.producer(v_new) != split {
            return None;
        }
        let (reshape, Op::Reshape { .. }) = def(g, g.node(split).inputs[0]) else { return None };
        let (lin, Op::Linear) = def(g, g.node(reshape).inputs[0]) else { return None };
        let (c_kv, w_kv_b) = (g.node(lin).inputs[0], g.node(lin).inputs[1]);
        param_name(g, w_kv_b)?;
        let scope = node.scope.clone().unwrap_or_default();
        Some(Mla {
            attention: att,
            scope,
            scale,
            q_nope,
            q_pe,
            c_kv,
            k_pe,
            w_kv_b,
            cache,
            over_cache,
            dead_inputs: Default::default(),
        })
    }

    fn rewrite(&self, g: &mut Graph, spec: &ModelSpec, trace: &mut Trace) -> Result<(), PassError> {
        let s = &self.scope;
        let att_out = g.node(self.attention).results[0];
        // The latent entry of each new token: [c_kv | k_pe] -> [B, T, r + dr] (dead, and removed,
        // when neither a cache nor the absorbed form reads it).
        let dr = g.ty(self.k_pe).shape[3];
        let k_pe_flat = add1(g, s, Op::Reshape { shape: vec![Dim::B, Dim::T, dr] }, &[self.k_pe])?;
        let latent = add1(g, s, Op::Concat { axis: 2 }, &[self.c_kv, k_pe_flat])?;
        let mut updated = None;
        if let Some((ku, vu, pos)) = self.cache {
            let no_input = || bug(format!("{s}: a cache is not a graph input"));
            let (k_name, v_name) =
                (input_name(g, ku).ok_or_else(no_input)?, input_name(g, vu).ok_or_else(no_input)?);
            // `kv_cache.{i}.k` -> `kv_cache.{i}`.
            let name = k_name.strip_suffix(".k").unwrap_or(&k_name).to_string();
            let mut cache_ty = g.ty(latent).clone();
            cache_ty.shape[1] = Dim::S;
            let (_, cache) = g
                .add_node(Op::Input { name: name.clone() }, &[], vec![cache_ty], None)
                .map_err(|e| bug(e.to_string()))?;
            let u = add1(g, s, Op::CacheUpdate, &[cache[0], latent, pos])?;
            for old in [&k_name, &v_name] {
                g.remove_output(old);
            }
            let old_inputs = [g.node(ku).inputs[0], g.node(vu).inputs[0]].map(|v| g.producer(v));
            self.dead_inputs.borrow_mut().extend(old_inputs);
            g.add_output(name, u).map_err(|e| bug(e.to_string()))?;
            trace.fire(LATENT_CACHE);
            updated = Some((u, pos));
        }
        // Decode: one new token over the longest context; otherwise (a prefill, the stateless
        // graph) as many new tokens as context.
        let context = spec.model.max_position_embeddings;
        let t = if self.over_cache { 1 } else { context };
        let absorb = absorb_is_cheaper(spec, t, context);
        let out = match (absorb, self.over_cache, updated) {
            (true, true, Some((u, pos))) => {
                trace.fire(ABSORB);
                let kv = self.one_head(g, u, Dim::S)?;
                self.absorbed(g, spec, kv, Some(pos))?
            }
            (true, false, _) => {
                trace.fire(ABSORB);
                let kv = self.one_head(g, latent, Dim::T)?;
                self.absorbed(g, spec, kv, None)?
            }
            (false, true, Some((u, pos))) => {
                trace.fire(EXPAND);
                self.expanded(g, spec, u, pos)?
            }
            // Attention over the new tokens, naive as built; say so.
            _ => return self.name_choice(g, MlaForm::Naive),
        };
        g.replace_all_uses(att_out, out).map_err(|e| bug(e.to_string()))?;
        Ok(())
    }

    /// `[B, N, r + dr]` latent rows as one key/value head `[B, N, 1, r + dr]`.
    fn one_head(&self, g: &mut Graph, rows: ValueId, n: Dim) -> Result<ValueId, PassError> {
        let width = g.ty(rows).shape[2];
        add1(g, &self.scope, Op::Reshape { shape: vec![Dim::B, n, Dim::known(1), width] }, &[rows])
    }

    /// Marks the attention with the form it has: its typed `mla` attribute, which later passes
    /// read, and its scope, for people reading the IR and profiles.
    fn name_choice(&self, g: &mut Graph, form: MlaForm) -> Result<(), PassError> {
        let node = g.node(self.attention);
        let (mut op, inputs, ty) = (node.op.clone(), node.inputs.clone(), g.ty(node.results[0]).clone());
        if let Op::Attention { mla, .. } = &mut op {
            *mla = Some(form);
        }
        let scope = format!("{}.{}", self.scope, form.name());
        let (_, r) = g.add_node(op, &inputs, vec![ty], Some(&scope)).map_err(|e| bug(e.to_string()))?;
        g.replace_all_uses(g.node(self.attention).results[0], r[0]).map_err(|e| bug(e.to_string()))
    }

    /// `W_kv_b` as `[H, dn + dv, r]`, split into `W_UK [H, dn, r]` and `W_UV [H, dv, r]`.
    fn halves(&self, g: &mut Graph, spec: &ModelSpec) -> Result<(ValueId, ValueId), PassError> {
        let a = &spec.attention;
        let (h, dn, dv, r) = (a.num_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank);
        let s = &self.scope;
        let shape = vec![Dim::known(h), Dim::known(dn + dv), Dim::known(r)];
        let w = add1(g, s, Op::Reshape { shape }, &[self.w_kv_b])?;
        let parts = add(g, s, Op::Split { axis: 1, sizes: vec![dn, dv] }, &[w])?;
        Ok((parts[0], parts[1]))
    }

    /// The absorbed attention of the queries over `kv` (latent rows as one head): the cache with
    /// `pos`, or the new tokens' own rows (causal over them) without.
    fn absorbed(
        &self,
        g: &mut Graph,
        spec: &ModelSpec,
        kv: ValueId,
        pos: Option<ValueId>,
    ) -> Result<ValueId, PassError> {
        let a = &spec.attention;
        let (h, dv, r) = (a.num_heads, a.v_head_dim, a.kv_lora_rank);
        let s = &format!("{}.absorbed", self.scope);
        let (w_uk, w_uv) = self.halves(g, spec)?;
        let perm = || Op::Transpose { perm: vec![0, 2, 1, 3] };
        // q_lat[b, t, h] = q_nope[b, t, h] @ W_UK[h]: [B, H, T, dn] @ [H, dn, r].
        let qn = add1(g, s, perm(), &[self.q_nope])?;
        let q_lat = add1(g, s, Op::MatMul, &[qn, w_uk])?;
        let q_lat = add1(g, s, perm(), &[q_lat])?;
        let q = add1(g, s, Op::Concat { axis: 3 }, &[q_lat, self.q_pe])?;
        // One key/value head: the latent row [c_kv | k_pe] is the key, and the value (whose rope
        // part of the result is dropped), so the cache is read in place.
        let width = g.ty(kv).shape[3];
        let attn = Op::Attention { scale: self.scale, causal: true, mla: Some(MlaForm::Absorbed) };
        let o = match pos {
            Some(pos) => add1(g, s, attn, &[q, kv, kv, pos])?,
            None => add1(g, s, attn, &[q, kv, kv])?,
        };
        let dr = width.as_known().unwrap_or(r) - r;
        let o_lat = add(g, s, Op::Split { axis: 3, sizes: vec![r, dr] }, &[o])?[0];
        // o[b, t, h] = o_lat[b, t, h] @ W_UV[h]^T: [B, H, T, r] @ [H, r, dv].
        let w_uv_t = add1(g, s, Op::Transpose { perm: vec![0, 2, 1] }, &[w_uv])?;
        let ol = add1(g, s, perm(), &[o_lat])?;
        let o = add1(g, s, Op::MatMul, &[ol, w_uv_t])?;
        let o = add1(g, s, perm(), &[o])?;
        debug_assert_eq!(g.ty(o).shape[2..], [Dim::known(h), Dim::known(dv)]);
        Ok(o)
    }

    fn expanded(
        &self,
        g: &mut Graph,
        spec: &ModelSpec,
        cache: ValueId,
        pos: ValueId,
    ) -> Result<ValueId, PassError> {
        let a = &spec.attention;
        let (h, dn, dr, dv, r) =
            (a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank);
        let s = &format!("{}.naive", self.scope);
        let parts = add(g, s, Op::Split { axis: 2, sizes: vec![r, dr] }, &[cache])?;
        let kv = add1(g, s, Op::Linear, &[parts[0], self.w_kv_b])?;
        let shape = vec![Dim::B, Dim::S, Dim::known(h), Dim::known(dn + dv)];
        let kv = add1(g, s, Op::Reshape { shape }, &[kv])?;
        let kv = add(g, s, Op::Split { axis: 3, sizes: vec![dn, dv] }, &[kv])?;
        let k_pe = add1(
            g,
            s,
            Op::Reshape { shape: vec![Dim::B, Dim::S, Dim::known(1), Dim::known(dr)] },
            &[parts[1]],
        )?;
        let shape = vec![Dim::B, Dim::S, Dim::known(h), Dim::known(dr)];
        let k_pe = add1(g, s, Op::Broadcast { shape }, &[k_pe])?;
        let k = add1(g, s, Op::Concat { axis: 3 }, &[kv[0], k_pe])?;
        let q = add1(g, s, Op::Concat { axis: 3 }, &[self.q_nope, self.q_pe])?;
        add1(
            g,
            s,
            Op::Attention { scale: self.scale, causal: true, mla: Some(MlaForm::Naive) },
            &[q, k, kv[1], pos],
        )
    }
}

/// The name of the graph input a `cache_update` updates.
fn input_name(g: &Graph, update: NodeId) -> Option<String> {
    match def(g, g.node(update).inputs[0]).1 {
        Op::Input { name } => Some(name.clone()),
        _ => None,
    }
}
