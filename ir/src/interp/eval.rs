//! The walker: binds symbolic sizes, checks inputs and parameters, runs nodes in order and frees
//! each value after its last use. The arithmetic lives in [`super::ops`].

use std::borrow::Cow;
use std::collections::HashMap;

use crate::graph::{Graph, NodeId, ValueId};
use crate::infer::{infer, padded_scales};
use crate::op::Op;
use crate::types::{DType, Dim, Sym, SymBindings, TensorType};

use super::tensor::Tensor;
use super::{ops, InterpError, Outputs};

/// Runs `g` on the named `inputs` and `params` and returns its outputs.
pub fn run(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Result<Outputs, InterpError> {
    run_with(g, inputs, params, &mut |_, _| {})
}

/// Like [`run`], and calls `observe` with every value of the top-level graph right after it is
/// computed (inputs and parameters included; values inside fused kernels are not reported).
pub fn run_with(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
    observe: &mut impl FnMut(ValueId, &Tensor),
) -> Result<Outputs, InterpError> {
    let feeds: HashMap<&str, &Tensor> = inputs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    execute(g, &feeds, params, observe, Bindings::default())
}

/// Concrete values of the symbolic sizes, each with the input that bound it.
#[derive(Clone, Default)]
struct Bindings {
    vals: [Option<(u64, String)>; 3],
}

enum EvalError {
    Unbound(Sym),
    Overflow,
}

impl Bindings {
    fn get(&self, s: Sym) -> Option<u64> {
        self.vals[s as usize].as_ref().map(|(v, _)| *v)
    }

    /// The value of `d`, if every symbol it uses is bound.
    fn eval(&self, d: Dim) -> Result<u64, EvalError> {
        let mut b = SymBindings { b: 1, t: 1, s: 1 };
        for s in used_syms(d) {
            let v = self.get(s).ok_or(EvalError::Unbound(s))?;
            match s {
                Sym::B => b.b = v,
                Sym::T => b.t = v,
                Sym::S => b.s = v,
            }
        }
        d.eval(&b).ok_or(EvalError::Overflow)
    }

    /// Binds the one unbound symbol of `dim`, a dimension of input `name`, from its concrete size
    /// `n`. Returns false when that is not possible yet (several symbols unbound); whether bound
    /// symbols agree is checked once every input is seen, so the first binding wins.
    fn unify(&mut self, name: &str, dim: Dim, n: u64) -> bool {
        let unbound: Vec<Sym> = used_syms(dim).into_iter().filter(|&s| self.get(s).is_none()).collect();
        match unbound.as_slice() {
            [] => true,
            [s] => {
                // dim = s * rest with rest free of s: solve s = n / rest. A power (`B*B`) is left to
                // the final check, which reports it.
                let rest = dim.checked_div(Dim::sym(*s)).filter(|r| !used_syms(*r).contains(s));
                let Some(rest) = rest else { return false };
                let r = match self.eval(rest) {
                    Ok(r) if r > 0 && n % r == 0 => r,
                    _ => return false,
                };
                self.vals[*s as usize] = Some((n / r, name.to_string()));
                true
            }
            _ => false,
        }
    }
}

/// The symbols a dimension mentions.
fn used_syms(d: Dim) -> Vec<Sym> {
    Sym::ALL.into_iter().filter(|&s| d.checked_div(Dim::sym(s)).is_some()).collect()
}

/// Binds symbolic sizes from the inputs and checks every input against its declared type.
/// `start` holds sizes already known: a fused body's inputs may mention only products (`4*B*T`),
/// from which its caller's `B` and `T` could not be solved again.
fn bind_inputs(g: &Graph, feeds: &HashMap<&str, &Tensor>, start: Bindings) -> Result<Bindings, InterpError> {
    let declared = g.inputs();
    for name in feeds.keys() {
        if !declared.iter().any(|(n, _)| n == name) {
            return Err(InterpError::UnknownInput { name: name.to_string(), graph: g.name().to_string() });
        }
    }
    let mut bind = start;
    let mut pending = Vec::new();
    for &(name, v) in &declared {
        let t = *feeds.get(name).ok_or_else(|| InterpError::MissingInput { name: name.to_string() })?;
        let ty = g.ty(v);
        let mismatch =
            || InterpError::InputType { name: name.to_string(), expected: ty.clone(), found: t.ty() };
        if t.dtype() != ty.dtype || t.shape().len() != ty.rank() {
            return Err(mismatch());
        }
        for (&dim, &n) in ty.shape.iter().zip(t.shape()) {
            if dim.as_known().is_some_and(|k| k != n) {
                return Err(mismatch());
            }
            if !bind.unify(name, dim, n) {
                pending.push((name, dim, n));
            }
        }
    }
    // Dimensions with several unbound symbols (`B*T` before either is known) get a second chance.
    for &(name, dim, n) in &pending {
        bind.unify(name, dim, n);
    }
    // Every input dimension must now evaluate to its size.
    for &(name, v) in &declared {
        let t = feeds[name];
        for (axis, (&dim, &n)) in g.ty(v).shape.iter().zip(t.shape()).enumerate() {
            let got = bind.eval(dim);
            if matches!(got, Ok(x) if x == n) {
                continue;
            }
            // Name the first symbol of the dimension and the input that bound it.
            let syms = used_syms(dim);
            let bound_sym = syms.iter().copied().find_map(|s| bind.vals[s as usize].clone().map(|b| (s, b)));
            return Err(match (got, bound_sym) {
                (Ok(_), Some((s, (bound, bound_by)))) => InterpError::DimConflict {
                    name: name.to_string(),
                    axis,
                    dim,
                    sym: s.name(),
                    bound,
                    found: n,
                    bound_by,
                },
                // A symbol still unbound here could not be solved from this size (`2*T` against an
                // odd size, `B*B`): the size does not fit the declared dimension.
                _ => InterpError::InputType {
                    name: name.to_string(),
                    expected: g.ty(v).clone(),
                    found: t.ty(),
                },
            });
        }
    }
    Ok(bind)
}

/// Checks that the parameters are exactly the graph's, with the declared types.
fn check_params(g: &Graph, params: &HashMap<String, Tensor>) -> Result<(), InterpError> {
    let declared = g.params();
    for (name, ty) in &declared {
        let t = params.get(*name).ok_or_else(|| InterpError::MissingParam { name: name.to_string() })?;
        if t.ty() != **ty {
            return Err(InterpError::ParamType {
                name: name.to_string(),
                expected: (*ty).clone(),
                found: t.ty(),
            });
        }
    }
    let mut extra: Vec<&String> = params.keys().filter(|k| !declared.iter().any(|(n, _)| n == k)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(InterpError::UnexpectedParam { name: name.to_string(), graph: g.name().to_string() });
    }
    Ok(())
}

/// The declared type of `v` with every dimension evaluated.
fn concrete(g: &Graph, bind: &Bindings, v: ValueId) -> Result<TensorType, InterpError> {
    let ty = g.ty(v);
    let mut shape = Vec::with_capacity(ty.rank());
    for &d in &ty.shape {
        match bind.eval(d) {
            Ok(n) => shape.push(Dim::known(n)),
            Err(EvalError::Unbound(s)) => return Err(InterpError::UnboundDim { value: v, sym: s.name() }),
            Err(EvalError::Overflow) => {
                return Err(InterpError::Op {
                    value: Some(v),
                    op: g.node(g.producer(v)).op.name(),
                    msg: format!("dimension {d} overflows"),
                })
            }
        }
    }
    Ok(TensorType::new(ty.dtype, shape))
}

/// The op with symbolic shape attributes evaluated, so that inference on concrete operand types
/// compares like with like.
fn concrete_op<'o>(op: &'o Op, bind: &Bindings) -> Result<Cow<'o, Op>, String> {
    let eval = |shape: &[Dim]| -> Result<Vec<Dim>, String> {
        shape
            .iter()
            .map(|&d| match bind.eval(d) {
                Ok(n) => Ok(Dim::known(n)),
                Err(EvalError::Unbound(s)) => {
                    Err(format!("symbolic size {} is not bound by any input", s.name()))
                }
                Err(EvalError::Overflow) => Err(format!("dimension {d} overflows")),
            })
            .collect()
    };
    Ok(match op {
        Op::Reshape { shape } => Cow::Owned(Op::Reshape { shape: eval(shape)? }),
        Op::Broadcast { shape } => Cow::Owned(Op::Broadcast { shape: eval(shape)? }),
        _ => Cow::Borrowed(op),
    })
}

