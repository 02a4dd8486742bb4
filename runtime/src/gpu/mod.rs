//! The CUDA backend: runs an artifact's program on its `kernels.ptx`, the GPU counterpart of
//! [`crate::cpu::CpuModel`] with the same surface.
//!
//! [`GpuModel::load`] does everything that can fail before the first run, cheapest first: it opens
//! the device ([`RuntimeError::NoCudaDriver`] on a machine without a driver,
//! [`RuntimeError::NoCudaDevice`] when the driver sees none), requires the GPU target
//! ([`RuntimeError::NoGpuTarget`]), plans every launch (`plan.rs`: refuses `send`/`recv` steps),
//! reads `kernels.ptx` (its size and SHA-256 checked again) and checks every kernel's `.entry`
//! parameter list against what a launch passes, checks every grid against CUDA's limits at the
//! loaded maxima, allocates ONE zeroed device arena, uploads the parameters in their compiled dtypes
//! (FP8 as one byte per element) and the constants, and has the driver compile the PTX (a rejection
//! carries the JIT log, [`RuntimeError::PtxLoad`]). Each launch's argument array is built once: the
//! buffers' device addresses never change, only the sizes at its end are rewritten per run.
//!
//! The arena is sized as on the CPU: for the largest sizes the caller asks for
//! ([`GpuOptions::max`], at most what the artifact was compiled for), since the plan's offsets hold
//! for any sizes up to the compiled maxima.
//!
//! An artifact with a KV cache has two programs: the forward one (the prefill) and a decode program
//! ([`kiln_ir::artifact::Manifest::decode_view`]). Each is planned and gets its own arena and
//! constants (`GpuModel::program` builds one from a manifest view and what they share); the device,
//! the loaded module, the parameters and the caches ([`kiln_ir::artifact::Storage::State`],
//! allocated once, zeroed, at the loaded maxima) are shared. [`GpuModel::run_decode`] runs the decode
//! program over the caches the previous runs filled, as on the CPU.
//!
//! [`GpuModel::run`] checks the inputs exactly as the CPU backend does (`inputs.rs`), computes every
//! launch's grid before queuing anything, copies the inputs to their arena slots, queues every
//! launch on one stream in program order (aliases are views: nothing runs; scratch buffers are arena
//! slots like any other), and synchronises, so a kernel fault is reported by the run that caused it.
//! Outputs stay on the device until read: [`GpuModel::output`] copies one whole,
//! [`GpuModel::output_f32`] only the elements asked for (generation reads one row of logits per
//! sequence, not `B*T` rows).
//!
//! What it does not do yet: per-expert load (the CPU backend's `expert_load`), several devices, or
//! overlap of copies with kernels.

mod device;
pub mod plan;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use kiln_ir::artifact::{BufferId, Manifest, Storage};
use kiln_ir::{DType, Sym, SymBindings};

use crate::artifact::Artifact;
use crate::host::{decode, decode_f32, encode};
use crate::inputs;
use crate::weights::{manifest_params, HostData, HostTensor, Param, WeightError};
use crate::RuntimeError;

use device::{Device, Function, Module};
use plan::{LaunchPlan, Place};

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// The CUDA device ordinal (default 0).
    pub device: usize,
    /// The largest sizes runs will use; the arena is sized for them. Default: the artifact's maxima.
    pub max: Option<SymBindings>,
}

/// One launch of the program, bound to device addresses.
struct Launch {
    plan: LaunchPlan,
    function: Function,
    /// Buffer addresses then sizes, in the `.entry`'s order ([`LaunchPlan::args`]).
    args: Vec<u64>,
}

/// What the programs of one artifact share: the device, the loaded module, the parameters and the
/// persistent state (KV caches), with the device address of each.
struct Shared {
    device: Arc<Device>,
    module: Arc<Module>,
    params: Arc<HashMap<String, CudaSlice<u8>>>,
    states: Arc<HashMap<String, CudaSlice<u8>>>,
    /// The `.entry` parameter lists of `kernels.ptx`.
    entries: HashMap<String, Vec<plan::PtxParam>>,
    name: String,
}

