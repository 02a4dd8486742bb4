//! The safetensors file format: reading and validating headers, decoding tensor bytes, writing files.
//!
//! A file is an 8-byte little-endian header length `n`, `n` bytes of JSON, then the data section:
//!
//! ```text
//! {"__metadata__": {"format": "pt"},
//!  "model.norm.weight": {"dtype": "BF16", "shape": [7168], "data_offsets": [0, 14336]}, ...}
//! ```
//!
//! Offsets are relative to the data section. Every header is validated before any data is trusted:
//! the JSON is well formed, the header length is below [`MAX_HEADER_LEN`] and inside the file, every
//! dtype is known, every tensor's byte length is `numel * element size`, every range lies inside the
//! data section, and no two ranges overlap. Holes and trailing bytes are allowed (they are harmless;
//! the reference implementation rejects them, but nothing here reads them).
//!
//! Files are read through their memory mapping (`super::mapped`): the header is validated against
//! the mapping's length before any tensor's bytes are touched, so a short file is an error rather
//! than a fault, and a tensor's bytes are a slice of the mapping, copied only when converted.

use std::fmt;
use std::io::Write;
use std::path::Path;

use kiln_ir::DType;
use serde::Deserialize;

use kiln_ir::interp::numerics::f8e4m3_from_f32;

use super::mapped::Mapping;
use super::numeric::{bf16_to_f32, e4m3_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use super::{HostData, HostTensor, WeightError};

/// Headers longer than this are refused: real ones are a few MB at most (DeepSeek-V3's largest
/// shard header is under 100 KB), and the length comes from the file, so it must not size an
/// allocation unchecked.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// An element type as spelled in safetensors headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StDType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
}

impl StDType {
    pub const ALL: [StDType; 15] = [
        StDType::Bool,
        StDType::U8,
        StDType::I8,
        StDType::I16,
        StDType::U16,
        StDType::I32,
        StDType::U32,
        StDType::I64,
        StDType::U64,
        StDType::F16,
        StDType::BF16,
        StDType::F32,
        StDType::F64,
        StDType::F8E4M3,
        StDType::F8E5M2,
    ];

    /// The header spelling: `BF16`, `F8_E4M3`, ...
    pub fn name(self) -> &'static str {
        match self {
            StDType::Bool => "BOOL",
            StDType::U8 => "U8",
            StDType::I8 => "I8",
            StDType::I16 => "I16",
            StDType::U16 => "U16",
            StDType::I32 => "I32",
            StDType::U32 => "U32",
            StDType::I64 => "I64",
            StDType::U64 => "U64",
            StDType::F16 => "F16",
            StDType::BF16 => "BF16",
            StDType::F32 => "F32",
            StDType::F64 => "F64",
            StDType::F8E4M3 => "F8_E4M3",
            StDType::F8E5M2 => "F8_E5M2",
        }
    }

    pub fn from_name(s: &str) -> Option<StDType> {
        StDType::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn size_bytes(self) -> u64 {
        match self {
            StDType::Bool | StDType::U8 | StDType::I8 | StDType::F8E4M3 | StDType::F8E5M2 => 1,
            StDType::I16 | StDType::U16 | StDType::F16 | StDType::BF16 => 2,
            StDType::I32 | StDType::U32 | StDType::F32 => 4,
            StDType::I64 | StDType::U64 | StDType::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            StDType::F16 | StDType::BF16 | StDType::F32 | StDType::F64 | StDType::F8E4M3 | StDType::F8E5M2
        )
    }

    pub fn is_int(self) -> bool {
        !self.is_float() && self != StDType::Bool
    }

    /// The safetensors spelling of a kiln dtype.
    pub fn of(d: DType) -> StDType {
        match d {
            DType::F32 => StDType::F32,
            DType::F16 => StDType::F16,
            DType::BF16 => StDType::BF16,
            DType::F8E4M3 => StDType::F8E4M3,
            DType::I64 => StDType::I64,
            DType::I32 => StDType::I32,
            DType::Bool => StDType::Bool,
        }
    }
}

