//! Kernel formation: a verified graph into the kernels that compute it and the program of steps that
//! runs them.
//!
//! Today every primitive op is its own kernel, and a `fused` node is one kernel whose body is the fused
//! graph. Nodes that compute nothing are not kernels: `input`, `param` and `constant` name buffers the
//! runtime provides; `reshape` is an [`Step::Alias`] (every value is a dense row-major buffer, so a
//! reshape is the same bytes under another type); `send`/`recv` are [`Step::Runtime`] steps.
//!
//! A [`Kernel`] is described by content alone: its body is a small graph whose inputs `a0, a1, ...` are
//! the kernel's arguments and whose outputs `r0, r1, ...` its results, with no scopes and no names from
//! the model. Kernels with equal bodies (same op, attributes and argument types) are one kernel, so the
//! 58 identical MoE layers of DeepSeek-V3 share theirs. Each kernel is named after its op and a hash of
//! its printed body (`k_rms_norm_4f1c0e2a9b3d`), which is stable across runs, machines and graph
//! positions; its [`KernelId`] (`k0`, `k1`, ...) numbers kernels in order of first use in the graph.
//!
//! Kernel ABI facts fixed here and relied on by lowering: buffers are passed in the order arguments,
//! results, then scratch buffers ([`Kernel::scratch`]: the intermediates of a `fused` body that does
//! not lower as one pass, and the workspace an op's kernel needs, see [`super::fusion`]; the runtime
//! provides them for the launch, their contents undefined before and after); every symbolic size (`B`, `T`, `S`) that occurs in a
//! kernel's types is passed as an `i64`, in the order of [`Kernel::syms`].
//!
//! What formation does not do: fusion decisions (a pass produces `fused` nodes), memory planning, or
//! any check that a kernel can be lowered (lowering reports `LowerError::Unsupported`).

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};

use kiln_ir::graph::GraphError;
use kiln_ir::infer::{infer, InferError};
use kiln_ir::types::Sym;
use kiln_ir::verify::{verify, VerifyError};
use kiln_ir::{Attr, Dim, Graph, NodeId, Op, TensorType, ValueId};
use rayon::prelude::*;

/// A kernel of a [`KernelPlan`]. Displays as `k3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelId(u32);

impl KernelId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "k{}", self.0)
    }
}

/// One kernel: what it computes (its body) and its signature.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub id: KernelId,
    /// `k_{op}_{hash}`: the symbol of the kernel in emitted code.
    pub name: String,
    /// Inputs `a0..` are the arguments, outputs `r0..` the results.
    pub body: Graph,
    pub args: Vec<TensorType>,
    pub results: Vec<TensorType>,
    /// Scratch buffers the kernel needs for one launch, after its results: the intermediates of a
    /// `fused` body computed in several phases, and the workspace of an op that needs one
    /// (`attention_grad`; [`super::fusion::workspace`]); [`super::fusion::Plan::scratch`].
    pub scratch: Vec<TensorType>,
    /// The symbolic sizes the kernel's types (scratch included) mention, in `B, T, S` order: its
    /// `i64` size arguments.
    pub syms: Vec<Sym>,
}

/// One step of the program that runs a graph, in graph order.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Runs `kernel` on the buffers of `args`, writing the buffers of `results`.
    Launch { kernel: KernelId, node: NodeId, args: Vec<ValueId>, results: Vec<ValueId> },
    /// `result` is the buffer of `source` under another shape (a reshape): no code runs.
    Alias { node: NodeId, result: ValueId, source: ValueId },
    /// Communication the runtime performs itself (`send`, `recv`).
    Runtime { node: NodeId },
}

/// The kernels of a graph and the steps that run them.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelPlan {
    /// Indexed by [`KernelId`].
    pub kernels: Vec<Kernel>,
    pub steps: Vec<Step>,
}

impl KernelPlan {
    pub fn kernel(&self, id: KernelId) -> &Kernel {
        &self.kernels[id.index()]
    }

    /// The number of kernel launches one run of the graph makes.
    pub fn launch_count(&self) -> usize {
        self.steps.iter().filter(|s| matches!(s, Step::Launch { .. })).count()
    }
}

