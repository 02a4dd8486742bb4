//! Hugging Face checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor: shard file}}`).
//!
//! Opening maps every shard into memory (see [`super::mapped`]), validates its header against the
//! mapping and checks that the index and the shards agree (each listed tensor is in the shard the
//! index names, and each shard holds only tensors the index maps to it). No tensor data is touched
//! until [`Checkpoint::read`] (or [`Checkpoint::view`], which borrows it without copying).
//!
//! FP8 weights (DeepSeek-V3's format, reference §4.2, README_WEIGHTS): an `F8_E4M3` tensor `X` comes
//! with `X_scale_inv`, f32 of shape `(ceil(rows / b0), ceil(cols / b1))` for the weight block
//! `[b0, b1]` (128 x 128 unless [`Checkpoint::with_weight_block`] says otherwise), and reads as
//! `w[i, j] = fp8(x[i, j]) * scale_inv[i / b0, j / b1]`. Despite its name the scale is the multiplier.
//! Blocks at the right and bottom edges are partial; they use their block's scale like any other.
//! A missing scale is an error: DeepSeek's own `fp8_cast_bf16.py` keeps such a tensor undequantised
//! with a warning, which would silently feed raw FP8 codes to the model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_ir::DType;
use serde::Deserialize;

use super::mapped::{MappedTensor, Mapping};
use super::numeric::e4m3_to_f32;
use super::safetensors::{decode, read_header, Entry, StDType};
use super::{HostData, HostTensor, WeightError};

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// One tensor of a checkpoint, as its header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: StDType,
    pub shape: Vec<u64>,
    /// The shard holding it.
    pub file: PathBuf,
    entry: Entry,
    /// Its file's index in [`Checkpoint::files`].
    shard: usize,
}

/// An opened checkpoint: the validated headers of its files. See the module documentation.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    files: Vec<PathBuf>,
    /// The files' mappings, in the order of `files`.
    maps: Vec<Arc<Mapping>>,
    tensors: BTreeMap<String, TensorInfo>,
    weight_block: [u64; 2],
}

/// The name of the block scale of FP8 tensor `name`: `{name}_scale_inv`.
pub fn scale_name(name: &str) -> String {
    format!("{name}_scale_inv")
}

