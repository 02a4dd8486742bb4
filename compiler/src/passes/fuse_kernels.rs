//! `fuse-kernels`: groups nodes into `fused` kernels by named rules, so that a forward pass makes
//! fewer launches and fewer intermediates reach memory.
//!
//! Each rule grows a group of nodes from a seed and keeps it only if codegen can lower it: one-pass
//! rules must classify as one of [`crate::codegen::fusion`]'s one-pass patterns (the check is that
//! module's own [`classify`]), phased rules must have a fusion plan. A group becomes one
//! `fused {name = "RULE"}` node whose body is the group (inputs `a0..`, outputs `r0..`, no scopes,
//! so the identical layers of a model share one kernel), scoped like the group's anchor; the name
//! says which rule made it (`fp8-gemm+gemm-swiglu` when several apply). The rules, in the order they
//! claim nodes (a node joins one group at most):
//!
//! ```text
//! latent-attention    absorb W_UK, attention over the cache, apply W_UV   phased; W_UK/W_UV <= 64 KiB
//! router              linear(x, gate) -> moe_route                       one kernel, phased
//! add-rms-norm        rms_norm(a + b, w), the sum a result too             one pass (row)
//! add-rms-norm-quant  the same, then quantize of the norm                 phased [row; quantize]
//! gemm-swiglu         silu(x @ gate^T) * (x @ up^T), linear or grouped      one pass
//! gemm-residual       x @ w^T + r (+ more elementwise)                    one pass
//! fp8-gemm            x @ dequantize(w8, s)^T with x = dequantize(q, sx)   one pass, FP8 loads
//! gemm-rope           rope(split(x @ w^T)), plain weights <= 64 KiB        phased [gemm; split; rope]
//! elementwise-chain   connected elementwise ops (and producers only it reads) one pass
//! decode-phases       a decode layer's remaining launches, in order        phased, small weights only
//! ```
//!
//! `fp8-gemm` is what keeps dequantised weights out of memory: the `dequantize` of a weight (and of
//! the GEMM's quantised input) is copied into the GEMM's kernel, which decodes FP8 codes and applies
//! the block scales as it loads them; the original `dequantize` disappears once nothing else
//! reads it. A GEMM group absorbs every elementwise consumer of its results that keeps it one pass
//! (casts, SwiGLU, residual adds), greedily in graph order.
//!
//! Assumes a verified graph, normally the end of the pipeline (after `dce`). Guarantees a verified
//! graph computing the same values: a fused body is its nodes as they were, so the interpreter gives
//! bit-identical results; every fused body lowers (one pass, or phased for `latent-attention`, `router`,
//! `add-rms-norm-quant` and `gemm-rope`, whose kernels run their phases one after another on one
//! CPU work item or one GPU block: legal and correct, slower than a one-pass kernel on big inputs).
//! Running it again changes nothing: fused nodes are not regrouped.
//!
//! Its work is linear in the graph (`tests/it/fuse.rs` counts it as layers and experts double):
//! every question about a candidate group is answered in the group's neighbourhood (`groups`:
//! producers and readers by table, convexity walks that stay between the members), and codegen's
//! analysis of a candidate body is made once per distinct body, so DeepSeek-V3's 58 identical MoE
//! layers are analysed as one.
//!
//! `latent-attention` takes the decode attention `fuse-mla-latent` marked `mla = absorbed` and the
//! nodes of its scope connected to it
//! (one that reads the cache at `positions`), except those that read only weights (the runtime
//! computes the per-head halves of `kv_b_proj` once at load, and the kernel reads them) and the
//! absorption GEMMs whose halves exceed [`SMALL_WEIGHT_BYTES`]: those keep GEMM kernels the threads
//! share, and the rule fuses the query's assembly, the attention and the split of its result.
//!
//! Does not do: reorder, recompute or duplicate anything but a GEMM operand's `dequantize`, or fuse
//! across `fused` nodes or a `cache_update` (which is a launch of its own, writing in place).

mod groups;

use std::collections::BTreeSet;

use kiln_ir::module::ProgramKind;
use kiln_ir::MlaForm;
use kiln_ir::{Graph, Op, UnaryOp, ValueId};
use rustc_hash::FxHashMap as HashMap;

use super::rewrite::Trace;
use super::{Changed, Options, PassError};
use crate::codegen::fusion::{is_elementwise, Pattern};
pub use groups::Work;
use groups::{Ctx, Group};

const NAME: &str = "fuse-kernels";

