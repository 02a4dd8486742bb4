//! The elementwise evaluator of fused kernels ([`Chain`]), and the one-pass elementwise pattern
//! built on it.
//!
//! A chain computes one element of any value of a body from the kernel's buffers: element `e` of a
//! unary, binary or cast result is the op applied to element `broadcast(e)` of each operand (the
//! operand's index in the result's shape, as `elementwise::broadcast_index` computes it); a reshape
//! keeps the flat index; a broadcast reads its operand's broadcast index; a constant is its value;
//! an input is a load. Values are computed in their compute type (f32 for floats) and **rounded to
//! their dtype after every op**, exactly where the interpreter rounds when it runs the body op by
//! op, so a chain of binary ops and casts is bit for bit the interpreter's result. (Unary functions
//! are computed in f32 by the kernel and in f64 by the interpreter: the few-ulp difference of the
//! single-op kernels, which the final rounding to bf16 usually hides.)
//!
//! Values already computed at the current element are remembered (`memo`, keyed by value and index),
//! so a value read twice is computed once. The memo holds SSA values of the region being written:
//! [`Chain::start`] clears it whenever the caller moves to another region (each element loop body).
//! Row and linear templates [`Chain::seed`] the result of their op at the element they store, so
//! the epilogue reads it from there.
//!
//! Errors (an op the evaluator cannot compute, such as integer division) are kept and returned by
//! [`Chain::finish`]: callbacks of the templates cannot return them.

use std::cell::RefCell;
use std::collections::HashMap;

use kiln_ir::interp::numerics::round_to_dtype;
use kiln_ir::{DType, Dim, Graph, Op, UnaryOp, ValueId};

use super::elementwise::{binary_arith, broadcast_index, convert, each_element};
use super::{compute_type, Frame, LaunchShape, LowerError, Target};
use crate::codegen::mlir::{for_loop, Value};

/// The elementwise evaluator of one body. See the module documentation.
pub(super) struct Chain<'g> {
    body: &'g Graph,
    /// The buffer each input of the body is read from: input `j` is argument `j`.
    inputs: HashMap<ValueId, usize>,
    /// Result `j` of the body is buffer `results + j`.
    results: usize,
    memo: RefCell<HashMap<(ValueId, Value), Value>>,
    /// Values rounded to a narrow dtype, with their stored form: a result of that dtype stores it
    /// as it is rather than rounding again.
    narrowed: RefCell<HashMap<Value, (DType, Value)>>,
    error: RefCell<Option<LowerError>>,
}