/// Why a graph could not be partitioned into kernels.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FormError {
    /// The graph does not verify; formation only accepts verified graphs.
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    /// An op applied to argument types it does not accept ([`Kernel::for_op`]).
    #[error("kernel for `{op}`: {cause}")]
    Infer { op: &'static str, cause: InferError },
    /// A kernel body could not be built: a bug in formation.
    #[error("kernel for `{op}`: {cause}")]
    Body { op: &'static str, cause: GraphError },
    /// Two different kernels got the same name. Names carry 48 bits of hash, so this does not happen
    /// by chance; it is reported rather than producing two symbols with one name.
    #[error("kernels `{first}` and `{second}` differ but both hash to `{name}`")]
    NameCollision { name: String, first: String, second: String },
}

impl Kernel {
    /// The kernel of one primitive op applied to arguments of the given types (id `k0`): what
    /// formation builds for each node, usable on its own in tests and tools.
    pub fn for_op(op: &Op, args: &[TensorType]) -> Result<Kernel, FormError> {
        let refs: Vec<&TensorType> = args.iter().collect();
        let results = infer(op, &refs).map_err(|cause| FormError::Infer { op: op.name(), cause })?;
        let body = op_body(op, args, &results)?;
        Kernel::from_body(KernelId(0), body)
    }

    /// The kernel whose body is `body` (inputs are arguments, outputs results); its scratch buffers
    /// come from its fusion plan.
    fn from_body(id: KernelId, mut body: Graph) -> Result<Kernel, FormError> {
        body.set_name("kernel");
        let text = kiln_ir::print(&body);
        let name = format!("k_{}_{:012x}", body_label(&body), fnv1a(text.as_bytes()) >> 16);
        body.set_name(name.clone());
        let args: Vec<TensorType> = body.inputs().iter().map(|&(_, v)| body.ty(v).clone()).collect();
        let results: Vec<TensorType> = body.outputs().iter().map(|&(_, v)| body.ty(v).clone()).collect();
        let scratch =
            super::fusion::scratch(&body).map_err(|cause| FormError::Body { op: "fused", cause })?;
        let syms = syms_of(args.iter().chain(&results).chain(&scratch));
        Ok(Kernel { id, name, body, args, results, scratch, syms })
    }

    /// The op of a one-op kernel (every kernel that is not `fused`).
    pub fn single_op(&self) -> Option<&Op> {
        let mut ops = self.body.nodes().into_iter().map(|n| &self.body.node(n).op);
        let mut computing = ops.by_ref().filter(|op| !matches!(op, Op::Input { .. }));
        let first = computing.next()?;
        computing.next().is_none().then_some(first)
    }
}

/// The symbolic sizes some of `types` mention, in `B, T, S` order.
pub fn syms_of<'t>(types: impl Iterator<Item = &'t TensorType> + Clone) -> Vec<Sym> {
    Sym::ALL.into_iter().filter(|&s| types.clone().any(|t| t.shape.iter().any(|&d| has_sym(d, s)))).collect()
}

/// Whether `d` has `s` as a factor.
pub fn has_sym(d: Dim, s: Sym) -> bool {
    d.checked_div(Dim::sym(s)).is_some()
}

/// A label for kernel names: the op name, or `fused_{name}` with the name reduced to `[a-z0-9_]`.
fn body_label(body: &Graph) -> String {
    let ops: Vec<&Op> = body
        .nodes()
        .into_iter()
        .map(|n| &body.node(n).op)
        .filter(|op| !matches!(op, Op::Input { .. } | Op::Constant { .. }))
        .collect();
    match ops.as_slice() {
        [one] => one.name().to_string(),
        _ => "fused".to_string(),
    }
}

/// The body graph of one op: inputs `a0..` of the argument types, the op, outputs `r0..`.
fn op_body(op: &Op, args: &[TensorType], results: &[TensorType]) -> Result<Graph, FormError> {
    let wrap = |cause| FormError::Body { op: op.name(), cause };
    let mut body = Graph::new("kernel");
    let mut ins = Vec::with_capacity(args.len());
    for (i, t) in args.iter().enumerate() {
        let (_, v) =
            body.add_node(Op::Input { name: format!("a{i}") }, &[], vec![t.clone()], None).map_err(wrap)?;
        ins.push(v[0]);
    }
    let (_, outs) = body.add_node(op.clone(), &ins, results.to_vec(), None).map_err(wrap)?;
    for (i, v) in outs.into_iter().enumerate() {
        body.add_output(format!("r{i}"), v).map_err(wrap)?;
    }
    Ok(body)
}

/// FNV-1a, 64 bits: a fixed, documented hash, so kernel names do not change between Rust versions
/// (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Partitions a verified graph into kernels (one per primitive op or `fused` node, deduplicated by
/// content) and the steps that run them. See the module documentation.
pub fn form_kernels(g: &Graph) -> Result<KernelPlan, FormError> {
    verify(g)?;
    let mut kernels = Kernels::default();
    let steps = form_into(g, &mut kernels)?;
    Ok(KernelPlan { kernels: kernels.kernels, steps })
}

