//! The code-generation toolchain kiln links (MLIR 22 through melior, LLVM 22 through inkwell) and the
//! one it runs (`ptxas`), probed end to end: `kiln doctor` prints the result, and the tests use it to
//! prove that the toolchain on this machine can do what codegen needs.
//!
//! The probe does real work, not version queries alone: it parses and verifies an MLIR module that
//! uses every dialect codegen lowers to, emits PTX for sm_90a from LLVM IR with the NVPTX backend,
//! creates a target machine for the host CPU, and, when `ptxas` is found, assembles the PTX with it.

use std::path::{Path, PathBuf};
use std::process::Command;

use inkwell::context::Context as LlvmContext;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::targets::FileType;
use melior::ir::operation::OperationLike;

/// What went wrong with the toolchain.
#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    #[error("MLIR: {0}")]
    Mlir(String),
    #[error("LLVM: {0}")]
    Llvm(String),
    #[error("ptxas at {path}: {message}")]
    Ptxas { path: PathBuf, message: String },
}

/// Result of [`probe`].
#[derive(Clone, Debug)]
pub struct ToolchainReport {
    pub llvm_version: (u32, u32, u32),
    /// Dialects the MLIR context loaded.
    pub mlir_dialects: usize,
    /// PTX emitted for the probe kernel.
    pub ptx: String,
    pub host_triple: String,
    pub host_cpu: String,
    /// `ptxas` found and its version line, or `None` when it is not installed.
    pub ptxas: Option<(PathBuf, String)>,
}

/// An MLIR module that touches each dialect kiln lowers through.
const MLIR_PROBE: &str = r#"
module attributes {gpu.container_module} {
  func.func @axpy(%a: f32, %x: memref<4xf32>, %y: memref<4xf32>) {
    %c0 = arith.constant 0 : index
    %c4 = arith.constant 4 : index
    %c1 = arith.constant 1 : index
    scf.for %i = %c0 to %c4 step %c1 {
      %xi = memref.load %x[%i] : memref<4xf32>
      %yi = memref.load %y[%i] : memref<4xf32>
      %p = arith.mulf %a, %xi : f32
      %s = arith.addf %p, %yi : f32
      %e = math.exp %s : f32
      memref.store %e, %y[%i] : memref<4xf32>
    }
    return
  }
  func.func @mm(%a: memref<4x8xf32>, %b: memref<8x2xf32>, %c: memref<4x2xf32>) {
    linalg.matmul ins(%a, %b : memref<4x8xf32>, memref<8x2xf32>) outs(%c : memref<4x2xf32>)
    return
  }
  gpu.module @kernels {
    gpu.func @tid(%out: memref<32xi32>) kernel {
      %t = gpu.thread_id x
      %v = arith.index_cast %t : index to i32
      memref.store %v, %out[%t] : memref<32xi32>
      gpu.return
    }
  }
}
"#;

/// LLVM IR for the NVPTX probe: `c[i] = a[i] + b[i]` for `i = threadIdx.x`.
const NVPTX_PROBE: &str = r#"
target triple = "nvptx64-nvidia-cuda"
define ptx_kernel void @kiln_probe(ptr addrspace(1) %a, ptr addrspace(1) %b, ptr addrspace(1) %c) {
  %tid = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %i = zext i32 %tid to i64
  %pa = getelementptr float, ptr addrspace(1) %a, i64 %i
  %pb = getelementptr float, ptr addrspace(1) %b, i64 %i
  %pc = getelementptr float, ptr addrspace(1) %c, i64 %i
  %va = load float, ptr addrspace(1) %pa
  %vb = load float, ptr addrspace(1) %pb
  %s = fadd float %va, %vb
  store float %s, ptr addrspace(1) %pc
  ret void
}
declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
"#;

/// Parses and verifies [`MLIR_PROBE`]; returns the number of loaded dialects.
pub fn probe_mlir() -> Result<usize, ToolchainError> {
    let registry = melior::dialect::DialectRegistry::new();
    melior::utility::register_all_dialects(&registry);
    let context = melior::Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    let module = melior::ir::Module::parse(&context, MLIR_PROBE)
        .ok_or_else(|| ToolchainError::Mlir("the probe module does not parse".into()))?;
    if !module.as_operation().verify() {
        return Err(ToolchainError::Mlir("the probe module does not verify".into()));
    }
    Ok(context.loaded_dialect_count())
}