/// Runs `g` with inputs by name; returns the outputs in declaration order.
fn execute<'a>(
    g: &Graph,
    feeds: &HashMap<&str, &'a Tensor>,
    params: &'a HashMap<String, Tensor>,
    observe: &mut dyn FnMut(ValueId, &Tensor),
    start: Bindings,
) -> Result<Outputs, InterpError> {
    let bind = bind_inputs(g, feeds, start)?;
    check_params(g, params)?;

    let order = g.nodes();
    let bound = g.value_bound() as usize;
    // Remaining reads of each value; outputs are pinned and never freed.
    let mut uses = vec![0u32; bound];
    let mut pinned = vec![false; bound];
    for &n in &order {
        for v in &g.node(n).inputs {
            uses[v.as_u32() as usize] += 1;
        }
    }
    for (_, v) in g.outputs() {
        pinned[v.as_u32() as usize] = true;
    }
    let mut slots: Vec<Option<Cow<'a, Tensor>>> = vec![None; bound];

    for &n in &order {
        let node = g.node(n);
        let results = eval_node(g, n, &bind, feeds, params, &slots)?;
        for (&r, t) in node.results.iter().zip(results) {
            observe(r, &t);
            let i = r.as_u32() as usize;
            if uses[i] > 0 || pinned[i] {
                slots[i] = Some(t);
            }
        }
        for v in &node.inputs {
            let i = v.as_u32() as usize;
            uses[i] -= 1;
            if uses[i] == 0 && !pinned[i] {
                slots[i] = None;
            }
        }
    }

    let mut out = Outputs::new();
    for (name, v) in g.outputs() {
        let t = slots[v.as_u32() as usize].as_ref().expect("outputs are pinned");
        out.insert(name.clone(), t.as_ref().clone());
    }
    Ok(out)
}