impl<'g> Chain<'g> {
    pub fn new(f: &Frame, body: &'g Graph) -> Chain<'g> {
        let inputs = body.inputs().iter().enumerate().map(|(j, &(_, v))| (v, j)).collect();
        Chain {
            body,
            inputs,
            results: f.kernel.args.len(),
            memo: RefCell::new(HashMap::new()),
            narrowed: RefCell::new(HashMap::new()),
            error: RefCell::new(None),
        }
    }

    /// Forgets every value computed so far: the code that follows is in another region.
    pub fn start(&self) {
        self.memo.borrow_mut().clear();
        self.narrowed.borrow_mut().clear();
    }

    /// `x` is element `i` of `v` (the result of a template's op).
    pub fn seed(&self, v: ValueId, i: &Value, x: Value) {
        self.memo.borrow_mut().insert((v, i.clone()), x);
    }

    /// Element `i` of `v`.
    pub fn at(&self, f: &mut Frame, v: ValueId, i: &Value) -> Value {
        let shape = self.body.ty(v).shape.clone();
        self.eval(f, v, &shape, i)
    }

    /// Stores element `i` of every output of the body in its result buffer.
    pub fn store_outputs(&self, f: &mut Frame, i: &Value) {
        for (j, &(_, v)) in self.body.outputs().iter().enumerate() {
            let x = self.at(f, v, i);
            let buf = self.results + j;
            let stored = self.narrowed.borrow().get(&x).cloned();
            match stored {
                Some((dtype, raw)) if dtype == f.bufs[buf].ty.dtype => f.store_raw(buf, i, &raw),
                _ => f.store(buf, i, &x),
            }
        }
    }

    /// `v` rounded to `dtype` (in the compute type), remembering its stored form.
    pub fn round(&self, f: &mut Frame, v: &Value, dtype: DType) -> Value {
        match dtype {
            DType::F16 | DType::BF16 | DType::F8E4M3 => {
                let raw = f.narrow(v.clone(), dtype);
                let x = f.widen(raw.clone(), dtype);
                self.narrowed.borrow_mut().insert(x.clone(), (dtype, raw));
                x
            }
            _ => v.clone(),
        }
    }

    /// The first error met, if any.
    pub fn finish(self) -> Result<(), LowerError> {
        match self.error.into_inner() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fail(&self, f: &mut Frame, e: LowerError, dtype: DType) -> Value {
        self.error.borrow_mut().get_or_insert(e);
        // A placeholder of the right type: the text is discarded with the error.
        f.b.constant(if compute_type(dtype) == "f32" { "0.0" } else { "0" }, compute_type(dtype))
    }

    /// The element of `v` that flat index `i` of a tensor of shape `frame` reads: the same index when
    /// both have as many elements, else its broadcast index.
    fn eval(&self, f: &mut Frame, v: ValueId, frame: &[Dim], i: &Value) -> Value {
        let ty = self.body.ty(v);
        let same = ty.numel().is_some()
            && ty.numel() == frame.iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
        let e = if same { i.clone() } else { broadcast_index(f, &ty.shape.clone(), frame, i) };
        self.element(f, v, &e)
    }

    /// Element `e` (a flat index into its own shape) of `v`.
    fn element(&self, f: &mut Frame, v: ValueId, e: &Value) -> Value {
        if let Some(x) = self.memo.borrow().get(&(v, e.clone())) {
            return x.clone();
        }
        let g = self.body;
        let node = g.node(g.producer(v));
        let ty = g.ty(v).clone();
        let shape = &ty.shape;
        let x = match &node.op {
            Op::Input { .. } => f.load(self.inputs[&v], e),
            // The interpreter's constant, rounded to its dtype here rather than by the kernel.
            Op::Constant { value } => f.b.f32(f64::from(round_to_dtype(ty.dtype, *value as f32))),
            Op::Unary(u) => {
                let a = self.eval(f, node.inputs[0], shape, e);
                let y = f.unary(*u, &a);
                self.round(f, &y, ty.dtype)
            }
            Op::Binary(op) => {
                let dtype = g.ty(node.inputs[0]).dtype;
                match binary_arith(*op, dtype) {
                    Ok(name) => {
                        let a = self.eval(f, node.inputs[0], shape, e);
                        let b = self.eval(f, node.inputs[1], shape, e);
                        let ct = compute_type(dtype);
                        let y = f.b.op("y", format_args!("arith.{name} {a}, {b} : {ct}"));
                        self.round(f, &y, ty.dtype)
                    }
                    Err(reason) => {
                        let err = f.unsupported(op.name(), reason);
                        return self.fail(f, err, ty.dtype);
                    }
                }
            }
            Op::Cast { to } => {
                let from = g.ty(node.inputs[0]).dtype;
                let a = self.eval(f, node.inputs[0], shape, e);
                let y = convert(f, &a, from, *to);
                self.round(f, &y, *to)
            }
            // Same bytes under another shape: the same flat index.
            Op::Reshape { .. } => self.element(f, node.inputs[0], e),
            Op::Broadcast { .. } => self.eval(f, node.inputs[0], shape, e),
            op => {
                // A template's op read at an element where it was not computed: the fusion analysis
                // rules this out, so this is a bug rather than an unsupported body.
                let err = LowerError::Malformed {
                    kernel: f.kernel.name.clone(),
                    message: format!(
                        "the fused `{}` result {v} is read at an element it was not computed for",
                        op.name()
                    ),
                };
                return self.fail(f, err, ty.dtype);
            }
        };
        self.memo.borrow_mut().insert((v, e.clone()), x.clone());
        x
    }
}

/// The elementwise pattern: one work item (CPU) or thread (GPU) per output element. On the CPU a
/// body that [`vector_body`] takes computes 16 elements of a work range at a time (its last
/// elements alone, by the scalar chain).
pub(super) fn elementwise(f: &mut Frame, body: &Graph) -> Result<LaunchShape, LowerError> {
    let n = f
        .result(0)
        .ty
        .numel()
        .ok_or_else(|| f.unsupported("fused", "the element count does not fit a dimension"))?;
    let chain = Chain::new(f, body);
    if f.target == Target::Cpu && vector_body(f, body, n) {
        let (lo, hi) = f.range.clone().expect("CPU frames have a work range");
        let (one, sixteen) = (f.b.index(1), f.b.index(16));
        let count = f.b.subi(&hi, &lo);
        let whole = f.b.divui(&count, &sixteen);
        let whole = f.b.muli(&whole, &sixteen);
        let split = f.b.addi(&lo, &whole);
        let inputs: HashMap<ValueId, usize> =
            body.inputs().iter().enumerate().map(|(j, &(_, v))| (v, j)).collect();
        let results = f.kernel.args.len();
        for_loop(f, &lo, &split, &sixteen, |f, i| {
            let mut memo = HashMap::new();
            for (j, &(_, v)) in body.outputs().iter().enumerate() {
                let x = vector_element(f, body, &inputs, n, &mut memo, v, i);
                f.store_vec(results + j, i, &x);
            }
        });
        for_loop(f, &split, &hi, &one, |f, i| {
            chain.start();
            chain.store_outputs(f, i);
        });
        chain.finish()?;
        return Ok(LaunchShape::Cpu { work: n });
    }
    let launch = each_element(f, n, |f, i| {
        chain.start();
        chain.store_outputs(f, i);
    });
    chain.finish()?;
    Ok(launch)
}

/// `vector<16xf32>`.
const VEC: &str = "vector<16xf32>";

/// Whether the 16-lane evaluator ([`vector_element`]) computes `body` exactly as the scalar chain
/// does: every value a float of at most 32 bits (FP8 aside) with the kernel's `n` elements or one
/// (read at its element 0), ops whose vector forms round as their scalar ones (arithmetic,
/// float casts, negation, absolute value, square root; not the transcendental functions, whose
/// vector forms are other approximations), and float buffers.
fn vector_body(f: &Frame, body: &Graph, n: Dim) -> bool {
    let float = |d: DType| matches!(d, DType::F32 | DType::BF16 | DType::F16);
    if !f.bufs.iter().all(|b| float(b.ty.dtype)) {
        return false;
    }
    body.nodes().into_iter().all(|id| {
        let node = body.node(id);
        let op_ok = match &node.op {
            Op::Input { .. } | Op::Constant { .. } | Op::Reshape { .. } | Op::Broadcast { .. } => true,
            Op::Unary(u) => matches!(u, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sqrt),
            Op::Binary(_) | Op::Cast { .. } => true,
            _ => false,
        };
        op_ok
            && node.results.iter().all(|&v| {
                let ty = body.ty(v);
                float(ty.dtype) && (ty.numel() == Some(n) || ty.numel() == Some(Dim::known(1)))
            })
    })
}

/// Elements `i..i + 16` of `v` ([`vector_body`]'s values), in f32 lanes: a value of one element
/// is its element 0 in every lane; each op is the scalar chain's, lane by lane, rounded to its
/// dtype after every op.
fn vector_element(
    f: &mut Frame,
    g: &Graph,
    inputs: &HashMap<ValueId, usize>,
    n: Dim,
    memo: &mut HashMap<ValueId, Value>,
    v: ValueId,
    i: &Value,
) -> Value {
    if let Some(x) = memo.get(&v) {
        return x.clone();
    }
    let node = g.node(g.producer(v));
    let ty = g.ty(v).clone();
    let splat = |f: &mut Frame, x: &Value| f.b.op("s", format_args!("vector.broadcast {x} : f32 to {VEC}"));
    let round = |f: &mut Frame, y: Value| match ty.dtype {
        DType::BF16 | DType::F16 => {
            let e = if ty.dtype == DType::BF16 { "bf16" } else { "f16" };
            let raw = f.b.op("r", format_args!("arith.truncf {y} : {VEC} to vector<16x{e}>"));
            f.b.op("r", format_args!("arith.extf {raw} : vector<16x{e}> to {VEC}"))
        }
        _ => y,
    };
    let x = match &node.op {
        Op::Input { .. } if ty.numel() == Some(n) => f.load_vec(inputs[&v], i),
        Op::Input { .. } => {
            let zero = f.b.index(0);
            let x = f.load(inputs[&v], &zero);
            splat(f, &x)
        }
        Op::Constant { value } => {
            let c = f.b.f32(f64::from(round_to_dtype(ty.dtype, *value as f32)));
            splat(f, &c)
        }
        Op::Unary(u) => {
            let a = vector_element(f, g, inputs, n, memo, node.inputs[0], i);
            let y = match u {
                UnaryOp::Neg => f.b.op("f", format_args!("arith.negf {a} : {VEC}")),
                UnaryOp::Abs => {
                    let neg = f.b.op("f", format_args!("arith.negf {a} : {VEC}"));
                    f.b.op("f", format_args!("arith.maximumf {a}, {neg} : {VEC}"))
                }
                _ => f.b.op("s", format_args!("math.sqrt {a} : {VEC}")),
            };
            round(f, y)
        }
        Op::Binary(op) => {
            let name = binary_arith(*op, g.ty(node.inputs[0]).dtype).expect("float arithmetic");
            let a = vector_element(f, g, inputs, n, memo, node.inputs[0], i);
            let b = vector_element(f, g, inputs, n, memo, node.inputs[1], i);
            let y = f.b.op("y", format_args!("arith.{name} {a}, {b} : {VEC}"));
            round(f, y)
        }
        // Float to float: the value in f32, rounded to the new dtype.
        Op::Cast { .. } => {
            let a = vector_element(f, g, inputs, n, memo, node.inputs[0], i);
            round(f, a)
        }
        // A reshape keeps the flat index; a broadcast of as many elements reads the same ones, of
        // one element its element 0 (as the value itself, one element, is read).
        _ => vector_element(f, g, inputs, n, memo, node.inputs[0], i),
    };
    memo.insert(v, x.clone());
    x
}
