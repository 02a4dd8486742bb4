//! Binding a checkpoint to the parameters a graph (or an artifact's manifest) declares: one
//! [`HostTensor`] per parameter name, in declaration order.
//!
//! Everything that can be checked from the headers is checked before any data is read, so a
//! mismatched checkpoint fails in milliseconds rather than after reading hundreds of gigabytes:
//!
//! 1. every parameter is in the checkpoint (else [`WeightError::Missing`], listing up to ten);
//! 2. with the same shape ([`WeightError::ShapeMismatch`]) and a dtype of the same class
//!    ([`WeightError::DTypeClass`]): any float dtype converts to the parameter's float dtype by
//!    rounding to nearest even (bf16 stored, f32 parameter: exact; f32 stored, bf16 parameter:
//!    rounded), integers to integers (range-checked), bools only to bools;
//! 3. every FP8 weight has a well-formed block scale (see [`super::checkpoint`]);
//! 4. FP8 parameters (what `insert-fp8-casts` makes: `X` of dtype f8e4m3 next to an f32 parameter
//!    `X_scale_inv`, DeepSeek-V3's checkpoint format) bind to FP8 tensors as they are stored: the
//!    codes are not dequantised (each becomes its exact E4M3 value) and `X_scale_inv` binds like any
//!    f32 parameter. The graph must declare the scale too ([`WeightError::UnscaledFp8`]), or the codes
//!    would be used unscaled; a non-FP8 tensor for an FP8 parameter is
//!    [`WeightError::UnsupportedParam`] (kiln does not quantise weights while loading);
//! 5. no tensor is left unexplained ([`WeightError::Extra`]). These are explained without a
//!    parameter:
//!    - `X_scale_inv` of an FP8 tensor `X` that the graph declares in a wider float: consumed by
//!      dequantising `X`;
//!    - names ending in `rotary_emb.inv_freq`: a buffer older Hugging Face code saved, recomputed
//!      from the config (kiln's `rope` op computes its frequencies itself);
//!    - DeepSeek's MTP layer `N` stores copies of the shared modules as
//!      `model.layers.{N}.embed_tokens.weight` and `model.layers.{N}.shared_head.head.weight`
//!      (README_WEIGHTS). kiln's MTP modules read the main `model.embed_tokens.weight` and
//!      `lm_head.weight` (the reference report shares them), so the copies have no parameter. A layer
//!      is an MTP layer when the graph has its `model.layers.{N}.eh_proj.weight`, which only MTP
//!      modules have; this needs no `num_hidden_layers`, which a graph does not record. The copies
//!      must have the shared tensor's shape; their values are not compared, because for
//!      DeepSeek-V3 that would read two 0.9B-parameter tensors a second time only to check them.
//!
//! Checks come first and tensors are read after, one at a time: [`bind_params`] returns an iterator
//! so that a runtime can convert each tensor to its own storage and drop it before reading the next.
//! [`bind_mapped`] makes the same checks and yields [`Param`]s: a tensor already stored as its
//! parameter's compiled storage (same dtype and shape, aligned; FP8 codes included) is borrowed from
//! the checkpoint's mapping instead of being read ([`Checkpoint::view`]), the rest is converted as
//! [`bind_params`] converts it.

use std::collections::{BTreeSet, HashMap};

use kiln_ir::artifact::Manifest;
use kiln_ir::{DType, Dim, Graph};

use super::checkpoint::{scale_name, Checkpoint};
use super::mapped::Param;
use super::numeric::{e4m3_to_f32, round_to};
use super::safetensors::StDType;
use super::{HostData, HostTensor, WeightError, LISTED};

/// A parameter a graph or a manifest declares: its name, dtype and constant shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamDecl {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Elements (the product of `shape`).
    pub numel: usize,
}

/// The graph's parameters, each name once in graph order; the same name twice must mean the same
/// type (the builder shares a node, a hand-written graph may repeat it).
pub fn graph_params(graph: &Graph) -> Result<Vec<ParamDecl>, WeightError> {
    declared(graph.params().into_iter().map(|(name, ty)| (name, ty.dtype, ty.shape.as_slice())))
}

