//! The text form of a program's buffers. A buffer stored in a parameter is written
//! `{"id", "value", "param"}`, `param` being the parameter's index in [`Manifest::params`] (and with
//! `shape` too when the buffer is a view of another shape): its dtype, shape and size are the
//! parameter's declaration's. Every other buffer is written whole. DeepSeek-V3's three inference
//! programs each hold some 90 thousand parameters' buffers, and written whole, each repeating its
//! parameter's name, dtype and shape, they were 57 of the manifest's 65 MB.
//!
//! A buffer alone knows neither the index nor the declaration, so both directions go through the
//! manifest: its `Serialize` puts the parameters' indices in reach of the buffers while it writes
//! them ([`with_params`]), and its `params` field, once read, does the same for the buffers read
//! after it (`params` comes before `programs`, as kiln writes them: a manifest whose programs come
//! first is refused, naming the rule). Either way the table lives in a thread-local for exactly the
//! duration of one manifest's (de)serialisation.

use std::cell::RefCell;

use rustc_hash::FxHashMap;
use serde::de::Error as _;
use serde::ser::{Error as _, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{bytes_of, serde_text, Buffer, BufferId, BufferKind, ParamEntry, Storage};
use crate::types::{DType, Dim, SymBindings};

/// The parameters of the manifest being written (by name: their index and declared shape) or read
/// (in order).
enum Params {
    Writing(FxHashMap<String, (u32, Vec<Dim>)>),
    Reading(Vec<ParamEntry>),
}

thread_local! {
    static PARAMS: RefCell<Option<Params>> = const { RefCell::new(None) };
}

/// Runs `f` with `params` (when given, for writing) as the table buffers are written against, or
/// with none (for reading, until `params` is read), and restores the table there was before
/// (manifests inside manifests each see their own).
pub(super) fn with_params<T>(params: Option<&[ParamEntry]>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Params>);
    impl Drop for Restore {
        fn drop(&mut self) {
            PARAMS.with(|t| *t.borrow_mut() = self.0.take());
        }
    }
    let table = params.map(|params| {
        Params::Writing(
            (params.iter().enumerate()).map(|(i, p)| (p.name.clone(), (i as u32, p.shape.clone()))).collect(),
        )
    });
    let _restore = Restore(PARAMS.with(|t| t.replace(table)));
    f()
}

/// `Manifest::params`'s deserialiser: the list, also kept for the buffers read after it.
pub(super) fn read_params<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ParamEntry>, D::Error> {
    let params = Vec::<ParamEntry>::deserialize(d)?;
    PARAMS.with(|t| *t.borrow_mut() = Some(Params::Reading(params.clone())));
    Ok(params)
}

/// A buffer written whole.
#[derive(Serialize)]
struct Whole<'a> {
    id: BufferId,
    value: &'a str,
    dtype: DType,
    #[serde(serialize_with = "serde_text::dims::serialize")]
    shape: &'a [Dim],
    kind: BufferKind,
    storage: &'a Storage,
    max_bytes: u64,
}

impl Serialize for Buffer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Storage::Param { name } = &self.storage else {
            let whole = Whole {
                id: self.id,
                value: &self.value,
                dtype: self.dtype,
                shape: &self.shape,
                kind: self.kind,
                storage: &self.storage,
                max_bytes: self.max_bytes,
            };
            return whole.serialize(s);
        };
        let found = PARAMS.with(|t| match &*t.borrow() {
            Some(Params::Writing(by_name)) => {
                Some(by_name.get(name).map(|(i, shape)| (*i, *shape != self.shape)))
            }
            _ => None,
        });
        let (index, view) = match found {
            Some(Some(found)) => found,
            Some(None) => {
                return Err(S::Error::custom(format!(
                    "{} ({}) is stored in parameter `{name}`, which the manifest does not declare",
                    self.id, self.value
                )))
            }
            None => {
                return Err(S::Error::custom(format!(
                    "{} ({}) is stored in a parameter: it is written as part of its manifest",
                    self.id, self.value
                )))
            }
        };
        let mut out = s.serialize_struct("Buffer", if view { 4 } else { 3 })?;
        out.serialize_field("id", &self.id)?;
        out.serialize_field("value", &self.value)?;
        out.serialize_field("param", &index)?;
        if view {
            out.serialize_field("shape", &Shape(&self.shape))?;
        }
        out.end()
    }
}