impl fmt::Display for StDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a file's header, with its data range as absolute file offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub dtype: StDType,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Reads and validates the header of a mapped safetensors file.
pub(crate) fn read_header(map: &Mapping) -> Result<Vec<Entry>, WeightError> {
    parse_bytes(map.path(), map.bytes())
}

/// Validates the header of a file held in memory (`path` only names it in errors).
pub(crate) fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<Entry>, WeightError> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(WeightError::Truncated { path: path.to_path_buf(), len: file_len });
    };
    let header_len = check_header_len(path, u64::from_le_bytes(*prefix), file_len)?;
    parse_header(path, &bytes[8..8 + header_len as usize], file_len)
}

fn check_header_len(path: &Path, header_len: u64, file_len: u64) -> Result<u64, WeightError> {
    if header_len > MAX_HEADER_LEN {
        return Err(WeightError::HeaderTooLarge { path: path.to_path_buf(), header_len });
    }
    if header_len > file_len - 8 {
        return Err(WeightError::HeaderPastEof { path: path.to_path_buf(), header_len, file_len });
    }
    Ok(header_len)
}

fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Vec<Entry>, WeightError> {
    let bad = |reason: String| WeightError::BadHeader { path: path.to_path_buf(), reason };
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| bad(format!("the JSON header does not parse: {e}")))?;
    let data_start = 8 + json.len() as u64;
    let data_len = file_len - data_start;
    let mut entries = Vec::with_capacity(map.len());
    for (name, value) in map {
        if name == "__metadata__" {
            // The format defines the metadata as a map of strings to strings.
            let ok = value.as_object().is_some_and(|m| m.values().all(serde_json::Value::is_string));
            if !ok {
                return Err(bad("`__metadata__` must be an object of strings".into()));
            }
            continue;
        }
        if name.is_empty() {
            return Err(bad("a tensor has an empty name".into()));
        }
        let raw: RawInfo = serde_json::from_value(value)
            .map_err(|e| bad(format!("tensor `{name}`: {e} (expected dtype, shape and data_offsets)")))?;
        let Some(dtype) = StDType::from_name(&raw.dtype) else {
            return Err(WeightError::UnknownDType {
                path: path.to_path_buf(),
                tensor: name,
                dtype: raw.dtype,
            });
        };
        let [begin, end] = raw.data_offsets;
        if begin > end {
            return Err(bad(format!("tensor `{name}`: data_offsets [{begin}, {end}] run backwards")));
        }
        let expected = raw
            .shape
            .iter()
            .try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor `{name}`: shape {:?} overflows 64 bits", raw.shape)))?;
        if end - begin != expected {
            return Err(WeightError::ByteLength {
                path: path.to_path_buf(),
                tensor: name,
                dtype,
                shape: raw.shape,
                expected,
                found: end - begin,
            });
        }
        if end > data_len {
            return Err(WeightError::OutOfRange {
                path: path.to_path_buf(),
                tensor: name,
                begin,
                end,
                data_len,
            });
        }
        entries.push(Entry {
            name,
            dtype,
            shape: raw.shape,
            begin: data_start + begin,
            end: data_start + end,
        });
    }
    let mut by_offset: Vec<&Entry> = entries.iter().filter(|e| e.end > e.begin).collect();
    by_offset.sort_by_key(|e| (e.begin, e.end));
    for w in by_offset.windows(2) {
        if w[1].begin < w[0].end {
            return Err(WeightError::Overlap {
                path: path.to_path_buf(),
                first: w[0].name.clone(),
                second: w[1].name.clone(),
            });
        }
    }
    Ok(entries)
}