/// Forms the kernels of several programs of one model (prefill and decode) as one deduplicated
/// set: each plan has every kernel (ids agree across plans) and its own program's steps.
pub fn form_programs(graphs: &[&Graph]) -> Result<Vec<KernelPlan>, FormError> {
    // Verified at once, the first failure in order reported.
    let verified: Vec<Result<(), VerifyError>> = graphs.par_iter().map(|g| verify(g)).collect();
    verified.into_iter().collect::<Result<(), VerifyError>>()?;
    let mut kernels = Kernels::default();
    let mut programs = Vec::new();
    for g in graphs {
        programs.push(form_into(g, &mut kernels)?);
    }
    Ok(programs.into_iter().map(|steps| KernelPlan { kernels: kernels.kernels.clone(), steps }).collect())
}

/// The kernels formed so far, found by name, and by the node that made them: a node with the op
/// (a `fused` body included) and the operand and result types of one seen before is that node's
/// kernel, found without building, printing and hashing its body again (DeepSeek-V3's 58 MoE
/// layers in each program are the same dozen nodes).
#[derive(Default)]
struct Kernels {
    kernels: Vec<Kernel>,
    by_name: HashMap<String, KernelId>,
    by_node: rustc_hash::FxHashMap<u64, Vec<(NodeKey, KernelId)>>,
}

/// What a node's kernel is a function of.
#[derive(PartialEq)]
struct NodeKey {
    op: Op,
    args: Vec<TensorType>,
    results: Vec<TensorType>,
}

impl Kernels {
    /// The kernel of a node with this op and these types, if one was formed.
    fn find(&self, hash: u64, op: &Op, args: &[&TensorType], results: &[&TensorType]) -> Option<KernelId> {
        let same_op = |a: &Op| match (a, op) {
            // A body that fuse-kernels gave several nodes (the identical layers of a model) is one
            // graph: no need to compare it with itself node by node.
            (Op::Fused { name: n1, body: b1 }, Op::Fused { name: n2, body: b2 })
                if std::sync::Arc::ptr_eq(b1, b2) =>
            {
                n1 == n2
            }
            _ => a == op,
        };
        let same = |k: &NodeKey| {
            same_op(&k.op)
                && k.args.len() == args.len()
                && k.args.iter().zip(args).all(|(a, b)| a == *b)
                && k.results.len() == results.len()
                && k.results.iter().zip(results).all(|(a, b)| a == *b)
        };
        self.by_node.get(&hash)?.iter().find(|(k, _)| same(k)).map(|&(_, id)| id)
    }
}

/// A hash of part of what [`NodeKey`]'s equality compares (an op by name and attributes, a `fused`
/// body by its size and outputs; the types), so equal keys hash equally. Equal hashes are compared
/// in full, so a body's nodes need not be hashed: that would cost as much as the comparison.
fn node_hash(op: &Op, args: &[&TensorType], results: &[&TensorType]) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    hash_op(op, &mut h);
    args.hash(&mut h);
    results.hash(&mut h);
    h.finish()
}

fn hash_op(op: &Op, h: &mut impl Hasher) {
    op.name().hash(h);
    for (key, attr) in op.attrs() {
        key.hash(h);
        hash_attr(&attr, h);
    }
    if let Op::Fused { body, .. } = op {
        (body.node_count(), body.value_bound()).hash(h);
        body.outputs().hash(h);
    }
}

fn hash_attr(a: &Attr, h: &mut impl Hasher) {
    match a {
        Attr::Int(i) => (0u8, i).hash(h),
        // Equal floats hash equally but for 0.0 and -0.0, which then only miss the table.
        Attr::Float(f) => (1u8, f.to_bits()).hash(h),
        Attr::Bool(b) => (2u8, b).hash(h),
        Attr::Str(s) | Attr::Ident(s) => (3u8, s).hash(h),
        Attr::List(items) => {
            (4u8, items.len()).hash(h);
            for i in items {
                hash_attr(i, h);
            }
        }
    }
}

