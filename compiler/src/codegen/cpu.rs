//! The CPU back end: lowered kernels (`func.func`s) into LLVM IR, an object file for the host CPU, and
//! a shared library the runtime `dlopen`s.
//!
//! Stages, each a function whose output can be dumped: [`CPU_PIPELINE`] lowers the module to the LLVM
//! dialect; translation gives an LLVM module, to which [`llvm_ir`] adds one packed entry point per
//! kernel; LLVM's [`CPU_OPT`] (`default<O2>`) optimises it for the host (CPU name and features from the machine
//! compiling, so the library is for this host); [`object`] emits the object file and
//! [`link_shared_library`] links it with `cc -shared`, atomically. [`objects`] emits one object per
//! kernel, in parallel, for [`link_objects`] (what `kiln compile` does).
//!
//! The exported ABI of each kernel `k` (see `lower` for the bare-pointer function itself, which the
//! library keeps internal, inlined into its entry) is the packed entry `void k_packed(void *const *buffers, const int64_t *sizes, int64_t lo, int64_t hi)`:
//! `buffers` holds the kernel's arguments then results, `sizes` its symbolic sizes in
//! `Kernel::syms` order, and `[lo, hi)` the work items to compute. One signature for every kernel
//! lets the runtime call any of them without generated glue. The entry passes the function the
//! buffers its body uses ([`super::lower::LoweredKernel::passed`]) and, to a kernel that picks
//! experts' weights at run time, `buffers` itself as a table of addresses.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use inkwell::comdat::ComdatSelectionKind;
use inkwell::context::Context as LlvmContext;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::module::{Linkage, Module as LlvmModule};
use inkwell::targets::{CodeModel, FileType, RelocMode, Target as LlvmTarget, TargetMachine};
use inkwell::GlobalVisibility;
use inkwell::OptimizationLevel;

use super::emit::{each_kernel, each_kernel_timed, init_llvm_targets, optimize_for, EmitError, Mlir};
use super::lower::{LoweredModule, Target, THREAD_SCRATCH, THREAD_SCRATCH_BYTES};

/// MLIR passes from the lowered kernels to the LLVM dialect. bf16 conversions are expanded into integer
/// arithmetic (`arith-expand`) so the library needs no compiler-rt helpers; `tanh` and friends that
/// LLVM cannot inline become libm calls. Vector ops become LLVM's while control flow is still
/// structured: `convert-vector-to-llvm` first simplifies the regions it works on, which on a CFG of
/// many similar blocks (a 256-way switch over MoE experts' weights) took half a second a kernel; the
/// code is the same but for the order of those blocks.
pub const CPU_PIPELINE: &str = "builtin.module(\
func.func(arith-expand{include-bf16=true}), \
expand-strided-metadata, \
convert-vector-to-scf, \
convert-vector-to-llvm, \
convert-scf-to-cf, \
convert-math-to-llvm, \
convert-math-to-libm, \
finalize-memref-to-llvm, \
convert-arith-to-llvm, \
convert-index-to-llvm, \
convert-func-to-llvm{use-bare-ptr-memref-call-conv=1}, \
convert-cf-to-llvm, \
reconcile-unrealized-casts)";

/// LLVM's pipeline for CPU kernels: `-O2`, not `-O3`. The kernels arrive vectorised, blocked and
/// unrolled by lowering, and what `-O3` adds (non-trivial loop unswitching, a higher inlining
/// threshold, call-site splitting) found nothing to do in them: on models/bench.toml in f32, bf16
/// and FP8, 7 alternating rounds each of prefill 128 and decode gave the same tokens/s within the
/// machine's noise, while `-O2` took 20% less of LLVM's time on DeepSeek-V3 (the optimisation
/// pipeline 1.49 -> 1.20 s, instruction selection and the rest 1.99 -> 1.64 s, summed over
/// kernels). The GPU keeps `-O3` (`gpu::GPU_OPT`) until a device can measure the difference.
pub const CPU_OPT: &str = "default<O2>";