/// `route(x @ gate^T)`: the router's gate GEMM and its top-k selection, one launch.
pub const ROUTER: &str = "router";
/// `h = a + b; y = rms_norm(h, w)`: one pass over each row, writing `h` and `y`.
pub const ADD_RMS_NORM: &str = "add-rms-norm";
/// `add-rms-norm`, then `quantize(y)` in 1 x 128 tiles: the norm and the FP8 activation in one launch.
pub const ADD_RMS_NORM_QUANT: &str = "add-rms-norm-quant";
/// `silu(x @ g^T) * (x @ u^T)`: one load of `x` feeds both GEMMs; the product never leaves registers.
pub const GEMM_SWIGLU: &str = "gemm-swiglu";
/// `x @ w^T + r`: the residual add in the GEMM's store.
pub const GEMM_RESIDUAL: &str = "gemm-residual";
/// `x @ (w8 * s)^T` with FP8 `w8` and block scales `s` (and `x` likewise): decoded as loaded.
pub const FP8_GEMM: &str = "fp8-gemm";
/// `rope(split(x @ w^T))`: the projection and its rotary part in one launch.
pub const GEMM_ROPE: &str = "gemm-rope";
/// Connected elementwise ops evaluated per element in one pass.
pub const ELEMENTWISE_CHAIN: &str = "elementwise-chain";
/// Decode attention over the latent cache (`fuse-mla-latent`'s absorbed form): the query's
/// absorption of `W_UK`, scores over the latent and rope parts of the cache with an online softmax,
/// the weighted sum and `W_UV`, in one launch.
pub const LATENT_ATTENTION: &str = "latent-attention";
/// In a decode program, the remaining launches of a layer merged in order into phased kernels
/// (see [`SMALL_WEIGHT_BYTES`]).
pub const DECODE_PHASES: &str = "decode-phases";

/// The rules of this pass, in the order the trace lists them.
pub const RULES: &[&str] = &[
    LATENT_ATTENTION,
    ROUTER,
    ADD_RMS_NORM,
    ADD_RMS_NORM_QUANT,
    GEMM_SWIGLU,
    GEMM_RESIDUAL,
    FP8_GEMM,
    GEMM_ROPE,
    ELEMENTWISE_CHAIN,
    DECODE_PHASES,
];

pub fn run(graph: &mut Graph, opts: &Options) -> Result<Changed, PassError> {
    Ok(rewrite(graph, opts.kind)?.changed())
}

fn fail(message: String) -> PassError {
    PassError::Precondition { pass: NAME, message }
}

impl Ctx<'_> {
    /// Grows an elementwise `group` by the free elementwise producers of its operands that it
    /// alone reads and that read nothing computed after them from the group (a train step's
    /// `w * (1 - lr * wd)` and `v * beta2`, which come after the chain's seed in program order),
    /// as long as the group still lowers.
    fn grow_prologue(&self, group: &mut Group) {
        loop {
            let candidates: BTreeSet<usize> = (self.inputs(group).into_iter())
                .map(|v| self.producer(v))
                .filter(|&q| !group.nodes.contains(&q) && self.free(q) && is_elementwise(&self.node(q).op))
                .filter(|&q| !matches!(self.node(q).op, Op::Constant { .. } | Op::Reshape { .. }))
                .filter(|&q| {
                    (self.node(q).results.iter()).all(|&r| self.readers(r).all(|u| group.nodes.contains(&u)))
                })
                .collect();
            let mut grew = false;
            for q in candidates {
                if group.nodes.len() >= MAX_CHAIN_NODES {
                    return;
                }
                group.nodes.insert(q);
                if self.lowers(group) {
                    grew = true;
                } else {
                    group.nodes.remove(&q);
                }
            }
            if !grew {
                return;
            }
        }
    }

    /// Gives back the members of an elementwise `group` whose result would leave the kernel only
    /// to wait: read by nothing in the group and by no output, only by elementwise ops that also
    /// read a value computed after the rest of the group (so they cannot join it), and computed from
    /// values that outlive the kernel in any case. Kept, each such member's result would be held
    /// whole from this kernel to its readers'; given back, it is computed again inside its
    /// readers' kernel from the values it reads. A train step's AdamW reads its own copy of each
    /// gradient times `1 / M`, made from the sum written over its accumulator, and only after the
    /// global norm: taken into the kernel that makes the sum, every copy was held at once, the
    /// model's gradients over again in the arena.
    fn shed_waiting_results(&self, group: &mut Group) {
        let computed_later = |v: ValueId, after: usize| {
            let q = self.producer(v);
            q > after && !matches!(self.node(q).op, Op::Input { .. } | Op::Param { .. } | Op::Constant { .. })
        };
        loop {
            // The last of the other members (the member itself may come after what its readers
            // wait for: AdamW's copy is made after the norm it waits for).
            let last = |u: usize| group.nodes.iter().copied().filter(|&q| q != u).max().unwrap_or(0);
            let kept_anyway = |v: ValueId, u: usize| {
                !group.nodes.contains(&self.producer(v))
                    || self.is_output(v)
                    || self.readers(v).any(|w| w != u && !group.nodes.contains(&w))
            };
            let waiting = group.nodes.iter().copied().find(|&u| {
                let node = self.node(u);
                let [r] = node.results[..] else { return false };
                u != group.anchor
                    && !self.is_output(r)
                    && self.readers(r).next().is_some()
                    && self.readers(r).all(|w| {
                        !group.nodes.contains(&w)
                            && self.free(w)
                            && is_elementwise(&self.node(w).op)
                            && self.node(w).inputs.iter().any(|&z| z != r && computed_later(z, last(u)))
                    })
                    && node.inputs.iter().all(|&v| kept_anyway(v, u))
            });
            let Some(u) = waiting else { return };
            group.nodes.remove(&u);
            if !self.lowers(group) {
                group.nodes.insert(u);
                return;
            }
        }
    }

    /// Grows `group` by elementwise consumers of its results, in order, as long as `keep` accepts
    /// the pattern. Returns the members added. With `no_state`, a consumer that reads a state
    /// updated in place stays out: the memory plan updates a state in place only in an
    /// elementwise kernel, where each element is read before it is written (a GEMM's epilogue
    /// holding an optimizer's update, as fusion makes without gradient clipping, is not one).
    fn grow_epilogue(
        &self,
        group: &mut Group,
        keep: &dyn Fn(&Pattern) -> bool,
        no_state: bool,
        max_nodes: usize,
    ) -> Vec<usize> {
        let mut added = Vec::new();
        loop {
            if group.nodes.len() >= max_nodes {
                return added;
            }
            let candidates: BTreeSet<usize> = group
                .nodes
                .iter()
                .flat_map(|&p| self.node(p).results.iter().flat_map(|&r| self.readers(r)))
                .filter(|&u| !group.nodes.contains(&u) && self.free(u) && is_elementwise(&self.node(u).op))
                .filter(|&u| !matches!(self.node(u).op, Op::Constant { .. }))
                .filter(|&u| !(no_state && self.node(u).inputs.iter().any(|&v| self.is_updated(v))))
                .collect();
            let mut grew = false;
            for c in candidates {
                let mut trial = group.clone();
                trial.nodes.insert(c);
                if self.one_pass(&trial).is_some_and(|p| keep(&p)) {
                    *group = trial;
                    added.push(c);
                    grew = true;
                    break;
                }
            }
            if !grew {
                return added;
            }
        }
    }
}

