//! Shape and dtype inference: the result types of an op from the types of its operands.
//!
//! Each rule checks everything the op needs of its operands (count, rank, dtype, matching dimensions)
//! and says what is wrong in terms of operand positions, so the verifier and the graph builder can
//! report it in context. Symbolic dimensions are compared structurally: `B*T` equals `T*B`, and a rule
//! that needs a constant (the width of a split, the head count of attention) says so.

mod grad;

use crate::graph::Graph;
use crate::op::{Dispatch, Op, ReduceOp, Router};
use crate::types::{DType, Dim, Shape, TensorType};

/// Why an op cannot be applied to operands of these types.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InferError(pub String);

fn fail<T>(msg: impl Into<String>) -> Result<T, InferError> {
    Err(InferError(msg.into()))
}

fn arity(op: &Op, ins: &[&TensorType], want: usize) -> Result<(), InferError> {
    if ins.len() != want {
        return fail(format!("`{}` takes {want} operand(s), found {}", op.name(), ins.len()));
    }
    Ok(())
}

fn float(op: &Op, what: &str, t: &TensorType) -> Result<(), InferError> {
    if !t.dtype.is_float() {
        return fail(format!("`{}` needs a floating-point {what}, found {t}", op.name()));
    }
    Ok(())
}

fn int(op: &Op, what: &str, t: &TensorType) -> Result<(), InferError> {
    if !t.dtype.is_int() {
        return fail(format!("`{}` needs integer {what}, found {t}", op.name()));
    }
    Ok(())
}

fn rank_at_least(op: &Op, what: &str, t: &TensorType, r: usize) -> Result<(), InferError> {
    if t.rank() < r {
        return fail(format!("`{}` needs {what} of rank at least {r}, found {t}", op.name()));
    }
    Ok(())
}

fn rank_is(op: &Op, what: &str, t: &TensorType, r: usize) -> Result<(), InferError> {
    if t.rank() != r {
        return fail(format!("`{}` needs {what} of rank {r}, found {t}", op.name()));
    }
    Ok(())
}

fn same_dtype(op: &Op, a: &TensorType, b: &TensorType) -> Result<(), InferError> {
    if a.dtype != b.dtype {
        return fail(format!("`{}` needs operands of one dtype, found {a} and {b}", op.name()));
    }
    Ok(())
}

fn dim_eq(op: &Op, what: &str, a: Dim, b: Dim) -> Result<(), InferError> {
    if a != b {
        return fail(format!("`{}`: {what} must match, found {a} and {b}", op.name()));
    }
    Ok(())
}

fn last(t: &TensorType) -> Dim {
    *t.shape.last().expect("rank checked by the caller")
}

/// NumPy broadcasting of two shapes, right-aligned.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let n = a.len().max(b.len());
    let one = Dim::known(1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { one };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { one };
        out.push(if da == db || db == one {
            da
        } else if da == one {
            db
        } else {
            return None;
        });
    }
    Some(out)
}

/// The sum of two dimensions when it is a dimension (`3 + 4`, `T + T`).
fn dim_add(a: Dim, b: Dim) -> Option<Dim> {
    if let (Some(x), Some(y)) = (a.as_known(), b.as_known()) {
        return Some(Dim::known(x.checked_add(y)?));
    }
    // Same monomial up to the factor: a = fa*m, b = fb*m.
    let (fa, fb) = (a.factor(), b.factor());
    let ma = a.checked_div(Dim::known(fa))?;
    let mb = b.checked_div(Dim::known(fb))?;
    (ma == mb).then(|| ma.checked_mul(Dim::known(fa.checked_add(fb)?))).flatten()
}

/// Whether `scales` is the padded form of the scales of `shape` in `block` tiles: a dimension that
/// was symbolic when the program was built keeps its size (see [`scale_shape`]), which a run, where
/// every size is known, sees as `d` slots rather than `ceil(d / b)`.
pub fn padded_scales(shape: &[Dim], block: &[u64], scales: &[Dim]) -> bool {
    if block.is_empty() || block.len() > shape.len() || scales.len() != shape.len() {
        return false;
    }
    let lead = shape.len() - block.len();
    shape.iter().zip(scales).enumerate().all(|(i, (&d, &s))| {
        if i < lead {
            return s == d;
        }
        let b = block[i - lead];
        s == d || b > 0 && matches!((d.as_known(), s.as_known()), (Some(n), Some(m)) if m == n.div_ceil(b))
    })
}

/// Shape of the per-tile scales of a block-quantised tensor: leading dimensions kept, each of the
/// trailing `block.len()` dimensions divided by its block size, rounded up. A symbolic dimension
/// (the tokens of a batch, which FP8 training's weight gradients tile by 128) keeps its size: the
/// number of tiles `ceil(d / b)` is not a dimension kiln's types can state, so the scales are
/// padded: tile `j`'s scale is at index `j`, and the slots after the last tile hold 0.
pub fn scale_shape(op: &Op, shape: &[Dim], block: &[u64]) -> Result<Shape, InferError> {
    if block.is_empty() || block.len() > shape.len() {
        return fail(format!(
            "`{}`: block {block:?} must have between 1 and {} entries",
            op.name(),
            shape.len()
        ));
    }
    let lead = shape.len() - block.len();
    let mut out: Shape = shape[..lead].to_vec();
    for (&d, &b) in shape[lead..].iter().zip(block) {
        if b == 0 {
            return fail(format!("`{}`: block sizes must be positive", op.name()));
        }
        out.push(match (d.as_known(), b) {
            (Some(n), _) => Dim::known(n.div_ceil(b)),
            (None, _) => d,
        });
    }
    Ok(out)
}

fn check_router(op: &Op, r: &Router) -> Result<(), InferError> {
    if r.num_groups == 0 || r.num_experts % r.num_groups != 0 {
        return fail(format!(
            "`{}`: {} experts cannot be split into {} equal groups",
            op.name(),
            r.num_experts,
            r.num_groups
        ));
    }
    if r.topk_groups == 0 || r.topk_groups > r.num_groups {
        return fail(format!(
            "`{}`: topk_groups must be between 1 and num_groups ({}), found {}",
            op.name(),
            r.num_groups,
            r.topk_groups
        ));
    }
    let reachable = r.topk_groups.saturating_mul(r.num_experts / r.num_groups);
    if r.top_k == 0 || r.top_k > reachable {
        return fail(format!(
            "`{}`: top_k must be between 1 and the {reachable} experts of the kept groups, found {}",
            op.name(),
            r.top_k
        ));
    }
    Ok(())
}

