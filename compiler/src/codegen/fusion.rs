//! Fusion analysis: how the body of a `fused` kernel is computed. Pure functions of the body, used by
//! kernel formation (which needs the scratch space a kernel takes) and by lowering (which emits it).
//!
//! A body is first checked against the patterns that lower as **one pass** ([`Pattern`]): no value
//! other than the kernel's results is written to memory, every intermediate lives in registers.
//!
//! - [`Pattern::Elementwise`]: unary, binary, cast, constant, reshape and broadcast ops whose outputs
//!   all have the same number of elements. One work item (CPU) or thread (GPU) per output element
//!   evaluates the whole expression DAG for that element, reading each operand through its
//!   broadcast index.
//! - [`Pattern::Row`]: one row op (`rms_norm`, `softmax`, `reduce`) with an elementwise *prologue*
//!   (the ops that compute its operands, evaluated wherever the row op loads an element) and an
//!   elementwise *epilogue* (the ops that consume its result, evaluated where it stores one).
//!   Residual add + RMS norm is this pattern, the sum being a result of the kernel too.
//!   `cross_entropy` is not a row anchor (it reads its targets per row, which the prologue does not
//!   model): it is its own kernel, and a group of its own inside a `fused` body. Neither is any
//!   backward op of training (`cross_entropy_grad`, `embedding_grad`, `attention_grad`,
//!   `scatter_add_along`, `grouped_linear_wgrad`, `moe_combine_grad`; nor `take_along`): each reads
//!   or writes across rows in its own pattern, so none is an anchor of any pattern here and each is
//!   its own kernel, or a group of its own in a `fused` body.
//! - [`Pattern::Linear`]: one or more `linear`s of the same input by weights of the same shape (a
//!   gate/up pair), read straight from the kernel's arguments, with an epilogue on their results
//!   (SwiGLU `silu(gate) * up`, a residual add); or one or more `grouped_linear`s of the same rows
//!   and offsets (the routed experts' gate/up pair). An operand may also be the `dequantize` of two
//!   arguments, FP8 codes and f32 block scales ([`GemmOperand::Fp8`]): the GEMM decodes and scales
//!   as it loads, so the dequantised weight never exists in memory (`fp8-gemm`).
//! - [`Pattern::Op`]: a single op in the canonical form of a one-op kernel; its own lowering. An op
//!   whose kernel needs memory of its own for the launch ([`workspace`]: `attention_grad`'s
//!   per-row softmax statistics) gets it as scratch buffers after its results; that is still one
//!   pass (nothing but the op's results and its own workspace is written).
//!
//! Every value that an epilogue reads at an element must be available at that element: each node
//! that depends on the anchor (the row op or the linears) has exactly as many elements as the
//! anchor's result, and so has every output. That is what makes the stores of one work item
//! independent of the others.
//!
//! Any other body is **partitioned** ([`Plan::phases`]): greedily, in the body's topological order,
//! each op joins the current group when the group stays a one-pass pattern, and starts a new group
//! otherwise. Values that cross groups live in the kernel's result buffers when they are results,
//! and in **scratch** buffers otherwise ([`Plan::scratch`], arguments of the kernel that the runtime
//! provides from the arena for the one launch). Results that are the body's inputs, constants or
//! another result's value are written by copy phases at the end. Lowering runs the phases one after
//! another inside one kernel entry (see `lower::fused`).
//!
//! Nested `fused` nodes are inlined first. Dead nodes (whose values reach no output) are ignored.
//!
//! What this does not do: reorder ops to make bigger groups, recompute a cheap value in two groups
//! rather than store it, or fuse a GEMM's operand computed by anything but a `dequantize` of
//! arguments.

use std::collections::{HashMap, HashSet};
use std::fmt;

use kiln_ir::graph::GraphError;
use kiln_ir::{Dim, Graph, NodeId, Op, TensorType, ValueId};

