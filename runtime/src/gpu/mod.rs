//! The CUDA backend: an artifact's `kernels.ptx` on one device, under the executor
//! ([`crate::exec`]), which gives it everything that is not device-specific (programs, states,
//! checks, folding weight-only launches, the per-expert load, the profile).
//!
//! [`GpuBackend::open`] does everything that can fail before memory is touched, cheapest first: it
//! opens the device ([`RuntimeError::NoCudaDriver`] on a machine without a driver,
//! [`RuntimeError::NoCudaDevice`] when the driver sees none), requires the GPU target
//! ([`RuntimeError::NoGpuTarget`]), plans every launch of every program (`plan.rs`, testable without
//! a device: refuses `send`/`recv` steps) and checks each against the `.entry` parameter lists read
//! from `kernels.ptx` (its size and SHA-256 checked again), then has the driver compile the PTX (a
//! rejection carries the JIT log, [`RuntimeError::PtxLoad`]).
//!
//! Memory is zeroed device memory; parameters are uploaded in their compiled dtypes (FP8 as one
//! byte per element). [`Backend::bind`] builds each launch's argument array once (buffers never
//! move; only the sizes at its end are rewritten per run) and checks every grid against CUDA's
//! limits at the loaded maxima. [`Backend::run`] computes every grid before queuing anything, then
//! queues every launch on one stream in program order and synchronises, so a kernel fault is
//! reported by the run that caused it.
//!
//! Under `mpirun`, a run's sums and gathers may go over NCCL on device memory (`nccl.rs`,
//! [`Backend::device_collectives`]) instead of through the host.
//!
//! What it does not do yet: several devices in one process, or overlap of copies with kernels. The manifest's GPU
//! grids are checked against CUDA's limits and the entries' parameter lists, but not against a
//! signature compiled into the PTX, as the CPU backend's kernels are.

mod device;
pub mod nccl;
pub mod plan;

use std::collections::HashMap;
use std::ops::Range;

use cudarc::driver::CudaSlice;
use kiln_ir::SymBindings;

use crate::artifact::Artifact;
use crate::exec::{After, Backend, Binding, Executor, ParamBytes};
use crate::RuntimeError;

use device::{Device, Function, Module};
use plan::LaunchPlan;

/// A loaded artifact with its weights, ready to run on a CUDA device.
pub type GpuModel = Executor<GpuBackend>;

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// The CUDA device ordinal (default 0).
    pub device: usize,
    /// The largest sizes runs will use; memory is sized for them. Default: the artifact's maxima.
    pub max: Option<SymBindings>,
}

/// One device with the artifact's module loaded.
pub struct GpuBackend {
    // The module before the device: unloaded while the context lives.
    module: Module,
    /// The `.entry` parameter lists of `kernels.ptx`.
    entries: HashMap<String, Vec<plan::PtxParam>>,
    name: String,
    device: Device,
}

/// One launch, bound to device addresses.
pub struct Launch {
    plan: LaunchPlan,
    function: Function,
    /// Buffer addresses then sizes, in the `.entry`'s order ([`LaunchPlan::args`]).
    args: Vec<u64>,
}

/// A program's launches.
pub struct Launches(Vec<Launch>);

impl Backend for GpuBackend {
    type Memory = CudaSlice<u8>;
    type Launches = Launches;
    type Options = GpuOptions;