/// Runs the pass and reports which rules fired.
pub fn rewrite(graph: &mut Graph, kind: ProgramKind) -> Result<Trace, PassError> {
    Ok(rewrite_counted(graph, kind)?.0)
}

/// [`rewrite`], also reporting the work it did.
pub fn rewrite_counted(graph: &mut Graph, kind: ProgramKind) -> Result<(Trace, Work), PassError> {
    let mut trace = Trace::new(RULES);
    let (rebuilt, mut work) = fuse(graph, &mut trace)?;
    if let Some(rebuilt) = rebuilt {
        *graph = rebuilt;
    }
    // Only a decode program (and the draft, which runs beside it) runs one or two tokens per
    // sequence, which is what makes phases cheap.
    if matches!(kind, ProgramKind::Decode | ProgramKind::Draft) {
        work += decode_phases(graph, &mut trace)?;
    }
    Ok((trace, work))
}

/// Every rule but `decode-phases`: the graph with its groups fused, unless none was found.
fn fuse(graph: &Graph, trace: &mut Trace) -> Result<(Option<Graph>, Work), PassError> {
    let mut cx = Ctx::new(graph);
    let mut groups: Vec<(Group, String)> = Vec::new();
    let mut claim = |cx: &mut Ctx, group: Group, rules: Vec<&'static str>, trace: &mut Trace| {
        cx.take(&group);
        for r in &rules {
            trace.fire(r);
        }
        groups.push((group, rules.join("+")));
    };
    let n = cx.len();

    // latent-attention: decode attention over the latent cache with its absorbed projections.
    let weight_only = weight_only(&cx);
    for p in 0..n {
        let node = cx.node(p);
        // The absorbed form, as `fuse-mla-latent` marked it, over the cache (with positions).
        let is_absorbed = matches!(node.op, Op::Attention { mla: Some(MlaForm::Absorbed), .. });
        if !is_absorbed || node.inputs.len() != 4 {
            continue;
        }
        // Every node connected to it that the pass made for it (the same scope as the attention),
        // but the weight-only ones (the runtime computes those once, at load).
        let scope = node.scope.clone();
        let absorbed = |q: usize| cx.node(q).scope == scope;
        let mut group = Group::of([p], p);
        let mut stack = vec![p];
        while let Some(q) = stack.pop() {
            let node = cx.node(q);
            let before = node.inputs.iter().map(|&v| cx.producer(v));
            let after = node.results.iter().flat_map(|&r| cx.users(r));
            for r in before.chain(after).collect::<Vec<_>>() {
                // A big absorption GEMM keeps a kernel of its own that the threads share.
                let big = matches!(cx.node(r).op, Op::MatMul)
                    && cx.node(r).inputs.iter().any(|&v| {
                        let t = cx.g.ty(v);
                        weight_only[cx.producer(v)]
                            && t.known_numel().unwrap_or(u64::MAX).saturating_mul(t.dtype.size_bytes())
                                > SMALL_WEIGHT_BYTES
                    });
                if absorbed(r) && cx.free(r) && !weight_only[r] && !big && group.nodes.insert(r) {
                    stack.push(r);
                }
            }
        }
        if cx.convex(&group) && cx.lowers(&group) {
            claim(&mut cx, group, vec![LATENT_ATTENTION], trace);
        }
    }

    // router: the gate GEMM and the route.
    for p in 0..n {
        if !matches!(cx.node(p).op, Op::MoeRoute(_)) {
            continue;
        }
        let gate = cx.producer(cx.node(p).inputs[0]);
        if !cx.free(gate)
            || !matches!(cx.node(gate).op, Op::Linear)
            || cx.users(cx.node(gate).results[0]) != [p]
        {
            continue;
        }
        let group = Group::of([gate, p], p);
        if cx.lowers(&group) {
            claim(&mut cx, group, vec![ROUTER], trace);
        }
    }

    // add-rms-norm(-quant): a norm and the elementwise ops computing its input.
    for p in 0..n {
        if !cx.free(p) || !matches!(cx.node(p).op, Op::RmsNorm { .. }) {
            continue;
        }
        let mut group = Group::of([p], p);
        let mut stack = vec![cx.node(p).inputs[0]];
        while let Some(v) = stack.pop() {
            let q = cx.producer(v);
            let op = &cx.node(q).op;
            if group.nodes.contains(&q)
                || !cx.free(q)
                || !is_elementwise(op)
                || matches!(op, Op::Constant { .. })
            {
                continue;
            }
            let mut trial = group.clone();
            trial.nodes.insert(q);
            if matches!(cx.one_pass(&trial), Some(Pattern::Row { .. })) {
                group = trial;
                stack.extend(cx.node(q).inputs.iter().copied());
            }
        }
        let has_add =
            group.nodes.iter().any(|&q| matches!(cx.node(q).op, Op::Binary(kiln_ir::BinaryOp::Add)));
        if !has_add {
            continue;
        }
        let quant = cx
            .users(cx.node(p).results[0])
            .into_iter()
            .find(|&u| cx.free(u) && matches!(cx.node(u).op, Op::Quantize { .. }));
        if let Some(u) = quant {
            let mut trial = group.clone();
            trial.nodes.insert(u);
            if cx.lowers(&trial) {
                claim(&mut cx, trial, vec![ADD_RMS_NORM_QUANT], trace);
                continue;
            }
        }
        claim(&mut cx, group, vec![ADD_RMS_NORM], trace);
    }

    // GEMMs with their operands' dequantize and their epilogue.
    for p in 0..n {
        if !cx.free(p) || !matches!(cx.node(p).op, Op::Linear | Op::GroupedLinear { .. }) {
            continue;
        }
        if let Some((group, rules)) = gemm_group(&cx, p) {
            claim(&mut cx, group, rules, trace);
        }
    }

    // elementwise-chain: what is left of connected elementwise ops.
    for p in 0..n {
        let op = &cx.node(p).op;
        if !cx.free(p) || !is_elementwise(op) || matches!(op, Op::Constant { .. } | Op::Reshape { .. }) {
            continue;
        }
        let mut group = Group::of([p], p);
        cx.grow_epilogue(&mut group, &|pat| *pat == Pattern::Elementwise, false, MAX_CHAIN_NODES);
        cx.grow_prologue(&mut group);
        cx.shed_waiting_results(&mut group);
        let computing = group.nodes.iter().filter(|&&q| !matches!(cx.node(q).op, Op::Reshape { .. })).count();
        if computing >= 2 {
            claim(&mut cx, group, vec![ELEMENTWISE_CHAIN], trace);
        }
    }

    let rebuilt = if groups.is_empty() { None } else { Some(rebuild(&cx, &groups)?) };
    Ok((rebuilt, cx.work()))
}