/// How one group of ops is computed in one pass. Node ids refer to the group's own body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// One op whose body is in the canonical one-op form (inputs are its operands in order, outputs
    /// its results in order): the op's own lowering.
    Op,
    /// Elementwise ops whose outputs all have the same number of elements.
    Elementwise,
    /// A row op (`rms_norm`, `softmax`, `reduce`) with an elementwise prologue and epilogue.
    Row { anchor: NodeId },
    /// `linear`s (or `grouped_linear`s) sharing their input, with an elementwise epilogue; their
    /// operands may be `dequantize`s of arguments ([`gemm_operand`]).
    Linear { anchors: Vec<NodeId> },
}

/// Where a phase's operand or result lives: a buffer of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Loc {
    Arg(usize),
    Result(usize),
    Scratch(usize),
}

/// One pass over one group of ops.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    /// The group as a body of its own: inputs `a0..`, outputs `r0..`.
    pub body: Graph,
    pub pattern: Pattern,
    /// The buffer each input of `body` is read from.
    pub args: Vec<Loc>,
    /// The buffer each output of `body` is written to.
    pub results: Vec<Loc>,
    /// The scratch buffers a one-op phase's op uses as its own workspace ([`workspace`]), passed
    /// after its results; empty for every other phase.
    pub workspace: Vec<Loc>,
}

/// How a fused body is computed: its phases, in order, and the scratch buffers they share.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub phases: Vec<Phase>,
    /// Types of the scratch buffers (`Loc::Scratch(i)` is the `i`th).
    pub scratch: Vec<TensorType>,
}

impl Plan {
    /// Whether the body is computed in one pass with nothing but its results (and its op's
    /// workspace) written.
    pub fn is_one_pass(&self) -> bool {
        self.phases.len() == 1 && self.scratch.len() == self.phases[0].workspace.len()
    }
}

/// The workspace the kernel of `op` (applied to operands of types `args`) needs for one launch
/// beyond its results: buffers the runtime provides like a phased kernel's scratch, their contents
/// undefined before and after. Only `attention_grad` has one: the softmax statistics of each query
/// row (`max`, `sum`, and `sum_s P_s dP_s`), `f32[B, T, H, 3]`, which each work item writes for its
/// query rows and reads back for its key rows (`lower::attention`), so that no probability's
/// statistics are computed twice.
pub fn workspace(op: &Op, args: &[&TensorType]) -> Vec<TensorType> {
    match op {
        Op::AttentionGrad { .. } => {
            let q = &args[0].shape;
            vec![TensorType::new(kiln_ir::DType::F32, [q[0], q[1], q[2], Dim::known(3)])]
        }
        _ => Vec::new(),
    }
}

/// The workspace of the op of a body in the canonical one-op form ([`Pattern::Op`]).
fn op_workspace(g: &Graph) -> Vec<TensorType> {
    let Some(n) = g.nodes().into_iter().find(|&n| !matches!(g.node(n).op, Op::Input { .. })) else {
        return Vec::new();
    };
    let node = g.node(n);
    let args: Vec<&TensorType> = node.inputs.iter().map(|&v| g.ty(v)).collect();
    workspace(&node.op, &args)
}

/// `elementwise`, `rms_norm + elementwise`, `linear x2 + elementwise`, `softmax`, or
/// `phases [linear; rope]`: what a plan does, for reports and tests.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.phases.iter().map(phase_label).collect();
        match names.as_slice() {
            [one] if self.is_one_pass() => f.write_str(one),
            _ => write!(f, "phases [{}]", names.join("; ")),
        }
    }
}