/// The parameters of an artifact's manifest, with the same rules as [`graph_params`] (a manifest
/// lists them in graph order), then the states a checkpoint initialises: the weights a train step
/// updates in place (`trainable`) and the routers' selection biases (`routing_bias`).
pub fn manifest_params(manifest: &Manifest) -> Result<Vec<ParamDecl>, WeightError> {
    use kiln_ir::module::StateRole;
    let weights = (manifest.states.iter())
        .filter(|s| matches!(s.role, StateRole::Trainable | StateRole::RoutingBias))
        .map(|s| (s.name.as_str(), s.dtype, s.shape.as_slice()));
    declared(manifest.params.iter().map(|p| (p.name.as_str(), p.dtype, p.shape.as_slice())).chain(weights))
}

fn declared<'a>(
    list: impl Iterator<Item = (&'a str, DType, &'a [Dim])>,
) -> Result<Vec<ParamDecl>, WeightError> {
    let text =
        |dtype: DType, shape: &[Dim]| kiln_ir::TensorType::new(dtype, shape.iter().copied()).to_string();
    let mut seen: HashMap<&str, (DType, &[Dim])> = HashMap::new();
    let mut out = Vec::new();
    for (name, dtype, dims) in list {
        if let Some(&(d0, s0)) = seen.get(name) {
            if (d0, s0) != (dtype, dims) {
                return Err(WeightError::ConflictingParam {
                    name: name.to_string(),
                    first: text(d0, s0),
                    second: text(dtype, dims),
                });
            }
            continue;
        }
        seen.insert(name, (dtype, dims));
        let shape = dims.iter().map(|d| d.as_known()).collect::<Option<Vec<u64>>>();
        let Some(shape) = shape else {
            return Err(WeightError::SymbolicParam { name: name.to_string(), ty: text(dtype, dims) });
        };
        let numel =
            shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).and_then(|n| usize::try_from(n).ok());
        let Some(numel) = numel else {
            return Err(WeightError::ParamTooLarge { name: name.to_string(), ty: text(dtype, dims) });
        };
        out.push(ParamDecl { name: name.to_string(), dtype, shape, numel });
    }
    Ok(out)
}

/// Reads the checkpoint tensor of every parameter of `graph`, converted to the parameter's dtype.
/// See the module documentation for the checks and for what may be left over.
pub fn bind(graph: &Graph, ckpt: &Checkpoint) -> Result<Vec<HostTensor>, WeightError> {
    bind_params(graph_params(graph)?, ckpt)?.collect()
}

/// Checks the checkpoint against `params` (everything the headers tell, before any data is read),
/// then returns the tensors one by one, each read when the iterator reaches it.
pub fn bind_params(
    params: Vec<ParamDecl>,
    ckpt: &Checkpoint,
) -> Result<impl Iterator<Item = Result<HostTensor, WeightError>> + '_, WeightError> {
    check(&params, ckpt)?;
    Ok(params.into_iter().map(move |p| read_param(p, ckpt)))
}

/// [`bind_params`], borrowing every tensor that needs no conversion from the checkpoint's mapping
/// (see the module documentation); the views keep the mapping alive.
pub fn bind_mapped(
    params: Vec<ParamDecl>,
    ckpt: &Checkpoint,
) -> Result<impl Iterator<Item = Result<Param, WeightError>> + '_, WeightError> {
    check(&params, ckpt)?;
    Ok(params.into_iter().map(move |p| match ckpt.view(&p.name, p.dtype) {
        // `check` made sure the shapes agree; the view has the stored bytes, which are the storage.
        // Its pages are read in now, at load, not by the kernel that first reads them.
        Some(view) => {
            view.prefault();
            Ok(Param::Mapped(view))
        }
        None => read_param(p, ckpt).map(Param::Host),
    }))
}

/// Parameter `p` read from the checkpoint and converted to its dtype.
fn read_param(p: ParamDecl, ckpt: &Checkpoint) -> Result<HostTensor, WeightError> {
    if p.dtype == DType::F8E4M3 {
        // The codes as they are stored: their scales are parameters of their own.
        let codes = ckpt.raw(&p.name)?;
        let data = HostData::F32(codes.into_iter().map(e4m3_to_f32).collect());
        return Ok(HostTensor { name: p.name, dtype: p.dtype, shape: p.shape, data });
    }
    convert(ckpt.read(&p.name)?, p.dtype)
}