/// Emits PTX for sm_90a from [`NVPTX_PROBE`] with LLVM's NVPTX backend.
pub fn probe_nvptx() -> Result<String, ToolchainError> {
    // The same target machine codegen emits kernels with.
    let machine = crate::codegen::gpu::nvptx_machine().map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    let context = LlvmContext::create();
    let buffer = MemoryBuffer::create_from_memory_range_copy(NVPTX_PROBE.as_bytes(), "probe");
    let module = context.create_module_from_ir(buffer).map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    let ptx = machine
        .write_to_memory_buffer(&module, FileType::Assembly)
        .map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    Ok(String::from_utf8_lossy(ptx.as_slice()).into_owned())
}

/// Creates codegen's target machine for the host CPU; returns its triple and CPU name.
pub fn probe_host() -> Result<(String, String), ToolchainError> {
    let machine = crate::codegen::cpu::host_machine().map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    let triple = machine.get_triple().as_str().to_string_lossy().into_owned();
    Ok((triple, machine.get_cpu().to_string()))
}

/// Where `ptxas` is: `$KILN_PTXAS`, then `tools/local/bin/ptxas` of this checkout (where
/// `scripts/setup.sh` puts it), then `PATH`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/local/bin/ptxas");
    if let Ok(local) = local.canonicalize() {
        return Some(local);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("ptxas")).find(|p| p.is_file()))
}

/// Runs `ptxas --version`; returns its last line.
pub fn ptxas_version(ptxas: &Path) -> Result<String, ToolchainError> {
    let out = Command::new(ptxas)
        .arg("--version")
        .output()
        .map_err(|e| ToolchainError::Ptxas { path: ptxas.to_path_buf(), message: e.to_string() })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().last().unwrap_or("").trim().to_string())
}

/// Assembles `ptx` for `arch` with `ptxas -v` into a temporary file; returns ptxas's report
/// (registers, shared memory, spills per kernel), or its error output.
pub fn ptxas_check(ptxas: &Path, ptx: &str, arch: &str) -> Result<String, ToolchainError> {
    ptxas_check_on(ptxas, ptx, arch, 1)
}

/// [`ptxas_check`] with ptxas optimising on up to `threads` threads (`--split-compile`): the same
/// report, in the same order, and the same code.
pub fn ptxas_check_on(ptxas: &Path, ptx: &str, arch: &str, threads: usize) -> Result<String, ToolchainError> {
    let fail = |message: String| ToolchainError::Ptxas { path: ptxas.to_path_buf(), message };
    let dir = std::env::temp_dir().join(format!("kiln-ptxas-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
    let input = dir.join("k.ptx");
    std::fs::write(&input, ptx).map_err(|e| fail(e.to_string()))?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .args(if threads > 1 { vec![format!("--split-compile={threads}")] } else { vec![] })
        .arg(&input)
        .arg("-o")
        .arg(dir.join("k.cubin"))
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| fail(e.to_string()))?;
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(report)
    } else {
        Err(fail(report))
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs every probe. ptxas is optional here (`kiln doctor` reports it missing); tests that need it
/// fail with a message pointing at `scripts/setup.sh`.
pub fn probe() -> Result<ToolchainReport, ToolchainError> {
    let mlir_dialects = probe_mlir()?;
    let ptx = probe_nvptx()?;
    let (host_triple, host_cpu) = probe_host()?;
    let ptxas = match find_ptxas() {
        Some(path) => {
            ptxas_check(&path, &ptx, "sm_90a")?;
            let version = ptxas_version(&path)?;
            Some((path, version))
        }
        None => None,
    };
    Ok(ToolchainReport {
        llvm_version: inkwell::support::get_llvm_version(),
        mlir_dialects,
        ptx,
        host_triple,
        host_cpu,
        ptxas,
    })
}