fn phase_label(p: &Phase) -> String {
    let g = &p.body;
    let others = |skip: &[NodeId]| {
        live_nodes(g).into_iter().any(|n| !skip.contains(&n) && !matches!(g.node(n).op, Op::Input { .. }))
    };
    match &p.pattern {
        Pattern::Op => live_nodes(g)
            .into_iter()
            .find(|&n| !matches!(g.node(n).op, Op::Input { .. }))
            .map_or("copy".into(), |n| g.node(n).op.name().to_string()),
        Pattern::Elementwise => "elementwise".into(),
        Pattern::Row { anchor } => {
            let name = g.node(*anchor).op.name();
            if others(&[*anchor]) {
                format!("{name} + elementwise")
            } else {
                name.to_string()
            }
        }
        Pattern::Linear { anchors } => {
            let op = g.node(anchors[0]).op.name();
            let fp8 = live_nodes(g).into_iter().any(|n| operand_dequantize(g, n));
            let op = if fp8 { format!("fp8 {op}") } else { op.to_string() };
            let n = if anchors.len() > 1 { format!("{op} x{}", anchors.len()) } else { op };
            let mut skip = anchors.clone();
            skip.extend(live_nodes(g).into_iter().filter(|&n| operand_dequantize(g, n)));
            if others(&skip) {
                format!("{n} + elementwise")
            } else {
                n
            }
        }
    }
}

/// Ops an elementwise evaluator computes one element at a time.
pub fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::Binary(_)
            | Op::Cast { .. }
            | Op::Constant { .. }
            | Op::Reshape { .. }
            | Op::Broadcast { .. }
    )
}

/// The nodes whose values reach an output (inputs included), in topological order.
fn live_nodes(g: &Graph) -> Vec<NodeId> {
    let mut live: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = g.outputs().iter().map(|&(_, v)| g.producer(v)).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.node(n).inputs.iter().map(|&v| g.producer(v)));
        }
    }
    g.nodes().into_iter().filter(|n| live.contains(n)).collect()
}

fn numel(g: &Graph, v: ValueId) -> Option<Dim> {
    g.ty(v).numel()
}

/// The one-pass pattern of a body, if it has one. See the module documentation.
pub fn classify(g: &Graph) -> Option<Pattern> {
    let live: Vec<NodeId> =
        live_nodes(g).into_iter().filter(|&n| !matches!(g.node(n).op, Op::Input { .. })).collect();
    if let [n] = live.as_slice() {
        let node = g.node(*n);
        let ins: Vec<ValueId> = g.inputs().iter().map(|&(_, v)| v).collect();
        let outs: Vec<ValueId> = g.outputs().iter().map(|&(_, v)| v).collect();
        let canonical = ins == node.inputs && outs == node.results;
        if canonical && !matches!(node.op, Op::Reshape { .. } | Op::Constant { .. } | Op::Fused { .. }) {
            return Some(Pattern::Op);
        }
    }
    let (first, rest) = g.outputs().split_first()?;
    let n = numel(g, first.1)?;
    if rest.iter().any(|&(_, v)| numel(g, v) != Some(n)) {
        return None;
    }
    // `dequantize`s that only feed GEMM operands are part of the GEMM's loads, not anchors.
    let anchors: Vec<NodeId> = live
        .iter()
        .copied()
        .filter(|&a| !is_elementwise(&g.node(a).op) && !operand_dequantize(g, a))
        .collect();
    let pattern = match anchors.as_slice() {
        [] => return Some(Pattern::Elementwise),
        [a] if matches!(g.node(*a).op, Op::RmsNorm { .. } | Op::Softmax { .. } | Op::Reduce { .. }) => {
            Pattern::Row { anchor: *a }
        }
        _ if anchors.iter().all(|&a| matches!(g.node(a).op, Op::Linear))
            || anchors.iter().all(|&a| matches!(g.node(a).op, Op::GroupedLinear { .. })) =>
        {
            linear(g, &anchors)?
        }
        _ => return None,
    };
    // A `dequantize` that is not an anchor must feed a GEMM of the pattern.
    if live.iter().any(|&n| operand_dequantize(g, n)) && !matches!(pattern, Pattern::Linear { .. }) {
        return None;
    }
    // Every node that reads an anchor's result, directly or not, works on as many elements as the
    // outputs: the epilogue of one element needs the anchor's result at that element only.
    let results: Vec<ValueId> = anchors.iter().flat_map(|&a| g.node(a).results.clone()).collect();
    if results.iter().any(|&r| numel(g, r) != Some(n)) {
        return None;
    }
    let mut tainted: HashSet<ValueId> = results.into_iter().collect();
    for &m in &live {
        let node = g.node(m);
        if anchors.contains(&m) {
            if node.inputs.iter().any(|v| tainted.contains(v)) {
                return None;
            }
            continue;
        }
        if node.inputs.iter().any(|v| tainted.contains(v)) {
            if node.results.iter().any(|&r| numel(g, r) != Some(n)) {
                return None;
            }
            tainted.extend(node.results.iter().copied());
        }
    }
    Some(pattern)
}

