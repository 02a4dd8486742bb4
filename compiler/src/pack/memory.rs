//! `plan-memory`: where every value of a graph lives when its kernel plan runs.
//!
//! Every value becomes a [`Buffer`]. Parameters and constants (and reshapes of them) keep their own
//! storage; everything else, inputs and outputs included, lives in one activation arena. Offsets are
//! fixed at compile time for the largest sizes the caller asks for (`B`, `T`, `S` at their maxima):
//! every dimension is a monomial, so a buffer never grows when a size shrinks, and the same offsets
//! hold for every smaller run.
//!
//! Lifetimes are measured in program steps. A value is live from the step that defines it (inputs:
//! from the start) to the last step that reads it or any reshape of it (graph outputs: to the end).
//! Intervals are closed, so a kernel's results never share bytes with the arguments it reads: kernels
//! are not assumed to work in place. A reshape has the storage of its source, whose lifetime covers
//! the reshape's readers.
//!
//! The allocator is first fit in order of definition: each buffer goes at the lowest
//! [`ARENA_ALIGN`]-aligned offset that does not overlap a buffer live at the same time. Buffers that
//! died before a definition can never conflict with anything defined later, so only the live set is
//! searched.
//!
//! States (the module's [`kiln_ir::module::StateDecl`]s: KV caches today) live outside the arena, in
//! [`Storage::State`] buffers the runtime keeps between runs: a program input named like a state
//! reads it, and an output named like it updates it in place. The output's value is placed in the
//! state's storage, which is safe for a `cache_update` of that state (its kernel writes the new
//! slots into the cache it is given; nothing else may read the old cache), for any value computed
//! after the last read of the state's old value, for an elementwise kernel that reads the old
//! value (at the same shape, every operand full-size or scalar) as it writes the new one (each
//! element is read before it is written: an optimizer's update), and for an `all_reduce` of the
//! state itself (the runtime sums in place: a pipeline's accumulators over the replicas);
//! anything else is refused ([`PlanError::State`]).
//!
//! A kernel with scratch buffers (a fused kernel computed in phases, `codegen::fusion`) gets fresh
//! ones at each launch: buffers of kind `scratch` after the graph's values, live for that one step.
//!
//! What it does not do: in-place reuse of an argument by its result, or placement that depends on
//! sizes at run time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::fmt::Write;

use kiln_ir::artifact::{Buffer, BufferId, BufferKind, Storage, ARENA_ALIGN};
use kiln_ir::{Graph, Op, SymBindings, TensorType, ValueId};

use crate::codegen::{KernelPlan, Step};

/// The buffers of a graph and the arena they share.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Indexed by [`BufferId`], in the order values are defined.
    pub buffers: Vec<Buffer>,
    /// The buffer of each value.
    pub of_value: HashMap<ValueId, BufferId>,
    /// The closed interval of steps during which each buffer's storage is in use (the interval of
    /// its root, for a reshape).
    pub live: Vec<(usize, usize)>,
    /// The scratch buffers of each step (empty for most), indexed by step.
    pub scratch: Vec<Vec<BufferId>>,
    /// Bytes of the arena at the maximum sizes.
    pub arena_bytes: u64,
    /// The sizes the plan was made for.
    pub max: SymBindings,
}

impl MemoryPlan {
    /// Moves every arena buffer `base` bytes up (an [`ARENA_ALIGN`] multiple), leaving the arena's
    /// first `base` bytes to other programs that run at the same time.
    pub fn place_after(&mut self, base: u64) {
        debug_assert!(base % ARENA_ALIGN == 0);
        for b in &mut self.buffers {
            if let Storage::Arena { offset } = &mut b.storage {
                *offset += base;
            }
        }
        self.arena_bytes += base;
    }
}

/// Why no plan could be made.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{value} : {ty} has more than 2^64 bytes at B = {}, T = {}, S = {}", max.b, max.t, max.s)]
    TooLarge { value: ValueId, ty: TensorType, max: SymBindings },
    /// A `cache_update` that cannot be done in place.
    #[error("a KV-cache update cannot be compiled: {0}; compiled code updates a cache in place")]
    Cache(String),
    /// A state update that cannot be done in place.
    #[error("{0}")]
    State(String),
    #[error("the activation arena needs more than 2^64 bytes")]
    ArenaTooLarge,
    /// The plan does not belong to the graph (a step names a value the graph lacks): a compiler bug.
    #[error("internal error: the kernel plan does not match the graph: {0}")]
    Mismatch(String),
}