/// The most nodes an `elementwise-chain` kernel takes. A train step's global gradient norm is a
/// chain of one scalar add per parameter (933 of them on a 16-layer tiny model), and growing one
/// kernel over all of it, a node at a time with a convexity walk across the whole backward pass
/// each time, made fusion quadratic in the model's depth: a 32-layer tiny train step spent 4.4 s
/// in this rule, and DeepSeek-V3's train step ran out of memory. Capped, such a chain becomes
/// kernels of this many adds each, the same adds in the same order; the elementwise chains of a
/// forward pass are a handful of nodes long.
pub const MAX_CHAIN_NODES: usize = 64;

/// The largest weight (bytes) a GEMM may read inside a `decode-phases` kernel: one work item streams
/// it in about the time a launch costs; a bigger GEMM keeps a kernel of its own, whose work the
/// threads share.
pub const SMALL_WEIGHT_BYTES: u64 = 64 << 10;

/// `decode-phases`: in a decode program, the launches left in each decoder layer are merged, in
/// program order, into phased kernels, a group closing at a `cache_update` (a launch of its own), at
/// a GEMM whose weights exceed [`SMALL_WEIGHT_BYTES`], at the end of the layer, or where the group
/// would stop lowering. With one token per sequence every phase is small, so one work item running
/// them all costs less than the launches it replaces. Weight-only nodes stay out (the runtime
/// computes them at load), and so do reshapes of values from outside the group (views).
fn decode_phases(graph: &mut Graph, trace: &mut Trace) -> Result<Work, PassError> {
    let cx = Ctx::new(graph);
    let weight_only = weight_only(&cx);
    let layer = |p: usize| {
        let scope = cx.node(p).scope.as_deref()?;
        let rest = scope.strip_prefix("model.layers.")?;
        rest.split('.').next()?.parse::<u64>().ok()
    };
    let weight_bytes = |p: usize| -> u64 {
        (cx.node(p).inputs.iter())
            .filter(|&&v| {
                let q = cx.producer(v);
                weight_only[q] || matches!(cx.node(q).op, Op::Param { .. })
            })
            .map(|&v| {
                cx.g.ty(v).known_numel().unwrap_or(u64::MAX).saturating_mul(cx.g.ty(v).dtype.size_bytes())
            })
            .sum()
    };
    let joinable = |p: usize| {
        let op = &cx.node(p).op;
        !weight_only[p]
            && !matches!(
                op,
                Op::Input { .. }
                    | Op::Param { .. }
                    | Op::Constant { .. }
                    | Op::CacheUpdate
                    | Op::Send { .. }
                    | Op::Recv { .. }
                    | Op::AllReduce { .. }
                    | Op::AllGather { .. }
                    | Op::AllToAll { .. }
            )
            && layer(p).is_some()
            && weight_bytes(p) <= SMALL_WEIGHT_BYTES
    };
    let computing =
        |g: &Group| g.nodes.iter().filter(|&&q| !matches!(cx.node(q).op, Op::Reshape { .. })).count();
    let mut groups: Vec<(Group, String)> = Vec::new();
    let mut current: Option<Group> = None;
    let close = |current: &mut Option<Group>, groups: &mut Vec<(Group, String)>| {
        if let Some(g) = current.take() {
            if computing(&g) >= 2 {
                groups.push((g, DECODE_PHASES.to_string()));
            }
        }
    };
    for (p, &weight_only) in weight_only.iter().enumerate() {
        if matches!(cx.node(p).op, Op::Param { .. } | Op::Constant { .. }) || weight_only {
            continue;
        }
        // A reshape of a value from outside the group is a view the runtime takes without a launch;
        // inside a kernel it would be a copy (of the whole latent cache, every decode step, for the
        // cache's). It stays out, and the group goes on past it.
        if let Op::Reshape { .. } = cx.node(p).op {
            let source = cx.producer(cx.node(p).inputs[0]);
            if !current.as_ref().is_some_and(|g| g.nodes.contains(&source)) {
                continue;
            }
        }
        if !joinable(p) {
            close(&mut current, &mut groups);
            continue;
        }
        let extended = match &current {
            Some(g) if layer(g.anchor) == layer(p) => {
                let mut trial = g.clone();
                trial.nodes.insert(p);
                cx.lowers(&trial).then_some(trial)
            }
            _ => None,
        };
        match extended {
            Some(g) => current = Some(g),
            None => {
                close(&mut current, &mut groups);
                current = Some(Group::of([p], p));
            }
        }
    }
    close(&mut current, &mut groups);
    if groups.is_empty() {
        return Ok(cx.work());
    }
    for _ in &groups {
        trace.fire(DECODE_PHASES);
    }
    let rebuilt = rebuild(&cx, &groups)?;
    let work = cx.work();
    *graph = rebuilt;
    Ok(work)
}