/// A shape as text dimensions, for [`SerializeStruct::serialize_field`].
struct Shape<'a>(&'a [Dim]);

impl Serialize for Shape<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_text::dims::serialize(self.0, s)
    }
}

/// What a buffer's text may hold: every field of a buffer written whole, or `param` (with `shape`
/// for a view) for one stored in a parameter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Text {
    id: BufferId,
    value: String,
    #[serde(default)]
    param: Option<u32>,
    #[serde(default)]
    dtype: Option<DType>,
    #[serde(default, deserialize_with = "some_dims")]
    shape: Option<Vec<Dim>>,
    #[serde(default)]
    kind: Option<BufferKind>,
    #[serde(default)]
    storage: Option<Storage>,
    #[serde(default)]
    max_bytes: Option<u64>,
}

fn some_dims<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Dim>>, D::Error> {
    serde_text::dims::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for Buffer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = Text::deserialize(d)?;
        let Some(index) = t.param else {
            let missing = |field: &str| D::Error::custom(format!("{} ({}) has no `{field}`", t.id, t.value));
            let storage = t.storage.ok_or_else(|| missing("storage"))?;
            if matches!(storage, Storage::Param { .. }) {
                return Err(D::Error::custom(format!(
                    "{} ({}) is stored in a parameter: such a buffer is written `{{\"id\", \"value\", \"param\"}}`, \
                     `param` the parameter's index",
                    t.id, t.value
                )));
            }
            return Ok(Buffer {
                id: t.id,
                dtype: t.dtype.ok_or_else(|| missing("dtype"))?,
                shape: t.shape.ok_or_else(|| missing("shape"))?,
                kind: t.kind.ok_or_else(|| missing("kind"))?,
                max_bytes: t.max_bytes.ok_or_else(|| missing("max_bytes"))?,
                storage,
                value: t.value,
            });
        };
        if t.dtype.is_some() || t.kind.is_some() || t.storage.is_some() || t.max_bytes.is_some() {
            return Err(D::Error::custom(format!(
                "{} ({}) names a parameter, whose declaration gives its dtype, kind, storage and size: \
                 it has `id`, `value`, `param` and, for a view of another shape, `shape`",
                t.id, t.value
            )));
        }
        let declared = PARAMS.with(|t| match &*t.borrow() {
            Some(Params::Reading(params)) => Some(
                (params.get(index as usize).map(|e| (e.name.clone(), e.dtype, e.shape.clone())))
                    .ok_or(params.len()),
            ),
            _ => None,
        });
        let (name, dtype, declared_shape) = match declared {
            Some(Ok(e)) => e,
            Some(Err(n)) => {
                return Err(D::Error::custom(format!(
                    "{} ({}) names parameter {index}, but the manifest declares {n}",
                    t.id, t.value
                )));
            }
            None => {
                return Err(D::Error::custom(format!(
                    "{} ({}) names parameter {index} before the manifest's `params` were read: \
                     `params` comes before `programs`",
                    t.id, t.value
                )))
            }
        };
        // A parameter's dimensions are constants (the bindings do not matter), and an overflow is
        // its declaration's, which the manifest's check refuses.
        let max_bytes =
            bytes_of(dtype, &declared_shape, &SymBindings { b: 1, t: 1, s: 1 }).unwrap_or(u64::MAX);
        Ok(Buffer {
            id: t.id,
            value: t.value,
            dtype,
            shape: t.shape.unwrap_or(declared_shape),
            kind: BufferKind::Param,
            storage: Storage::Param { name },
            max_bytes,
        })
    }
}