impl MemoryPlan {
    pub fn buffer(&self, v: ValueId) -> BufferId {
        self.of_value[&v]
    }

    /// One line per buffer: id, value, type, kind, storage, bytes at the maxima and lifetime.
    pub fn print(&self) -> String {
        let mut out = format!(
            "arena: {} bytes at B = {}, T = {}, S = {}\n",
            self.arena_bytes, self.max.b, self.max.t, self.max.s
        );
        for (b, &(start, end)) in self.buffers.iter().zip(&self.live) {
            let storage = match &b.storage {
                Storage::Arena { offset } => format!("arena@{offset}"),
                Storage::Param { name } => format!("param {name}"),
                Storage::Constant { value } => format!("constant {value:?}"),
                Storage::State { name } => format!("state {name}"),
            };
            let ty = TensorType::new(b.dtype, b.shape.iter().copied());
            let kind = format!("{:?}", b.kind).to_lowercase();
            let _ = writeln!(
                out,
                "{:>5} {:>6} {:<28} {kind:<10} {storage:<24} {:>12} B  steps {start}..={end}",
                b.id.to_string(),
                b.value,
                ty.to_string(),
                b.max_bytes
            );
        }
        out
    }
}

fn align(n: u64) -> Option<u64> {
    n.checked_next_multiple_of(ARENA_ALIGN)
}