/// Suffix of the packed entry point of each kernel (the manifest format's).
pub use kiln_ir::artifact::PACKED_SUFFIX;
use kiln_ir::artifact::SIGNATURE_SUFFIX;

/// What the CPU lowering may use beyond the vector code every kernel gets: instructions LLVM would
/// not pick by itself from plain vector arithmetic. Read once from the host (the library is for
/// this host, see [`host_description`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX512_BF16's `vdpbf16ps`: two bf16 products summed into each f32 lane, for GEMMs whose
    /// operands are both bf16. `KILN_NO_BF16_DOT=1` turns it off (to compare against the widening
    /// path on the same machine).
    pub bf16_dot: bool,
    /// AVX512_VBMI's `vpermi2b` (a 128-entry byte table looked up 64 bytes at a time): with
    /// `bf16_dot`, FP8 GEMMs decode E4M3 codes to bf16 by table and take `vdpbf16ps`.
    pub byte_permute: bool,
    /// `linear`'s packed path (`lower/matmul/packed.rs`) for GEMMs with enough rows.
    /// `KILN_NO_PACKED_GEMM=1` turns it off, leaving every GEMM to the dot-product blocks (to
    /// compare the two on the same machine).
    pub packed_gemm: bool,
    /// AMX's bf16 tiles (`tdpbf16ps`, with AMX-TILE's loads, stores and configuration): the
    /// packed path's bf16 micro-kernel (`lower/matmul/packed/amx.rs`). Only where Linux grants the
    /// process the tile state ([`request_amx`]), and with `bf16_dot` and `packed_gemm`.
    /// `KILN_NO_AMX=1` turns it off (the AVX-512 micro-kernel then takes bf16).
    pub amx: bool,
    /// AVX-512F: 32 vector registers of 16 f32 lanes. Without it (AVX2's 16 registers of 8 lanes,
    /// each of the lowering's 16-lane vectors two of them) the packed path's micro-kernel keeps a
    /// quarter of a panel's columns in registers at a time (`lower/matmul/packed.rs`).
    pub avx512: bool,
}

/// Asks Linux for this process's permission to use AMX's tile data
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16 and later): without it the
/// first tile instruction kills the process. True when granted (or already granted).
pub fn request_amx() -> bool {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        extern "C" {
            fn syscall(number: i64, ...) -> i64;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        // SAFETY: arch_prctl with these arguments only changes which register state the kernel
        // lets this process use; it reads and writes no memory of ours.
        unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    false
}

thread_local! {
    static PINNED: std::cell::Cell<Option<CpuFeatures>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`host_features`] on this thread answering `features` instead of the host's: for
/// lowering whose text must not depend on the machine it runs on (the MLIR snapshots pin both
/// AVX-512's and AVX2's register blocking). Lowering only: a library compiled this way may use
/// instructions this host lacks.
pub fn with_features<T>(features: CpuFeatures, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<CpuFeatures>);
    impl Drop for Restore {
        fn drop(&mut self) {
            PINNED.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PINNED.with(|p| p.replace(Some(features))));
    f()
}

/// The host's [`CpuFeatures`] (or those [`with_features`] pins on this thread).
pub fn host_features() -> CpuFeatures {
    if let Some(pinned) = PINNED.with(|p| p.get()) {
        return pinned;
    }
    static FEATURES: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
    *FEATURES.get_or_init(|| {
        let features = TargetMachine::get_host_cpu_features().to_string();
        let has = |f: &str| features.split(',').any(|x| x == f);
        let off = std::env::var_os("KILN_NO_BF16_DOT").is_some_and(|v| v != "0");
        let bf16_dot = has("+avx512bf16") && has("+avx512f") && !off;
        let packed_gemm = std::env::var_os("KILN_NO_PACKED_GEMM").is_none_or(|v| v == "0");
        let no_amx = std::env::var_os("KILN_NO_AMX").is_some_and(|v| v != "0");
        let amx = bf16_dot && packed_gemm && has("+amx-tile") && has("+amx-bf16") && !no_amx && request_amx();
        CpuFeatures { bf16_dot, byte_permute: has("+avx512vbmi"), packed_gemm, amx, avx512: has("+avx512f") }
    })
}

/// The machine code `kernels.so` is made for: the host's triple, CPU name and features, as LLVM
/// names them, and what the lowering uses of them ([`host_features`]). Code compiled for one may
/// not run on another (AVX-512 on a CPU without it), so a cache of compiled artifacts keys on it.
pub fn host_description() -> String {
    let triple = TargetMachine::get_default_triple();
    format!(
        "{} {} {} {:?}",
        triple.as_str().to_string_lossy(),
        TargetMachine::get_host_cpu_name().to_string(),
        TargetMachine::get_host_cpu_features().to_string(),
        host_features()
    )
}

pub(crate) fn host_machine() -> Result<TargetMachine, EmitError> {
    init_llvm_targets()?;
    let triple = TargetMachine::get_default_triple();
    let target = LlvmTarget::from_triple(&triple).map_err(|e| EmitError::Llvm(e.to_string()))?;
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| EmitError::Llvm(format!("no target machine for the host CPU `{cpu}`")))
}