/// Decodes little-endian elements of `dtype` into host data, exactly: floats (bf16, f16, f32, FP8
/// E4M3 codes) into f32, integers and bools into i64. `bytes.len()` is a multiple of the element
/// size (checked with the header). F64, F8_E5M2 and U64 values above `i64::MAX` are refused: kiln
/// has no use for them and they would not convert exactly.
pub(crate) fn decode(tensor: &str, dtype: StDType, bytes: &[u8]) -> Result<(DType, HostData), WeightError> {
    fn le<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes.chunks_exact(N).map(|c| c.try_into().expect("chunks_exact yields N bytes"))
    }
    let floats = |v: Vec<f32>| HostData::F32(v);
    let ints = |v: Vec<i64>| HostData::I64(v);
    Ok(match dtype {
        StDType::F32 => (DType::F32, floats(le::<4>(bytes).map(f32::from_le_bytes).collect())),
        StDType::BF16 => {
            (DType::BF16, floats(le::<2>(bytes).map(|b| bf16_to_f32(u16::from_le_bytes(b))).collect()))
        }
        StDType::F16 => {
            (DType::F16, floats(le::<2>(bytes).map(|b| f16_to_f32(u16::from_le_bytes(b))).collect()))
        }
        StDType::F8E4M3 => (DType::F8E4M3, floats(bytes.iter().map(|&b| e4m3_to_f32(b)).collect())),
        StDType::Bool => (DType::Bool, ints(bytes.iter().map(|&b| i64::from(b != 0)).collect())),
        StDType::U8 => (DType::I32, ints(bytes.iter().map(|&b| i64::from(b)).collect())),
        StDType::I8 => (DType::I32, ints(bytes.iter().map(|&b| i64::from(b as i8)).collect())),
        StDType::I16 => {
            (DType::I32, ints(le::<2>(bytes).map(|b| i64::from(i16::from_le_bytes(b))).collect()))
        }
        StDType::U16 => {
            (DType::I32, ints(le::<2>(bytes).map(|b| i64::from(u16::from_le_bytes(b))).collect()))
        }
        StDType::I32 => {
            (DType::I32, ints(le::<4>(bytes).map(|b| i64::from(i32::from_le_bytes(b))).collect()))
        }
        StDType::U32 => {
            (DType::I64, ints(le::<4>(bytes).map(|b| i64::from(u32::from_le_bytes(b))).collect()))
        }
        StDType::I64 => (DType::I64, ints(le::<8>(bytes).map(i64::from_le_bytes).collect())),
        StDType::U64 => {
            let v: Result<Vec<i64>, _> =
                le::<8>(bytes).map(|b| i64::try_from(u64::from_le_bytes(b))).collect();
            let v = v.map_err(|_| WeightError::UnsupportedDType {
                tensor: tensor.to_string(),
                dtype,
                why: "it holds values above i64::MAX",
            })?;
            (DType::I64, ints(v))
        }
        StDType::F64 | StDType::F8E5M2 => {
            return Err(WeightError::UnsupportedDType {
                tensor: tensor.to_string(),
                dtype,
                why: "kiln has no such element type and would not convert it exactly",
            })
        }
    })
}

/// How [`write_safetensors`] stores float tensors. Integer and bool tensors are always stored in
/// their own dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFloats {
    /// Each tensor in its declared dtype (f32, bf16, f16, FP8). An FP8 tensor `X` is stored as
    /// `F8_E4M3` codes only when its block scale `X_scale_inv` is among the tensors written (as an
    /// FP8 graph declares it), DeepSeek-V3's format; alone it is refused, because an unscaled FP8
    /// weight is not something kiln can read back.
    AsDeclared,
    /// Every float tensor as F32 (exact).
    F32,
    /// Every float tensor as BF16, rounded to nearest even.
    BF16,
}

