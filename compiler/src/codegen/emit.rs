//! The MLIR half of emission, shared by both targets: parse and verify lowered text, run a pass
//! pipeline (written as a string, parsed by MLIR), and translate the LLVM-dialect result into an LLVM
//! module in an inkwell context. MLIR's diagnostics are collected and returned in the error, so a
//! failure says what MLIR said.
//!
//! Each thread that emits has its own MLIR context ([`Mlir::with`]), with MLIR's multithreading off:
//! contexts are not `Send`, and loading every dialect costs more than emitting most kernels, so a
//! thread makes one on first use and reuses it for every module it emits. Nothing else is shared
//! between calls: modules are made and destroyed by each call, diagnostics are collected per call,
//! and kernels can be emitted on several threads at once (see `cpu::objects` and `gpu::ptx`).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::OnceLock;

use inkwell::context::Context as LlvmContext;
use inkwell::module::Module as LlvmModule;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{InitializationConfig, TargetMachine};
use melior::dialect::DialectRegistry;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::Module;
use melior::pass::PassManager;
use melior::Context;
use rayon::prelude::*;

use std::time::Duration;

use super::lower::{LoweredModule, Target};

/// Why emission failed. Every variant but [`EmitError::Link`] means lowering produced something MLIR or
/// LLVM rejects: a compiler bug, reported with the tool's own words.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("MLIR does not parse:\n{diagnostics}")]
    Parse { diagnostics: String },
    #[error("MLIR does not verify:\n{diagnostics}")]
    Verify { diagnostics: String },
    #[error("MLIR pass pipeline `{pipeline}` failed:\n{diagnostics}")]
    Pipeline { pipeline: String, diagnostics: String },
    #[error("translating MLIR to LLVM IR failed:\n{diagnostics}")]
    Translate { diagnostics: String },
    #[error("LLVM: {0}")]
    Llvm(String),
    /// Writing or linking the shared library failed (I/O, or `cc`).
    #[error("linking {path}: {message}")]
    Link { path: std::path::PathBuf, message: String },
}

/// Registers LLVM's host and NVPTX targets, once per process. LLVM's target registry is a global list
/// that concurrent first registrations could corrupt, so every caller goes through this.
pub(crate) fn init_llvm_targets() -> Result<(), EmitError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        inkwell::targets::Target::initialize_nvptx(&InitializationConfig::default());
        inkwell::targets::Target::initialize_native(&InitializationConfig::default())
    })
    .clone()
    .map_err(EmitError::Llvm)
}

/// Targets `ir` at `machine` (triple and data layout), verifies it and runs LLVM's optimisation
/// pipeline `passes` (`cpu::CPU_OPT`, `gpu::GPU_OPT`): the LLVM half of emission.
pub(crate) fn optimize_for(ir: &LlvmModule, machine: &TargetMachine, passes: &str) -> Result<(), EmitError> {
    ir.set_triple(&machine.get_triple());
    ir.set_data_layout(&machine.get_target_data().get_data_layout());
    ir.verify().map_err(|e| EmitError::Llvm(e.to_string()))?;
    ir.run_passes(passes, machine, PassBuilderOptions::create()).map_err(|e| EmitError::Llvm(e.to_string()))
}

/// An MLIR context with every dialect, pass and LLVM translation registered, collecting diagnostics.
pub(crate) struct Mlir {
    context: Context,
    diagnostics: Rc<RefCell<Vec<String>>>,
}

impl Mlir {
    /// Runs `f` with this thread's context, made on the thread's first call.
    pub fn with<T>(f: impl FnOnce(&Mlir) -> T) -> T {
        thread_local! {
            static MLIR: Mlir = Mlir::new();
        }
        MLIR.with(|mlir| {
            // What an earlier call left (warnings of a module that did compile) is not this call's.
            mlir.take_diagnostics();
            f(mlir)
        })
    }

