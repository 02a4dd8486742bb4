//! The CUDA device layer. cudarc loads `libcuda` at run time and panics if it is absent, so every
//! entry point here checks for the library first and returns [`RuntimeError::NoCudaDriver`].

use crate::RuntimeError;

/// One CUDA device as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The devices the driver sees, or `NoCudaDriver` on a machine without one.
pub fn devices() -> Result<Vec<DeviceInfo>, RuntimeError> {
    if !driver_present() {
        return Err(RuntimeError::NoCudaDriver);
    }
    let err = |e: cudarc::driver::DriverError| RuntimeError::Cuda(e.to_string());
    let count = match cudarc::driver::CudaContext::device_count() {
        // `cuInit` itself fails this way when the driver sees no GPU: that is an empty list.
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
        r => r.map_err(err)?,
    };
    (0..count as usize)
        .map(|ordinal| {
            let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(err)?;
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name().map_err(err)?,
                compute_capability: ctx.compute_capability().map_err(err)?,
                total_memory: ctx.total_mem().map_err(err)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver the error is typed; with one, every device reports a name and memory.
    #[test]
    fn devices_or_a_typed_error() {
        match devices() {
            Err(RuntimeError::NoCudaDriver) => {
                assert!(!driver_present());
                eprintln!("skipped the device checks: no CUDA driver on this machine");
            }
            Err(e) => panic!("driver present but unusable: {e}"),
            Ok(devs) => {
                for d in devs {
                    assert!(!d.name.is_empty());
                    assert!(d.total_memory > 0);
                }
            }
        }
    }
}