/// Plans the buffers of `g` run by `plan`, sized for `max`. See the module documentation.
pub fn plan_memory(
    g: &Graph,
    plan: &KernelPlan,
    max: SymBindings,
    state_names: &[&str],
) -> Result<MemoryPlan, PlanError> {
    let mismatch = |v: ValueId| PlanError::Mismatch(format!("{v} is not a value of the graph"));

    // Buffers in order of definition; the op that defines each.
    let mut values: Vec<(ValueId, &Op)> = Vec::new();
    let mut of_value = HashMap::default();
    for n in g.nodes() {
        let node = g.node(n);
        for &r in &node.results {
            of_value.insert(r, BufferId(values.len() as u32));
            values.push((r, &node.op));
        }
    }
    let id = |v: ValueId| of_value.get(&v).copied().ok_or_else(|| mismatch(v));

    // Definition step and root (the buffer whose storage a reshape shares) of each buffer.
    let mut start = vec![0usize; values.len()];
    let mut root: Vec<usize> = (0..values.len()).collect();
    for (i, step) in plan.steps.iter().enumerate() {
        match step {
            Step::Launch { results, .. } => {
                for &r in results {
                    start[id(r)?.index()] = i;
                }
            }
            Step::Alias { result, source, .. } => {
                let (r, s) = (id(*result)?.index(), id(*source)?.index());
                start[r] = i;
                root[r] = root[s];
            }
            Step::Runtime { node } => {
                for &r in &g.node(*node).results {
                    start[id(r)?.index()] = i;
                }
            }
        }
    }

    // States (`Storage::State`): an input named like a state reads it, and an output named like
    // it updates it in place. The output's value takes the state's storage when that is safe: a
    // `cache_update` of the state's input (it writes the new slots into the cache it was given),
    // or a value computed after the last read of the state's old value.
    let mut states: HashMap<usize, String> = HashMap::default();
    let mut in_place: HashMap<usize, usize> = HashMap::default();
    let inputs: HashMap<&str, ValueId> = g.inputs().into_iter().collect();
    for &name in state_names {
        if let Some(&v) = inputs.get(name) {
            states.insert(id(v)?.index(), name.to_string());
        }
    }
    let step_of: HashMap<ValueId, usize> = plan
        .steps
        .iter()
        .enumerate()
        .flat_map(|(i, s)| match s {
            Step::Launch { results, .. } => results.iter().map(|&r| (r, i)).collect::<Vec<_>>(),
            Step::Alias { result, .. } => vec![(*result, i)],
            Step::Runtime { node } => g.node(*node).results.iter().map(|&r| (r, i)).collect(),
        })
        .collect();
    // The last step that reads each root (a launch's operand, an alias's source) and each value
    // a runtime step reads: a train step updates thousands of states, and scanning the steps
    // after each update for a late read was quadratic in the model's depth.
    let mut last_read: Vec<Option<usize>> = vec![None; values.len()];
    let mut runtime_last: HashMap<ValueId, usize> = HashMap::default();
    for (i, step) in plan.steps.iter().enumerate() {
        let read = |v: &ValueId, last: &mut Vec<Option<usize>>| {
            if let Ok(b) = id(*v) {
                last[root[b.index()]] = Some(i);
            }
        };
        match step {
            Step::Launch { args, .. } => args.iter().for_each(|a| read(a, &mut last_read)),
            Step::Alias { source, .. } => read(source, &mut last_read),
            Step::Runtime { node } => {
                for &v in &g.node(*node).inputs {
                    runtime_last.insert(v, i);
                }
            }
        }
    }
    // A train step has an output per state (tens of thousands on DeepSeek-V3): a set, not a scan.
    let is_state: HashSet<&str> = state_names.iter().copied().collect();
    for (name, v) in g.outputs() {
        if !is_state.contains(name.as_str()) {
            continue;
        }
        let Some(&input) = inputs.get(name.as_str()) else {
            return Err(PlanError::State(format!(
                "output `{name}` updates state `{name}`, which the program does not read as an input"
            )));
        };
        if root[id(*v)?.index()] == root[id(input)?.index()] {
            continue; // The state, unchanged (or a view of it).
        }
        // The value that is stored: the output, or what it is a reshape of (a reshape is an alias,
        // so the state's storage must be where the reshaped value is computed: a collective's
        // result reshaped into the weight's shape, say).
        let mut v = v;
        while let Op::Reshape { .. } = g.node(g.producer(*v)).op {
            v = &g.node(g.producer(*v)).inputs[0];
        }
        let (vi, c) = (id(*v)?.index(), id(input)?.index());
        let node = g.node(g.producer(*v));
        let readers = g.users(input).len();
        if matches!(node.op, Op::CacheUpdate) && node.inputs[0] == input {
            if readers != 1 || g.outputs().iter().any(|(n, o)| *o == input && n != name) {
                return Err(PlanError::Cache(format!(
                    "the cache input `{name}` is read by more than its update"
                )));
            }
        } else {
            let at = step_of.get(v).copied().unwrap_or(0);
            // An elementwise kernel may read the old value at the step that writes the new one:
            // each element is read before the same element is written (an optimizer's update).
            let elementwise_at = |i: usize| match &plan.steps[i] {
                Step::Launch { kernel, results, .. } => {
                    let k = plan.kernel(*kernel);
                    let body = &k.body;
                    results.contains(v)
                        && body.nodes().into_iter().all(|n| {
                            let op = &body.node(n).op;
                            matches!(op, Op::Input { .. }) || crate::codegen::fusion::is_elementwise(op)
                        })
                        && k.args.iter().all(|t| t.shape == g.ty(*v).shape || t.shape.is_empty())
                }
                _ => false,
            };
            // A read of the old value after the step that computes the new one, or at it (but for
            // an elementwise kernel's own operand).
            let reads_old = |a: &ValueId| id(*a).is_ok_and(|b| root[b.index()] == root[c]);
            let at_step = match plan.steps.get(at) {
                Some(Step::Launch { args, .. }) => args.iter().any(reads_old) && !elementwise_at(at),
                Some(Step::Alias { source, .. }) => reads_old(source),
                Some(Step::Runtime { .. }) | None => false,
            };
            // A sum over peers of the state itself, written back over it: the runtime reads its
            // operand when the message starts and writes the result when it ends (in place, as
            // `MPI_IN_PLACE` or `ncclAllReduce` with one buffer), so its own read is not late.
            let sums_itself = matches!(node.op, Op::AllReduce { .. }) && node.inputs[0] == input;
            let late = at_step
                || last_read[root[c]].is_some_and(|l| l > at)
                || runtime_last.get(&input).is_some_and(|&l| l > at || (l == at && !sums_itself));
            if late || !step_of.contains_key(v) {
                return Err(PlanError::State(format!(
                    "state `{name}` cannot be updated in place: its old value is read at or after the step that computes the new one"
                )));
            }
        }
        in_place.insert(vi, c);
    }
    // Roots again, in step order, so that reshapes of an updated cache reach the cache input.
    for step in &plan.steps {
        match step {
            Step::Launch { results, .. } => {
                for &r in results {
                    let r = id(r)?.index();
                    if let Some(&c) = in_place.get(&r) {
                        root[r] = root[c];
                    }
                }
            }
            Step::Alias { result, source, .. } => {
                let (r, s) = (id(*result)?.index(), id(*source)?.index());
                root[r] = root[s];
            }
            Step::Runtime { node } => {
                for &r in &g.node(*node).results {
                    let r = id(r)?.index();
                    if let Some(&c) = in_place.get(&r) {
                        root[r] = root[c];
                    }
                }
            }
        }
    }

    // The last use of each root: readers of the value or of any reshape of it.
    let mut end = start.clone();
    let mut use_at = |v: ValueId, at: usize| -> Result<(), PlanError> {
        let r = root[id(v)?.index()];
        end[r] = end[r].max(at);
        Ok(())
    };
    for (i, step) in plan.steps.iter().enumerate() {
        match step {
            Step::Launch { args, .. } => {
                for &a in args {
                    use_at(a, i)?;
                }
            }
            Step::Alias { source, .. } => use_at(*source, i)?,
            Step::Runtime { node } => {
                for &a in &g.node(*node).inputs {
                    use_at(a, i)?;
                }
            }
        }
    }
    for &(_, v) in g.outputs() {
        use_at(v, plan.steps.len())?;
    }

    // Sizes, kinds and the storage of everything outside the arena.
    let outputs: HashSet<ValueId> = g.outputs().iter().map(|&(_, v)| v).collect();
    let mut buffers = Vec::with_capacity(values.len());
    for (i, &(v, op)) in values.iter().enumerate() {
        let ty = g.ty(v);
        let too_large = || PlanError::TooLarge { value: v, ty: ty.clone(), max };
        let max_bytes = ty
            .shape
            .iter()
            .try_fold(ty.dtype.size_bytes(), |acc, d| acc.checked_mul(d.eval(&max)?))
            .ok_or_else(too_large)?;
        let storage = match (values[root[i]].1, states.get(&root[i])) {
            (_, Some(name)) => Storage::State { name: name.clone() },
            (Op::Param { name }, _) => Storage::Param { name: name.clone() },
            (Op::Constant { value }, _) => Storage::Constant { value: *value },
            _ => Storage::Arena { offset: 0 },
        };
        let kind = match (op, &storage) {
            (Op::Input { .. }, _) => BufferKind::Input,
            (_, Storage::Param { .. }) => BufferKind::Param,
            (_, Storage::Constant { .. }) => BufferKind::Constant,
            _ if outputs.contains(&v) => BufferKind::Output,
            _ => BufferKind::Activation,
        };
        buffers.push(Buffer {
            id: BufferId(i as u32),
            value: v.to_string(),
            dtype: ty.dtype,
            shape: ty.shape.clone(),
            kind,
            storage,
            max_bytes,
        });
    }

    // Scratch buffers: their own, for their launch only.
    let mut scratch = vec![Vec::new(); plan.steps.len()];
    for (i, step) in plan.steps.iter().enumerate() {
        let Step::Launch { kernel, results, .. } = step else { continue };
        let Some(&first) = results.first() else { continue };
        for (j, ty) in plan.kernel(*kernel).scratch.iter().enumerate() {
            let too_large = || PlanError::TooLarge { value: first, ty: ty.clone(), max };
            let max_bytes = ty
                .shape
                .iter()
                .try_fold(ty.dtype.size_bytes(), |acc, d| acc.checked_mul(d.eval(&max)?))
                .ok_or_else(too_large)?;
            let id = BufferId(buffers.len() as u32);
            buffers.push(Buffer {
                id,
                value: format!("{first}#s{j}"),
                dtype: ty.dtype,
                shape: ty.shape.clone(),
                kind: BufferKind::Scratch,
                storage: Storage::Arena { offset: 0 },
                max_bytes,
            });
            start.push(i);
            end.push(i);
            root.push(id.index());
            scratch[i].push(id);
        }
    }

    // First fit over the arena roots in order of definition (ties: buffer order).
    let mut order: Vec<usize> = (0..buffers.len())
        .filter(|&i| root[i] == i && matches!(buffers[i].storage, Storage::Arena { .. }))
        .collect();
    order.sort_by_key(|&i| (start[i], i));
    let mut offsets = vec![0u64; buffers.len()];
    let mut arena = FirstFit::default();
    // The buffers placed, by the step after which they are dead.
    let mut ending: BinaryHeap<Reverse<(usize, u64, u64)>> = BinaryHeap::new();
    for i in order {
        let size = align(buffers[i].max_bytes).ok_or(PlanError::ArenaTooLarge)?;
        while let Some(&Reverse((e, offset, size))) = ending.peek() {
            if e >= start[i] {
                break;
            }
            ending.pop();
            arena.free(offset, size);
        }
        offsets[i] = arena.alloc(size).ok_or(PlanError::ArenaTooLarge)?;
        ending.push(Reverse((end[i], offsets[i], size)));
    }
    let arena_bytes = arena.high_water;
    for (i, b) in buffers.iter_mut().enumerate() {
        if let Storage::Arena { offset } = &mut b.storage {
            *offset = offsets[root[i]];
        }
    }
    let live = (0..buffers.len()).map(|i| (start[root[i]], end[root[i]])).collect();
    Ok(MemoryPlan { buffers, of_value, live, scratch, arena_bytes, max })
}