/// Positions of the nodes that read only weights and constants (and such nodes) and whose values
/// have no symbolic size: computed once at load by the runtime, so no rule takes them into a kernel
/// of the run. (A constant broadcast to `[B, T]` depends on the run's sizes: it runs with the run.)
fn weight_only(cx: &Ctx) -> Vec<bool> {
    let mut out = vec![false; cx.len()];
    for p in 0..cx.len() {
        let node = cx.node(p);
        let sized = |v: ValueId| cx.g.ty(v).shape.iter().all(|d| !d.is_symbolic());
        out[p] = !node.inputs.is_empty()
            && node.results.iter().all(|&r| sized(r))
            && node.inputs.iter().all(|&v| {
                let q = cx.producer(v);
                out[q] || matches!(cx.node(q).op, Op::Param { .. } | Op::Constant { .. })
            });
    }
    out
}

/// The group of the GEMM at `p`: its gate/up partner for SwiGLU, its operands' `dequantize`s, its
/// epilogue; or its projection's rope (phased). `None` when no rule applies.
fn gemm_group(cx: &Ctx, p: usize) -> Option<(Group, Vec<&'static str>)> {
    let node = cx.node(p);
    let y = node.results[0];
    // SwiGLU: silu(this) * other, other a GEMM of the same kind, input and (for grouped) offsets.
    // A GEMM in f32 for a narrower model rounds its result with a cast first (`gemm-in-f32`).
    let through_cast = |v: ValueId| match cx.users(v).as_slice() {
        [u] if matches!(cx.node(*u).op, Op::Cast { .. }) => cx.node(*u).results[0],
        _ => v,
    };
    let behind_cast = |v: ValueId| {
        let q = cx.producer(v);
        match cx.node(q).op {
            Op::Cast { .. } => cx.producer(cx.node(q).inputs[0]),
            _ => q,
        }
    };
    let mut anchors = vec![p];
    for s in
        cx.users(through_cast(y)).into_iter().filter(|&s| matches!(cx.node(s).op, Op::Unary(UnaryOp::Silu)))
    {
        for m in cx.users(cx.node(s).results[0]) {
            let mul = cx.node(m);
            if !matches!(mul.op, Op::Binary(kiln_ir::BinaryOp::Mul)) || mul.inputs[0] != cx.node(s).results[0]
            {
                continue;
            }
            let q = behind_cast(mul.inputs[1]);
            let other = cx.node(q);
            let same = q != p
                && cx.free(q)
                && std::mem::discriminant(&other.op) == std::mem::discriminant(&node.op)
                && other.inputs[0] == node.inputs[0]
                && (matches!(node.op, Op::Linear) || other.inputs[1] == node.inputs[1]);
            if same && anchors.len() == 1 {
                anchors.push(q);
            }
        }
    }
    let mut group = Group { nodes: anchors.iter().copied().collect(), cloned: BTreeSet::new(), anchor: p };
    // FP8 operands: copy their dequantize in when the GEMM can load through it.
    let mut fp8 = false;
    let mut with_deq = group.clone();
    for &a in &anchors {
        for &v in &cx.node(a).inputs {
            let d = cx.producer(v);
            if matches!(cx.node(d).op, Op::Dequantize { .. }) {
                with_deq.cloned.insert(d);
            }
        }
    }
    let with_deq_pattern = if with_deq.cloned.is_empty() { None } else { cx.one_pass(&with_deq) };
    let pattern = if matches!(with_deq_pattern, Some(Pattern::Linear { .. })) {
        group = with_deq;
        fp8 = true;
        with_deq_pattern
    } else {
        cx.one_pass(&group)
    };
    if !matches!(pattern, Some(Pattern::Linear { .. } | Pattern::Op)) {
        return None;
    }
    let base = group.clone();
    let added = cx.grow_epilogue(&mut group, &|pat| matches!(pat, Pattern::Linear { .. }), true, usize::MAX);
    let mut rules = Vec::new();
    if fp8 {
        rules.push(FP8_GEMM);
    }
    if anchors.len() == 2 {
        rules.push(GEMM_SWIGLU);
    }
    let residual = added.iter().any(|&a| {
        let n = cx.node(a);
        matches!(n.op, Op::Binary(kiln_ir::BinaryOp::Add))
            && n.inputs.iter().any(|&v| !group.nodes.contains(&cx.producer(v)))
    });
    if residual {
        rules.push(GEMM_RESIDUAL);
    }
    if !rules.is_empty() {
        return Some((group, rules));
    }
    // gemm-rope: a plain GEMM whose result, maybe reshaped, is split and a part rotated. Its kernel
    // is phased (one work item), so only for a small weight: a big one keeps a GEMM the threads
    // share.
    if !matches!(node.op, Op::Linear) || !base.cloned.is_empty() || anchors.len() != 1 {
        return None;
    }
    let w = cx.g.ty(node.inputs[1]);
    if w.known_numel().unwrap_or(u64::MAX).saturating_mul(w.dtype.size_bytes()) > SMALL_WEIGHT_BYTES {
        return None;
    }
    let mut rope = base;
    let mut v = y;
    loop {
        let users = cx.users(v);
        let [u] = users.as_slice() else { return None };
        if !cx.free(*u) {
            return None;
        }
        match cx.node(*u).op {
            Op::Reshape { .. } => {
                rope.nodes.insert(*u);
                v = cx.node(*u).results[0];
            }
            Op::Split { .. } => {
                rope.nodes.insert(*u);
                let mut found = false;
                for &r in &cx.node(*u).results {
                    let mut w = r;
                    // The rotated part may be reshaped into heads first.
                    loop {
                        let us = cx.users(w);
                        let [x] = us.as_slice() else { break };
                        if !cx.free(*x) {
                            break;
                        }
                        match cx.node(*x).op {
                            Op::Reshape { .. } => {
                                rope.nodes.insert(*x);
                                w = cx.node(*x).results[0];
                            }
                            // The inverse rotation (a gradient) stays a kernel of its own, like
                            // every backward op of training (see `codegen::fusion`).
                            Op::Rope(ref c) if !c.inverse => {
                                rope.nodes.insert(*x);
                                found = true;
                                break;
                            }
                            _ => break,
                        }
                    }
                }
                return (found && cx.lowers(&rope)).then_some((rope, vec![GEMM_ROPE]));
            }
            _ => return None,
        }
    }
}