/// A loaded artifact with its weights, ready to run on a CUDA device. See the module documentation.
pub struct GpuModel {
    manifest: Manifest,
    launches: Vec<Launch>,
    arena: CudaSlice<u8>,
    arena_bytes: u64,
    /// Constants by buffer, this program's own.
    constants: HashMap<BufferId, CudaSlice<u8>>,
    max: SymBindings,
    token_inputs: HashMap<String, u64>,
    /// The sizes of the last run, whose outputs the arena holds.
    last: Option<SymBindings>,
    /// The decode program of an artifact with a KV cache, over the same parameters and caches.
    decode: Option<Box<GpuModel>>,
    /// Whether the last run was of the decode program (whose outputs are then the ones to read).
    decoded: bool,
    name: String,
    // Shared with the decode program and pointed to by `launches`; dropped after everything above
    // (see `Drop`), the device last.
    params: Arc<HashMap<String, CudaSlice<u8>>>,
    states: Arc<HashMap<String, CudaSlice<u8>>>,
    _module: Arc<Module>,
    device: Arc<Device>,
}

/// Checks the sizes a program is loaded for against what it was compiled for.
fn check_max(m: &Manifest, max: &SymBindings) -> Result<(), RuntimeError> {
    let compiled = m.max_sizes();
    for sym in Sym::ALL {
        let (v, limit) = (max.get(sym), compiled.get(sym));
        if m.max(sym).is_some() && (v == 0 || v > limit) {
            return Err(RuntimeError::Size {
                sym: sym.name(),
                value: v,
                max: limit,
                why: "the sizes the artifact was compiled for (kiln compile --max-batch, --max-context)",
            });
        }
    }
    Ok(())
}

impl GpuModel {
    /// Loads `artifact` onto a CUDA device with the given parameters (each by name, in any order,
    /// every declared one exactly once): [`HostTensor`]s, converted to their compiled dtypes on the
    /// way, or [`Param`]s, whose mapped tensors are uploaded straight from the checkpoint's mapping.
    /// An artifact with a decode program gets it too, over the same parameters and KV caches. See
    /// the module documentation for what is checked.
    pub fn load<P: Into<Param>>(
        artifact: &Artifact,
        params: impl IntoIterator<Item = Result<P, WeightError>>,
        options: &GpuOptions,
    ) -> Result<GpuModel, RuntimeError> {
        let device = Device::open(options.device)?;
        let m = artifact.manifest();
        let target = m.gpu.as_ref().ok_or(RuntimeError::NoGpuTarget)?;
        let max = options.max.unwrap_or(m.max_sizes());
        check_max(m, &max)?;
        // Planned (and checked against the PTX) before anything is uploaded.
        plan::plan(&m.kernels, &m.program, &m.buffers)?;
        let ptx_bytes = artifact.read_file(&target.module)?;
        let ptx = String::from_utf8(ptx_bytes).map_err(|_| RuntimeError::PtxLoad {
            arch: target.arch.clone(),
            log: "kernels.ptx is not UTF-8 text".into(),
        })?;
        let entries = plan::entry_params(&ptx);
        let params = Arc::new(upload_params(&device, m, params)?);
        // Every KV cache, once, zeroed, at the loaded maxima: both programs read and write the same
        // ones, as on the CPU.
        let mut states = HashMap::new();
        for (name, dtype, shape) in m.states() {
            let bytes = shape.iter().try_fold(dtype.size_bytes(), |a, d| a.checked_mul(d.eval(&max)?));
            let bytes = bytes.unwrap_or(u64::MAX);
            states.insert(name.to_string(), device.alloc(bytes, &format!("the KV cache `{name}`"))?);
        }
        let module = Arc::new(device.load_module(&ptx, &target.arch)?);
        let (gpu_name, (major, minor)) = device.describe()?;
        let shared = Shared {
            device: Arc::new(device),
            module,
            params,
            states: Arc::new(states),
            entries,
            name: format!("{gpu_name} (sm_{major}{minor})"),
        };
        let mut model = GpuModel::program(m, max, &shared)?;
        if let Some(d) = m.decode_view() {
            let dmax = SymBindings { t: 1, ..max };
            check_max(&d, &dmax)?;
            model.decode = Some(Box::new(GpuModel::program(&d, dmax, &shared)?));
        }
        shared.device.synchronize()?;
        Ok(model)
    }