fn require_cpu(module: &LoweredModule) -> Result<(), EmitError> {
    match module.target {
        Target::Cpu => Ok(()),
        Target::Gpu => Err(EmitError::Llvm("the CPU back end was given GPU kernels".into())),
    }
}

/// The packed entry of one kernel, as LLVM IR text (see the module documentation), and its
/// signature line as the constant string `@{name}_signature`.
fn packed_entry(name: &str, passed: &[usize], sizes: usize, table: bool, signature: &str) -> String {
    let mut body = String::new();
    let mut args = Vec::new();
    for &i in passed {
        body.push_str(&format!(
            "  %bp{i} = getelementptr inbounds ptr, ptr %buffers, i64 {i}\n  %b{i} = load ptr, ptr %bp{i}\n"
        ));
        args.push(format!("ptr %b{i}"));
    }
    for i in 0..sizes {
        body.push_str(&format!(
            "  %sp{i} = getelementptr inbounds i64, ptr %sizes, i64 {i}\n  %s{i} = load i64, ptr %sp{i}\n"
        ));
        args.push(format!("i64 %s{i}"));
    }
    args.push("i64 %lo".into());
    args.push("i64 %hi".into());
    if table {
        args.push("ptr %buffers".into());
    }
    let params = args.iter().map(|a| a.split(' ').next().unwrap_or("ptr")).collect::<Vec<_>>().join(", ");
    // The signature holds only `[a-z0-9_ *,\[\]|>-]`, none of which LLVM's c"..." escapes.
    let sig =
        format!("@{name}{SIGNATURE_SUFFIX} = constant [{} x i8] c\"{signature}\\00\"\n", signature.len() + 1);
    sig + &format!(
        "declare void @{name}({params})\n\
         define void @{name}{PACKED_SUFFIX}(ptr %buffers, ptr %sizes, i64 %lo, i64 %hi) {{\n{body}  \
         call void @{name}({})\n  ret void\n}}\n",
        args.join(", ")
    )
}

/// f32 to bf16, rounding to nearest even (NaN stays a quiet NaN), for the calls LLVM's x86 back
/// end makes when it legalises a bf16 value it holds in a register (a bf16 copy kernel loads and
/// stores through f32): compiler-rt has it, but the library links with `cc`, whose libgcc (GCC 12)
/// does not. Hidden, so each library resolves to its own; kept alive, since the calls appear only
/// in instruction selection, after the optimiser would have dropped an unused function.
const TRUNC_SF_BF2: &str = "\
@llvm.compiler.used = appending global [1 x ptr] [ptr @__truncsfbf2], section \"llvm.metadata\"
define weak hidden bfloat @__truncsfbf2(float %x) {
  %b = bitcast float %x to i32
  %abs = and i32 %b, 2147483647
  %nan = icmp ugt i32 %abs, 2139095040
  %hi = lshr i32 %b, 16
  %odd = and i32 %hi, 1
  %bias = add i32 %odd, 32767
  %r = add i32 %b, %bias
  %rounded = lshr i32 %r, 16
  %quiet = or i32 %hi, 64
  %sel = select i1 %nan, i32 %quiet, i32 %rounded
  %t = trunc i32 %sel to i16
  %f = bitcast i16 %t to bfloat
  ret bfloat %f
}
";

