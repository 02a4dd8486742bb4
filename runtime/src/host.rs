//! Host memory for kernels: aligned, zeroed allocations ([`Memory`]) no larger than the machine
//! ([`check_fits`]), and the bytes each dtype is
//! stored as ([`encode`], [`decode`]), which are the generated kernels' storage types: f32, f16 and
//! bf16 in IEEE/bfloat layout, FP8 E4M3 and bool as one byte each, i32 and i64, all little-endian.
//!
//! Values come and go as [`HostData`]: floats as f32 (exactly representable in the dtype, so that
//! encoding is exact; other values are rounded to nearest even, FP8 with saturation), integers and
//! bools as i64 (range-checked on the way in).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use kiln_ir::interp::numerics::f8e4m3_from_f32;
use kiln_ir::DType;

use crate::weights::{bf16_to_f32, e4m3_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, HostData};
use crate::RuntimeError;

/// The alignment of every allocation: the arena's offset alignment, so that an arena buffer is
/// aligned in memory as it is in the plan.
pub const ALIGN: usize = kiln_ir::artifact::ARENA_ALIGN as usize;

/// A zeroed, [`ALIGN`]-aligned allocation that lives at a fixed address until dropped.
pub struct Memory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Memory` owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for Memory {}
// SAFETY: shared access only reads through `&self`.
unsafe impl Sync for Memory {}

impl Memory {
    /// `len` zeroed bytes (at least one byte is allocated, so that every buffer has an address).
    /// `None` when the allocation fails or the size is not addressable.
    pub fn zeroed(len: u64) -> Option<Memory> {
        let len = usize::try_from(len).ok()?;
        let layout = Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(Memory { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of the first byte, for kernels.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes were allocated and zeroed, so they are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), ALIGN).expect("checked in zeroed");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Bytes of memory this machine has for a process, `MemTotal` plus `SwapTotal` of `/proc/meminfo`,
/// or [`MEMORY_LIMIT`]'s bytes where that is set and smaller; `None` where there is neither.
pub fn machine_memory() -> Option<u64> {
    let machine = meminfo(&["MemTotal:", "SwapTotal:"]);
    match memory_limit() {
        Ok(Some(limit)) => Some(machine.map_or(limit, |m| m.min(limit))),
        _ => machine,
    }
}

/// The environment variable that makes kiln take this machine's memory as at most so many bytes:
/// what would fit a smaller machine, asked on this one (and the tests' way to reach the limits).
pub const MEMORY_LIMIT: &str = "KILN_MEMORY_LIMIT";

/// [`MEMORY_LIMIT`]'s bytes, if it is set; an error saying what is wrong where it is not a whole
/// number of bytes.
pub fn memory_limit() -> Result<Option<u64>, RuntimeError> {
    match std::env::var(MEMORY_LIMIT) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            RuntimeError::BadOption(format!(
                "{MEMORY_LIMIT}={text:?} is not a number of bytes: give a whole number, such as 17179869184 for 16 GiB"
            ))
        }),
        Err(e) => Err(RuntimeError::BadOption(format!("{MEMORY_LIMIT}: {e}"))),
    }
}

/// Bytes of memory free for more allocations now, `MemAvailable` plus `SwapFree` of
/// `/proc/meminfo` (the kernel's estimate, page cache it can drop included); `None` where there is
/// no `/proc/meminfo` to ask.
pub fn available_memory() -> Option<u64> {
    meminfo(&["MemAvailable:", "SwapFree:"])
}

/// The sum of `/proc/meminfo`'s `keys` (the first must be there), in bytes.
fn meminfo(keys: &[&str]) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
    };
    let first = kib(keys.first()?)?;
    Some(keys[1..].iter().fold(first, |a, k| a.saturating_add(kib(k).unwrap_or(0))).saturating_mul(1024))
}

/// Refuses an allocation of `bytes` for `what` that this machine could not hold even if it held
/// nothing else (see [`machine_memory`]). An allocation that large would otherwise abort the
/// process (Rust aborts when a `Vec` cannot get its memory) or, with overcommit, bring in the OOM
/// killer once touched. An allocation that fits may still fail; that is reported where it happens.
pub fn check_fits(bytes: u64, what: &str) -> Result<(), RuntimeError> {
    memory_limit()?;
    match machine_memory() {
        Some(memory) if bytes > memory => {
            let counted = match memory_limit() {
                Ok(Some(limit)) if limit == memory => "KILN_MEMORY_LIMIT",
                _ => "MemTotal + SwapTotal in /proc/meminfo",
            };
            Err(RuntimeError::TooLarge { bytes, what: what.to_string(), memory, counted })
        }
        _ => Ok(()),
    }
}

/// Writes `data` as `dtype` elements into `out`, which must hold exactly `data.len()` elements.
/// Fails (with the reason) on a class mismatch, an integer out of range or a bool not 0 or 1.
pub fn encode(dtype: DType, data: &HostData, out: &mut [u8]) -> Result<(), String> {
    let size = dtype.size_bytes() as usize;
    if out.len() != data.len() * size {
        return Err(format!("{} values do not fill {} bytes of {dtype}", data.len(), out.len()));
    }
    match (data, dtype) {
        (HostData::F32(v), DType::F32) => put(out, v, |x| x.to_le_bytes()),
        (HostData::F32(v), DType::BF16) => put(out, v, |&x| f32_to_bf16(x).to_le_bytes()),
        (HostData::F32(v), DType::F16) => put(out, v, |&x| f32_to_f16(x).to_le_bytes()),
        (HostData::F32(v), DType::F8E4M3) => put(out, v, |&x| [f8e4m3_from_f32(x)]),
        (HostData::I64(v), DType::I64) => put(out, v, |x| x.to_le_bytes()),
        (HostData::I64(v), DType::I32) => {
            if let Some(x) = v.iter().find(|&&x| i32::try_from(x).is_err()) {
                return Err(format!("value {x} does not fit in i32"));
            }
            put(out, v, |&x| (x as i32).to_le_bytes())
        }
        (HostData::I64(v), DType::Bool) => {
            if let Some(x) = v.iter().find(|&&x| x != 0 && x != 1) {
                return Err(format!("bool value {x} is neither 0 nor 1"));
            }
            put(out, v, |&x| [x as u8])
        }
        (HostData::F32(_), d) => return Err(format!("float values for a {d} tensor")),
        (HostData::I64(_), d) => return Err(format!("integer values for a {d} tensor")),
    }
    Ok(())
}

fn put<T, const N: usize>(out: &mut [u8], values: &[T], f: impl Fn(&T) -> [u8; N]) {
    for (chunk, x) in out.chunks_exact_mut(N).zip(values) {
        chunk.copy_from_slice(&f(x));
    }
}

/// The values of `bytes` holding `dtype` elements (a trailing partial element is ignored).
pub fn decode(dtype: DType, bytes: &[u8]) -> HostData {
    fn get<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact gives N bytes"))).collect()
    }
    match dtype {
        DType::F32 => HostData::F32(get(bytes, f32::from_le_bytes)),
        DType::BF16 => HostData::F32(get(bytes, |b| bf16_to_f32(u16::from_le_bytes(b)))),
        DType::F16 => HostData::F32(get(bytes, |b| f16_to_f32(u16::from_le_bytes(b)))),
        DType::F8E4M3 => HostData::F32(get(bytes, |[b]| e4m3_to_f32(b))),
        DType::I64 => HostData::I64(get(bytes, i64::from_le_bytes)),
        DType::I32 => HostData::I64(get(bytes, |b| i64::from(i32::from_le_bytes(b)))),
        DType::Bool => HostData::I64(get(bytes, |[b]| i64::from(b != 0))),
    }
}

/// `decode` for float dtypes only, as f32.
pub fn decode_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    match decode(dtype, bytes) {
        HostData::F32(v) if dtype.is_float() => Some(v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_through_its_bytes() {
        let floats = HostData::F32(vec![1.0, -2.5, 0.0, 448.0, 0.015625]);
        for d in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3] {
            let mut b = vec![0u8; 5 * d.size_bytes() as usize];
            encode(d, &floats, &mut b).unwrap();
            assert_eq!(decode(d, &b), floats, "{d}");
        }
        let ints = HostData::I64(vec![0, 1, -7, 1 << 40]);
        let mut b = vec![0u8; 32];
        encode(DType::I64, &ints, &mut b).unwrap();
        assert_eq!(decode(DType::I64, &b), ints);
        let mut b = vec![0u8; 16];
        assert!(encode(DType::I32, &ints, &mut b).unwrap_err().contains("does not fit in i32"));
        encode(DType::I32, &HostData::I64(vec![0, 1, -7, 5]), &mut b).unwrap();
        assert_eq!(decode(DType::I32, &b), HostData::I64(vec![0, 1, -7, 5]));
        let mut b = vec![0u8; 4];
        assert!(encode(DType::Bool, &ints, &mut b).is_err());
        assert!(encode(DType::F32, &HostData::I64(vec![1]), &mut b).unwrap_err().contains("integer values"));
        assert!(encode(DType::F32, &floats, &mut b).unwrap_err().contains("do not fill"));
    }

    #[test]
    fn memory_is_aligned_and_zeroed() {
        for len in [0u64, 1, 1000] {
            let m = Memory::zeroed(len).unwrap();
            assert_eq!(m.as_ptr() as usize % ALIGN, 0);
            assert!(m.bytes().iter().all(|&b| b == 0));
        }
        assert!(Memory::zeroed(u64::MAX).is_none());
    }
}
