//! The cudarc layer of the CUDA backend: one context and one stream on one device, zeroed device
//! allocations, copies in and out, the PTX module, and kernel launches. Nothing here knows about
//! artifacts; `gpu::GpuModel` does.
//!
//! Everything runs on the context's default stream, in order, so no event tracking is needed:
//! cudarc's is switched off for the allocations made here, and a launch's arguments are raw device
//! addresses into allocations that live as long as the model.
//!
//! The module is loaded with `cuModuleLoadDataEx` and an error-log buffer rather than through
//! cudarc's `load_module`, so that a PTX the driver's JIT rejects (an unsupported ISA version, a
//! driver too old for sm_90a) is reported with the JIT's own message, and so that the runtime needs
//! no NVRTC.

use std::ffi::{c_void, CString};
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUjit_option};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError};

use super::plan::LaunchDims;
use crate::RuntimeError;

fn cuda(e: DriverError) -> RuntimeError {
    RuntimeError::Cuda(e.to_string())
}

/// Maps an allocation failure to [`RuntimeError::OutOfMemory`], anything else to `Cuda`.
fn alloc_error(e: DriverError, bytes: u64, what: &str) -> RuntimeError {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        RuntimeError::OutOfMemory { bytes, what: format!("{what} on the GPU") }
    } else {
        cuda(e)
    }
}