fn check_dispatch(op: &Op, d: &Dispatch) -> Result<(), InferError> {
    // Without a group limit, a token's slots may share an expert (an expert-parallel rank maps
    // the slots routed elsewhere onto its own experts, with weight 0): at least one slot.
    if d.top_k == 0 || (d.num_groups > 1 && d.top_k > d.num_experts) {
        return fail(format!("`{}`: top_k must be between 1 and num_experts", op.name()));
    }
    // The group limit is the router's (`check_router` states the same rules).
    if d.num_groups == 0 || d.num_experts % d.num_groups != 0 {
        return fail(format!(
            "`{}`: {} experts cannot be split into {} equal groups",
            op.name(),
            d.num_experts,
            d.num_groups
        ));
    }
    if d.topk_groups == 0 || d.topk_groups > d.num_groups {
        return fail(format!(
            "`{}`: topk_groups must be between 1 and num_groups ({}), found {}",
            op.name(),
            d.num_groups,
            d.topk_groups
        ));
    }
    let reachable = d.topk_groups.saturating_mul(d.num_experts / d.num_groups);
    if d.num_groups > 1 && d.top_k > reachable {
        return fail(format!(
            "`{}`: top_k = {} does not fit in the {reachable} experts of {} groups",
            op.name(),
            d.top_k,
            d.topk_groups
        ));
    }
    if d.ep_size == 0 || d.num_experts % d.ep_size != 0 {
        return fail(format!(
            "`{}`: {} experts cannot be placed evenly on {} ranks",
            op.name(),
            d.num_experts,
            d.ep_size
        ));
    }
    Ok(())
}