/// The new graph: every group one `fused` node, placed once its operands exist; nodes no output
/// needs any more (a `dequantize` now copied into every GEMM that read it) are left out. Groups
/// that are each convex can still depend on each other both ways (a norm computed in one group
/// from values of another, which reads the norm: a train step's clipping, or the recomputed norms
/// of its backward pass); such a cycle cannot be placed, so the latest group on it is dissolved
/// back into its nodes.
///
/// The cycles are found on the graph of items (groups and the nodes left single) before anything
/// is built: its strongly connected components, each of which loses a group per round. A
/// DeepSeek-V3 train step has a few such cycles in every layer, and dissolving them one at a time,
/// placing the whole graph again after each, made this quadratic in the model's depth.
fn rebuild(cx: &Ctx, groups: &[(Group, String)]) -> Result<Graph, PassError> {
    let mut groups = groups.to_vec();
    loop {
        let items = Items::new(cx, &groups);
        cx.count(items.len());
        let dissolve = items.cyclic_groups()?;
        if dissolve.is_empty() {
            return place(cx, &groups, &items);
        }
        let mut i = 0;
        groups.retain(|_| {
            i += 1;
            !dissolve.contains(&(i - 1))
        });
    }
}

/// The graph [`rebuild`] places: groups first (`0..groups`), then one item per node in no group.
struct Items {
    groups: usize,
    /// By position: the item holding the node.
    item_of: Vec<usize>,
    /// The position of each single item's node.
    singles: Vec<usize>,
    /// By group: its fused node's inputs.
    group_inputs: Vec<Vec<ValueId>>,
    /// By item: the items it reads from, without itself, ascending.
    deps: Vec<Vec<usize>>,
    /// By item: whether an output, a graph input or a send needs it.
    live: Vec<bool>,
}