/// Forms the kernels of a verified graph into `kernels` (reusing those already there) and returns
/// its steps.
fn form_into(g: &Graph, kernels: &mut Kernels) -> Result<Vec<Step>, FormError> {
    let mut steps = Vec::new();
    for n in g.nodes() {
        let node = g.node(n);
        match &node.op {
            Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } => continue,
            Op::Reshape { .. } => {
                steps.push(Step::Alias { node: n, result: node.results[0], source: node.inputs[0] });
                continue;
            }
            Op::Send { .. }
            | Op::Recv { .. }
            | Op::AllReduce { .. }
            | Op::AllGather { .. }
            | Op::AllToAll { .. } => {
                steps.push(Step::Runtime { node: n });
                continue;
            }
            _ => {}
        }
        let args: Vec<&TensorType> = node.inputs.iter().map(|&v| g.ty(v)).collect();
        let results: Vec<&TensorType> = node.results.iter().map(|&r| g.ty(r)).collect();
        let hash = node_hash(&node.op, &args, &results);
        let id = match kernels.find(hash, &node.op, &args, &results) {
            Some(id) => id,
            None => {
                let id = kernels.insert(g, n)?;
                let key = NodeKey {
                    op: node.op.clone(),
                    args: args.into_iter().cloned().collect(),
                    results: results.into_iter().cloned().collect(),
                };
                kernels.by_node.entry(hash).or_default().push((key, id));
                id
            }
        };
        steps.push(Step::Launch {
            kernel: id,
            node: n,
            args: node.inputs.clone(),
            results: node.results.clone(),
        });
    }
    Ok(steps)
}

impl Kernels {
    /// The kernel of node `n` of `g`: built from its body and named, then one already formed
    /// under that name (the same body reached by another node) or a new one.
    fn insert(&mut self, g: &Graph, n: NodeId) -> Result<KernelId, FormError> {
        let node = g.node(n);
        let body = match &node.op {
            Op::Fused { body, .. } => (**body).clone(),
            op => {
                let args: Vec<TensorType> = node.inputs.iter().map(|&v| g.ty(v).clone()).collect();
                let results: Vec<TensorType> = node.results.iter().map(|&r| g.ty(r).clone()).collect();
                op_body(op, &args, &results)?
            }
        };
        let kernels = &mut self.kernels;
        let by_name = &mut self.by_name;
        let candidate = Kernel::from_body(KernelId(kernels.len() as u32), body)?;
        let id = match by_name.get(&candidate.name) {
            Some(&id) => {
                let existing = &kernels[id.index()];
                if existing.body != candidate.body {
                    return Err(FormError::NameCollision {
                        name: candidate.name.clone(),
                        first: kiln_ir::print(&existing.body),
                        second: kiln_ir::print(&candidate.body),
                    });
                }
                id
            }
            None => {
                let id = candidate.id;
                by_name.insert(candidate.name.clone(), id);
                kernels.push(candidate);
                id
            }
        };
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> KernelPlan {
        form_kernels(&kiln_ir::parse(text).unwrap()).unwrap()
    }

    #[test]
    fn identical_ops_share_a_kernel() {
        let p = plan(
            r#"graph @g {
  %0 = input {name = "x"} : f32[B, T, 8]
  %1 = param {name = "w"} : f32[8]
  %2 = rms_norm %0, %1 {eps = 1e-6} : f32[B, T, 8]
  %3 = reshape %2 {shape = [B, T, 2, 4]} : f32[B, T, 2, 4]
  %4 = param {name = "v"} : f32[8]
  %5 = rms_norm %0, %4 {eps = 1e-6} : f32[B, T, 8]
  %6 = rms_norm %0, %4 {eps = 1e-5} : f32[B, T, 8]
  %7 = silu %5 : f32[B, T, 8]
  output "a" = %3
  output "b" = %6
  output "c" = %7
}"#,
        );
        assert_eq!(p.kernels.len(), 3, "{:#?}", p.kernels);
        assert_eq!(p.launch_count(), 4);
        let ids: Vec<KernelId> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Launch { kernel, .. } => Some(*kernel),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [KernelId(0), KernelId(0), KernelId(1), KernelId(2)]);
        assert!(matches!(p.steps[1], Step::Alias { .. }));
        let k = &p.kernels[0];
        assert!(k.name.starts_with("k_rms_norm_") && k.name.len() == "k_rms_norm_".len() + 12, "{}", k.name);
        assert_eq!(k.syms, [Sym::B, Sym::T]);
        assert_eq!(k.args.len(), 2);
        assert!(matches!(k.single_op(), Some(Op::RmsNorm { .. })));
        assert_eq!(p.kernels[1].id.to_string(), "k1");
        // The name depends on content only.
        let again = Kernel::for_op(&Op::Unary(kiln_ir::UnaryOp::Silu), &p.kernels[2].args).unwrap();
        assert_eq!(again.name, p.kernels[2].name);
    }

    #[test]
    fn bad_graphs_and_types_are_errors() {
        let g = Graph::new("empty");
        assert!(matches!(form_kernels(&g), Err(FormError::Invalid(_))));
        let e = Kernel::for_op(&Op::Linear, &[TensorType::known(kiln_ir::DType::F32, &[2, 3])]).unwrap_err();
        assert!(matches!(e, FormError::Infer { op: "linear", .. }), "{e}");
    }
}