/// Writes `tensors` as one safetensors file at `path`, atomically (`kiln_ir::output::write_file`):
/// the bytes go to a temporary file in the same directory, which is renamed over `path` only once
/// complete, so readers never see a half-written checkpoint. The header carries `{"format": "pt"}` as PyTorch-saved files do, and is
/// padded with spaces to a multiple of 8 bytes so that the data section is aligned.
pub fn write_safetensors(
    path: &Path,
    tensors: &[HostTensor],
    floats: StoreFloats,
) -> Result<(), WeightError> {
    let heads: Vec<TensorHead> = tensors.iter().map(TensorHead::of).collect();
    write_safetensors_streamed(path, &heads, floats, |i| Ok(std::borrow::Cow::Borrowed(&tensors[i])))
}

/// What a streamed write ([`write_safetensors_streamed`]) must know of a tensor before its values:
/// its name, dtype and shape (a float dtype's values come as f32, any other's as i64).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorHead {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

impl TensorHead {
    pub fn of(t: &HostTensor) -> TensorHead {
        TensorHead { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }
    }
}

/// [`write_safetensors`] for tensors that are made one at a time: the header comes from `heads`,
/// then `fetch(i)` gives tensor `i` (which must match `heads[i]`) when its bytes are written, so
/// one tensor at a time is in memory rather than the whole checkpoint. A training run's save reads
/// each state from the executor so: a checkpoint of models/bench.toml's FP8 form holds 8 GB of
/// f32 values. An error of `fetch` (a reason) ends the write, naming the tensor, and the temporary
/// file goes.
pub fn write_safetensors_streamed<'a>(
    path: &Path,
    heads: &[TensorHead],
    floats: StoreFloats,
    mut fetch: impl FnMut(usize) -> Result<std::borrow::Cow<'a, HostTensor>, String>,
) -> Result<(), WeightError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let names: std::collections::HashSet<&str> = heads.iter().map(|t| t.name.as_str()).collect();
    // The header first, from the shapes and the stored dtypes; then the data streams out tensor by
    // tensor through one reused buffer, instead of being gathered whole in memory (a checkpoint
    // may be as large as the machine's memory).
    let mut stored = Vec::with_capacity(heads.len());
    let mut end = 0u64;
    for t in heads {
        let bad = |reason: String| WeightError::BadTensor { name: t.name.clone(), reason };
        if t.name.is_empty() || t.name == "__metadata__" {
            return Err(bad("this name cannot be a tensor name in safetensors".into()));
        }
        if header.contains_key(&t.name) {
            return Err(bad("two tensors have this name".into()));
        }
        let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let Some(numel) = numel else {
            return Err(bad(format!("shape {:?} has more elements than a file can hold", t.shape)));
        };
        let scaled = names.contains(super::scale_name(&t.name).as_str());
        let dtype = stored_dtype(t.dtype, t.dtype.is_float(), floats, scaled).map_err(bad)?;
        let begin = end;
        end += numel * dtype.size_bytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": dtype.name(), "shape": t.shape, "data_offsets": [begin, end] }),
        );
        stored.push(dtype);
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("a JSON map serialises");
    json.resize(json.len().next_multiple_of(8), b' ');

    // A value encode refuses (an i64 beyond i32, say) or a tensor `fetch` cannot give ends the
    // write; the temporary file goes.
    let mut refused: Option<WeightError> = None;
    let written = kiln_ir::output::write_file_with(path, |f| {
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(&json)?;
        let mut buf = Vec::new();
        for (i, (head, &dtype)) in heads.iter().zip(&stored).enumerate() {
            let mut fail = |reason: String| {
                refused = Some(WeightError::BadTensor { name: head.name.clone(), reason });
                Err(std::io::Error::other("a tensor could not be written"))
            };
            let t = match fetch(i) {
                Ok(t) => t,
                Err(reason) => return fail(reason),
            };
            let numel = head.shape.iter().product::<u64>();
            if t.name != head.name || t.dtype != head.dtype || t.shape != head.shape {
                let (found, want) = (shape_text(t.dtype, &t.shape), shape_text(head.dtype, &head.shape));
                return fail(format!("came as `{}` {found} where the header says {want}", t.name));
            }
            if t.data.len() as u64 != numel {
                return fail(format!("shape {:?} does not match its {} values", t.shape, t.data.len()));
            }
            if let Err(reason) = stored_dtype(t.dtype, matches!(t.data, HostData::F32(_)), floats, true) {
                return fail(reason);
            }
            buf.clear();
            if let Err(reason) = encode(&t, dtype, &mut buf) {
                return fail(reason);
            }
            f.write_all(&buf)?;
        }
        Ok(())
    });
    if let Some(e) = refused {
        return Err(e);
    }
    written.map_err(|e| match e {
        kiln_ir::output::OutputError::Io { path, source } => WeightError::Io { path, source },
        other => WeightError::Output(other),
    })
}