/// The input a value is a (chain of) reshape(s) of, if it is one.
pub fn input_behind_reshapes(g: &Graph, mut v: ValueId) -> Option<ValueId> {
    loop {
        let node = g.node(g.producer(v));
        match node.op {
            Op::Input { .. } => return Some(v),
            Op::Reshape { .. } => v = node.inputs[0],
            _ => return None,
        }
    }
}

/// How a fused GEMM reads one operand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GemmOperand {
    /// The values of an input of the body (behind reshapes, which keep the bytes).
    Input(ValueId),
    /// `dequantize(codes, scales)` to f32 of two inputs: f8e4m3 codes and f32 scales, one per
    /// `rows x cols` block of the operand seen as `[R, K]`.
    Fp8 { codes: ValueId, scales: ValueId, rows: u64, cols: u64 },
}

/// How a GEMM of a fused body reads `v`: an input, or a `dequantize` the GEMM can do as it loads.
/// That needs f8e4m3 codes and f32 scales that are inputs, a result in f32 (one rounding of
/// `q * s`, as the interpreter's), blocks of a multiple of [`CPU_LANES`] columns (the CPU's vector
/// loads share one scale), and blocks of one row unless the operand is a matrix (the rows of a flattened
/// activation are its leading dimensions).
pub fn gemm_operand(g: &Graph, v: ValueId) -> Option<GemmOperand> {
    if let Some(i) = input_behind_reshapes(g, v) {
        return Some(GemmOperand::Input(i));
    }
    let node = g.node(g.producer(v));
    let Op::Dequantize { to: kiln_ir::DType::F32, block } = &node.op else { return None };
    let (codes, scales) =
        (input_behind_reshapes(g, node.inputs[0])?, input_behind_reshapes(g, node.inputs[1])?);
    if g.ty(codes).dtype != kiln_ir::DType::F8E4M3 || g.ty(scales).dtype != kiln_ir::DType::F32 {
        return None;
    }
    let rank = g.ty(v).rank();
    let (rows, cols) = match block.as_slice() {
        [c] => (1, *c),
        [r, c] => (*r, *c),
        _ => return None,
    };
    if cols == 0 || cols % crate::codegen::lower::CPU_LANES != 0 || (rows != 1 && rank != 2) || rows == 0 {
        return None;
    }
    Some(GemmOperand::Fp8 { codes, scales, rows, cols })
}

/// Whether `n` is a `dequantize` read only as a GEMM operand it can be loaded through.
fn operand_dequantize(g: &Graph, n: NodeId) -> bool {
    let node = g.node(n);
    matches!(node.op, Op::Dequantize { .. })
        && gemm_operand(g, node.results[0]).is_some()
        && !g.is_output(node.results[0])
        && g.users(node.results[0]).iter().all(|&u| {
            let user = g.node(u);
            let operands = match user.op {
                Op::Linear => 0..2,
                Op::GroupedLinear { .. } => 2..user.inputs.len(),
                _ => return false,
            };
            // As the input (operand 0) or a weight, never as `grouped_linear`'s offsets.
            user.inputs
                .iter()
                .enumerate()
                .all(|(i, &x)| x != node.results[0] || i == 0 || operands.contains(&i))
        })
}

/// The weight operands of a GEMM anchor.
pub fn gemm_weights(g: &Graph, n: NodeId) -> &[ValueId] {
    let node = g.node(n);
    match node.op {
        Op::GroupedLinear { .. } => &node.inputs[2..],
        _ => &node.inputs[1..2],
    }
}