/// First-fit placement in the arena: each buffer goes at the lowest offset where it overlaps no
/// live buffer. The free gaps below the top of the live buffers are kept by offset and, for the
/// search, by size class (the floor of the size's log2): a gap of a higher class than the buffer
/// always fits, so the lowest such gap is the first of each higher class's set, and only the
/// buffer's own class is scanned. A train step keeps tens of thousands of buffers live (the saved
/// activations), and scanning them per buffer was quadratic in the model's depth.
#[derive(Default)]
struct FirstFit {
    /// Live buffers: offset to size.
    live: BTreeMap<u64, u64>,
    /// Free gaps below the top of the live buffers: offset to length.
    gaps: BTreeMap<u64, u64>,
    /// The offsets of the gaps, by size class.
    classes: Vec<BTreeSet<u64>>,
    /// The most bytes ever in use: the arena's size.
    high_water: u64,
}

impl FirstFit {
    fn class(len: u64) -> usize {
        63 - len.leading_zeros() as usize
    }

    fn top(&self) -> u64 {
        self.live.last_key_value().map_or(0, |(&o, &s)| o + s)
    }

    fn add_gap(&mut self, offset: u64, len: u64) {
        let c = FirstFit::class(len);
        if self.classes.len() <= c {
            self.classes.resize_with(c + 1, BTreeSet::new);
        }
        self.classes[c].insert(offset);
        self.gaps.insert(offset, len);
    }

