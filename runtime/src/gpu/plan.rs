//! Launch planning for the CUDA backend: everything about running a program on a GPU that can be
//! worked out, and tested, without one.
//!
//! [`plan`] turns a program (its steps and buffers, plus the shared kernel table) into one
//! [`LaunchPlan`] per launch step: the kernel's `.entry`, where each buffer it takes lives
//! ([`Place`]), the sizes it takes, and its grid. Alias steps plan nothing (an alias shares its
//! source's storage, so no code runs); `send`/`recv` steps are refused
//! ([`RuntimeError::Distributed`]), as on the CPU.
//!
//! The argument list a launch passes is the one the PTX `.entry` declares after MLIR's lowering
//! (`convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=1}`, see the compiler's `codegen::lower`):
//! one `.u64 .ptr` per buffer (the kernel's arguments, results, then scratch, in the launch's order),
//! then one `.u64` per size of [`KernelEntry::sym_args`]. No memref descriptors: each buffer is a
//! bare device address. [`LaunchPlan::args`] produces these values, 8 bytes each, in that order;
//! [`entry_params`] reads the parameter lists back from the PTX text and [`check_entry`] compares
//! them with a plan before the driver is asked for anything, so an ABI mismatch is a typed error
//! rather than a kernel reading garbage.
//!
//! [`LaunchPlan::dims`] evaluates the grid for a run's sizes and checks CUDA's limits (grid x below
//! 2^31, y and z at most 65535, at most 1024 threads per block), naming the kernel when one is
//! exceeded.
//!
//! What it does not do: touch a device. The backend (`gpu::GpuBackend::bind`) resolves each buffer to a
//! device address once at load (the executor says where each lives) and rewrites the sizes per run.

use std::collections::HashMap;

use kiln_ir::artifact::{Buffer, BufferId, GridAxis, KernelEntry, KernelIndex, Step, Storage};
use kiln_ir::{Sym, SymBindings};

use crate::RuntimeError;

/// Where a buffer a launch takes lives.
#[derive(Clone, Debug, PartialEq)]
pub enum Place {
    /// At this byte offset into the activation arena.
    Arena { offset: u64 },
    /// The device copy of the named parameter.
    Param { name: String },
    /// The device copy of this constant buffer.
    Constant { buffer: BufferId },
    /// The persistent state (a KV cache) of this name, shared by every program of the artifact.
    State { name: String },
}

/// One launch step, ready to be bound to device addresses.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchPlan {
    /// The step's index in the program.
    pub step: usize,
    pub kernel: KernelIndex,
    /// The kernel's name (`k_linear_…`), for messages.
    pub name: String,
    /// The `.entry` in the PTX module.
    pub entry: String,
    /// The buffers, in the kernel's order (arguments, results, scratch), with where each lives.
    pub buffers: Vec<(BufferId, Place)>,
    /// The sizes passed after the buffers, in this order.
    pub syms: Vec<Sym>,
    pub grid: [GridAxis; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
}

/// A launch's geometry at concrete sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
}

/// CUDA's limits on a launch (every GPU since compute capability 3.0).
const MAX_GRID: [u64; 3] = [(1 << 31) - 1, 65535, 65535];
const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
const MAX_THREADS: u64 = 1024;

/// Plans every launch of a program. `kernels` is the artifact's kernel table, `steps` and
/// `buffers` the program's (a manifest that has passed [`kiln_ir::artifact::Manifest::validate`],
/// so every index is in range).
pub fn plan(
    kernels: &[KernelEntry],
    steps: &[Step],
    buffers: &[Buffer],
) -> Result<Vec<LaunchPlan>, RuntimeError> {
    let mut out = Vec::new();
    for (step, s) in steps.iter().enumerate() {
        let (kernel, bufs) = match s {
            Step::Launch { kernel, buffers, .. } => (*kernel, buffers),
            // The executor runs an all-reduce between launches (see `exec::all_reduce`).
            Step::Alias { .. } | Step::AllReduce { .. } | Step::AllGather { .. } | Step::AllToAll { .. } => {
                continue
            }
            Step::Send { peer, .. } => {
                return Err(RuntimeError::Distributed { step, what: format!("send to stage {peer}") })
            }
            Step::Recv { peer, .. } => {
                return Err(RuntimeError::Distributed { step, what: format!("receive from stage {peer}") })
            }
        };
        let k = &kernels[kernel.index()];
        let gpu = k.gpu.as_ref().ok_or(RuntimeError::NoGpuTarget)?;
        let buffers = bufs
            .iter()
            .map(|&b| {
                let place = match &buffers[b.index()].storage {
                    Storage::Arena { offset } => Place::Arena { offset: *offset },
                    Storage::Param { name } => Place::Param { name: name.clone() },
                    Storage::Constant { .. } => Place::Constant { buffer: b },
                    Storage::State { name } => Place::State { name: name.clone() },
                };
                (b, place)
            })
            .collect();
        out.push(LaunchPlan {
            step,
            kernel,
            name: k.name.clone(),
            entry: gpu.entry.clone(),
            buffers,
            syms: k.sym_args.clone(),
            grid: gpu.grid,
            block: gpu.block,
            shared_mem_bytes: gpu.shared_mem_bytes,
        });
    }
    Ok(out)
}