/// Everything the headers tell about binding `params` to `ckpt`; no tensor data is read.
fn check(params: &[ParamDecl], ckpt: &Checkpoint) -> Result<(), WeightError> {
    let missing: Vec<&str> =
        params.iter().filter(|p| ckpt.get(&p.name).is_none()).map(|p| p.name.as_str()).collect();
    if !missing.is_empty() {
        return Err(WeightError::Missing {
            count: missing.len(),
            names: missing.iter().take(LISTED).map(|s| s.to_string()).collect(),
        });
    }
    let declared: HashMap<&str, DType> = params.iter().map(|p| (p.name.as_str(), p.dtype)).collect();
    for p in params {
        let info = ckpt.get(&p.name).expect("checked above");
        if info.shape != p.shape {
            return Err(WeightError::ShapeMismatch {
                name: p.name.clone(),
                expected: p.shape.clone(),
                found: info.shape.clone(),
            });
        }
        if p.dtype == DType::F8E4M3 {
            if info.dtype != StDType::F8E4M3 {
                return Err(WeightError::UnsupportedParam {
                    name: p.name.clone(),
                    dtype: p.dtype,
                    stored: info.dtype,
                });
            }
            let scale = scale_name(&p.name);
            if !declared.get(scale.as_str()).is_some_and(|d| d.is_float()) {
                return Err(WeightError::UnscaledFp8 { name: p.name.clone(), scale });
            }
        }
        let same_class = if p.dtype.is_float() {
            info.dtype.is_float()
        } else if p.dtype.is_int() {
            info.dtype.is_int()
        } else {
            info.dtype == StDType::Bool
        };
        if !same_class {
            return Err(WeightError::DTypeClass { name: p.name.clone(), param: p.dtype, stored: info.dtype });
        }
        if info.dtype == StDType::F8E4M3 {
            ckpt.fp8_scale(info)?;
        }
    }
    check_leftovers(params, ckpt)
}

fn check_leftovers(params: &[ParamDecl], ckpt: &Checkpoint) -> Result<(), WeightError> {
    let by_name: HashMap<&str, &ParamDecl> = params.iter().map(|p| (p.name.as_str(), p)).collect();
    let mtp_layers: BTreeSet<&str> = params
        .iter()
        .filter_map(|p| p.name.strip_prefix("model.layers.")?.strip_suffix(".eh_proj.weight"))
        .collect();
    // MTP modules of the checkpoint that the graph does not have (the KV-cache programs leave the
    // MTP heads out): a layer with any tensor only an MTP module has, of which the graph declares
    // nothing, is skipped whole, once it is known to be whole.
    let unused_mtp: BTreeSet<String> = ckpt
        .tensors()
        .filter_map(|t| {
            let rest = t.name.strip_prefix("model.layers.")?;
            let (layer, local) = rest.split_once('.')?;
            MTP_ONLY.contains(&local).then(|| format!("model.layers.{layer}."))
        })
        .filter(|prefix| !params.iter().any(|p| p.name.starts_with(prefix.as_str())))
        .collect();
    for prefix in &unused_mtp {
        check_mtp_module(prefix, params, ckpt)?;
    }
    let mut extra = Vec::new();
    for info in ckpt.tensors() {
        let name = info.name.as_str();
        if by_name.contains_key(name) || name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if unused_mtp.iter().any(|p| name.starts_with(p.as_str())) {
            continue;
        }
        let scales_fp8 = name
            .strip_suffix("_scale_inv")
            .and_then(|base| ckpt.get(base))
            .is_some_and(|base| base.dtype == StDType::F8E4M3);
        if scales_fp8 {
            continue;
        }
        if let Some(shared) = mtp_copy_of(name, &mtp_layers, &by_name) {
            if let Some(s) = by_name.get(shared) {
                if s.shape != info.shape {
                    return Err(WeightError::CopyMismatch {
                        copy: name.to_string(),
                        shared: shared.to_string(),
                        copy_shape: info.shape.clone(),
                        shared_shape: s.shape.clone(),
                    });
                }
            }
            continue;
        }
        extra.push(name.to_string());
    }
    if extra.is_empty() {
        Ok(())
    } else {
        Err(WeightError::Extra { count: extra.len(), names: extra.into_iter().take(LISTED).collect() })
    }
}