/// The result types of `op` applied to operands of types `ins`. Ops whose type is declared in the
/// graph (`input`, `param`, `constant`, `recv`) have nothing to infer and are an error here.
pub fn infer(op: &Op, ins: &[&TensorType]) -> Result<Vec<TensorType>, InferError> {
    let one = |t: TensorType| Ok(vec![t]);
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Recv { .. } => {
            fail(format!("`{}` declares its type; there is nothing to infer", op.name()))
        }
        Op::Linear => {
            arity(op, ins, 2)?;
            let (x, w) = (ins[0], ins[1]);
            float(op, "input", x)?;
            rank_at_least(op, "an input", x, 1)?;
            rank_is(op, "a weight", w, 2)?;
            same_dtype(op, x, w)?;
            dim_eq(op, "the input's last dimension and the weight's in-features", last(x), w.shape[1])?;
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank >= 1") = w.shape[0];
            one(x.with_shape(shape))
        }
        Op::MatMul => {
            arity(op, ins, 2)?;
            let (a, b) = (ins[0], ins[1]);
            float(op, "operand", a)?;
            same_dtype(op, a, b)?;
            rank_at_least(op, "operands", a, 2)?;
            rank_at_least(op, "operands", b, 2)?;
            let (ra, rb) = (a.rank(), b.rank());
            dim_eq(op, "the contracted dimensions", a.shape[ra - 1], b.shape[rb - 2])?;
            let Some(mut shape) = broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2]) else {
                return fail(format!("`matmul`: batch dimensions of {a} and {b} do not broadcast"));
            };
            shape.push(a.shape[ra - 2]);
            shape.push(b.shape[rb - 1]);
            one(a.with_shape(shape))
        }
        Op::Unary(_) => {
            arity(op, ins, 1)?;
            float(op, "operand", ins[0])?;
            one(ins[0].clone())
        }
        Op::Binary(_) => {
            arity(op, ins, 2)?;
            same_dtype(op, ins[0], ins[1])?;
            match broadcast(&ins[0].shape, &ins[1].shape) {
                Some(shape) => one(ins[0].with_shape(shape)),
                None => {
                    fail(format!("`{}`: shapes of {} and {} do not broadcast", op.name(), ins[0], ins[1]))
                }
            }
        }
        Op::Cast { to } => {
            arity(op, ins, 1)?;
            one(ins[0].with_dtype(*to))
        }
        Op::Reduce { op: kind, axes, keep_dims } => {
            arity(op, ins, 1)?;
            let x = ins[0];
            if *kind == ReduceOp::Mean {
                float(op, "operand", x)?;
            }
            check_axes(op, axes, x.rank())?;
            let shape = x
                .shape
                .iter()
                .enumerate()
                .filter_map(|(i, &d)| match (axes.contains(&i), keep_dims) {
                    (false, _) => Some(d),
                    (true, true) => Some(Dim::known(1)),
                    (true, false) => None,
                })
                .collect();
            one(x.with_shape(shape))
        }
        Op::Softmax { axis } => {
            arity(op, ins, 1)?;
            float(op, "operand", ins[0])?;
            check_axes(op, &[*axis], ins[0].rank())?;
            one(ins[0].clone())
        }
        Op::CrossEntropy { .. } => cross_entropy(op, ins),
        Op::RmsNorm { eps } => {
            arity(op, ins, 2)?;
            let (x, w) = (ins[0], ins[1]);
            float(op, "input", x)?;
            rank_at_least(op, "an input", x, 1)?;
            rank_is(op, "a weight", w, 1)?;
            same_dtype(op, x, w)?;
            dim_eq(op, "the normalised dimension and the weight", last(x), w.shape[0])?;
            if eps.is_nan() || *eps <= 0.0 {
                return fail(format!("`rms_norm`: eps must be positive, found {eps}"));
            }
            one(x.clone())
        }
        Op::Rope(cfg) => {
            arity(op, ins, 2)?;
            let (x, pos) = (ins[0], ins[1]);
            float(op, "input", x)?;
            int(op, "positions", pos)?;
            rank_at_least(op, "an input", x, 3)?;
            rank_is(op, "positions", pos, 2)?;
            dim_eq(op, "batch of input and positions", x.shape[0], pos.shape[0])?;
            dim_eq(op, "tokens of input and positions", x.shape[1], pos.shape[1])?;
            match last(x).as_known() {
                Some(d) if d % 2 == 0 && d > 0 => {}
                _ => return fail(format!("`rope` needs an even, constant last dimension, found {x}")),
            }
            if cfg.theta.is_nan() || cfg.theta <= 0.0 {
                return fail(format!("`rope`: theta must be positive, found {}", cfg.theta));
            }
            one(x.clone())
        }
        Op::Attention { causal, .. } => {
            if ins.len() != 3 && ins.len() != 4 {
                return fail(format!("`attention` takes 3 or 4 operand(s), found {}", ins.len()));
            }
            one(attention(op, *causal, ins)?)
        }
        Op::CacheUpdate => {
            arity(op, ins, 3)?;
            let (cache, new, pos) = (ins[0], ins[1], ins[2]);
            rank_at_least(op, "a cache", cache, 2)?;
            rank_is(op, "new entries", new, cache.rank())?;
            same_dtype(op, cache, new)?;
            int(op, "positions", pos)?;
            rank_is(op, "positions", pos, 2)?;
            dim_eq(op, "batch of the cache and the new entries", cache.shape[0], new.shape[0])?;
            for (a, (&c, &n)) in cache.shape.iter().zip(&new.shape).enumerate().skip(2) {
                dim_eq(op, &format!("axis {a} of the cache and the new entries"), c, n)?;
            }
            dim_eq(op, "batch of the new entries and positions", new.shape[0], pos.shape[0])?;
            dim_eq(op, "tokens of the new entries and positions", new.shape[1], pos.shape[1])?;
            one(cache.clone())
        }
        Op::Embedding => {
            arity(op, ins, 2)?;
            let (table, ids) = (ins[0], ins[1]);
            rank_is(op, "a table", table, 2)?;
            int(op, "ids", ids)?;
            let mut shape = ids.shape.clone();
            shape.push(table.shape[1]);
            one(table.with_shape(shape))
        }
        Op::Gather { axis } => {
            arity(op, ins, 2)?;
            let (data, idx) = (ins[0], ins[1]);
            int(op, "indices", idx)?;
            check_axes(op, &[*axis], data.rank())?;
            let mut shape = data.shape[..*axis].to_vec();
            shape.extend_from_slice(&idx.shape);
            shape.extend_from_slice(&data.shape[axis + 1..]);
            one(data.with_shape(shape))
        }
        Op::TopK { k } => {
            arity(op, ins, 1)?;
            let x = ins[0];
            rank_at_least(op, "an operand", x, 1)?;
            if let Some(n) = last(x).as_known() {
                if *k == 0 || *k > n {
                    return fail(format!("`topk`: k must be between 1 and {n}, found {k}"));
                }
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank >= 1") = Dim::known(*k);
            Ok(vec![x.with_shape(shape.clone()), TensorType::new(DType::I32, shape)])
        }
        Op::Concat { axis } => {
            if ins.is_empty() {
                return fail("`concat` needs at least one operand");
            }
            let first = ins[0];
            check_axes(op, &[*axis], first.rank())?;
            let mut size = first.shape[*axis];
            for t in &ins[1..] {
                same_dtype(op, first, t)?;
                rank_is(op, "operands", t, first.rank())?;
                for (i, (&a, &b)) in first.shape.iter().zip(&t.shape).enumerate() {
                    if i != *axis {
                        dim_eq(op, &format!("dimension {i} of the operands"), a, b)?;
                    }
                }
                size = match dim_add(size, t.shape[*axis]) {
                    Some(s) => s,
                    None => {
                        return fail(format!("`concat`: cannot add dimensions {size} and {}", t.shape[*axis]))
                    }
                };
            }
            let mut shape = first.shape.clone();
            shape[*axis] = size;
            one(first.with_shape(shape))
        }
        Op::Split { axis, sizes } => {
            arity(op, ins, 1)?;
            let x = ins[0];
            check_axes(op, &[*axis], x.rank())?;
            let total = sizes.iter().try_fold(0u64, |acc, &s| acc.checked_add(s));
            if total.is_none() || x.shape[*axis].as_known() != total || sizes.contains(&0) {
                return fail(format!(
                    "`split`: positive sizes {sizes:?} must add up to dimension {axis} of {x}"
                ));
            }
            Ok(sizes
                .iter()
                .map(|&s| {
                    let mut shape = x.shape.clone();
                    shape[*axis] = Dim::known(s);
                    x.with_shape(shape)
                })
                .collect())
        }
        Op::Reshape { shape } => {
            arity(op, ins, 1)?;
            let x = ins[0];
            let out = x.with_shape(shape.clone());
            if x.numel() != out.numel() || x.numel().is_none() {
                return fail(format!("`reshape`: cannot reshape {x} to {out}: element counts differ"));
            }
            one(out)
        }
        Op::Transpose { perm } => {
            arity(op, ins, 1)?;
            let x = ins[0];
            let mut seen = vec![false; x.rank()];
            if perm.len() != x.rank()
                || perm.iter().any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
            {
                return fail(format!("`transpose`: {perm:?} is not a permutation of the axes of {x}"));
            }
            one(x.with_shape(perm.iter().map(|&p| x.shape[p]).collect()))
        }
        Op::Broadcast { shape } => {
            arity(op, ins, 1)?;
            let x = ins[0];
            if broadcast(&x.shape, shape).as_deref() != Some(shape.as_slice()) {
                return fail(format!(
                    "`broadcast`: {x} does not broadcast to {}",
                    x.with_shape(shape.clone())
                ));
            }
            one(x.with_shape(shape.clone()))
        }
        Op::Quantize { to, spec } => {
            arity(op, ins, 1)?;
            let x = ins[0];
            float(op, "operand", x)?;
            if *to != DType::F8E4M3 {
                return fail(format!("`quantize` only targets f8e4m3, found {to}"));
            }
            let scales = scale_shape(op, &x.shape, &spec.block)?;
            Ok(vec![x.with_dtype(*to), TensorType::new(DType::F32, scales)])
        }
        Op::Dequantize { to, block } => {
            arity(op, ins, 2)?;
            let (q, s) = (ins[0], ins[1]);
            if s.dtype != DType::F32 {
                return fail(format!("`dequantize` needs f32 scales, found {s}"));
            }
            if !to.is_float() {
                return fail(format!("`dequantize` produces a float type, found {to}"));
            }
            let want = scale_shape(op, &q.shape, block)?;
            if s.shape != want && !padded_scales(&q.shape, block, &s.shape) {
                return fail(format!(
                    "`dequantize`: scales of {q} with block {block:?} must have shape {}, found {s}",
                    TensorType::new(DType::F32, want.clone())
                ));
            }
            one(q.with_dtype(*to))
        }
        Op::MoeRoute(r) => {
            if !(1..=2).contains(&ins.len()) {
                return fail(format!(
                    "`moe_route` takes logits and an optional bias, found {} operands",
                    ins.len()
                ));
            }
            check_router(op, r)?;
            let logits = ins[0];
            float(op, "logits", logits)?;
            rank_at_least(op, "logits", logits, 1)?;
            dim_eq(
                op,
                "the logits' last dimension and num_experts",
                last(logits),
                Dim::known(r.num_experts),
            )?;
            if let Some(bias) = ins.get(1) {
                float(op, "bias", bias)?;
                rank_is(op, "a bias", bias, 1)?;
                dim_eq(op, "the bias and num_experts", bias.shape[0], Dim::known(r.num_experts))?;
            }
            let mut shape = logits.shape.clone();
            *shape.last_mut().expect("rank >= 1") = Dim::known(r.top_k);
            Ok(vec![TensorType::new(DType::F32, shape.clone()), TensorType::new(DType::I32, shape)])
        }
        Op::MoeExperts { num_experts } => {
            let e = *num_experts as usize;
            if Some(ins.len()) != e.checked_mul(3).and_then(|n| n.checked_add(3)) {
                return fail(format!(
                    "`moe_experts` with {e} experts takes 3 + 3*{e} operands, found {}",
                    ins.len()
                ));
            }
            let (x, w, idx) = (ins[0], ins[1], ins[2]);
            float(op, "input", x)?;
            rank_at_least(op, "an input", x, 1)?;
            float(op, "weights", w)?;
            int(op, "indices", idx)?;
            if w.shape != idx.shape
                || w.shape.len() != x.rank()
                || w.shape[..w.rank() - 1] != x.shape[..x.rank() - 1]
            {
                return fail(format!(
                    "`moe_experts`: weights {w} and indices {idx} must be [..tokens, top_k] for input {x}"
                ));
            }
            let d = last(x);
            for (i, ex) in ins[3..].chunks(3).enumerate() {
                let (gate, up, down) = (ex[0], ex[1], ex[2]);
                for t in ex {
                    rank_is(op, "expert weights", t, 2)?;
                    same_dtype(op, x, t)?;
                }
                let inter = gate.shape[0];
                if gate.shape != [inter, d] || up.shape != [inter, d] || down.shape != [d, inter] {
                    return fail(format!(
                        "`moe_experts`: expert {i} needs gate [I, {d}], up [I, {d}], down [{d}, I], found {gate}, {up}, {down}"
                    ));
                }
            }
            one(x.clone())
        }
        Op::MoeDispatch(dsp) => {
            arity(op, ins, 2)?;
            check_dispatch(op, dsp)?;
            let (x, idx) = (ins[0], ins[1]);
            rank_is(op, "an input", x, 2)?;
            rank_is(op, "indices", idx, 2)?;
            int(op, "indices", idx)?;
            dim_eq(op, "tokens of input and indices", x.shape[0], idx.shape[0])?;
            dim_eq(op, "top_k and the indices", idx.shape[1], Dim::known(dsp.top_k))?;
            let rows = x.shape[0].checked_mul(Dim::known(dsp.top_k));
            let Some(rows) = rows else {
                return fail("`moe_dispatch`: row count overflows");
            };
            Ok(vec![
                x.with_shape(vec![rows, x.shape[1]]),
                TensorType::new(DType::I32, [Dim::known(dsp.num_experts.saturating_add(1))]),
                TensorType::new(DType::I32, [rows]),
            ])
        }
        Op::GroupedLinear { num_experts } => {
            let e = *num_experts as usize;
            if Some(ins.len()) != e.checked_add(2) || e == 0 {
                return fail(format!(
                    "`grouped_linear` with {e} experts takes 2 + {e} operands, found {}",
                    ins.len()
                ));
            }
            let (x, offsets) = (ins[0], ins[1]);
            rank_is(op, "rows", x, 2)?;
            int(op, "offsets", offsets)?;
            let want = num_experts.checked_add(1).map(|n| vec![Dim::known(n)]);
            if Some(&offsets.shape) != want.as_ref() {
                return fail(format!("`grouped_linear`: offsets must be i32[{}], found {offsets}", e + 1));
            }
            let n = ins[2].shape.first().copied().unwrap_or(Dim::known(0));
            for w in &ins[2..] {
                rank_is(op, "expert weights", w, 2)?;
                same_dtype(op, x, w)?;
                if w.shape != [n, x.shape[1]] {
                    return fail(format!(
                        "`grouped_linear`: every weight must be [{n}, {}], found {w}",
                        x.shape[1]
                    ));
                }
            }
            one(x.with_shape(vec![x.shape[0], n]))
        }
        Op::MoeCombine { top_k } => {
            arity(op, ins, 3)?;
            one(moe_combine(op, *top_k, ins)?)
        }
        Op::EmbeddingGrad { rows } => grad::embedding_grad(op, *rows, ins),
        Op::CrossEntropyGrad { .. } => grad::cross_entropy_grad(op, ins),
        Op::AttentionGrad { causal, .. } => grad::attention_grad(op, *causal, ins),
        Op::TakeAlong { axis } => grad::take_along(op, *axis, ins),
        Op::ScatterAddAlong { axis, size } => grad::scatter_add_along(op, *axis, *size, ins),
        Op::GroupedLinearWgrad { num_experts } => grad::grouped_linear_wgrad(op, *num_experts, ins),
        Op::MoeCombineGrad { top_k } => grad::moe_combine_grad(op, *top_k, ins),
        Op::PromotedGemm { form, k_block } => {
            if *k_block == 0 {
                return fail("`promoted_gemm` needs a k_block of at least 1");
            }
            // The operands and shapes of the plain form; every result is f32.
            let outs = infer(&form.plain(), ins)
                .map_err(|e| InferError(format!("`promoted_gemm` of form {}: {}", form.name(), e.0)))?;
            Ok(outs.into_iter().map(|t| t.with_dtype(DType::F32)).collect())
        }
        Op::Fused { name, body } => {
            let params: Vec<&TensorType> = body.inputs().iter().map(|&(_, v)| body.ty(v)).collect();
            if params.len() != ins.len() || params.iter().zip(ins).any(|(a, b)| a != b) {
                return fail(format!(
                    "`fused` kernel `{name}` takes ({}), found ({})",
                    list(&params),
                    list(ins)
                ));
            }
            Ok(body.outputs().iter().map(|&(_, v)| body.ty(v).clone()).collect())
        }
        Op::Send { .. } => {
            arity(op, ins, 1)?;
            Ok(vec![])
        }
        Op::AllReduce { group } => {
            arity(op, ins, 1)?;
            if ins[0].dtype != DType::F32 {
                return fail(format!("`all_reduce` over `{group}` sums f32 tensors, found {}", ins[0]));
            }
            one(ins[0].clone())
        }
        Op::AllGather { group, size } => {
            arity(op, ins, 1)?;
            if ins[0].dtype != DType::F32 || *size == 0 {
                return fail(format!(
                    "`all_gather` over `{group}` stacks f32 tensors from at least one process, found {} from {size}",
                    ins[0]
                ));
            }
            let mut shape = vec![Dim::known(*size)];
            shape.extend(ins[0].shape.iter().copied());
            one(ins[0].with_shape(shape))
        }
        Op::AllToAll { group, size } => {
            let x = ins.first().copied();
            let keep = ins.get(1).copied();
            let blocks = x.is_some_and(|x| x.shape.first() == Some(&Dim::known(*size)));
            let rows = keep.is_none_or(|k| {
                k.dtype == DType::F32
                    && !k.shape.is_empty()
                    && x.is_some_and(|x| x.shape.starts_with(&k.shape))
            });
            match x {
                Some(x) if (1..=2).contains(&ins.len()) && x.dtype == DType::F32 && *size > 0 && blocks && rows => {
                    one(x.clone())
                }
                _ => fail(format!(
                    "`all_to_all` over `{group}` exchanges an f32 `[{size}, ..]` tensor, one block per process, \
                     optionally with f32 row flags whose shape is a prefix of it; found ({})",
                    list(ins)
                )),
            }
        }
    }
}