impl LaunchPlan {
    fn error(&self, reason: String) -> RuntimeError {
        RuntimeError::GpuKernel { kernel: self.kernel.to_string(), name: self.name.clone(), reason }
    }

    /// The grid and block at `sizes`, checked against CUDA's limits.
    pub fn dims(&self, sizes: &SymBindings) -> Result<LaunchDims, RuntimeError> {
        let mut grid = [0u32; 3];
        for (axis, (g, max)) in self.grid.iter().zip(MAX_GRID).enumerate() {
            let blocks = g.blocks(sizes).ok_or_else(|| self.error(format!("grid axis {axis} overflows")))?;
            if blocks == 0 || blocks > max {
                return Err(self.error(format!(
                    "{blocks} blocks along grid axis {axis} ({} / {}), but CUDA allows 1..={max}",
                    g.work, g.per_block
                )));
            }
            grid[axis] = blocks as u32;
        }
        let threads: u64 = self.block.iter().map(|&b| u64::from(b)).product();
        if self.block.iter().zip(MAX_BLOCK).any(|(&b, max)| b == 0 || b > max) || threads > MAX_THREADS {
            return Err(self.error(format!(
                "a block of {:?} threads, but CUDA allows at most {MAX_BLOCK:?} and {MAX_THREADS} in all",
                self.block
            )));
        }
        Ok(LaunchDims { grid, block: self.block, shared_mem_bytes: self.shared_mem_bytes })
    }

    /// The launch's parameters in the `.entry`'s order: the device address of each buffer (from
    /// `address`), then each size as an `i64`; every value is 8 bytes, the sizes' two's-complement
    /// bits held in a `u64`.
    pub fn args(&self, address: impl Fn(BufferId) -> u64, sizes: &SymBindings) -> Vec<u64> {
        let mut args: Vec<u64> = self.buffers.iter().map(|(b, _)| address(*b)).collect();
        args.resize(self.buffers.len() + self.syms.len(), 0);
        self.set_sizes(&mut args, sizes);
        args
    }

    /// Rewrites the sizes at the end of `args` (from [`LaunchPlan::args`]) for another run: the
    /// addresses stay, since every buffer keeps its place for the model's lifetime.
    pub fn set_sizes(&self, args: &mut [u64], sizes: &SymBindings) {
        let n = self.buffers.len();
        for (slot, &s) in args[n..].iter_mut().zip(&self.syms) {
            *slot = sizes.get(s) as i64 as u64;
        }
    }
}

/// One parameter of a PTX `.entry`, as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxParam {
    /// The width in bits of its type (`.u64`: 64).
    pub bits: u32,
    /// Declared `.ptr` (a pointer to global memory).
    pub ptr: bool,
}

/// The parameter list of every `.entry` in a PTX module, by entry name. Reads only the
/// declarations (`.visible .entry NAME( .param .u64 .ptr .align 1 NAME_param_0, … )`), which is
/// all a launch depends on.
pub fn entry_params(ptx: &str) -> HashMap<String, Vec<PtxParam>> {
    let mut out = HashMap::new();
    let mut rest = ptx;
    while let Some(at) = rest.find(".entry ") {
        rest = &rest[at + ".entry ".len()..];
        let Some(open) = rest.find('(') else { break };
        let name = rest[..open].trim().to_string();
        let Some(close) = rest[open..].find(')') else { break };
        let params = rest[open + 1..open + close]
            .split(',')
            .filter(|p| p.contains(".param"))
            .map(|p| {
                let words: Vec<&str> = p.split_whitespace().collect();
                let bits = words
                    .iter()
                    .find_map(|w| {
                        let t = w.strip_prefix('.')?;
                        let digits = t.trim_start_matches(['u', 's', 'b', 'f']);
                        (digits.len() < t.len()).then(|| digits.parse().ok()).flatten()
                    })
                    .unwrap_or(0);
                PtxParam { bits, ptr: words.contains(&".ptr") }
            })
            .collect();
        out.insert(name, params);
        rest = &rest[open + close..];
    }
    out
}