/// Opens the checkpoint at `path`: a directory holding `model.safetensors` or
/// `model.safetensors.index.json` (the single file wins if both exist, as in Hugging Face's
/// loader), a `.safetensors` file, or an index file.
pub fn open_checkpoint(path: &Path) -> Result<Checkpoint, WeightError> {
    let not_found = || WeightError::NoCheckpoint { path: path.to_path_buf() };
    if path.is_dir() {
        let single = path.join(SINGLE);
        if single.is_file() {
            return from_files(vec![single], None);
        }
        let index = path.join(INDEX);
        if index.is_file() {
            return open_index(&index);
        }
        return Err(not_found());
    }
    let meta =
        std::fs::metadata(path).map_err(|source| WeightError::Io { path: path.to_path_buf(), source })?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !meta.is_file() {
        Err(not_found())
    } else if name.ends_with(".safetensors") {
        from_files(vec![path.to_path_buf()], None)
    } else if name.ends_with(".json") {
        open_index(path)
    } else {
        Err(not_found())
    }
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

fn open_index(index: &Path) -> Result<Checkpoint, WeightError> {
    let bad = |reason: String| WeightError::BadIndex { path: index.to_path_buf(), reason };
    let text =
        std::fs::read(index).map_err(|source| WeightError::Io { path: index.to_path_buf(), source })?;
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if value.get("weight_map").is_none() {
        // Most often the model's config.json next to the checkpoint, given instead of its folder.
        let config = value.get("model_type").is_some() || value.get("architectures").is_some();
        let what = if config { "a model's config.json" } else { "a JSON file without a `weight_map`" };
        let folder = index.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return Err(WeightError::NotAnIndex {
            path: index.to_path_buf(),
            what,
            folder: folder.to_path_buf(),
        });
    }
    let parsed: Index = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<&str> = parsed.weight_map.values().map(String::as_str).collect();
    shards.sort_unstable();
    shards.dedup();
    for s in &shards {
        // Shards are plain file names next to the index; anything else could point outside it.
        if s.is_empty() || *s == "." || *s == ".." || s.contains(['/', '\\']) {
            return Err(bad(format!("shard `{s}` is not a file name in the index's directory")));
        }
    }
    let files = shards.iter().map(|s| dir.join(s)).collect();
    from_files(files, Some((index, &parsed.weight_map)))
}

/// Reads every file's header; with an index, checks the index against the shards.
fn from_files(
    files: Vec<PathBuf>,
    index: Option<(&Path, &BTreeMap<String, String>)>,
) -> Result<Checkpoint, WeightError> {
    let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
    let mut maps = Vec::with_capacity(files.len());
    for (shard, file) in files.iter().enumerate() {
        let map = Mapping::open(file)?;
        let entries = read_header(&map)?;
        maps.push(map);
        for entry in entries {
            if let Some((index_path, map)) = index {
                let shard = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if map.get(&entry.name) != Some(&shard) {
                    let listed = match map.get(&entry.name) {
                        Some(other) => format!("maps it to `{other}`"),
                        None => "does not list it".to_string(),
                    };
                    return Err(WeightError::IndexMismatch {
                        path: index_path.to_path_buf(),
                        reason: format!(
                            "shard `{shard}` holds tensor `{}`, but the index {listed}",
                            entry.name
                        ),
                    });
                }
            }
            let info = TensorInfo {
                name: entry.name.clone(),
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                file: file.clone(),
                entry,
                shard,
            };
            tensors.insert(info.name.clone(), info);
        }
    }
    if let Some((index_path, map)) = index {
        if let Some((name, shard)) = map.iter().find(|(name, _)| !tensors.contains_key(*name)) {
            return Err(WeightError::IndexMismatch {
                path: index_path.to_path_buf(),
                reason: format!("the index maps `{name}` to `{shard}`, which does not hold it"),
            });
        }
    }
    Ok(Checkpoint { files, maps, tensors, weight_block: [128, 128] })
}

impl Checkpoint {
    /// The safetensors files, in the order their headers were read.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The FP8 weight block `[rows, cols]` one scale covers.
    pub fn weight_block(&self) -> [u64; 2] {
        self.weight_block
    }

    /// Uses `block` (a spec's `quantization.weight_block`) instead of the default 128 x 128.
    pub fn with_weight_block(mut self, block: [u64; 2]) -> Result<Checkpoint, WeightError> {
        if block.contains(&0) {
            return Err(WeightError::BadBlock { block });
        }
        self.weight_block = block;
        Ok(self)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo, WeightError> {
        self.get(name).ok_or_else(|| WeightError::NoSuchTensor { name: name.to_string() })
    }

    /// The stored bytes of a tensor in the file's mapping (in bounds: the header was validated
    /// against the mapping's length).
    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.maps[info.shard].bytes()[info.entry.begin as usize..info.entry.end as usize]
    }

    /// The stored bytes of a tensor, little-endian as in the file.
    pub fn raw(&self, name: &str) -> Result<Vec<u8>, WeightError> {
        Ok(self.bytes(self.info(name)?).to_vec())
    }

    /// The mapping of each file, in the order of [`Checkpoint::files`].
    pub fn mappings(&self) -> &[Arc<Mapping>] {
        &self.maps
    }

    /// Tensor `name` as `dtype` storage without copying, when its stored bytes already are that:
    /// stored in `dtype` itself (bools excepted: their bytes may be other than 0 and 1) and aligned
    /// for the element type. `None` when it is not, or when there is no such tensor.
    pub fn view(&self, name: &str, dtype: DType) -> Option<MappedTensor> {
        let info = self.get(name)?;
        if info.dtype != StDType::of(dtype) || dtype == DType::Bool {
            return None;
        }
        let range = info.entry.begin as usize..info.entry.end as usize;
        MappedTensor::new(name, dtype, &info.shape, &self.maps[info.shard], range)
    }

    /// Decodes a tensor: floats exactly to f32 (keeping their stored dtype), integers to i64 (as i32
    /// or i64), bools to 0/1. FP8 weights are dequantised with their block scales and declared f32.
    pub fn read(&self, name: &str) -> Result<HostTensor, WeightError> {
        let info = self.info(name)?;
        let bytes = self.bytes(info);
        if info.dtype == StDType::F8E4M3 {
            let scale = self.fp8_scale(info)?;
            let HostData::F32(s) = self.read(&scale.name)?.data else {
                return Err(WeightError::BadScale {
                    tensor: name.to_string(),
                    scale: scale.name.clone(),
                    reason: "did not decode to floats".into(),
                });
            };
            let [rows, cols] = [info.shape[0], info.shape[1]];
            let data = dequantize_blocks(bytes, rows, cols, &s, self.weight_block);
            return Ok(HostTensor {
                name: name.to_string(),
                dtype: DType::F32,
                shape: info.shape.clone(),
                data,
            });
        }
        let (dtype, data) = decode(name, info.dtype, bytes)?;
        Ok(HostTensor { name: name.to_string(), dtype, shape: info.shape.clone(), data })
    }

    /// The block scale of FP8 tensor `info`, checked for dtype and shape. Used before any data is
    /// read, so that `bind` reports a bad scale without reading gigabytes first.
    pub(crate) fn fp8_scale(&self, info: &TensorInfo) -> Result<&TensorInfo, WeightError> {
        let scale = scale_name(&info.name);
        let [rows, cols] = info.shape[..] else {
            return Err(WeightError::Fp8Rank { tensor: info.name.clone(), shape: info.shape.clone() });
        };
        let Some(s) = self.get(&scale) else {
            return Err(WeightError::MissingScale { tensor: info.name.clone(), scale });
        };
        let bad = |reason: String| WeightError::BadScale {
            tensor: info.name.clone(),
            scale: scale.clone(),
            reason,
        };
        if !matches!(s.dtype, StDType::F32 | StDType::BF16 | StDType::F16) {
            return Err(bad(format!("is {}; scales are F32 (or BF16, F16)", s.dtype)));
        }
        let [b0, b1] = self.weight_block;
        let want = [rows.div_ceil(b0), cols.div_ceil(b1)];
        if s.shape != want {
            return Err(bad(format!(
                "has shape {:?}, but a [{rows}, {cols}] weight in {b0} x {b1} blocks needs {want:?}",
                s.shape
            )));
        }
        Ok(s)
    }
}

/// Dequantises a row-major `[rows, cols]` matrix of E4M3 codes with one scale per `block`:
/// `w[i, j] = e4m3(codes[i * cols + j]) * scales[(i / b0) * ceil(cols / b1) + j / b1]`.
///
/// `codes` has `rows * cols` entries and `scales` `ceil(rows / b0) * ceil(cols / b1)`: the header
/// checks and [`Checkpoint::fp8_scale`] guarantee both before this runs.
pub(crate) fn dequantize_blocks(
    codes: &[u8],
    rows: u64,
    cols: u64,
    scales: &[f32],
    block: [u64; 2],
) -> HostData {
    let (rows, cols) = (rows as usize, cols as usize);
    let [b0, b1] = block.map(|b| b as usize);
    let scale_cols = cols.div_ceil(b1);
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        let scale_row = &scales[(i / b0) * scale_cols..][..scale_cols];
        let row = &codes[i * cols..][..cols];
        out.extend(row.iter().enumerate().map(|(j, &c)| e4m3_to_f32(c) * scale_row[j / b1]));
    }
    HostData::F32(out)
}
