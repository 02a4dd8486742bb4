//! Watching a program's launches: finding the first launch whose results hold a NaN or an
//! infinity ([`super::Executor::run_checked`]), and writing NaN into one launch's results
//! ([`super::Executor::set_poison`]), the fault `kiln train --inject-fault nan:SCOPE` injects to
//! test that the training monitor names the op it came from.
//!
//! Both work after a launch has finished, from the executor's `after` callback, so the backends
//! know nothing of them, and a run that watches nothing pays one test per launch. A checked run
//! reads every result of every launch back to the host: it is for re-checking a step that went
//! wrong, not for every step.

use std::collections::HashMap;

use kiln_ir::artifact::{ArgRole, Manifest, Program, Step, Storage};
use kiln_ir::SymBindings;

use super::Backend;
use crate::host::{decode, encode};
use crate::weights::HostData;
use crate::RuntimeError;

/// The first launch of a run whose results were not all finite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonFinite {
    /// The program it ran in.
    pub program: String,
    /// The op, as the program's text shows it: the kernel of a compiled launch (`k_linear_1f2e
    /// (step 34)`), or the node of an interpreted one (`%123 = linear`).
    pub op: String,
    /// Its scope, as in the IR text (`model.layers.1.mlp`), when it has one.
    pub scope: Option<String>,
    /// The value (buffer) holding the first non-finite element, as in the IR text (`%123`).
    pub value: String,
    /// Non-finite elements in that value.
    pub count: usize,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = self.scope.as_deref().unwrap_or("(no scope)");
        write!(
            f,
            "{} non-finite value(s) in {} of {} in scope {scope} (program `{}`)",
            self.count, self.value, self.op, self.program
        )
    }
}

/// What the executor watches in its runs.
#[derive(Default)]
pub(super) struct Watch {
    /// Write NaN into the results of this step (its index in the program's steps) of this program
    /// (its index in the manifest), each time it runs.
    pub poison: Option<(usize, usize)>,
    /// Check every launch's results; the first non-finite one goes to `found`.
    pub check: bool,
    pub found: Option<NonFinite>,
}

/// The step of `program` that `nan:SCOPE` poisons: its first launch in scope `scope`. An unknown
/// scope is an error listing the program's scopes.
pub(super) fn poisoned_step(program: &Program, scope: &str) -> Result<usize, RuntimeError> {
    let scope_of = |s: &Step| match s {
        Step::Launch { scope, .. } => scope.clone(),
        _ => None,
    };
    if let Some(i) = program.steps.iter().position(|s| scope_of(s).as_deref() == Some(scope)) {
        return Ok(i);
    }
    let mut known: Vec<String> = program.steps.iter().filter_map(scope_of).collect();
    known.sort();
    known.dedup();
    Err(RuntimeError::BadOption(format!(
        "no launch of program `{}` is in scope `{scope}`; its scopes: {}",
        program.name,
        known.join(", ")
    )))
}

/// The memories a launch's results may live in.
pub(super) struct Memories<'a, B: Backend> {
    pub arena: &'a mut B::Memory,
    pub states: &'a mut HashMap<String, B::Memory>,
}

/// After step `step` of `program` (program `pi` of `manifest`) has run at `sizes`: poisons its
/// results if it is the poisoned step, then checks them if the watch checks.
pub(super) fn after<B: Backend>(
    be: &B,
    mem: &mut Memories<'_, B>,
    manifest: &Manifest,
    (pi, program): (usize, &Program),
    step: usize,
    sizes: &SymBindings,
    watch: &mut Watch,
) -> Result<(), RuntimeError> {
    let Step::Launch { kernel, buffers, scope } = &program.steps[step] else { return Ok(()) };
    let entry = &manifest.kernels[kernel.index()];
    let results = (entry.args.iter().zip(buffers))
        .filter(|(a, _)| a.role == ArgRole::Output)
        .map(|(_, &b)| program.buffer(b))
        .filter(|b| b.dtype.is_float());
    let poison = watch.poison == Some((pi, step));
    if !(poison || (watch.check && watch.found.is_none())) {
        return Ok(());
    }
    be.synchronize()?;
    for b in results {
        let n = b.bytes(sizes).unwrap_or(0) as usize;
        let (memory, at) = match &b.storage {
            Storage::Arena { offset } => (&mut *mem.arena, *offset as usize),
            Storage::State { name } => match mem.states.get_mut(name) {
                Some(m) => (m, 0),
                None => continue,
            },
            // Parameters and constants are never a launch's result.
            Storage::Param { .. } | Storage::Constant { .. } => continue,
        };
        if poison {
            let count = n / b.dtype.size_bytes() as usize;
            let mut bytes = vec![0u8; n];
            encode(b.dtype, &HostData::F32(vec![f32::NAN; count]), &mut bytes)
                .map_err(|reason| RuntimeError::InputValue { name: b.value.clone(), reason })?;
            be.write(memory, at, &bytes)?;
        }
        if watch.check && watch.found.is_none() {
            let HostData::F32(v) = decode(b.dtype, &be.read(memory, at..at + n)?) else { continue };
            let count = v.iter().filter(|x| !x.is_finite()).count();
            if count > 0 {
                watch.found = Some(NonFinite {
                    program: program.name.clone(),
                    op: format!("{} (step {step})", entry.name),
                    scope: scope.clone(),
                    value: b.value.clone(),
                    count,
                });
            }
        }
    }
    Ok(())
}