fn shape_text(dtype: DType, shape: &[u64]) -> String {
    format!("{dtype}{shape:?}")
}

/// The dtype a tensor of `dtype` is stored in (`float_data`: its values are f32s, not i64s;
/// `scaled`: the tensor's FP8 block scale is written too).
fn stored_dtype(
    dtype: DType,
    float_data: bool,
    floats: StoreFloats,
    scaled: bool,
) -> Result<StDType, String> {
    match float_data {
        true => {
            if !dtype.is_float() {
                return Err(format!("dtype {dtype} with float data"));
            }
            let to = match (floats, dtype) {
                (StoreFloats::F32, _) => StDType::F32,
                (StoreFloats::BF16, _) => StDType::BF16,
                (StoreFloats::AsDeclared, DType::F8E4M3) if scaled => StDType::F8E4M3,
                (StoreFloats::AsDeclared, DType::F8E4M3) => {
                    return Err("FP8 tensors cannot be written without their block scales; \
                                store floats as F32 or BF16"
                        .into())
                }
                (StoreFloats::AsDeclared, d) => StDType::of(d),
            };
            match to {
                StDType::F32 | StDType::BF16 | StDType::F16 | StDType::F8E4M3 => Ok(to),
                other => Err(format!("cannot store {dtype} as {other}")),
            }
        }
        false => match dtype {
            DType::I64 => Ok(StDType::I64),
            DType::I32 => Ok(StDType::I32),
            DType::Bool => Ok(StDType::Bool),
            d => Err(format!("dtype {d} with integer data")),
        },
    }
}

/// Appends the bytes of `t` stored as `to` ([`stored_dtype`]) to `out`.
fn encode(t: &HostTensor, to: StDType, out: &mut Vec<u8>) -> Result<(), String> {
    out.reserve(t.data.len() * to.size_bytes() as usize);
    match &t.data {
        HostData::F32(v) => match to {
            StDType::F32 => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            StDType::BF16 => v.iter().for_each(|&x| out.extend(f32_to_bf16(x).to_le_bytes())),
            StDType::F16 => v.iter().for_each(|&x| out.extend(f32_to_f16(x).to_le_bytes())),
            // Values of an FP8 tensor are E4M3 values already; encoding them is exact.
            StDType::F8E4M3 => out.extend(v.iter().map(|&x| f8e4m3_from_f32(x))),
            other => return Err(format!("cannot store {} as {other}", t.dtype)),
        },
        HostData::I64(v) => match to {
            StDType::I64 => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            StDType::I32 => {
                for &x in v {
                    let x = i32::try_from(x).map_err(|_| format!("value {x} does not fit in i32"))?;
                    out.extend(x.to_le_bytes());
                }
            }
            StDType::Bool => {
                for &x in v {
                    if x != 0 && x != 1 {
                        return Err(format!("bool tensor holds {x}"));
                    }
                    out.push(x as u8);
                }
            }
            other => return Err(format!("cannot store {} as {other}", t.dtype)),
        },
    }
    Ok(())
}