    fn remove_gap(&mut self, offset: u64) -> u64 {
        let len = self.gaps.remove(&offset).expect("a gap at this offset");
        self.classes[FirstFit::class(len)].remove(&offset);
        len
    }

    /// Places `size` bytes (a multiple of the alignment); `None` past `u64`.
    fn alloc(&mut self, size: u64) -> Option<u64> {
        if size == 0 {
            return Some(0);
        }
        let c = FirstFit::class(size);
        let mut best: Option<u64> =
            (self.classes.iter().skip(c + 1)).filter_map(|set| set.first().copied()).min();
        if let Some(set) = self.classes.get(c) {
            for &o in set {
                if best.is_some_and(|b| o > b) {
                    break;
                }
                if self.gaps[&o] >= size {
                    best = Some(o);
                    break;
                }
            }
        }
        let offset = match best {
            Some(o) => {
                let len = self.remove_gap(o);
                if len > size {
                    self.add_gap(o + size, len - size);
                }
                o
            }
            None => self.top(),
        };
        self.high_water = self.high_water.max(offset.checked_add(size)?);
        self.live.insert(offset, size);
        Some(offset)
    }

    /// Frees what [`FirstFit::alloc`] placed at `offset`.
    fn free(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        self.live.remove(&offset);
        let top = self.top();
        if offset >= top {
            // The top buffer: the gap below it, if any, is now above the top.
            if let Some((&o, _)) = self.gaps.range(top..).next() {
                self.remove_gap(o);
            }
            return;
        }
        let (mut start, mut end) = (offset, offset + size);
        if let Some((&o, &len)) = self.gaps.range(..offset).next_back() {
            if o + len == offset {
                self.remove_gap(o);
                start = o;
            }
        }
        if self.gaps.contains_key(&end) {
            end += self.remove_gap(end);
        }
        self.add_gap(start, end - start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::form_kernels;

    const MAX: SymBindings = SymBindings { b: 2, t: 16, s: 16 };

    fn planned(text: &str) -> (Graph, MemoryPlan) {
        let g = kiln_ir::parse(text).unwrap();
        let plan = form_kernels(&g).unwrap();
        let states = crate::pack::cache_states(&g);
        let names: Vec<&str> = states.iter().map(|s| s.name.as_str()).collect();
        let m = plan_memory(&g, &plan, MAX, &names).unwrap();
        (g, m)
    }

    /// No two arena buffers with different roots whose lifetimes overlap share a byte.
    fn assert_no_conflicts(m: &MemoryPlan) {
        let arena: Vec<(usize, u64)> = m
            .buffers
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b.storage {
                Storage::Arena { offset } => Some((i, offset)),
                _ => None,
            })
            .collect();
        for &(i, oi) in &arena {
            assert!(oi % ARENA_ALIGN == 0 && oi + m.buffers[i].max_bytes <= m.arena_bytes);
            for &(j, oj) in &arena {
                let (a, b) = (m.live[i], m.live[j]);
                if i >= j || a == b && oi == oj || a.0 > b.1 || b.0 > a.1 {
                    continue;
                }
                let (si, sj) = (m.buffers[i].max_bytes, m.buffers[j].max_bytes);
                assert!(oi + si <= oj || oj + sj <= oi, "b{i} and b{j} overlap:\n{}", m.print());
            }
        }
    }

    #[test]
    fn a_chain_reuses_memory_and_outputs_live_to_the_end() {
        let (g, m) = planned(
            r#"graph @chain {
  %0 = input {name = "x"} : f32[B, T, 64]
  %1 = exp %0 : f32[B, T, 64]
  %2 = neg %1 : f32[B, T, 64]
  %3 = exp %2 : f32[B, T, 64]
  %4 = neg %3 : f32[B, T, 64]
  %5 = reshape %4 {shape = [B, T, 8, 8]} : f32[B, T, 8, 8]
  output "y" = %5
}"#,
        );
        assert_no_conflicts(&m);
        let bytes = 2 * 16 * 64 * 4;
        assert!(m.buffers.iter().all(|b| b.max_bytes == bytes));
        // At most two of the four same-sized values are live at once.
        assert_eq!(m.arena_bytes, 2 * bytes);
        let y = m.buffer(g.outputs()[0].1);
        assert_eq!(m.buffers[y.index()].kind, BufferKind::Output);
        assert_eq!(m.buffers[y.index()].storage, m.buffers[4].storage, "a reshape shares its source");
        assert_eq!(m.live[4], (3, 5), "the reshaped output keeps its source to the end");
        assert_eq!(m.buffers[0].kind, BufferKind::Input);
        assert_eq!(m.live[0], (0, 0));
    }