/// A constructor for a library whose kernels use AMX's tiles: when the library is loaded it asks
/// Linux for the tile state ([`request_amx`]), and where that is refused it says so and ends the
/// process, which the first tile instruction would otherwise kill with no word of why.
const AMX_INIT: &str = "\
@llvm.global_ctors = appending global [1 x { i32, ptr, ptr }] [{ i32, ptr, ptr } { i32 65535, ptr @kiln_amx_init, ptr null }]
@kiln_amx_refused = private constant [111 x i8] c\"kiln: this library's kernels use AMX tiles, and Linux refused them (arch_prctl); recompile with KILN_NO_AMX=1\\0A\\00\"
declare i64 @syscall(i64, ...)
declare i64 @write(i32, ptr, i64)
declare void @_exit(i32)
define internal void @kiln_amx_init() {
  %r = call i64 (i64, ...) @syscall(i64 158, i64 4131, i64 18)
  %ok = icmp eq i64 %r, 0
  br i1 %ok, label %done, label %refused
refused:
  %w = call i64 @write(i32 2, ptr @kiln_amx_refused, i64 110)
  call void @_exit(i32 70)
  unreachable
done:
  ret void
}
";

/// Lowers, translates and optimises the module; returns the LLVM module in `llvm`.
fn optimized<'l>(
    module: &LoweredModule,
    llvm: &'l LlvmContext,
    machine: &TargetMachine,
) -> Result<LlvmModule<'l>, EmitError> {
    require_cpu(module)?;
    let ir = Mlir::with(|mlir| {
        let mut m = mlir.parse(&module.text())?;
        mlir.run(&mut m, CPU_PIPELINE)?;
        mlir.translate(m.as_operation(), llvm)
    })?;
    // The thread-local scratch: one array per thread for the whole library, not one per kernel's
    // object (a COMDAT group that the linker keeps once), zero-filled where the C library
    // allocates a thread's copy.
    if let Some(g) = ir.get_global(THREAD_SCRATCH) {
        let comdat = ir.get_or_insert_comdat(THREAD_SCRATCH);
        comdat.set_selection_kind(ComdatSelectionKind::Any);
        g.set_linkage(Linkage::LinkOnceODR);
        g.set_visibility(GlobalVisibility::Hidden);
        g.set_thread_local(true);
        g.set_comdat(comdat);
        let zero = llvm.i8_type().array_type(THREAD_SCRATCH_BYTES as u32).const_zero();
        g.set_initializer(&zero);
    }
    for k in &module.kernels {
        let sig = k.signature.as_deref().unwrap_or_default();
        let text = packed_entry(&k.name, &k.passed, k.syms.len(), k.table, sig);
        let buffer = MemoryBuffer::create_from_memory_range_copy(text.as_bytes(), "packed");
        let entry = llvm.create_module_from_ir(buffer).map_err(|e| EmitError::Llvm(e.to_string()))?;
        ir.link_in_module(entry).map_err(|e| EmitError::Llvm(e.to_string()))?;
        // The packed entry is the library's only way in: with the kernel's own function internal,
        // LLVM inlines it into its one caller and drops it, instead of compiling the body twice
        // (once inlined, once for an exported symbol nobody calls). On DeepSeek-V3 that took
        // instruction selection and the rest from 1.64 to 1.32 s, summed over kernels, and the
        // library from 441 to 352 KB.
        if let Some(f) = ir.get_function(&k.name) {
            f.set_linkage(Linkage::Internal);
        }
    }
    let buffer = MemoryBuffer::create_from_memory_range_copy(TRUNC_SF_BF2.as_bytes(), "truncsfbf2");
    let helper = llvm.create_module_from_ir(buffer).map_err(|e| EmitError::Llvm(e.to_string()))?;
    ir.link_in_module(helper).map_err(|e| EmitError::Llvm(e.to_string()))?;
    if ir.get_function("llvm.x86.ldtilecfg").is_some() {
        let buffer = MemoryBuffer::create_from_memory_range_copy(AMX_INIT.as_bytes(), "amx");
        let init = llvm.create_module_from_ir(buffer).map_err(|e| EmitError::Llvm(e.to_string()))?;
        ir.link_in_module(init).map_err(|e| EmitError::Llvm(e.to_string()))?;
    }
    optimize_for(&ir, machine, CPU_OPT)?;
    Ok(ir)
}

