//! Weight-only launches, folded at load: a launch whose every input is a parameter, a constant or
//! another folded value ([`Program::weight_only_steps`]: the concatenated down-projections and the
//! per-head halves of `kv_b_proj` that `fuse-mla-latent` makes, a dequantised FP8 weight read
//! whole) computes the same bytes at every run, so it runs once, when the model loads, into memory
//! of its own, and is left out of every run.
//!
//! Parameters are read-only for every program (what a program writes is a state, and a launch that
//! reads a state is never weight-only), so a folded value never goes stale. A kernel that takes the
//! run's sizes (`B`, `T`, `S`) is never folded: its result depends on them (a train step counts its
//! tokens by summing a constant broadcast to `[B, T]`, which folded at the loaded maxima made every
//! gradient of a smaller batch `max / actual` times too small).
//!
//! Each folded value has a key that says what it is: the kernel and the keys of its inputs
//! (`param:NAME`, a constant's value and type, or another folded value's key). Two programs that
//! fold the same value (the prefill's and the decode program's merged `q_a`/`kv_a` weight) share
//! one copy, computed once.

use std::collections::{HashMap, HashSet};

use kiln_ir::artifact::{ArgRole, BufferId, Manifest, Program, Step, Storage};
use kiln_ir::SymBindings;

use super::{Backend, Binding, Executor};
use crate::RuntimeError;

/// What one program folds.
pub(super) struct Plan {
    /// Indices into the program's steps.
    pub folded_steps: HashSet<usize>,
    /// Every folded buffer (results and their aliases) with the result it is.
    roots: HashMap<BufferId, BufferId>,
    /// The key of each folded result.
    keys: HashMap<BufferId, String>,
}

impl Plan {
    pub fn is_folded(&self, b: BufferId) -> bool {
        self.roots.contains_key(&b)
    }
}

/// The folded values of every program, each distinct value once.
pub(super) struct Folded<B: Backend> {
    memories: Vec<B::Memory>,
    by_key: HashMap<String, usize>,
    /// `(program, buffer)` to its memory, aliases included.
    of: HashMap<(usize, BufferId), usize>,
}

impl<B: Backend> Default for Folded<B> {
    fn default() -> Self {
        Folded { memories: Vec::new(), by_key: HashMap::new(), of: HashMap::new() }
    }
}

impl<B: Backend> Folded<B> {
    pub fn memory(&self, program: usize, b: BufferId) -> Option<&B::Memory> {
        self.of.get(&(program, b)).map(|&i| &self.memories[i])
    }

    pub fn bytes(&self, backend: &B) -> usize {
        self.memories.iter().map(|m| backend.len(m)).sum()
    }
}

/// The weight-only launches of `p` and the keys of their results.
pub(super) fn plan(m: &Manifest, p: &Program) -> Plan {
    let folded_steps: HashSet<usize> = p.weight_only_steps(&m.kernels).into_iter().collect();
    let mut roots: HashMap<BufferId, BufferId> = HashMap::new();
    let mut keys: HashMap<BufferId, String> = HashMap::new();
    for (i, s) in p.steps.iter().enumerate() {
        match s {
            Step::Alias { buffer, source } => {
                if let Some(&r) = roots.get(source) {
                    roots.insert(*buffer, r);
                }
            }
            Step::Launch { kernel, buffers, .. } if folded_steps.contains(&i) => {
                let k = m.kernel(*kernel);
                let key_of = |b: BufferId| match roots.get(&b) {
                    Some(r) => keys[r].clone(),
                    None => {
                        let buf = p.buffer(b);
                        match &buf.storage {
                            Storage::Param { name } => format!("param:{name}"),
                            Storage::Constant { value } => {
                                format!("const:{value:?}:{}:{:?}", buf.dtype, buf.shape)
                            }
                            _ => format!("{}:{b}", p.name),
                        }
                    }
                };
                let inputs: Vec<String> = (k.args.iter().zip(buffers))
                    .filter(|(a, _)| matches!(a.role, ArgRole::Input | ArgRole::Param))
                    .map(|(_, &b)| key_of(b))
                    .collect();
                let outputs = k.args.iter().zip(buffers).filter(|(a, _)| a.role == ArgRole::Output);
                for (r, (_, &b)) in outputs.enumerate() {
                    keys.insert(b, format!("{}({})#{r}", k.name, inputs.join(", ")));
                    roots.insert(b, b);
                }
            }
            _ => {}
        }
    }
    Plan { folded_steps, roots, keys }
}

/// Runs the folded launches of program `pi` whose values no earlier program computed, into memory
/// of their own, and records where every folded buffer of the program lives.
pub(super) fn run<B: Backend>(
    exec: &Executor<B>,
    folded: &mut Folded<B>,
    pi: usize,
    plan: &Plan,
    max: &SymBindings,
) -> Result<(), RuntimeError> {
    let p = &exec.manifest.programs[pi];
    let mut todo = Vec::new();
    let mut steps: Vec<usize> = plan.folded_steps.iter().copied().collect();
    steps.sort_unstable();
    for &i in &steps {
        let Step::Launch { kernel, buffers, .. } = &p.steps[i] else { continue };
        let k = exec.manifest.kernel(*kernel);
        let mut fresh = false;
        for (a, &b) in k.args.iter().zip(buffers) {
            if a.role != ArgRole::Output {
                continue;
            }
            let key = &plan.keys[&b];
            let at = match folded.by_key.get(key) {
                Some(&at) => at,
                None => {
                    fresh = true;
                    let bytes = p.buffer(b).max_bytes;
                    folded
                        .memories
                        .push(exec.backend.alloc(bytes, &format!("folded weight {b} of `{}`", p.name))?);
                    folded.by_key.insert(key.clone(), folded.memories.len() - 1);
                    folded.memories.len() - 1
                }
            };
            folded.of.insert((pi, b), at);
        }
        if fresh {
            todo.push(i);
        }
    }
    for (&b, &r) in &plan.roots {
        if let Some(&at) = folded.of.get(&(pi, r)) {
            folded.of.insert((pi, b), at);
        }
    }
    if todo.is_empty() {
        return Ok(());
    }
    let address = |b: BufferId| match folded.of.get(&(pi, b)) {
        Some(&at) => exec.backend.address(&folded.memories[at]),
        None => exec.address(pi, b),
    };
    let what = Binding { manifest: &exec.manifest, program: p, steps: &todo, address: &address, max };
    let mut launches = exec.backend.bind(&what)?;
    exec.backend.run(&mut launches, 0..todo.len(), max, &mut |_, _| Ok(()))?;
    exec.backend.synchronize()
}
