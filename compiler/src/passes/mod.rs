//! The pass pipeline: one static table of passes in pipeline order, and the functions that run it.
//!
//! A pass is a plain function `fn(&mut Graph, &Options) -> Result<Changed, PassError>`: no I/O, no
//! device, no global state. Constants come from the model spec in [`Options`], never from the pass.
//! The graph is verified after every pass; a verifier failure there is a compiler bug and is reported
//! as [`PassError::Invalid`] naming the pass.
//!
//! The table is written out by hand (no registration at a distance): `kiln passes` lists it,
//! `kiln ir --after NAME` runs it up to a pass.

use kiln_ir::module::ProgramKind;
use kiln_ir::verify::{verify, VerifyError};
use kiln_ir::{Graph, ModelSpec};

use crate::target::Targets;

pub mod cache_activations;
pub mod dce;
pub mod fuse_kernels;
pub mod fuse_mla_latent;
pub mod insert_fp8_casts;
pub mod moe_plan;
pub mod plan_moe_dispatch;
pub mod rematerialize;
mod rewrite;

pub use rewrite::Trace;

/// What a pass may read besides the graph: the spec, what kind of program the graph is (a decode
/// program runs one token per sequence; a pass must not guess that from the graph's shape), and
/// the targets it is compiled for.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    pub spec: &'a ModelSpec,
    pub kind: ProgramKind,
    pub targets: Targets,
}

impl<'a> Options<'a> {
    /// A forward program (stateless, every token at once) for every target.
    pub fn new(spec: &'a ModelSpec) -> Options<'a> {
        Options { spec, kind: ProgramKind::Forward, targets: Targets::All }
    }

    /// The same, for a program of `kind`.
    pub fn of_kind(spec: &'a ModelSpec, kind: ProgramKind) -> Options<'a> {
        Options { kind, ..Options::new(spec) }
    }
}

/// Whether a pass changed the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Changed {
    Yes,
    No,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("unknown pass `{name}`; the passes are: {known}")]
    UnknownPass { name: String, known: String },
    #[error("pass `{pass}` cannot run: {message}")]
    Precondition { pass: &'static str, message: String },
    /// The graph does not verify after a pass: a compiler bug.
    #[error(
        "internal error: the graph is invalid after pass `{pass}` (a kiln bug; please report it)\n{error}"
    )]
    Invalid { pass: &'static str, error: VerifyError },
}

/// One entry of the pipeline table.
pub struct PassInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub run: fn(&mut Graph, &Options) -> Result<Changed, PassError>,
}

/// Every pass, in pipeline order.
pub const PASSES: &[PassInfo] = &[
    PassInfo {
        name: "fuse-mla-latent",
        summary: "merge the MLA down-projections, latent KV cache, absorbed decode attention by cost",
        run: fuse_mla_latent::run,
    },
    PassInfo {
        name: "plan-moe-dispatch",
        summary: "lower moe_experts to an explicit dispatch, grouped GEMMs and combine",
        run: plan_moe_dispatch::run,
    },
    // On a train step: before insert-fp8-casts, so that a recomputed up-projection runs in FP8 too.
    PassInfo {
        name: "rematerialize",
        summary: "on a train step, recompute RMS norms and MLA up-projections in the backward pass",
        run: rematerialize::run,
    },
    PassInfo {
        name: "insert-fp8-casts",
        summary: "FP8 weights with block scales and quantised GEMM inputs, from [quantization]",
        run: insert_fp8_casts::run,
    },
    // After insert-fp8-casts: it caches the FP8 copies that pass made.
    PassInfo {
        name: "cache-activations",
        summary:
            "on an FP8 train step, keep the attention output and SwiGLU inputs for the backward pass in FP8",
        run: cache_activations::run,
    },
    // Last, so that it cleans up after every rewrite before it.
    PassInfo { name: "dce", summary: "remove nodes whose results reach no output", run: dce::run },
    // After dce: fusion decides on the final graph, and leaves no dead node behind it.
    PassInfo {
        name: "fuse-kernels",
        summary:
            "group nodes into fused kernels by named rules (GEMM epilogues, add + RMS norm, router, FP8 GEMM)",
        run: fuse_kernels::run,
    },
];

/// Looks a pass up by name.
pub fn find(name: &str) -> Result<&'static PassInfo, PassError> {
    PASSES.iter().find(|p| p.name == name).ok_or_else(|| PassError::UnknownPass {
        name: name.to_string(),
        known: PASSES.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
    })
}

/// Runs one pass and verifies the result.
pub fn run_pass(graph: &mut Graph, pass: &PassInfo, opts: &Options) -> Result<Changed, PassError> {
    let changed = (pass.run)(graph, opts)?;
    verify(graph).map_err(|error| PassError::Invalid { pass: pass.name, error })?;
    Ok(changed)
}

/// Runs the pipeline from the start up to and including the pass called `last`, on a program of
/// `kind`.
pub fn run_until(
    graph: &mut Graph,
    spec: &ModelSpec,
    kind: ProgramKind,
    last: &str,
) -> Result<(), PassError> {
    find(last)?;
    let opts = Options::of_kind(spec, kind);
    for pass in PASSES {
        run_pass(graph, pass, &opts)?;
        if pass.name == last {
            break;
        }
    }
    Ok(())
}