/// Checks that `params` (an `.entry`'s declared parameters) are what [`LaunchPlan::args`] passes:
/// one 64-bit pointer per buffer, then one 64-bit integer per size.
pub fn check_entry(plan: &LaunchPlan, params: Option<&Vec<PtxParam>>) -> Result<(), RuntimeError> {
    let Some(params) = params else {
        return Err(plan.error(format!("its entry `{}` is not in kernels.ptx", plan.entry)));
    };
    let (nb, ns) = (plan.buffers.len(), plan.syms.len());
    if params.len() != nb + ns {
        return Err(plan.error(format!(
            "its entry `{}` declares {} parameters, but a launch passes {nb} buffers and {ns} sizes",
            plan.entry,
            params.len()
        )));
    }
    for (i, p) in params.iter().enumerate() {
        let buffer = i < nb;
        if p.bits != 64 || p.ptr != buffer {
            let want = if buffer { "a 64-bit pointer (a buffer)" } else { "a 64-bit integer (a size)" };
            return Err(plan.error(format!(
                "parameter {i} of `{}` is {}{}-bit, but the launch passes {want}",
                plan.entry,
                if p.ptr { "a pointer, " } else { "" },
                p.bits
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::Dim;

    fn launch(grid: [(Dim, u64); 3], block: [u32; 3]) -> LaunchPlan {
        LaunchPlan {
            step: 0,
            kernel: KernelIndex(3),
            name: "k_test".into(),
            entry: "k_test".into(),
            buffers: vec![
                (BufferId(0), Place::Arena { offset: 512 }),
                (BufferId(1), Place::Param { name: "w".into() }),
                (BufferId(2), Place::Constant { buffer: BufferId(2) }),
                (BufferId(3), Place::State { name: "kv_cache.0".into() }),
            ],
            syms: vec![Sym::B, Sym::T],
            grid: grid.map(|(work, per_block)| GridAxis { work, per_block }),
            block,
            shared_mem_bytes: 0,
        }
    }

    const SIZES: SymBindings = SymBindings { b: 2, t: 100, s: 1 };

    #[test]
    fn grids_round_up_and_respect_cuda_limits() {
        let bt = Dim::sym(Sym::B).checked_mul(Dim::sym(Sym::T)).unwrap();
        let one = (Dim::known(1), 1);
        let l = launch([(Dim::known(96), 32), (bt, 32), one], [32, 8, 1]);
        let d = l.dims(&SIZES).unwrap();
        assert_eq!(d.grid, [3, 7, 1], "200 rows in blocks of 32 are 7 blocks");
        assert_eq!(d.block, [32, 8, 1]);

        let e =
            launch([one, (bt, 1), one], [32, 1, 1]).dims(&SymBindings { b: 1, t: 70000, s: 1 }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel k3 (`k_test`) on the GPU: 70000 blocks along grid axis 1 (B*T / 1), but CUDA allows 1..=65535"
        );
        let e = launch([one, one, one], [64, 32, 1]).dims(&SIZES).unwrap_err();
        assert!(e.to_string().contains("a block of [64, 32, 1] threads"), "{e}");
    }

    #[test]
    fn args_are_addresses_then_sizes() {
        let l = launch([(Dim::known(1), 1); 3], [1, 1, 1]);
        // Where each buffer lives, as the executor would say it.
        let place = |b: BufferId| &l.buffers.iter().find(|(x, _)| *x == b).unwrap().1;
        let args = l.args(
            |b| match place(b) {
                Place::Arena { offset } => 0x1000 + offset,
                Place::Param { .. } => 0x2000,
                Place::Constant { buffer } => 0x3000 + u64::from(buffer.0),
                Place::State { .. } => 0x4000,
            },
            &SIZES,
        );
        assert_eq!(args, [0x1200, 0x2000, 0x3002, 0x4000, 2, 100]);
        let mut again = args.clone();
        l.set_sizes(&mut again, &SymBindings { b: 1, t: 7, s: 1 });
        assert_eq!(again, [0x1200, 0x2000, 0x3002, 0x4000, 1, 7]);
    }

    #[test]
    fn entries_are_read_from_ptx_and_checked() {
        let ptx = "// .globl k_test\n.visible .entry k_test(\n\t.param .u64 .ptr .align 1 k_test_param_0,\n\
                   \t.param .u64 .ptr .align 1 k_test_param_1,\n\t.param .u64 .ptr .align 1 k_test_param_2,\n\
                   \t.param .u64 .ptr .align 1 k_test_param_3,\n\t.param .u64 k_test_param_4,\n\
                   \t.param .u64 k_test_param_5\n)\n{\n\tret;\n}\n\
                   .visible .entry k_short(\n\t.param .u64 .ptr .align 1 k_short_param_0,\n\t.param .u32 k_short_param_1\n)\n{ ret; }\n";
        let entries = entry_params(ptx);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries["k_short"], [PtxParam { bits: 64, ptr: true }, PtxParam { bits: 32, ptr: false }]);
        let l = launch([(Dim::known(1), 1); 3], [1, 1, 1]);
        check_entry(&l, entries.get("k_test")).unwrap();
        let short = LaunchPlan { entry: "k_short".into(), ..l.clone() };
        let e = check_entry(&short, entries.get("k_short")).unwrap_err();
        assert!(
            e.to_string().ends_with("declares 2 parameters, but a launch passes 4 buffers and 2 sizes"),
            "{e}"
        );
        let mut narrow = short.clone();
        narrow.buffers.truncate(1);
        narrow.syms.truncate(1);
        let e = check_entry(&narrow, entries.get("k_short")).unwrap_err();
        assert!(
            e.to_string().ends_with(
                "parameter 1 of `k_short` is 32-bit, but the launch passes a 64-bit integer (a size)"
            ),
            "{e}"
        );
        let missing = LaunchPlan { entry: "k_gone".into(), ..l };
        assert!(check_entry(&missing, entries.get("k_gone"))
            .unwrap_err()
            .to_string()
            .contains("not in kernels.ptx"));
    }
}