    fn open(artifact: &Artifact, options: &GpuOptions) -> Result<GpuBackend, RuntimeError> {
        let device = Device::open(options.device)?;
        let m = artifact.manifest();
        let target = m.gpu.as_ref().ok_or(RuntimeError::NoGpuTarget)?;
        let ptx_bytes = artifact.read_file(&target.module)?;
        let ptx = String::from_utf8(ptx_bytes).map_err(|_| RuntimeError::PtxLoad {
            arch: target.arch.clone(),
            log: "kernels.ptx is not UTF-8 text".into(),
        })?;
        let entries = plan::entry_params(&ptx);
        // Planned and checked against the PTX before anything is uploaded.
        for p in &m.programs {
            for l in plan::plan(&m.kernels, &p.steps, &p.buffers)? {
                plan::check_entry(&l, entries.get(&l.entry))?;
            }
        }
        let module = device.load_module(&ptx, &target.arch)?;
        let (gpu_name, (major, minor)) = device.describe()?;
        Ok(GpuBackend { module, entries, name: format!("{gpu_name} (sm_{major}{minor})"), device })
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn alloc(&self, bytes: u64, what: &str) -> Result<CudaSlice<u8>, RuntimeError> {
        self.device.alloc(bytes, what)
    }

    fn param(&self, bytes: ParamBytes, what: &str) -> Result<CudaSlice<u8>, RuntimeError> {
        match bytes {
            ParamBytes::Owned(v) => self.device.upload(&v, what),
            ParamBytes::Mapped(t) => self.device.upload(t.bytes(), what),
        }
    }

    fn len(&self, mem: &CudaSlice<u8>) -> usize {
        mem.len()
    }

    fn write(&self, mem: &mut CudaSlice<u8>, offset: usize, bytes: &[u8]) -> Result<(), RuntimeError> {
        self.device.write(mem, offset, bytes)
    }

    fn read(&self, mem: &CudaSlice<u8>, range: Range<usize>) -> Result<Vec<u8>, RuntimeError> {
        self.device.read(mem, range)
    }

    fn address(&self, mem: &CudaSlice<u8>) -> u64 {
        self.device.address(mem)
    }

    fn bind(&self, what: &Binding) -> Result<Launches, RuntimeError> {
        let (m, program, max) = (what.manifest, what.program, what.max);
        let mut functions: HashMap<String, Function> = HashMap::new();
        let mut out = Vec::with_capacity(what.steps.len());
        for p in plan::plan(&m.kernels, &program.steps, &program.buffers)? {
            if !what.steps.contains(&p.step) {
                continue;
            }
            plan::check_entry(&p, self.entries.get(&p.entry))?;
            p.dims(max)?;
            let function = match functions.get(&p.entry) {
                Some(&f) => f,
                None => {
                    let f = self.module.function(&p.entry).map_err(|e| RuntimeError::GpuKernel {
                        kernel: p.kernel.to_string(),
                        name: p.name.clone(),
                        reason: format!("the driver has no function `{}` in the loaded module: {e}", p.entry),
                    })?;
                    *functions.entry(p.entry.clone()).or_insert(f)
                }
            };
            let args = p.args(what.address, max);
            out.push(Launch { plan: p, function, args });
        }
        Ok(Launches(out))
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        self.device.synchronize()
    }

    fn run(
        &self,
        todo: &mut Launches,
        range: std::ops::Range<usize>,
        at: &SymBindings,
        then: &mut After<Self>,
    ) -> Result<(), RuntimeError> {
        let todo = &mut todo.0[range.clone()];
        let dims = todo.iter().map(|l| l.plan.dims(at)).collect::<Result<Vec<_>, _>>()?;
        for (i, (l, d)) in (range.start..).zip(todo.iter_mut().zip(&dims)) {
            l.plan.set_sizes(&mut l.args, at);
            // SAFETY: the function comes from the module loaded for this artifact, and its
            // parameter list was checked against the plan (`check_entry`) when bound; the
            // addresses are of memory the executor owns (its arena, sized for the maxima `sizes`
            // is within, parameters, constants, states, folded values), which it synchronises before
            // freeing (its `Drop`).
            unsafe { self.device.launch(l.function, d, &mut l.args)? };
            then(self, i)?;
        }
        self.device.synchronize()
    }

    fn max_sizes(options: &GpuOptions) -> Option<SymBindings> {
        options.max
    }

    fn device_collectives(
        &self,
        comm: &dyn crate::comm::Communicator,
        groups: &[String],
    ) -> Result<Box<dyn crate::comm::DeviceCollectives>, RuntimeError> {
        Ok(Box::new(nccl::Nccl::join(&self.device, comm, groups)?))
    }
}

impl Executor<GpuBackend> {
    /// The device, as the driver names it, with its compute capability.
    pub fn device_name(&self) -> String {
        self.backend().describe()
    }
}