/// Computes the results of node `n`.
fn eval_node<'a>(
    g: &Graph,
    n: NodeId,
    bind: &Bindings,
    feeds: &HashMap<&str, &'a Tensor>,
    params: &'a HashMap<String, Tensor>,
    slots: &[Option<Cow<'a, Tensor>>],
) -> Result<Vec<Cow<'a, Tensor>>, InterpError> {
    let node = g.node(n);
    let name = node.op.name();
    let first = node.results.first().or(node.inputs.first()).copied();
    let fail = |msg: String| InterpError::Op { value: first, op: name, msg };
    let declared: Vec<TensorType> =
        node.results.iter().map(|&r| concrete(g, bind, r)).collect::<Result<_, _>>()?;

    match &node.op {
        // Both were checked against their declared types before the run.
        Op::Input { name: input } => return Ok(vec![Cow::Borrowed(feeds[input.as_str()])]),
        Op::Param { name: param } => return Ok(vec![Cow::Borrowed(&params[param])]),
        Op::Constant { value } => {
            return constant(*value, &declared[0]).map(|t| vec![Cow::Owned(t)]).map_err(fail)
        }
        Op::Send { peer, .. } | Op::Recv { peer, .. } => {
            return Err(InterpError::Communication { value: first, op: name, peer: *peer })
        }
        _ => {}
    }

    let mut ins = Vec::with_capacity(node.inputs.len());
    for v in &node.inputs {
        match slots[v.as_u32() as usize].as_deref() {
            Some(t) => ins.push(t),
            None => return Err(fail(format!("operand {v} has not been computed"))),
        }
    }

    if let Op::Fused { name: kernel, body } = &node.op {
        let value = node.results.first().copied().unwrap_or(ValueId::new(0));
        let wrap = |e: InterpError| InterpError::Fused { value, kernel: kernel.clone(), source: Box::new(e) };
        let body_inputs = body.inputs();
        if body_inputs.len() != ins.len() {
            return Err(fail(format!("the body takes {} operands, found {}", body_inputs.len(), ins.len())));
        }
        let feeds: HashMap<&str, &Tensor> =
            body_inputs.iter().map(|(n, _)| *n).zip(ins.iter().copied()).collect();
        // The body shares the graph's sizes.
        let outs = execute(body, &feeds, &HashMap::new(), &mut |_, _| {}, bind.clone()).map_err(wrap)?;
        let results: Vec<Tensor> = body.outputs().iter().map(|(n, _)| outs[n].clone()).collect();
        check_types(&results, &declared).map_err(fail)?;
        return Ok(results.into_iter().map(Cow::Owned).collect());
    }

    // Validate the operands with shape inference on their concrete types.
    let op = concrete_op(&node.op, bind).map_err(fail)?;
    let in_types: Vec<TensorType> = ins.iter().map(|t| t.ty()).collect();
    let refs: Vec<&TensorType> = in_types.iter().collect();
    let mut inferred = infer(&op, &refs).map_err(|e| fail(e.0))?;
    // A quantisation whose tiles ran along a symbolic dimension declares padded scales.
    if let Op::Quantize { spec, .. } = &*op {
        if inferred[0] == declared[0] && padded_scales(&in_types[0].shape, &spec.block, &declared[1].shape) {
            inferred[1] = declared[1].clone();
        }
    }
    if inferred != declared {
        return Err(fail(format!(
            "operands {} give {}, but the graph declares {}",
            list(&in_types),
            list(&inferred),
            list(&declared)
        )));
    }
    let results = ops::apply(&op, &ins, &inferred).map_err(fail)?;
    check_types(&results, &inferred).map_err(|m| fail(format!("interpreter bug: {m}")))?;
    Ok(results.into_iter().map(Cow::Owned).collect())
}

fn check_types(results: &[Tensor], want: &[TensorType]) -> Result<(), String> {
    let got: Vec<TensorType> = results.iter().map(Tensor::ty).collect();
    if got != want {
        return Err(format!("computed {}, but the graph declares {}", list(&got), list(want)));
    }
    Ok(())
}

/// A constant of the declared type, every element `value` rounded to the dtype.
fn constant(value: f64, ty: &TensorType) -> Result<Tensor, String> {
    let shape: Vec<u64> = ty.shape.iter().map(|d| d.as_known().expect("concrete")).collect();
    let n = shape.iter().product::<u64>() as usize;
    match ty.dtype {
        d if d.is_float() => Ok(Tensor::float(d, shape, vec![value as f32; n])),
        d if d.is_int() && value.fract() == 0.0 && value.abs() < 2f64.powi(53) => {
            let v = value as i64;
            Tensor::from_i64(d, shape, vec![v; n]).map_err(|e| e.to_string())
        }
        DType::Bool if value == 0.0 || value == 1.0 => {
            Tensor::from_bool(shape, vec![value == 1.0; n]).map_err(|e| e.to_string())
        }
        d => Err(format!("{value} is not a value of {d}")),
    }
}

fn list(ts: &[TensorType]) -> String {
    ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}
