//! The GPU back end: lowered kernels (`gpu.func`s in one `gpu.module`) into PTX for sm_90a.
//!
//! Stages: [`GPU_PIPELINE`] lowers the `gpu.module` to the LLVM and NVVM dialects (kernel parameters
//! as bare pointers, shared memory as addrspace(3) globals, barriers as `bar.sync`); the `gpu.module`
//! is translated to LLVM IR on its own; LLVM's `default<O3>` and its NVPTX back end (inkwell, the same
//! path as `toolchain::probe_nvptx`) produce PTX text. Nothing here needs CUDA: no libdevice is linked
//! (lowering never emits calls into it), and checking the PTX is `ptxas`'s job
//! (`toolchain::ptxas_check`).

use inkwell::context::Context as LlvmContext;
use inkwell::module::Module as LlvmModule;
use inkwell::targets::{CodeModel, FileType, RelocMode, Target as LlvmTarget, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;
use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;

use super::emit::{each_kernel, init_llvm_targets, optimize_for, EmitError, Mlir};
use super::lower::{LoweredModule, Target, GPU_MODULE};

/// MLIR passes from the lowered `gpu.module` to the LLVM and NVVM dialects.
pub const GPU_PIPELINE: &str = "builtin.module(\
gpu.module(expand-strided-metadata, convert-scf-to-cf, \
convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=1 index-bitwidth=64}), \
reconcile-unrealized-casts)";

/// The GPU kiln compiles for, and the PTX ISA version it emits. PTX ISA 8.1 (CUDA 12.1) raised the
/// kernel parameter space from 4352 to 32764 bytes, which `moe_experts` needs: it takes each
/// expert's three weights as separate pointers (DeepSeek-V3: 771 buffers, 6.2 KB).
pub const SM: &str = "sm_90a";

/// LLVM's pipeline for GPU kernels: `-O3`. The CPU's `-O2` ([`super::cpu::CPU_OPT`]) was measured
/// on the CPU only; this stays until a device can measure the PTX of both.
pub const GPU_OPT: &str = "default<O3>";
const PTX_FEATURES: &str = "+ptx81";

pub(crate) fn nvptx_machine() -> Result<TargetMachine, EmitError> {
    init_llvm_targets()?;
    let triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let target = LlvmTarget::from_triple(&triple).map_err(|e| EmitError::Llvm(e.to_string()))?;
    target
        .create_target_machine(
            &triple,
            SM,
            PTX_FEATURES,
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| EmitError::Llvm(format!("no NVPTX target machine for {SM}")))
}

fn optimized<'l>(
    module: &LoweredModule,
    llvm: &'l LlvmContext,
    machine: &TargetMachine,
) -> Result<LlvmModule<'l>, EmitError> {
    if module.target != Target::Gpu {
        return Err(EmitError::Llvm("the GPU back end was given CPU kernels".into()));
    }
    let ir = Mlir::with(|mlir| {
        let mut m = mlir.parse(&module.text())?;
        mlir.run(&mut m, GPU_PIPELINE)?;
        let body = m.body();
        let mut op = body.first_operation();
        while let Some(o) = op {
            if o.name().as_string_ref().as_str() == Ok("gpu.module") {
                break;
            }
            op = o.next_in_block();
        }
        let gpu_module = op.ok_or_else(|| EmitError::Translate {
            diagnostics: format!("no gpu.module @{GPU_MODULE} after lowering"),
        })?;
        mlir.translate(gpu_module, llvm)
    })?;
    optimize_for(&ir, machine, GPU_OPT)?;
    Ok(ir)
}

/// The optimised LLVM IR of a GPU module, as text.
pub fn llvm_ir(module: &LoweredModule) -> Result<String, EmitError> {
    let llvm = LlvmContext::create();
    let machine = nvptx_machine()?;
    let text = optimized(module, &llvm, &machine)?.print_to_string().to_string();
    Ok(text)
}

/// PTX for sm_90a holding every kernel of the module (`.entry` per kernel, named as the kernel).
///
/// Each kernel is compiled alone, in parallel on the current rayon pool, and the texts are joined
/// under one header ([`join`]): an entry of LLVM's PTX is self-contained (its shared memory is
/// declared inside it), so the joined module is what compiling the kernels together gives, up to
/// where LLVM puts its comments, and the same whatever the number of threads. Should a kernel's PTX
/// declare anything at module scope (which could clash between kernels), the module is compiled
/// whole instead.
pub fn ptx(module: &LoweredModule) -> Result<String, EmitError> {
    ptx_by(module, &module_ptx)
}

/// [`ptx`], with each kernel's PTX (and the whole module's, where the parts cannot be joined) from
/// `part`: [`module_ptx`] or the kernel cache in front of it.
pub(crate) fn ptx_by(
    module: &LoweredModule,
    part: &(dyn Fn(&LoweredModule) -> Result<String, EmitError> + Sync),
) -> Result<String, EmitError> {
    if module.kernels.len() > 1 {
        let parts = each_kernel(module, part)?;
        if let Some(joined) = join(&parts) {
            return Ok(joined);
        }
    }
    part(module)
}

/// The PTX of several modules of one kernel each, as one module: the first one's header (the
/// generator's comment, `.version`, `.target`, `.address_size`), then every module's entries in
/// order. `None` unless every module has the same header and nothing at module scope but entries.
fn join(parts: &[String]) -> Option<String> {
    fn split(ptx: &str) -> Option<(&str, &str)> {
        let end = ptx.find("\n.address_size ")? + 1;
        let end = end + ptx[end..].find('\n')? + 1;
        // The blank line after the header belongs to it.
        let end = if ptx[end..].starts_with('\n') { end + 1 } else { end };
        Some(ptx.split_at(end))
    }
    let (header, _) = split(parts.first()?)?;
    let mut out = header.to_string();
    for part in parts {
        let (h, entries) = split(part)?;
        if h != header || !entries.lines().all(entry_scope) {
            return None;
        }
        out.push_str(entries);
    }
    Some(out)
}

/// Whether a line of PTX after the header can belong to an entry: anything indented or inside a
/// body (labels, braces, comments), the entry's declaration and its performance directives; not a
/// module-scope declaration (`.global`, `.const`, `.func`, `.extern`, ...).
fn entry_scope(line: &str) -> bool {
    const ENTRY: &[&str] = &[
        ".visible .entry ",
        ".entry ",
        ".maxntid ",
        ".reqntid ",
        ".minnctapersm ",
        ".maxnreg ",
        ".maxclusterrank ",
        ".reqnctapercluster ",
        ".explicitcluster",
        ".pragma ",
    ];
    !line.starts_with('.') || ENTRY.iter().any(|d| line.starts_with(d))
}

/// [`ptx`] of the whole module in one LLVM module.
pub(crate) fn module_ptx(module: &LoweredModule) -> Result<String, EmitError> {
    let llvm = LlvmContext::create();
    let machine = nvptx_machine()?;
    let ir = optimized(module, &llvm, &machine)?;
    let text = machine
        .write_to_memory_buffer(&ir, FileType::Assembly)
        .map_err(|e| EmitError::Llvm(e.to_string()))?;
    Ok(String::from_utf8_lossy(text.as_slice()).into_owned())
}