/// The output type of `attention` (or the forward operands of `attention_grad`): `q[B, T, H, Dk]`,
/// `k[B, S, Hk, Dk]`, `v[B, S, Hk, Dv]` of one float dtype with `Hk` a constant divisor of `H`, and
/// optionally `positions[B, T]` (integer) when causal. The caller has checked the operand count.
fn attention(op: &Op, causal: bool, ins: &[&TensorType]) -> Result<TensorType, InferError> {
    let (q, k, v) = (ins[0], ins[1], ins[2]);
    if let Some(p) = ins.get(3) {
        if !causal {
            return fail(format!(
                "`{}` with positions must be causal (the positions are its mask)",
                op.name()
            ));
        }
        int(op, "positions", p)?;
        rank_is(op, "positions", p, 2)?;
        dim_eq(op, "batch of queries and positions", q.shape[0], p.shape[0])?;
        dim_eq(op, "tokens of queries and positions", q.shape[1], p.shape[1])?;
    }
    for (t, what) in [(q, "queries"), (k, "keys"), (v, "values")] {
        float(op, what, t)?;
        rank_is(op, what, t, 4)?;
        same_dtype(op, q, t)?;
    }
    dim_eq(op, "batch of queries and keys", q.shape[0], k.shape[0])?;
    dim_eq(op, "batch of keys and values", k.shape[0], v.shape[0])?;
    dim_eq(op, "context of keys and values", k.shape[1], v.shape[1])?;
    dim_eq(op, "heads of keys and values", k.shape[2], v.shape[2])?;
    dim_eq(op, "head dimension of queries and keys", q.shape[3], k.shape[3])?;
    match (q.shape[2].as_known(), k.shape[2].as_known()) {
        (Some(h), Some(hk)) if hk > 0 && h % hk == 0 => {}
        _ => {
            return fail(format!(
                "`{}`: query heads ({}) must be a constant multiple of key heads ({})",
                op.name(),
                q.shape[2],
                k.shape[2]
            ))
        }
    }
    Ok(q.with_shape(vec![q.shape[0], q.shape[1], q.shape[2], v.shape[3]]))
}