impl Items {
    fn new(cx: &Ctx, groups: &[(Group, String)]) -> Items {
        let n = cx.len();
        let mut item_of = vec![usize::MAX; n];
        for (i, (group, _)) in groups.iter().enumerate() {
            for &p in &group.nodes {
                item_of[p] = i;
            }
        }
        let mut singles = Vec::new();
        for (p, item) in item_of.iter_mut().enumerate() {
            if *item == usize::MAX {
                *item = groups.len() + singles.len();
                singles.push(p);
            }
        }
        let group_inputs: Vec<Vec<ValueId>> = groups.iter().map(|(group, _)| cx.inputs(group)).collect();
        let mut items = Items {
            groups: groups.len(),
            item_of,
            singles,
            group_inputs,
            deps: Vec::new(),
            live: Vec::new(),
        };
        let count = items.groups + items.singles.len();
        items.deps = (0..count)
            .map(|i| {
                let mut d: Vec<usize> = (items.inputs_of(cx, i).iter())
                    .map(|&v| items.item_of[cx.producer(v)])
                    .filter(|&d| d != i)
                    .collect();
                d.sort_unstable();
                d.dedup();
                d
            })
            .collect();
        // Liveness from the outputs, graph inputs and sends.
        let mut live = vec![false; count];
        let mut stack: Vec<usize> =
            cx.g.outputs().iter().map(|&(_, v)| items.item_of[cx.producer(v)]).collect();
        stack.extend(
            (0..n)
                .filter(|&p| matches!(cx.node(p).op, Op::Input { .. } | Op::Send { .. }))
                .map(|p| items.item_of[p]),
        );
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut live[i], true) {
                stack.extend(items.deps[i].iter().copied());
            }
        }
        items.live = live;
        items
    }

    fn len(&self) -> usize {
        self.deps.len()
    }

    fn inputs_of<'a>(&'a self, cx: &'a Ctx, i: usize) -> &'a [ValueId] {
        if i < self.groups {
            &self.group_inputs[i]
        } else {
            &cx.node(self.singles[i - self.groups]).inputs
        }
    }

    fn first_pos(&self, groups: &[(Group, String)], i: usize) -> usize {
        if i < self.groups {
            *groups[i].0.nodes.iter().next().expect("non-empty")
        } else {
            self.singles[i - self.groups]
        }
    }

    /// The groups to dissolve: in each strongly connected component of the live items, the
    /// latest group on one cycle through it (the cycle followed from the component's first item
    /// along each item's first dependency in the component).
    fn cyclic_groups(&self) -> Result<Vec<usize>, PassError> {
        let component = self.components();
        let mut size = vec![0usize; self.len()];
        for &c in component.iter().filter(|&&c| c != usize::MAX) {
            size[c] += 1;
        }
        let mut done = vec![false; self.len()];
        let mut dissolve = Vec::new();
        for start in 0..self.len() {
            let c = component[start];
            if c == usize::MAX || size[c] < 2 || std::mem::replace(&mut done[c], true) {
                continue;
            }
            let mut seen: HashMap<usize, usize> = HashMap::default();
            let mut path = Vec::new();
            let mut at = start;
            while !seen.contains_key(&at) {
                seen.insert(at, path.len());
                path.push(at);
                let Some(&next) = self.deps[at].iter().find(|&&d| component[d] == c) else {
                    return Err(fail(format!("item {at} leaves its component (a kiln bug)")));
                };
                at = next;
            }
            match path[seen[&at]..].iter().copied().filter(|&i| i < self.groups).max() {
                Some(i) => dissolve.push(i),
                None => return Err(fail("a cycle of single nodes (a kiln bug)".to_string())),
            }
        }
        dissolve.sort_unstable();
        Ok(dissolve)
    }

    /// By item: its strongly connected component among the live items (`usize::MAX` for dead
    /// ones), by Tarjan's algorithm without recursion.
    fn components(&self) -> Vec<usize> {
        const NONE: usize = usize::MAX;
        let n = self.len();
        let (mut index, mut low) = (vec![NONE; n], vec![0usize; n]);
        let mut on_stack = vec![false; n];
        let mut component = vec![NONE; n];
        let (mut next_index, mut next_component) = (0, 0);
        let mut stack = Vec::new();
        // Frames of the depth-first search: an item and how many of its dependencies it has tried.
        let mut frames: Vec<(usize, usize)> = Vec::new();
        for root in (0..n).filter(|&i| self.live[i]) {
            if index[root] != NONE {
                continue;
            }
            frames.push((root, 0));
            while let Some(&mut (v, ref mut k)) = frames.last_mut() {
                if *k == 0 && index[v] == NONE {
                    index[v] = next_index;
                    low[v] = next_index;
                    next_index += 1;
                    stack.push(v);
                    on_stack[v] = true;
                }
                if let Some(&w) = self.deps[v].get(*k) {
                    *k += 1;
                    if !self.live[w] {
                        continue;
                    }
                    if index[w] == NONE {
                        frames.push((w, 0));
                    } else if on_stack[w] {
                        low[v] = low[v].min(index[w]);
                    }
                    continue;
                }
                frames.pop();
                if let Some(&(parent, _)) = frames.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == index[v] {
                    loop {
                        let w = stack.pop().expect("v is on the stack");
                        on_stack[w] = false;
                        component[w] = next_component;
                        if w == v {
                            break;
                        }
                    }
                    next_component += 1;
                }
            }
        }
        component
    }
}