    fn new() -> Mlir {
        // MLIR's pass registry is global: register into it once, before any thread parses a pipeline.
        static PASSES: std::sync::Once = std::sync::Once::new();
        PASSES.call_once(melior::utility::register_all_passes);
        let registry = DialectRegistry::new();
        melior::utility::register_all_dialects(&registry);
        let context = Context::new_with_registry(&registry, false);
        context.load_all_available_dialects();
        melior::utility::register_all_llvm_translations(&context);
        let diagnostics = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&diagnostics);
        context.attach_diagnostic_handler(move |d| {
            let mut text = format!("{}: {d}", d.location());
            for i in 0..d.note_count() {
                if let Ok(note) = d.note(i) {
                    text.push_str(&format!("\n  note: {note}"));
                }
            }
            sink.borrow_mut().push(text);
            true
        });
        Mlir { context, diagnostics }
    }

    fn take_diagnostics(&self) -> String {
        std::mem::take(&mut *self.diagnostics.borrow_mut()).join("\n")
    }

    /// Parses and verifies a module.
    pub fn parse(&self, text: &str) -> Result<Module<'_>, EmitError> {
        let module = Module::parse(&self.context, text)
            .ok_or_else(|| EmitError::Parse { diagnostics: self.take_diagnostics() })?;
        if !module.as_operation().verify() {
            return Err(EmitError::Verify { diagnostics: self.take_diagnostics() });
        }
        Ok(module)
    }

    /// Runs a textual pass pipeline (`builtin.module(...)`) on the module.
    pub fn run(&self, module: &mut Module<'_>, pipeline: &str) -> Result<(), EmitError> {
        let fail = |diagnostics: String| EmitError::Pipeline { pipeline: pipeline.to_string(), diagnostics };
        let pm = PassManager::new(&self.context);
        melior::utility::parse_pass_pipeline(pm.as_operation_pass_manager(), pipeline)
            .map_err(|e| fail(e.to_string()))?;
        pm.run(module).map_err(|_| fail(self.take_diagnostics()))
    }

    /// Translates an operation in the LLVM dialect that is module-like (a `builtin.module` or a
    /// `gpu.module`) into an LLVM module owned by `llvm`.
    pub fn translate<'l>(
        &self,
        op: OperationRef<'_, '_>,
        llvm: &'l LlvmContext,
    ) -> Result<LlvmModule<'l>, EmitError> {
        // SAFETY: `op` is a live operation of this context; mlir-sys and inkwell bind the same LLVM
        // library, so the context pointer is valid for MLIR, and the returned module (owned by the
        // caller, created in `llvm`) is handed to inkwell, which takes ownership.
        let raw = unsafe { mlir_sys::mlirTranslateModuleToLLVMIR(op.to_raw(), llvm.raw() as *mut _) };
        if raw.is_null() {
            return Err(EmitError::Translate { diagnostics: self.take_diagnostics() });
        }
        // SAFETY: see above; `raw` is a fresh, non-null module in `llvm`.
        Ok(unsafe { LlvmModule::new(raw as *mut _) })
    }
}

/// Runs `f` on each kernel of `module`, as a module of its own, on the current rayon pool, and
/// returns the results in kernel order (with an error, the first in kernel order). The largest
/// kernels (by MLIR text, a fair guess at their cost) start first: one started last would leave a
/// thread working alone at the end.
pub(crate) fn each_kernel<T: Send>(
    module: &LoweredModule,
    f: impl Fn(&LoweredModule) -> Result<T, EmitError> + Sync,
) -> Result<Vec<T>, EmitError> {
    Ok(each_kernel_timed(module, f)?.into_iter().map(|(t, _)| t).collect())
}

/// [`each_kernel`], with the CPU time each kernel's `f` took ([`thread_cpu_time`]: a kernel is
/// emitted on one thread, so the figure does not depend on what the other threads did meanwhile).
pub(crate) fn each_kernel_timed<T: Send>(
    module: &LoweredModule,
    f: impl Fn(&LoweredModule) -> Result<T, EmitError> + Sync,
) -> Result<Vec<(T, Duration)>, EmitError> {
    let mut order: Vec<usize> = (0..module.kernels.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(module.kernels[i].func.len()));
    let mut done: Vec<(usize, Result<_, EmitError>)> = (order.into_par_iter().with_max_len(1))
        .map(|i| {
            let alone = LoweredModule { target: module.target, kernels: vec![module.kernels[i].clone()] };
            (i, timed(|| f(&alone)))
        })
        .collect();
    done.sort_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// `f`'s result and the CPU time the calling thread spent in it (zero where the platform has no
/// per-thread clock).
pub(crate) fn timed<T>(f: impl FnOnce() -> Result<T, EmitError>) -> Result<(T, Duration), EmitError> {
    let start = thread_cpu_time();
    let out = f()?;
    let spent = match (start, thread_cpu_time()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => Duration::ZERO,
    };
    Ok((out, spent))
}

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`); `None` off Linux.
pub fn thread_cpu_time() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            sec: i64,
            nsec: i64,
        }
        extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut ts = Timespec { sec: 0, nsec: 0 };
        // SAFETY: clock_gettime writes one timespec (two 64-bit fields on the 64-bit Linux targets
        // kiln builds for) through the pointer, which points at one.
        let ok = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
        (ok && ts.sec >= 0 && (0..1_000_000_000).contains(&ts.nsec))
            .then(|| Duration::new(ts.sec as u64, ts.nsec as u32))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// What emitting one kernel cost: the kernel, the target, and the CPU time of the thread that
/// lowered it from MLIR to an object (CPU) or PTX (GPU). `kiln compile --timings` lists the
/// slowest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTime {
    pub kernel: String,
    pub target: Target,
    pub cpu: Duration,
}

/// Parses and verifies MLIR text: the check that lowered text is valid, without emitting anything.
pub fn verify_mlir(text: &str) -> Result<(), EmitError> {
    Mlir::with(|mlir| mlir.parse(text).map(|_| ()))
}