/// The output type of `moe_combine` (or the forward operands of `moe_combine_grad`):
/// `y_sorted[K*N, D]`, `perm[K*N]` (integer), `weights[N, K]` give `[N, D]` of y's dtype.
fn moe_combine(op: &Op, top_k: u64, ins: &[&TensorType]) -> Result<TensorType, InferError> {
    let (y, perm, w) = (ins[0], ins[1], ins[2]);
    rank_is(op, "rows", y, 2)?;
    int(op, "a permutation", perm)?;
    rank_is(op, "weights", w, 2)?;
    dim_eq(op, "top_k and the weights", w.shape[1], Dim::known(top_k))?;
    let rows = w.shape[0].checked_mul(Dim::known(top_k));
    if rows != Some(y.shape[0]) || perm.shape != [y.shape[0]] {
        return fail(format!(
            "`{}`: rows {y} and permutation {perm} must hold top_k rows per token of {w}",
            op.name()
        ));
    }
    Ok(y.with_shape(vec![w.shape[0], y.shape[1]]))
}

/// `cross_entropy`: `logits[..., V]` (float) and `targets[...]` (i32 or i64) of the logits' leading
/// shape give `loss[...]` in f32. A known class count must be positive: a row of no classes has no
/// target.
fn cross_entropy(op: &Op, ins: &[&TensorType]) -> Result<Vec<TensorType>, InferError> {
    arity(op, ins, 2)?;
    Ok(vec![cross_entropy_loss(op, ins[0], ins[1])?])
}