/// The optimised LLVM IR of a CPU module, as text.
pub fn llvm_ir(module: &LoweredModule) -> Result<String, EmitError> {
    let llvm = LlvmContext::create();
    let machine = host_machine()?;
    let text = optimized(module, &llvm, &machine)?.print_to_string().to_string();
    Ok(text)
}

/// An object file for the host CPU holding every kernel of the module and its packed entry.
pub fn object(module: &LoweredModule) -> Result<Vec<u8>, EmitError> {
    let llvm = LlvmContext::create();
    let machine = host_machine()?;
    let ir = optimized(module, &llvm, &machine)?;
    let obj =
        machine.write_to_memory_buffer(&ir, FileType::Object).map_err(|e| EmitError::Llvm(e.to_string()))?;
    Ok(obj.as_slice().to_vec())
}

/// One object file per kernel of the module, in kernel order, compiled in parallel on the current
/// rayon pool (each thread with its own MLIR and LLVM contexts). A kernel is compiled alone, as a
/// module of its own: kernels share nothing (each is its own function with its own packed entry),
/// so each object, and the library [`link_objects`] makes of them in this order, is the same
/// whatever the number of threads.
pub fn objects(module: &LoweredModule) -> Result<Vec<Vec<u8>>, EmitError> {
    require_cpu(module)?;
    each_kernel(module, object)
}

/// [`objects`], each with the CPU time its thread spent compiling it.
pub fn objects_timed(module: &LoweredModule) -> Result<Vec<(Vec<u8>, std::time::Duration)>, EmitError> {
    require_cpu(module)?;
    each_kernel_timed(module, object)
}

/// Links an object file into the shared library `path` with `cc -shared ... -lm`. The library appears
/// at `path` complete or not at all: it is linked under a temporary name in the same directory and
/// renamed.
pub fn link_shared_library(object: &[u8], path: &Path) -> Result<(), EmitError> {
    link_objects(&[object], path)
}

/// [`link_shared_library`] for several object files, linked in the order given.
pub fn link_objects(objects: &[impl AsRef<[u8]>], path: &Path) -> Result<(), EmitError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let fail = |message: String| EmitError::Link { path: path.to_path_buf(), message };
    let tag = format!("{}.{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let file = path.file_name().ok_or_else(|| fail("the path has no file name".into()))?.to_string_lossy();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let objs: Vec<_> = (0..objects.len()).map(|i| dir.join(format!(".{file}.{tag}.{i}.o"))).collect();
    let tmp = dir.join(format!(".{file}.{tag}.tmp"));
    let remove = || objs.iter().for_each(|o| drop(std::fs::remove_file(o)));
    for (obj, bytes) in objs.iter().zip(objects) {
        if let Err(e) = std::fs::write(obj, bytes) {
            remove();
            return Err(fail(format!("writing {}: {e}", obj.display())));
        }
    }
    let out = Command::new("cc").arg("-shared").arg("-o").arg(&tmp).args(&objs).arg("-lm").output();
    remove();
    let out = out.map_err(|e| fail(format!("running cc: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(format!("cc failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(format!("renaming {}: {e}", tmp.display()))
    })
}