/// `linear`s (or `grouped_linear`s with one `offsets`) of one input, with weights of one shape
/// read in one way ([`gemm_operand`]).
fn linear(g: &Graph, anchors: &[NodeId]) -> Option<Pattern> {
    let first = g.node(anchors[0]);
    let x = first.inputs[0];
    let w0 = gemm_weights(g, anchors[0])[0];
    let w_ty = g.ty(w0).clone();
    let kind = |op: GemmOperand| match op {
        GemmOperand::Input(_) => None,
        GemmOperand::Fp8 { rows, cols, .. } => Some((rows, cols)),
    };
    let w_kind = kind(gemm_operand(g, w0)?);
    gemm_operand(g, x)?;
    let grouped = matches!(first.op, Op::GroupedLinear { .. });
    if grouped {
        input_behind_reshapes(g, first.inputs[1])?;
    }
    for &a in anchors {
        let node = g.node(a);
        if node.inputs[0] != x || (grouped && node.inputs[1] != first.inputs[1]) {
            return None;
        }
        if gemm_weights(g, a).len() != gemm_weights(g, anchors[0]).len() {
            return None;
        }
        for &w in gemm_weights(g, a) {
            if g.ty(w) != &w_ty || kind(gemm_operand(g, w)?) != w_kind {
                return None;
            }
        }
    }
    Some(Pattern::Linear { anchors: anchors.to_vec() })
}

/// The plan of a body: one phase when it has a one-pass pattern, else a partition (see the module
/// documentation). Fails only on a body that does not verify.
pub fn plan(body: &Graph) -> Result<Plan, GraphError> {
    let flat;
    let g = if body.nodes().iter().any(|&n| matches!(body.node(n).op, Op::Fused { .. })) {
        flat = inline_fused(body)?;
        &flat
    } else {
        body
    };
    if let Some(pattern) = classify(g) {
        let args = (0..g.inputs().len()).map(Loc::Arg).collect();
        let results = (0..g.outputs().len()).map(Loc::Result).collect();
        let scratch = if pattern == Pattern::Op { op_workspace(g) } else { Vec::new() };
        let workspace = (0..scratch.len()).map(Loc::Scratch).collect();
        let phase = Phase { body: g.clone(), pattern, args, results, workspace };
        return Ok(Plan { phases: vec![phase], scratch });
    }
    partition(g)
}

/// The scratch buffers of a body's plan (none for a one-pass body but its op's workspace), without
/// building the plan when the body is one pass.
pub fn scratch(body: &Graph) -> Result<Vec<TensorType>, GraphError> {
    match classify(body) {
        Some(Pattern::Op) => Ok(op_workspace(body)),
        Some(_) => Ok(Vec::new()),
        None => Ok(plan(body)?.scratch),
    }
}

/// A copy of `g` with every nested `fused` node replaced by its body.
fn inline_fused(g: &Graph) -> Result<Graph, GraphError> {
    let mut out = Graph::new(g.name());
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    inline_into(&mut out, g, &mut map, None)?;
    for (name, v) in g.outputs() {
        out.add_output(name.clone(), map[v])?;
    }
    Ok(out)
}

/// Copies the nodes of `g` into `out`, mapping values through `map`; with `operands`, `g` is a
/// nested body whose inputs are those values of `out`.
fn inline_into(
    out: &mut Graph,
    g: &Graph,
    map: &mut HashMap<ValueId, ValueId>,
    operands: Option<&[ValueId]>,
) -> Result<(), GraphError> {
    let mut next_input = 0;
    for n in g.nodes() {
        let node = g.node(n);
        let ins: Vec<ValueId> = node.inputs.iter().map(|v| map[v]).collect();
        match (&node.op, operands) {
            (Op::Input { .. }, Some(ops)) => {
                map.insert(node.results[0], ops[next_input]);
                next_input += 1;
            }
            (Op::Fused { body, .. }, _) => {
                let mut inner = HashMap::new();
                inline_into(out, body, &mut inner, Some(&ins))?;
                for (&r, (_, v)) in node.results.iter().zip(body.outputs()) {
                    map.insert(r, inner[v]);
                }
            }
            (op, _) => {
                let tys = node.results.iter().map(|&r| g.ty(r).clone()).collect();
                let (_, rs) = out.add_node(op.clone(), &ins, tys, node.scope.as_deref())?;
                map.extend(node.results.iter().copied().zip(rs));
            }
        }
    }
    Ok(())
}