/// The tensors (after `model.layers.{i}.`) that only an MTP module has: its two norms, its
/// projection and its head's norm.
const MTP_ONLY: [&str; 4] = ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"];

/// Checks that an MTP module of the checkpoint that the graph does not use, `prefix`
/// (`model.layers.61.`), is whole: it has every tensor only an MTP module has, and every tensor of
/// the graph's last decoder layer (an MTP module is a decoder layer like it, plus those), except
/// an MLP of another kind (dense or MoE, which `moe_layer_freq` may make differ): an MLP tensor is
/// needed when the module has another of its family (`mlp.experts`, `mlp.gate_proj`, ...). A
/// module missing one would otherwise be taken for a layer of stray tensors, and every one of
/// them reported as unused.
fn check_mtp_module(prefix: &str, params: &[ParamDecl], ckpt: &Checkpoint) -> Result<(), WeightError> {
    let layer_of = |name: &str| -> Option<(u64, String)> {
        let (layer, local) = name.strip_prefix("model.layers.")?.split_once('.')?;
        Some((layer.parse().ok()?, local.to_string()))
    };
    let family = |local: &str| local.split('.').take(2).collect::<Vec<_>>().join(".");
    let families: BTreeSet<String> =
        ckpt.tensors().filter_map(|t| t.name.strip_prefix(prefix)).map(family).collect();
    let last = params.iter().filter_map(|p| layer_of(&p.name)).map(|(l, _)| l).max();
    let mut needed: BTreeSet<String> = MTP_ONLY.iter().map(|s| s.to_string()).collect();
    needed.extend(
        params
            .iter()
            .filter_map(|p| layer_of(&p.name))
            .filter(|(l, local)| {
                Some(*l) == last && (!local.starts_with("mlp.") || families.contains(&family(local)))
            })
            .map(|(_, local)| local),
    );
    let missing: Vec<String> = needed
        .iter()
        .map(|local| format!("{prefix}{local}"))
        .filter(|name| ckpt.get(name).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(WeightError::IncompleteMtp {
        prefix: prefix.trim_end_matches('.').to_string(),
        count: missing.len(),
        names: missing.into_iter().take(LISTED).collect(),
    })
}

/// The shared parameter that `name` is an MTP layer's copy of, if it is one.
fn mtp_copy_of(
    name: &str,
    mtp_layers: &BTreeSet<&str>,
    params: &HashMap<&str, &ParamDecl>,
) -> Option<&'static str> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, local) = rest.split_once('.')?;
    if !mtp_layers.contains(layer) {
        return None;
    }
    match local {
        "embed_tokens.weight" => Some("model.embed_tokens.weight"),
        // With tied embeddings the head is the embedding table.
        "shared_head.head.weight" if params.contains_key("lm_head.weight") => Some("lm_head.weight"),
        "shared_head.head.weight" => Some("model.embed_tokens.weight"),
        _ => None,
    }
}

/// `t` in the parameter's dtype: floats rounded to it, integers range-checked.
fn convert(t: HostTensor, dtype: DType) -> Result<HostTensor, WeightError> {
    let data = match t.data {
        HostData::F32(v) if dtype == DType::F32 => HostData::F32(v),
        HostData::F32(v) => HostData::F32(v.into_iter().map(|x| round_to(dtype, x)).collect()),
        HostData::I64(v) => {
            if dtype == DType::I32 {
                if let Some(&value) = v.iter().find(|&&x| i32::try_from(x).is_err()) {
                    return Err(WeightError::IntOutOfRange { name: t.name, value, dtype });
                }
            }
            HostData::I64(v)
        }
    };
    Ok(HostTensor { name: t.name, dtype, shape: t.shape, data })
}