/// The graph [`rebuild`] makes, once no cycle is left.
fn place(cx: &Ctx, groups: &[(Group, String)], it: &Items) -> Result<Graph, PassError> {
    let g = cx.g;
    let items = it.len();
    let live = &it.live;
    let deps = &it.deps;
    let first_pos = |i: usize| it.first_pos(groups, i);
    // Kahn's algorithm over live items, earliest position first.
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); items];
    let mut pending = vec![0usize; items];
    for i in (0..items).filter(|&i| live[i]) {
        for &d in &deps[i] {
            users[d].push(i);
            pending[i] += 1;
        }
    }
    let mut ready: BTreeSet<(usize, usize)> =
        (0..items).filter(|&i| live[i] && pending[i] == 0).map(|i| (first_pos(i), i)).collect();
    let mut new = Graph::new(g.name());
    let mut map: HashMap<ValueId, ValueId> = HashMap::default();
    let err = |e: kiln_ir::graph::GraphError| fail(e.to_string());
    while let Some((_, i)) = ready.pop_first() {
        let ins: Vec<ValueId> = it.inputs_of(cx, i).iter().map(|v| map[v]).collect();
        if i < groups.len() {
            let (group, name) = &groups[i];
            let body = cx.fused_body(group, name)?;
            let outs = cx.outputs(group);
            let tys = outs.iter().map(|&v| g.ty(v).clone()).collect();
            let scope = cx.node(group.anchor).scope.clone();
            let op = Op::Fused { name: name.clone(), body };
            let (_, rs) = new.add_node(op, &ins, tys, scope.as_deref()).map_err(err)?;
            map.extend(outs.into_iter().zip(rs));
        } else {
            let node = cx.node(it.singles[i - groups.len()]);
            let tys = node.results.iter().map(|&r| g.ty(r).clone()).collect();
            let (_, rs) = new.add_node(node.op.clone(), &ins, tys, node.scope.as_deref()).map_err(err)?;
            map.extend(node.results.iter().copied().zip(rs));
        }
        for &u in &users[i] {
            pending[u] -= 1;
            if pending[u] == 0 {
                ready.insert((first_pos(u), u));
            }
        }
    }
    if let Some(i) = (0..items).find(|&i| live[i] && pending[i] > 0) {
        return Err(fail(format!("item {i} was left unplaced with no cycle found (a kiln bug)")));
    }
    for (name, v) in g.outputs() {
        let Some(&r) = map.get(v) else {
            return Err(fail(format!("output `{name}` ({v}) was not rebuilt (a kiln bug)")));
        };
        new.add_output(name.clone(), r).map_err(err)?;
    }
    Ok(new)
}