/// One device, opened.
pub(super) struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Device {
    /// Opens device `ordinal`: [`RuntimeError::NoCudaDriver`] without a driver,
    /// [`RuntimeError::NoCudaDevice`] when the driver sees no such device.
    pub fn open(ordinal: usize) -> Result<Device, RuntimeError> {
        if !crate::cuda::driver_present() {
            return Err(RuntimeError::NoCudaDriver);
        }
        let count = match CudaContext::device_count() {
            // `cuInit` itself fails this way on a machine whose driver sees no GPU.
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
            r => r.map_err(cuda)?,
        };
        if count <= 0 || ordinal >= count as usize {
            return Err(RuntimeError::NoCudaDevice);
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda)?;
        // SAFETY: every allocation of this device is used on its one stream only (see the module
        // documentation), which is the case event tracking exists to relax.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Device { ctx, stream })
    }

    /// The context, for the streams and events of a transport on this device (`nccl`).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch and copy of this device is queued on, in order.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `(name, compute capability)` of the device, for reports.
    pub fn describe(&self) -> Result<(String, (i32, i32)), RuntimeError> {
        Ok((self.ctx.name().map_err(cuda)?, self.ctx.compute_capability().map_err(cuda)?))
    }

    /// `bytes` zeroed bytes of device memory (at least one, so that every buffer has an address).
    pub fn alloc(&self, bytes: u64, what: &str) -> Result<CudaSlice<u8>, RuntimeError> {
        let len = usize::try_from(bytes.max(1))
            .map_err(|_| RuntimeError::OutOfMemory { bytes, what: format!("{what} on the GPU") })?;
        self.stream.alloc_zeros::<u8>(len).map_err(|e| alloc_error(e, bytes, what))
    }

    /// A device copy of `bytes`.
    pub fn upload(&self, bytes: &[u8], what: &str) -> Result<CudaSlice<u8>, RuntimeError> {
        let mut mem = self.alloc(bytes.len() as u64, what)?;
        if !bytes.is_empty() {
            self.stream.memcpy_htod(bytes, &mut mem.slice_mut(..bytes.len())).map_err(cuda)?;
        }
        Ok(mem)
    }

    /// Copies `bytes` into `dst` at byte `offset`; the caller keeps the range inside `dst`.
    pub fn write(&self, dst: &mut CudaSlice<u8>, offset: usize, bytes: &[u8]) -> Result<(), RuntimeError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.stream.memcpy_htod(bytes, &mut dst.slice_mut(offset..offset + bytes.len())).map_err(cuda)
    }

    /// Bytes `range` of `src`, after everything queued before has finished.
    pub fn read(&self, src: &CudaSlice<u8>, range: Range<usize>) -> Result<Vec<u8>, RuntimeError> {
        let mut out = vec![0u8; range.len()];
        if !out.is_empty() {
            self.stream.memcpy_dtoh(&src.slice(range), &mut out).map_err(cuda)?;
        }
        self.synchronize()?;
        Ok(out)
    }

    /// The device address of `mem`, which stays valid while `mem` lives.
    pub fn address(&self, mem: &CudaSlice<u8>) -> u64 {
        let (ptr, _record) = mem.device_ptr(&self.stream);
        ptr
    }

    /// Waits for everything queued, reporting an error a kernel raised.
    pub fn synchronize(&self) -> Result<(), RuntimeError> {
        self.stream.synchronize().map_err(cuda)
    }

    /// Loads a PTX module; the driver compiles it for the device. A rejection carries the JIT's
    /// error log.
    pub fn load_module(&self, ptx: &str, arch: &str) -> Result<Module, RuntimeError> {
        let load_error = |log: String| RuntimeError::PtxLoad { arch: arch.to_string(), log };
        let text = CString::new(ptx).map_err(|_| load_error("the PTX text contains a NUL byte".into()))?;
        self.ctx.bind_to_thread().map_err(cuda)?;
        let mut log = vec![0u8; 16 << 10];
        let mut options =
            [CUjit_option::CU_JIT_ERROR_LOG_BUFFER, CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
        // The driver reads the size option's value as an integer stored in the pointer itself.
        let mut values = [log.as_mut_ptr() as *mut c_void, log.len() as *mut c_void];
        let mut raw: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: `text` is NUL-terminated PTX; the options arrays have the length passed; the log
        // buffer outlives the call and its size is the one given.
        let result = unsafe {
            sys::cuModuleLoadDataEx(
                &mut raw,
                text.as_ptr() as *const c_void,
                options.len() as u32,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if result != sys::CUresult::CUDA_SUCCESS {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let message = String::from_utf8_lossy(&log[..end]).trim().to_string();
            let code = DriverError(result).to_string();
            return Err(load_error(if message.is_empty() { code } else { format!("{code}: {message}") }));
        }
        Ok(Module { raw, ctx: self.ctx.clone() })
    }

    /// Queues `function` on the stream with `args` (each an 8-byte parameter, in the entry's order).
    ///
    /// # Safety
    /// `function` must belong to a module of this device and take exactly `args.len()` 8-byte
    /// parameters; every address among them must point to device memory of this device large
    /// enough for what the kernel reads and writes at these dims, alive until the launch completes.
    pub unsafe fn launch(
        &self,
        function: Function,
        dims: &LaunchDims,
        args: &mut [u64],
    ) -> Result<(), RuntimeError> {
        self.ctx.bind_to_thread().map_err(cuda)?;
        let mut params: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        let [gx, gy, gz] = dims.grid;
        let [bx, by, bz] = dims.block;
        cudarc::driver::result::launch_kernel(
            function.0,
            (gx, gy, gz),
            (bx, by, bz),
            dims.shared_mem_bytes,
            self.stream.cu_stream(),
            &mut params,
        )
        .map_err(cuda)
    }
}

/// A loaded PTX module; unloaded on drop.
pub(super) struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

/// A kernel of a [`Module`]; valid while the module is loaded.
#[derive(Clone, Copy)]
pub(super) struct Function(sys::CUfunction);

// SAFETY: CUDA module and function handles may be used from any thread once the context is
// current there (`Device` and `Module` bind it before each call that needs it); the driver API is
// thread-safe, and `Module` has no interior state of its own (cudarc's `CudaModule` is the same).
unsafe impl Send for Module {}
// SAFETY: as for `Send`.
unsafe impl Sync for Module {}
// SAFETY: as for `Module`.
unsafe impl Send for Function {}

impl Module {
    /// The kernel named `entry`.
    pub fn function(&self, entry: &str) -> Result<Function, DriverError> {
        self.ctx.bind_to_thread()?;
        let name = CString::new(entry).map_err(|_| DriverError(sys::CUresult::CUDA_ERROR_INVALID_VALUE))?;
        // SAFETY: `raw` is a loaded module (it is unloaded only on drop).
        unsafe { cudarc::driver::result::module::get_function(self.raw, name) }.map(Function)
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: loaded in `Device::load_module`, unloaded once, here; the owner synchronises its
        // stream before dropping the module (launches hold no reference to it).
        self.ctx.record_err(unsafe { cudarc::driver::result::module::unload(self.raw) });
    }
}