/// A group of nodes as a body of its own, and the values of `g` its inputs and outputs stand for.
struct Group {
    body: Graph,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
}

/// Builds the body of `nodes` (in topological order). A single node gets the canonical one-op form
/// (an input per operand, an output per result); several get an input per outside value they read
/// and an output per value read outside (`used_outside`). Constants in `cloned` are copied in
/// rather than read.
fn group(
    g: &Graph,
    nodes: &[NodeId],
    used_outside: &dyn Fn(ValueId) -> bool,
    cloned: &HashSet<NodeId>,
) -> Result<Group, GraphError> {
    let mut body = Graph::new("phase");
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let mut inputs = Vec::new();
    let single = nodes.len() == 1;
    for &n in nodes {
        let node = g.node(n);
        let mut ins = Vec::with_capacity(node.inputs.len());
        for &v in &node.inputs {
            let known = if single { None } else { map.get(&v).copied() };
            let mapped = match known {
                Some(m) => m,
                None if cloned.contains(&g.producer(v)) => {
                    let op = g.node(g.producer(v)).op.clone();
                    let (_, r) = body.add_node(op, &[], vec![g.ty(v).clone()], None)?;
                    map.insert(v, r[0]);
                    r[0]
                }
                None => {
                    let name = format!("a{}", inputs.len());
                    let (_, r) = body.add_node(Op::Input { name }, &[], vec![g.ty(v).clone()], None)?;
                    inputs.push(v);
                    if !single {
                        map.insert(v, r[0]);
                    }
                    r[0]
                }
            };
            ins.push(mapped);
        }
        let tys = node.results.iter().map(|&r| g.ty(r).clone()).collect();
        let (_, rs) = body.add_node(node.op.clone(), &ins, tys, node.scope.as_deref())?;
        map.extend(node.results.iter().copied().zip(rs));
    }
    let mut outputs = Vec::new();
    for &n in nodes {
        for &r in &g.node(n).results {
            if single || used_outside(r) {
                body.add_output(format!("r{}", outputs.len()), map[&r])?;
                outputs.push(r);
            }
        }
    }
    Ok(Group { body, inputs, outputs })
}