    #[test]
    fn params_and_constants_stay_out_of_the_arena() {
        let (_, m) = planned(
            r#"graph @g {
  %0 = input {name = "x"} : f32[T, 8]
  %1 = param {name = "w"} : f32[4, 8]
  %2 = reshape %1 {shape = [32]} : f32[32]
  %3 = constant {value = 2.0} : f32[]
  %4 = linear %0, %1 : f32[T, 4]
  %5 = mul %4, %3 : f32[T, 4]
  output "y" = %5
  output "w" = %2
}"#,
        );
        assert_no_conflicts(&m);
        assert_eq!(m.buffers[1].storage, Storage::Param { name: "w".into() });
        assert_eq!(m.buffers[2].kind, BufferKind::Param, "a reshape of a parameter is a parameter");
        assert_eq!(m.buffers[3].storage, Storage::Constant { value: 2.0 });
        // x, linear and mul: the input dies at the linear, whose result the mul reads.
        let arena = m.buffers.iter().filter(|b| matches!(b.storage, Storage::Arena { .. })).count();
        assert_eq!(arena, 3);
        assert_eq!(m.arena_bytes, 512 + 256, "the mul reuses the bytes of x: {}", m.print());
    }

    /// A state is updated in place only where nothing reads its old value later: not a step after
    /// the update, and at the update's own step only as an elementwise kernel's operand.
    #[test]
    fn a_state_is_updated_in_place_only_after_its_last_read() {
        let plan_of = |body: &str| {
            let text = format!(
                "graph @g {{\n  %0 = input {{name = \"s\"}} : f32[8, 8]\n  \
                 %1 = input {{name = \"x\"}} : f32[8, 8]\n{body}  output \"s\" = %2\n  \
                 output \"y\" = %3\n}}"
            );
            let g = kiln_ir::parse(&text).unwrap_or_else(|e| panic!("{e}"));
            let plan = form_kernels(&g).unwrap();
            plan_memory(&g, &plan, MAX, &["s"]).map(|m| (g, m))
        };
        // Read, then updated by an elementwise kernel that reads it too: in place.
        let (g, m) = plan_of("  %3 = exp %0 : f32[8, 8]\n  %2 = mul %0, %1 : f32[8, 8]\n").unwrap();
        let new = m.buffer(g.outputs()[0].1);
        assert_eq!(m.buffers[new.index()].storage, Storage::State { name: "s".into() });
        // Updated, then read: the update would destroy what the read needs.
        let late = plan_of("  %2 = mul %0, %1 : f32[8, 8]\n  %3 = exp %0 : f32[8, 8]\n");
        assert!(matches!(late, Err(PlanError::State(_))), "{:?}", late.map(|(_, m)| m.print()));
        // Updated by a GEMM that reads it: its rows are read after others are written.
        let gemm = plan_of("  %3 = exp %0 : f32[8, 8]\n  %2 = linear %0, %0 : f32[8, 8]\n");
        assert!(matches!(gemm, Err(PlanError::State(_))), "{:?}", gemm.map(|(_, m)| m.print()));
    }

    #[test]
    fn first_fit_places_like_a_scan_of_the_live_buffers() {
        // Against the obvious first fit: the lowest offset overlapping no live buffer.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut fit = FirstFit::default();
        let mut live: Vec<(u64, u64, u64)> = Vec::new(); // offset, size, end
        let (mut high, mut most_gaps) = (0, 0);
        for step in 0..4000u64 {
            for &(o, s, _) in live.iter().filter(|&&(_, _, e)| e < step) {
                fit.free(o, s);
            }
            live.retain(|&(_, _, e)| e >= step);
            let size = 64 * (1 + next(if step % 7 == 0 { 200 } else { 8 }));
            let mut sorted = live.clone();
            sorted.sort_unstable();
            let mut offset = 0;
            for &(o, s, _) in &sorted {
                if offset + size <= o {
                    break;
                }
                offset = offset.max(o + s);
            }
            high = u64::max(high, offset + size);
            assert_eq!(fit.alloc(size), Some(offset), "step {step}");
            most_gaps = most_gaps.max(fit.gaps.len());
            live.push((offset, size, step + next(if step % 5 == 0 { 300 } else { 10 })));
        }
        assert_eq!(fit.high_water, high);
        assert!(most_gaps > 10, "the sequence should leave gaps to search, left {most_gaps}");
    }

    #[test]
    fn sizes_that_overflow_are_errors() {
        let g = kiln_ir::parse(
            r#"graph @g {
  %0 = input {name = "x"} : f32[S, S, S, 65536]
  %1 = exp %0 : f32[S, S, S, 65536]
  output "y" = %1
}"#,
        )
        .unwrap();
        let plan = form_kernels(&g).unwrap();
        let big = SymBindings { b: 1, t: 1, s: 1 << 20 };
        assert!(matches!(plan_memory(&g, &plan, big, &[]), Err(PlanError::TooLarge { .. })));
    }
}