/// The loss type of `cross_entropy` (or the forward operands of `cross_entropy_grad`).
fn cross_entropy_loss(op: &Op, logits: &TensorType, targets: &TensorType) -> Result<TensorType, InferError> {
    if !logits.dtype.is_float() {
        return fail(format!("`{}` needs floating-point logits, found {logits}", op.name()));
    }
    rank_at_least(op, "logits", logits, 1)?;
    if !matches!(targets.dtype, DType::I32 | DType::I64) {
        return fail(format!("`{}` needs i32 or i64 targets, found {targets}", op.name()));
    }
    let lead = &logits.shape[..logits.rank() - 1];
    if targets.rank() != lead.len() {
        return fail(format!(
            "`{}` needs targets of rank {} (the logits' rank less the class axis), found {targets} for {logits}",
            op.name(),
            lead.len()
        ));
    }
    for (a, (&l, &t)) in lead.iter().zip(&targets.shape).enumerate() {
        dim_eq(op, &format!("axis {a} of the logits and the targets"), l, t)?;
    }
    if last(logits).as_known() == Some(0) {
        return fail(format!("`{}` needs at least one class, found {logits}", op.name()));
    }
    Ok(TensorType::new(DType::F32, targets.shape.clone()))
}

fn list(ts: &[&TensorType]) -> String {
    ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

fn check_axes(op: &Op, axes: &[usize], rank: usize) -> Result<(), InferError> {
    for (i, &a) in axes.iter().enumerate() {
        if a >= rank || axes[..i].contains(&a) {
            return fail(format!(
                "`{}`: axes {axes:?} are not distinct axes of a rank-{rank} operand",
                op.name()
            ));
        }
    }
    Ok(())
}

/// Infers the result types of a node in `g` from its operands.
pub fn infer_node(g: &Graph, op: &Op, inputs: &[crate::ValueId]) -> Result<Vec<TensorType>, InferError> {
    let tys: Vec<&TensorType> = inputs.iter().map(|&v| g.ty(v)).collect();
    infer(op, &tys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{BinaryOp, GroupScore, QuantSpec, Scoring};

    fn t(s: &str) -> TensorType {
        // Test helper: "bf16[B, T, 16]".
        let (d, rest) = s.split_once('[').unwrap();
        let dims = rest.trim_end_matches(']');
        let shape = if dims.is_empty() {
            vec![]
        } else {
            dims.split(',').map(|x| Dim::parse(x.trim()).unwrap()).collect()
        };
        TensorType::new(DType::from_name(d).unwrap(), shape)
    }

    pub(super) fn ok(op: Op, ins: &[&str]) -> Vec<String> {
        let tys: Vec<TensorType> = ins.iter().map(|s| t(s)).collect();
        let refs: Vec<&TensorType> = tys.iter().collect();
        infer(&op, &refs).unwrap().iter().map(|t| t.to_string()).collect()
    }

    pub(super) fn bad(op: Op, ins: &[&str]) -> String {
        let tys: Vec<TensorType> = ins.iter().map(|s| t(s)).collect();
        let refs: Vec<&TensorType> = tys.iter().collect();
        infer(&op, &refs).unwrap_err().0
    }

    #[test]
    fn linear_and_matmul() {
        assert_eq!(ok(Op::Linear, &["bf16[B, T, 64]", "bf16[32, 64]"]), ["bf16[B, T, 32]"]);
        assert_eq!(
            bad(Op::Linear, &["bf16[B, T, 64]", "bf16[32, 63]"]),
            "`linear`: the input's last dimension and the weight's in-features must match, found 64 and 63"
        );
        assert_eq!(ok(Op::MatMul, &["f32[B, 4, T, 8]", "f32[4, 8, 16]"]), ["f32[B, 4, T, 16]"]);
        assert!(bad(Op::MatMul, &["f32[B, T, 4, 8]", "f32[4, 8, 16]"]).contains("do not broadcast"));
    }

    #[test]
    fn broadcasting_binary() {
        assert_eq!(ok(Op::Binary(BinaryOp::Mul), &["f32[B, T, 8]", "f32[8]"]), ["f32[B, T, 8]"]);
        assert_eq!(ok(Op::Binary(BinaryOp::Add), &["f32[B, 1, 8]", "f32[T, 1]"]), ["f32[B, T, 8]"]);
        assert!(bad(Op::Binary(BinaryOp::Add), &["f32[B, 8]", "f32[T, 8]"]).contains("do not broadcast"));
    }

    #[test]
    fn all_reduce_keeps_its_f32_operand_type() {
        let dp = || Op::AllReduce { group: "dp".into() };
        assert_eq!(ok(dp(), &["f32[B, T, 8]"]), ["f32[B, T, 8]"]);
        assert_eq!(ok(dp(), &["f32[]"]), ["f32[]"]);
        assert!(bad(dp(), &["bf16[8]"]).contains("sums f32 tensors, found bf16[8]"));
        assert!(bad(dp(), &["f32[8]", "f32[8]"]).contains("operand"));
    }

    #[test]
    fn all_to_all_keeps_its_blocks_and_takes_row_flags() {
        let ep = |size| Op::AllToAll { group: "ep".into(), size };
        assert_eq!(ok(ep(2), &["f32[2, B, T, 72]"]), ["f32[2, B, T, 72]"]);
        assert_eq!(ok(ep(2), &["f32[2, B, T, 72]", "f32[2, B, T]"]), ["f32[2, B, T, 72]"]);
        assert_eq!(ok(ep(4), &["f32[4, B]", "f32[4]"]), ["f32[4, B]"]);
        // One block per process, f32, flags over a prefix of the shape, at most one flag operand.
        for ins in [
            &["f32[3, B, 8]"][..],
            &["bf16[2, B, 8]"],
            &["f32[2, B, 8]", "f32[2, T]"],
            &["f32[2, B, 8]", "f32[]"],
            &["f32[2, B, 8]", "bf16[2, B]"],
            &["f32[2, B, 8]", "f32[2, B]", "f32[2, B]"],
            &[],
        ] {
            let e = bad(ep(2), ins);
            assert!(e.contains("`all_to_all` over `ep` exchanges an f32 `[2, ..]` tensor"), "{ins:?}: {e}");
        }
        assert!(bad(ep(0), &["f32[0, 8]"]).contains("all_to_all"));
    }

    #[test]
    fn concat_split_reshape() {
        assert_eq!(
            ok(Op::Concat { axis: 3 }, &["f32[B, T, 4, 16]", "f32[B, T, 4, 8]"]),
            ["f32[B, T, 4, 24]"]
        );
        assert_eq!(ok(Op::Concat { axis: 0 }, &["f32[T, 2]", "f32[2*T, 2]"]), ["f32[3*T, 2]"]);
        assert!(bad(Op::Concat { axis: 0 }, &["f32[T, 2]", "f32[B, 2]"]).contains("cannot add"));
        assert_eq!(
            ok(Op::Split { axis: 2, sizes: vec![16, 8] }, &["f32[B, T, 24]"]),
            ["f32[B, T, 16]", "f32[B, T, 8]"]
        );
        assert_eq!(
            ok(Op::Reshape { shape: vec![Dim::B, Dim::T, Dim::known(4), Dim::known(6)] }, &["f32[B, T, 24]"]),
            ["f32[B, T, 4, 6]"]
        );
        assert!(bad(Op::Reshape { shape: vec![Dim::B, Dim::known(24)] }, &["f32[B, T, 24]"])
            .contains("element counts differ"));
    }

    #[test]
    fn broadcast_expands_ones() {
        let b = Op::Broadcast { shape: vec![Dim::B, Dim::T, Dim::known(4), Dim::known(8)] };
        assert_eq!(ok(b.clone(), &["f32[B, T, 1, 8]"]), ["f32[B, T, 4, 8]"]);
        assert!(bad(b, &["f32[B, T, 2, 8]"]).contains("does not broadcast"));
    }

    #[test]
    fn attention_and_rope() {
        assert_eq!(
            ok(
                Op::Attention { scale: 0.1, causal: true, mla: None },
                &["f32[B, T, 8, 24]", "f32[B, S, 1, 24]", "f32[B, S, 1, 16]"]
            ),
            ["f32[B, T, 8, 16]"]
        );
        assert!(bad(
            Op::Attention { scale: 0.1, causal: true, mla: None },
            &["f32[B, T, 8, 24]", "f32[B, S, 3, 24]", "f32[B, S, 3, 16]"]
        )
        .contains("constant multiple"));
        assert_eq!(
            ok(
                Op::Attention { scale: 0.1, causal: true, mla: None },
                &["f32[B, T, 8, 24]", "f32[B, S, 1, 24]", "f32[B, S, 1, 16]", "i32[B, T]"]
            ),
            ["f32[B, T, 8, 16]"]
        );
        assert!(bad(
            Op::Attention { scale: 0.1, causal: false, mla: None },
            &["f32[B, T, 8, 24]", "f32[B, S, 1, 24]", "f32[B, S, 1, 16]", "i32[B, T]"]
        )
        .contains("must be causal"));
        assert_eq!(
            ok(Op::CacheUpdate, &["f32[B, S, 576]", "f32[B, T, 576]", "i32[B, T]"]),
            ["f32[B, S, 576]"]
        );
        assert!(bad(Op::CacheUpdate, &["f32[B, S, 576]", "f32[B, T, 512]", "i32[B, T]"]).contains("axis 2"));
        assert!(bad(Op::CacheUpdate, &["f32[B, S, 8]", "bf16[B, T, 8]", "i32[B, T]"]).contains("one dtype"));
        let rope =
            Op::Rope(crate::op::RopeConfig { theta: 1e4, interleaved: true, yarn: None, inverse: false });
        assert_eq!(ok(rope.clone(), &["f32[B, T, 4, 8]", "i32[B, T]"]), ["f32[B, T, 4, 8]"]);
        assert!(bad(rope, &["f32[B, T, 4, 7]", "i32[B, T]"]).contains("even"));
    }

    #[test]
    fn quantisation_scales() {
        let q = Op::Quantize {
            to: DType::F8E4M3,
            spec: QuantSpec { block: vec![128, 128], amax_floor: 1e-4, pow2_scale: false },
        };
        assert_eq!(ok(q, &["bf16[300, 256]"]), ["f8e4m3[300, 256]", "f32[3, 2]"]);
        let a = Op::Quantize {
            to: DType::F8E4M3,
            spec: QuantSpec { block: vec![1, 128], amax_floor: 1e-4, pow2_scale: false },
        };
        assert_eq!(ok(a.clone(), &["bf16[B, T, 512]"]), ["f8e4m3[B, T, 512]", "f32[B, T, 4]"]);
        // Tiles along a symbolic dimension: the scales keep its size (padded after the last tile).
        let tokens = Op::Quantize {
            to: DType::F8E4M3,
            spec: QuantSpec { block: vec![1, 128], amax_floor: 1e-4, pow2_scale: false },
        };
        assert_eq!(ok(tokens, &["bf16[64, B*T]"]), ["f8e4m3[64, B*T]", "f32[64, B*T]"]);
        assert!(padded_scales(&t("f32[64, 300]").shape, &[1, 128], &t("f32[64, 300]").shape));
        assert!(padded_scales(&t("f32[64, 300]").shape, &[1, 128], &t("f32[64, 3]").shape));
        assert!(!padded_scales(&t("f32[64, 300]").shape, &[1, 128], &t("f32[64, 4]").shape));
        let d = Op::Dequantize { to: DType::BF16, block: vec![128, 128] };
        assert_eq!(ok(d.clone(), &["f8e4m3[300, 256]", "f32[3, 2]"]), ["bf16[300, 256]"]);
        assert!(bad(d, &["f8e4m3[300, 256]", "f32[2, 2]"]).contains("must have shape f32[3, 2]"));
    }

    #[test]
    fn moe_ops() {
        let r = Router {
            num_experts: 16,
            top_k: 4,
            scoring: Scoring::Sigmoid,
            num_groups: 4,
            topk_groups: 2,
            group_score: GroupScore::Top2Sum,
            normalize: true,
            scaling: 2.5,
        };
        assert_eq!(
            ok(Op::MoeRoute(r.clone()), &["f32[B, T, 16]", "f32[16]"]),
            ["f32[B, T, 4]", "i32[B, T, 4]"]
        );
        let too_many = Router { top_k: 9, ..r.clone() };
        assert!(bad(Op::MoeRoute(too_many), &["f32[B, T, 16]"]).contains("the 8 experts of the kept groups"));
        let d = Dispatch { num_experts: 16, top_k: 4, ep_size: 2, num_groups: 1, topk_groups: 1 };
        assert_eq!(
            ok(Op::MoeDispatch(d.clone()), &["bf16[B*T, 32]", "i32[B*T, 4]"]),
            ["bf16[4*B*T, 32]", "i32[17]", "i32[4*B*T]"]
        );
        let grouped = Dispatch { num_groups: 4, topk_groups: 2, ..d.clone() };
        assert!(ok(Op::MoeDispatch(grouped), &["bf16[B*T, 32]", "i32[B*T, 4]"]).len() == 3);
        let uneven = Dispatch { num_groups: 3, topk_groups: 1, ..d.clone() };
        assert!(bad(Op::MoeDispatch(uneven), &["bf16[T, 32]", "i32[T, 4]"]).contains("3 equal groups"));
        let too_few = Dispatch { num_groups: 8, topk_groups: 1, ..d };
        assert!(bad(Op::MoeDispatch(too_few), &["bf16[T, 32]", "i32[T, 4]"]).contains("the 2 experts of"));
        assert_eq!(
            ok(Op::MoeCombine { top_k: 4 }, &["bf16[4*B*T, 32]", "i32[4*B*T]", "f32[B*T, 4]"]),
            ["bf16[B*T, 32]"]
        );
        assert_eq!(
            ok(
                Op::GroupedLinear { num_experts: 2 },
                &["bf16[4*B*T, 32]", "i32[3]", "bf16[8, 32]", "bf16[8, 32]"]
            ),
            ["bf16[4*B*T, 8]"]
        );
        let mut ins = vec!["bf16[B, T, 32]", "f32[B, T, 2]", "i32[B, T, 2]"];
        for _ in 0..2 {
            ins.extend(["bf16[8, 32]", "bf16[8, 32]", "bf16[32, 8]"]);
        }
        assert_eq!(ok(Op::MoeExperts { num_experts: 2 }, &ins), ["bf16[B, T, 32]"]);
        ins[8] = "bf16[32, 9]";
        assert!(bad(Op::MoeExperts { num_experts: 2 }, &ins).contains("expert 1 needs"));
    }

    #[test]
    fn huge_attributes_are_errors_not_overflows() {
        assert!(bad(Op::MoeExperts { num_experts: u64::MAX }, &["f32[T, 4]"]).contains("operands"));
        assert!(bad(Op::GroupedLinear { num_experts: u64::MAX }, &["f32[T, 4]"]).contains("operands"));
        assert!(bad(Op::Split { axis: 0, sizes: vec![u64::MAX, 2] }, &["f32[4]"]).contains("add up"));
        let r = Router {
            num_experts: u64::MAX - 1,
            top_k: 1,
            scoring: Scoring::Sigmoid,
            num_groups: 1,
            topk_groups: 1,
            group_score: GroupScore::Max,
            normalize: false,
            scaling: 1.0,
        };
        assert!(bad(Op::MoeRoute(r), &["f32[T, 4]"]).contains("num_experts"));
        let big = format!("{}*T", u64::MAX - 1);
        assert!(bad(Op::Concat { axis: 0 }, &[&format!("f32[{big}]"), &format!("f32[{big}]")])
            .contains("cannot add"));
    }

    #[test]
    fn reductions_and_topk() {
        let r = Op::Reduce { op: ReduceOp::Sum, axes: vec![2], keep_dims: false };
        assert_eq!(ok(r, &["f32[B, T, 8]"]), ["f32[B, T]"]);
        let r = Op::Reduce { op: ReduceOp::Max, axes: vec![2, 2], keep_dims: true };
        assert!(bad(r, &["f32[B, T, 8]"]).contains("not distinct"));
        assert_eq!(ok(Op::TopK { k: 2 }, &["f32[B, T, 8]"]), ["f32[B, T, 2]", "i32[B, T, 2]"]);
        assert!(bad(Op::TopK { k: 9 }, &["f32[B, T, 8]"]).contains("between 1 and 8"));
    }

    #[test]
    fn cross_entropy() {
        let ce = Op::CrossEntropy { ignore_index: None };
        assert_eq!(ok(ce.clone(), &["bf16[B, T, 1024]", "i64[B, T]"]), ["f32[B, T]"]);
        assert_eq!(ok(ce.clone(), &["f32[B*T, 50]", "i32[T*B]"]), ["f32[B*T]"]);
        assert_eq!(ok(ce.clone(), &["f32[7]", "i32[]"]), ["f32[]"]);
        assert_eq!(
            bad(ce.clone(), &["f32[B, T, 8]", "i32[B, T, 8]"]),
            "`cross_entropy` needs targets of rank 2 (the logits' rank less the class axis), found \
             i32[B, T, 8] for f32[B, T, 8]"
        );
        assert_eq!(
            bad(ce.clone(), &["f32[B, T, 8]", "i32[B, S]"]),
            "`cross_entropy`: axis 1 of the logits and the targets must match, found T and S"
        );
        assert_eq!(
            bad(ce.clone(), &["f32[B, T, 8]", "f32[B, T]"]),
            "`cross_entropy` needs i32 or i64 targets, found f32[B, T]"
        );
        assert_eq!(
            bad(ce.clone(), &["i32[B, T, 8]", "i32[B, T]"]),
            "`cross_entropy` needs floating-point logits, found i32[B, T, 8]"
        );
        assert_eq!(
            bad(ce.clone(), &["f32[]", "i32[]"]),
            "`cross_entropy` needs logits of rank at least 1, found f32[]"
        );
        assert!(bad(ce.clone(), &["f32[B, 0]", "i32[B]"]).contains("at least one class"));
        assert!(bad(ce, &["f32[B, 8]"]).contains("takes 2 operand(s), found 1"));
    }
}