/// The partition of a body that has no one-pass pattern. See the module documentation.
fn partition(g: &Graph) -> Result<Plan, GraphError> {
    let live = live_nodes(g);
    let live_set: HashSet<NodeId> = live.iter().copied().collect();
    let computing: Vec<NodeId> =
        live.iter().copied().filter(|&n| !matches!(g.node(n).op, Op::Input { .. })).collect();
    // Constants read only by elementwise ops are copied into each group that reads them; one that a
    // row op or any other op reads is computed once, like any other value.
    let cloned: HashSet<NodeId> = computing
        .iter()
        .copied()
        .filter(|&n| {
            matches!(g.node(n).op, Op::Constant { .. })
                && g.node(n).results.iter().all(|&r| {
                    g.users(r).iter().filter(|u| live_set.contains(u)).all(|&u| is_elementwise(&g.node(u).op))
                })
        })
        .collect();
    let outputs: HashSet<ValueId> = g.outputs().iter().map(|&(_, v)| v).collect();

    let mut groups: Vec<(Vec<NodeId>, Group, Pattern)> = Vec::new();
    for n in computing.into_iter().filter(|n| !cloned.contains(n)) {
        if let Some((nodes, _, _)) = groups.last() {
            let mut trial = nodes.clone();
            trial.push(n);
            let members: HashSet<NodeId> = trial.iter().copied().collect();
            let outside = |v: ValueId| {
                outputs.contains(&v)
                    || g.users(v).iter().any(|u| live_set.contains(u) && !members.contains(u))
            };
            let gr = group(g, &trial, &outside, &cloned)?;
            if let Some(p) = classify(&gr.body) {
                *groups.last_mut().expect("checked above") = (trial, gr, p);
                continue;
            }
        }
        let gr = group(g, &[n], &|_| true, &cloned)?;
        // A single op always has a pattern: its canonical form, or elementwise with a constant copied in.
        let p = classify(&gr.body).unwrap_or(Pattern::Op);
        groups.push((vec![n], gr, p));
    }

    // Where each value that crosses a group boundary lives.
    let mut home: HashMap<ValueId, Loc> =
        g.inputs().iter().enumerate().map(|(i, &(_, v))| (v, Loc::Arg(i))).collect();
    let mut scratch = Vec::new();
    let mut phases = Vec::new();
    for (_, gr, pattern) in groups {
        let args = gr.inputs.iter().map(|v| home[v]).collect();
        let mut results = Vec::with_capacity(gr.outputs.len());
        for &v in &gr.outputs {
            let loc = match g.outputs().iter().position(|&(_, o)| o == v) {
                Some(j) => Loc::Result(j),
                None => {
                    scratch.push(g.ty(v).clone());
                    Loc::Scratch(scratch.len() - 1)
                }
            };
            home.insert(v, loc);
            results.push(loc);
        }
        let workspace = if pattern == Pattern::Op { op_workspace(&gr.body) } else { Vec::new() };
        let workspace = workspace
            .into_iter()
            .map(|t| {
                scratch.push(t);
                Loc::Scratch(scratch.len() - 1)
            })
            .collect();
        phases.push(Phase { body: gr.body, pattern, args, results, workspace });
    }
    // Results not written yet: inputs, constants, or a value another result already holds.
    for (j, &(_, v)) in g.outputs().iter().enumerate() {
        if home.get(&v) == Some(&Loc::Result(j)) {
            continue;
        }
        let mut body = Graph::new("copy");
        let ty = g.ty(v).clone();
        let (op, args) = match home.get(&v) {
            Some(&loc) => (Op::Input { name: "a0".into() }, vec![loc]),
            None => (g.node(g.producer(v)).op.clone(), vec![]),
        };
        let (_, r) = body.add_node(op, &[], vec![ty], None)?;
        body.add_output("r0", r[0])?;
        let results = vec![Loc::Result(j)];
        phases.push(Phase { body, pattern: Pattern::Elementwise, args, results, workspace: vec![] });
    }
    Ok(Plan { phases, scratch })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(text: &str) -> Graph {
        let g = kiln_ir::parse(text).unwrap();
        let n = g.nodes().into_iter().find(|&n| matches!(g.node(n).op, Op::Fused { .. })).unwrap();
        match &g.node(n).op {
            Op::Fused { body, .. } => (**body).clone(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn one_pass_patterns() {
        let chain = body_of(
            r#"graph @g {
  %0 = input {name = "x"} : bf16[B, T, 8]
  %1 = input {name = "b"} : bf16[8]
  %2 = fused %0, %1 {name = "chain"} : f32[B, T, 8] {
    %0 = input {name = "x"} : bf16[B, T, 8]
    %1 = input {name = "b"} : bf16[8]
    %2 = add %0, %1 : bf16[B, T, 8]
    %3 = constant {value = 0.5} : bf16[]
    %4 = mul %2, %3 : bf16[B, T, 8]
    %5 = cast %4 {to = f32} : f32[B, T, 8]
    output "y" = %5
  }
  output "y" = %2
}"#,
        );
        assert_eq!(classify(&chain), Some(Pattern::Elementwise));
        let p = plan(&chain).unwrap();
        assert!(p.is_one_pass());
        assert_eq!(p.to_string(), "elementwise");

        let norm = body_of(
            r#"graph @g {
  %0 = input {name = "x"} : f32[T, 8]
  %1 = input {name = "r"} : f32[T, 8]
  %2 = input {name = "w"} : f32[8]
  %3, %4 = fused %0, %1, %2 {name = "add_norm"} : f32[T, 8], f32[T, 8] {
    %0 = input {name = "x"} : f32[T, 8]
    %1 = input {name = "r"} : f32[T, 8]
    %2 = input {name = "w"} : f32[8]
    %3 = add %0, %1 : f32[T, 8]
    %4 = rms_norm %3, %2 {eps = 1e-6} : f32[T, 8]
    output "h" = %3
    output "y" = %4
  }
  output "h" = %3
  output "y" = %4
}"#,
        );
        assert!(matches!(classify(&norm), Some(Pattern::Row { .. })));
        assert_eq!(plan(&norm).unwrap().to_string(), "rms_norm + elementwise");
    }

    #[test]
    fn an_op_with_a_workspace_is_one_pass_with_scratch() {
        use kiln_ir::DType::{F32, I32};
        let ty = |dtype, dims: &[&str]| {
            TensorType::new(dtype, dims.iter().map(|d| Dim::parse(d).unwrap()).collect::<Vec<_>>())
        };
        let op = Op::AttentionGrad { scale: 0.125, causal: true };
        let args = [
            ty(F32, &["B", "T", "4", "8"]),
            ty(F32, &["B", "S", "2", "8"]),
            ty(F32, &["B", "S", "2", "6"]),
            ty(F32, &["B", "T", "4", "6"]),
        ];
        let k = crate::codegen::kernel::Kernel::for_op(&op, &args).unwrap();
        assert_eq!(k.scratch, [ty(F32, &["B", "T", "4", "3"])]);
        let p = plan(&k.body).unwrap();
        assert!(p.is_one_pass());
        assert_eq!(p.to_string(), "attention_grad");
        assert_eq!(p.phases[0].workspace, [Loc::Scratch(0)]);
        // Ops without one have none.
        let ce = Op::CrossEntropyGrad { ignore_index: None };
        let args = [ty(F32, &["T", "9"]), ty(I32, &["T"]), ty(F32, &["T"])];
        let k = crate::codegen::kernel::Kernel::for_op(&ce, &args).unwrap();
        assert!(k.scratch.is_empty());
    }

    #[test]
    fn other_bodies_are_partitioned_with_scratch() {
        let body = body_of(
            r#"graph @g {
  %0 = input {name = "x"} : f32[T, 8]
  %1 = input {name = "w"} : f32[8]
  %2, %3 = fused %0, %1 {name = "norm_top"} : f32[T, 2], f32[T, 8] {
    %0 = input {name = "x"} : f32[T, 8]
    %1 = input {name = "w"} : f32[8]
    %2 = rms_norm %0, %1 {eps = 1e-6} : f32[T, 8]
    %3, %4 = topk %2 {k = 2} : f32[T, 2], i32[T, 2]
    %5 = exp %3 : f32[T, 2]
    output "y" = %5
    output "x" = %0
  }
  output "y" = %2
  output "x" = %3
}"#,
        );
        assert_eq!(classify(&body), None);
        let p = plan(&body).unwrap();
        assert_eq!(p.to_string(), "phases [rms_norm; topk; exp; elementwise]");
        // The norm's result and both results of the top-k (the indices are dead but written).
        let kinds: Vec<String> = p.scratch.iter().map(ToString::to_string).collect();
        assert_eq!(kinds, ["f32[T, 8]", "f32[T, 2]", "i32[T, 2]"]);
        assert_eq!(p.phases[1].args, [Loc::Scratch(0)]);
        assert_eq!(p.phases[1].results, [Loc::Scratch(1), Loc::Scratch(2)]);
        assert_eq!(p.phases[2].results, [Loc::Result(0)]);
        // The second result is the input itself: a copy.
        assert_eq!(
            (p.phases[3].args.as_slice(), p.phases[3].results.as_slice()),
            (&[Loc::Arg(0)][..], &[Loc::Result(1)][..])
        );
    }
}