    /// The executable form of one program of the manifest `m` (the forward one, or the decode
    /// view), over what the programs share: plans checked against the PTX entries and CUDA's limits
    /// at `max`, the arena and the constants allocated, each launch's arguments bound.
    fn program(m: &Manifest, max: SymBindings, shared: &Shared) -> Result<GpuModel, RuntimeError> {
        let device = &shared.device;
        let plans = plan::plan(&m.kernels, &m.program, &m.buffers)?;
        for p in &plans {
            plan::check_entry(p, shared.entries.get(&p.entry))?;
            p.dims(&max)?;
        }
        for p in &m.params {
            if !shared.params.contains_key(&p.name) {
                return Err(RuntimeError::UnknownParam { name: p.name.clone() });
            }
        }
        for b in &m.buffers {
            if let Storage::State { name } = &b.storage {
                let held = shared.states.get(name).map_or(0, |s| s.len() as u64);
                if b.bytes(&max).is_none_or(|n| n > held) {
                    return Err(RuntimeError::InputValue {
                        name: name.clone(),
                        reason: format!("{} ({}) does not fit the KV cache allocated for it", b.id, b.value),
                    });
                }
            }
        }
        let mut arena_bytes = 0u64;
        for b in &m.buffers {
            if let Storage::Arena { offset } = b.storage {
                let end = b.bytes(&max).and_then(|n| offset.checked_add(n));
                arena_bytes = arena_bytes.max(end.unwrap_or(u64::MAX));
            }
        }
        let arena = device.alloc(arena_bytes, "the activation arena")?;
        let mut constants = HashMap::new();
        for b in &m.buffers {
            if let Storage::Constant { value } = b.storage {
                let what = format!("constant {}", b.id);
                let n = (b.max_bytes / b.dtype.size_bytes()) as usize;
                let data = if b.dtype.is_float() {
                    HostData::F32(vec![value as f32; n])
                } else {
                    HostData::I64(vec![value as i64; n])
                };
                let mut bytes = vec![0u8; b.max_bytes as usize];
                encode(b.dtype, &data, &mut bytes)
                    .map_err(|reason| RuntimeError::InputValue { name: what.clone(), reason })?;
                constants.insert(b.id, device.upload(&bytes, &what)?);
            }
        }

        let base = device.address(&arena);
        let params_at: HashMap<&str, u64> =
            shared.params.iter().map(|(n, s)| (n.as_str(), device.address(s))).collect();
        let constants_at: HashMap<BufferId, u64> =
            constants.iter().map(|(&b, s)| (b, device.address(s))).collect();
        let states_at: HashMap<&str, u64> =
            shared.states.iter().map(|(n, s)| (n.as_str(), device.address(s))).collect();
        let address = |p: &Place| match p {
            Place::Arena { offset } => base + offset,
            Place::Param { name } => params_at[name.as_str()],
            Place::Constant { buffer } => constants_at[buffer],
            Place::State { name } => states_at[name.as_str()],
        };
        let mut functions: HashMap<String, Function> = HashMap::new();
        let mut launches = Vec::with_capacity(plans.len());
        for p in plans {
            let function = match functions.get(&p.entry) {
                Some(&f) => f,
                None => {
                    let f = shared.module.function(&p.entry).map_err(|e| RuntimeError::GpuKernel {
                        kernel: p.kernel.to_string(),
                        name: p.name.clone(),
                        reason: format!("the driver has no function `{}` in the loaded module: {e}", p.entry),
                    })?;
                    functions.insert(p.entry.clone(), f);
                    f
                }
            };
            let args = p.args(address, &max);
            launches.push(Launch { plan: p, function, args });
        }
        Ok(GpuModel {
            manifest: m.clone(),
            launches,
            arena,
            arena_bytes,
            constants,
            max,
            token_inputs: inputs::token_inputs(m),
            last: None,
            decode: None,
            decoded: false,
            name: shared.name.clone(),
            params: Arc::clone(&shared.params),
            states: Arc::clone(&shared.states),
            _module: Arc::clone(&shared.module),
            device: Arc::clone(&shared.device),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The device, as the driver names it, with its compute capability.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The largest sizes a run may use (what the arena was sized for).
    pub fn max_sizes(&self) -> SymBindings {
        self.max
    }

    /// Bytes of the activation arena on the device.
    pub fn arena_bytes(&self) -> usize {
        self.arena_bytes as usize
    }

    /// Bytes of the parameters and constants on the device, in their compiled dtypes.
    pub fn param_bytes(&self) -> usize {
        self.params.values().chain(self.constants.values()).map(CudaSlice::len).sum()
    }

    /// Whether the artifact has a decode program over a KV cache.
    pub fn has_decode(&self) -> bool {
        self.decode.is_some()
    }

    /// Bytes of every KV cache together, and the number of tokens (`B * S` at the loaded maxima)
    /// they hold.
    pub fn kv_cache_bytes(&self) -> (u64, u64) {
        let bytes = self.states.values().map(|m| m.len() as u64).sum();
        (bytes, if self.states.is_empty() { 0 } else { self.max.b * self.max.s })
    }

    /// Inputs that are token ids, with the vocabulary they index.
    pub fn token_inputs(&self) -> &HashMap<String, u64> {
        &self.token_inputs
    }

    /// Runs the program on `inputs` (each of the artifact's inputs once, by name). Everything is
    /// checked before anything is copied; on an error found then, the arena and the last outputs
    /// are as they were.
    pub fn run(&mut self, inputs: &[HostTensor]) -> Result<SymBindings, RuntimeError> {
        let sizes =
            inputs::check(&self.manifest, &self.max, !self.states.is_empty(), &self.token_inputs, inputs)?;
        let mut encoded = Vec::with_capacity(inputs.len());
        for t in inputs {
            let b = self.manifest.buffer(inputs::input_buffer(&self.manifest, &t.name)?);
            let Storage::Arena { offset } = b.storage else {
                return Err(RuntimeError::InputValue {
                    name: t.name.clone(),
                    reason: "not in the arena".into(),
                });
            };
            let mut bytes = vec![0u8; b.bytes(&sizes).unwrap_or(0) as usize];
            encode(b.dtype, &t.data, &mut bytes)
                .map_err(|reason| RuntimeError::InputValue { name: t.name.clone(), reason })?;
            encoded.push((offset as usize, bytes));
        }
        let dims = self.launches.iter().map(|l| l.plan.dims(&sizes)).collect::<Result<Vec<_>, _>>()?;
        self.last = None;
        for (at, bytes) in &encoded {
            self.device.write(&mut self.arena, *at, bytes)?;
        }
        for (l, d) in self.launches.iter_mut().zip(&dims) {
            l.plan.set_sizes(&mut l.args, &sizes);
            // SAFETY: the function comes from the module loaded for this artifact, and its
            // parameter list was checked against the plan (`check_entry`) at load; the addresses
            // are those of the arena (sized for the maxima `sizes` is within), the parameters and
            // the constants, all owned by `self`; the stream is synchronised before any of them
            // is freed (`Drop`).
            unsafe { self.device.launch(l.function, d, &mut l.args)? };
        }
        self.device.synchronize()?;
        self.last = Some(sizes);
        self.decoded = false;
        Ok(sizes)
    }

    /// Runs the decode program (see [`GpuModel::run`]) on the caches the last runs left; its
    /// outputs are then the ones [`GpuModel::output`] reads.
    pub fn run_decode(&mut self, inputs: &[HostTensor]) -> Result<SymBindings, RuntimeError> {
        let decode = self.decode.as_mut().ok_or(RuntimeError::NoDecodeProgram)?;
        let sizes = decode.run(inputs)?;
        self.last = None;
        self.decoded = true;
        Ok(sizes)
    }

    fn output_buffer(&self, name: &str) -> Result<(BufferId, SymBindings), RuntimeError> {
        let m = &self.manifest;
        let o = m.outputs.iter().find(|o| o.name == name).ok_or_else(|| RuntimeError::NoSuchOutput {
            name: name.to_string(),
            known: m.outputs.iter().map(|o| format!("`{}`", o.name)).collect::<Vec<_>>().join(", "),
        })?;
        Ok((o.buffer, self.last.ok_or(RuntimeError::NotRun)?))
    }

    /// Bytes `range` (relative to the buffer) of buffer `id`, copied from the device.
    fn read(&self, id: BufferId, range: Range<usize>) -> Result<Vec<u8>, RuntimeError> {
        let (mem, at) = match &self.manifest.buffer(id).storage {
            Storage::Arena { offset } => (&self.arena, *offset as usize),
            Storage::Param { name } => (&self.params[name], 0),
            Storage::Constant { .. } => (&self.constants[&id], 0),
            Storage::State { name } => (&self.states[name], 0),
        };
        self.device.read(mem, at + range.start..at + range.end)
    }

    /// An output of the last run, whole.
    pub fn output(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        if let (true, Some(d)) = (self.decoded, &self.decode) {
            return d.output(name);
        }
        let (id, sizes) = self.output_buffer(name)?;
        let b = self.manifest.buffer(id);
        let shape = b.shape.iter().map(|d| d.eval(&sizes).unwrap_or(0)).collect();
        let bytes = self.read(id, 0..b.bytes(&sizes).unwrap_or(0) as usize)?;
        Ok(HostTensor { name: name.to_string(), dtype: b.dtype, shape, data: decode(b.dtype, &bytes) })
    }

    /// Elements `range` (in row-major order) of a float output of the last run, as f32; only
    /// those elements are copied from the device.
    pub fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        if let (true, Some(d)) = (self.decoded, &self.decode) {
            return d.output_f32(name, range);
        }
        let (id, sizes) = self.output_buffer(name)?;
        let b = self.manifest.buffer(id);
        if !b.dtype.is_float() {
            return Err(RuntimeError::OutputType { name: name.to_string(), dtype: b.dtype });
        }
        let size = b.dtype.size_bytes() as usize;
        let len = b.bytes(&sizes).unwrap_or(0) as usize / size;
        if range.start > range.end || range.end > len {
            return Err(RuntimeError::OutputRange {
                name: name.to_string(),
                len,
                start: range.start,
                end: range.end,
            });
        }
        let bytes = self.read(id, range.start * size..range.end * size)?;
        Ok(decode_f32(b.dtype, &bytes).unwrap_or_default())
    }
}

impl Drop for GpuModel {
    fn drop(&mut self) {
        // Nothing may be freed under a kernel still running; an error here has already been
        // reported by the run that queued the work.
        let _ = self.device.synchronize();
    }
}

/// Uploads each parameter in its compiled dtype (converting a host tensor on the way; a mapped one
/// is already in it), checking that every declared parameter comes exactly once with its declared
/// type. At most one converted parameter is on the host at a time.
fn upload_params<P: Into<Param>>(
    device: &Device,
    m: &Manifest,
    params: impl IntoIterator<Item = Result<P, WeightError>>,
) -> Result<HashMap<String, CudaSlice<u8>>, RuntimeError> {
    let decls = manifest_params(m)?;
    let by_name: HashMap<&str, usize> = decls.iter().enumerate().map(|(i, d)| (d.name.as_str(), i)).collect();
    let mut out: HashMap<String, CudaSlice<u8>> = HashMap::new();
    for p in params {
        let p: Param = p?.into();
        let name = p.name().to_string();
        let Some(&i) = by_name.get(name.as_str()) else {
            return Err(RuntimeError::UnknownParam { name });
        };
        let d = &decls[i];
        if out.contains_key(&name) {
            return Err(RuntimeError::DuplicateParam { name });
        }
        let expected = || inputs::shape_text(d.dtype, &d.shape);
        let bytes = d.numel as u64 * d.dtype.size_bytes();
        let what = format!("parameter `{}`", d.name);
        let mem = match p {
            Param::Mapped(v) => {
                if v.dtype != d.dtype || v.shape != d.shape || v.len() as u64 != bytes {
                    return Err(RuntimeError::ParamType {
                        name,
                        expected: expected(),
                        found: format!("{} in {} bytes", inputs::shape_text(v.dtype, &v.shape), v.len()),
                    });
                }
                device.upload(v.bytes(), &what)?
            }
            Param::Host(t) => {
                if t.dtype != d.dtype || t.shape != d.shape || t.data.len() != d.numel {
                    return Err(RuntimeError::ParamType {
                        name,
                        expected: expected(),
                        found: format!(
                            "{} with {} values",
                            inputs::shape_text(t.dtype, &t.shape),
                            t.data.len()
                        ),
                    });
                }
                let mut host = vec![0u8; bytes as usize];
                encode(d.dtype, &t.data, &mut host).map_err(|reason| RuntimeError::ParamType {
                    name: name.clone(),
                    expected: expected(),
                    found: reason,
                })?;
                device.upload(&host, &what)?
            }
        };
        out.insert(name, mem);
    }
    if let Some(d) = decls.iter().find(|d| !out.contains_key(&d.name)) {
        return Err(RuntimeError::MissingParam { name: d.name.clone(), count: decls.len() });
    }
    Ok(out)
}

impl crate::generate::Engine for GpuModel {
    fn inputs(&self) -> Vec<(String, DType)> {
        inputs::caller_inputs(&self.manifest)
            .map(|i| (i.name.clone(), self.manifest.buffer(i.buffer).dtype))
            .collect()
    }

    fn vocab_size(&self) -> Option<u64> {
        let o = self.manifest.outputs.iter().find(|o| o.name == crate::generate::LOGITS)?;
        self.manifest.buffer(o.buffer).shape.last()?.as_known()
    }

    fn limits(&self) -> crate::generate::Limits {
        let used = |s: Sym| self.manifest.max(s).is_some();
        let mut limits = crate::generate::Limits {
            max_batch: if used(Sym::B) { self.max.b } else { 1 },
            max_tokens: if used(Sym::T) { self.max.t } else { 1 },
            what: format!("the artifact as loaded (T <= {}; kiln compile --max-context)", self.max.t),
        };
        if let Some(p) = self.manifest.model.as_ref().map(|m| m.model.max_position_embeddings) {
            if p < limits.max_tokens {
                limits = crate::generate::Limits {
                    max_tokens: p,
                    what: "the model's max_position_embeddings".into(),
                    ..limits
                };
            }
        }
        limits
    }

    fn run(&mut self, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        GpuModel::run(self, inputs).map(|_| ())
    }

    fn kv_cache(&self) -> Option<crate::generate::KvCache> {
        self.decode.as_ref()?;
        let (bytes, _) = self.kv_cache_bytes();
        Some(crate::generate::KvCache { capacity: self.max.s, bytes })
    }

    fn run_decode(&mut self, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        GpuModel::run_decode(self, inputs).map(|_| ())
    }

    fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        GpuModel::output_f32(self, name, range)
    }
}
