//! Checking a run's inputs before anything is copied to the device: each input once, by name, with
//! its buffer's dtype and rank; the sizes `B`, `T`, `S` bound from the inputs' shapes (a dimension
//! that is exactly a symbol binds it; every binding must agree), within the maxima the model was
//! loaded for; then every shape at those sizes; then every token id against the vocabulary it
//! indexes (the kernels clamp ids, so a bad one would silently read another row); with a KV cache,
//! every position against the cache's capacity.
//!
//! The executor (`exec::Executor::run`) calls them for every backend: they are written over a
//! program of the manifest and the loaded maxima only. Inputs held in a state (a KV cache,
//! [`Storage::State`]) are the runtime's, not the caller's: they are not asked for, and giving one
//! is an unknown input; outputs held in a state update it and are not the caller's to read. What an
//! input indexes is typed data of the program ([`Program::index_inputs`]), never a name.

use std::collections::{HashMap, HashSet};

use kiln_ir::artifact::{BufferId, Indexes, NamedBuffer, Program, Storage};
use kiln_ir::{DType, Dim, Sym, SymBindings, TensorType};

use crate::weights::{HostData, HostTensor};
use crate::RuntimeError;

fn ty_text(dtype: DType, shape: &[Dim]) -> String {
    TensorType::new(dtype, shape.iter().copied()).to_string()
}

pub(crate) fn shape_text(dtype: DType, shape: &[u64]) -> String {
    TensorType::known(dtype, shape).to_string()
}

/// The inputs the caller gives: every input of the program but the states.
pub(crate) fn caller_inputs(p: &Program) -> impl Iterator<Item = &NamedBuffer> {
    p.inputs.iter().filter(|i| !matches!(p.buffer(i.buffer).storage, Storage::State { .. }))
}

/// The outputs the caller reads: every output of the program but the states it updates.
pub(crate) fn caller_outputs(p: &Program) -> impl Iterator<Item = &NamedBuffer> {
    p.outputs.iter().filter(|o| !matches!(p.buffer(o.buffer).storage, Storage::State { .. }))
}

/// What a caller input may hold: values in `0..limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexLimit {
    pub limit: u64,
    /// The limit as the program declares it: [`Indexes::Along`]'s is evaluated at the run's sizes.
    pub dim: kiln_ir::Dim,
    pub indexes: Indexes,
    /// A value allowed besides `0..limit` (a loss's `ignore_index`).
    pub ignore: Option<i64>,
}

/// The program's index inputs with their limits at the loaded maxima `max`.
pub(crate) fn index_limits(p: &Program, max: &SymBindings) -> HashMap<String, IndexLimit> {
    let mut out: HashMap<String, IndexLimit> = HashMap::new();
    for t in &p.index_inputs {
        let limit = t.limit.eval(max).unwrap_or(0);
        let e = out.entry(t.input.clone()).or_insert(IndexLimit {
            limit,
            dim: t.limit,
            indexes: t.indexes,
            ignore: t.ignore,
        });
        e.limit = e.limit.min(limit);
        if e.ignore != t.ignore {
            e.ignore = None;
        }
    }
    out
}

/// The buffer of the caller's input `name`, or the error that lists the inputs there are.
pub(crate) fn input_buffer(m: &Program, name: &str) -> Result<BufferId, RuntimeError> {
    caller_inputs(m).find(|i| i.name == name).map(|i| i.buffer).ok_or_else(|| RuntimeError::UnknownInput {
        name: name.to_string(),
        known: caller_inputs(m).map(|i| format!("`{}`", i.name)).collect::<Vec<_>>().join(", "),
    })
}

/// Checks `inputs` against program `m` and returns the sizes they bind; see the module
/// documentation. When the program reads a state laid out over `S` (`sized_state`), `S` is the
/// state's capacity, `max.s`, whatever the inputs say.
pub(crate) fn check(
    m: &Program,
    max: &SymBindings,
    sized_state: bool,
    index_inputs: &HashMap<String, IndexLimit>,
    inputs: &[HostTensor],
) -> Result<SymBindings, RuntimeError> {
    let mut seen = HashSet::new();
    for t in inputs {
        input_buffer(m, &t.name)?;
        if !seen.insert(t.name.as_str()) {
            return Err(RuntimeError::DuplicateInput { name: t.name.clone() });
        }
    }
    let mut bound: [Option<(u64, String)>; 3] = Default::default();
    if sized_state {
        // States are laid out for their capacity: S is the loaded maximum, always.
        bound[Sym::S as usize] = Some((max.s, "the KV cache's capacity".into()));
    }
    for i in caller_inputs(m) {
        let t = inputs
            .iter()
            .find(|t| t.name == i.name)
            .ok_or_else(|| RuntimeError::MissingInput { name: i.name.clone() })?;
        let b = m.buffer(i.buffer);
        let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if t.dtype != b.dtype || t.shape.len() != b.shape.len() || numel != Some(t.data.len() as u64) {
            return Err(RuntimeError::InputType {
                name: t.name.clone(),
                expected: ty_text(b.dtype, &b.shape),
                found: shape_text(t.dtype, &t.shape),
            });
        }
        for (axis, (&d, &found)) in b.shape.iter().zip(&t.shape).enumerate() {
            let Some(sym) = Sym::ALL.into_iter().find(|&s| d == Dim::sym(s)) else { continue };
            match &bound[sym as usize] {
                Some((v, by)) if *v != found => {
                    return Err(RuntimeError::SizeConflict {
                        name: t.name.clone(),
                        axis,
                        found,
                        sym: sym.name(),
                        bound: *v,
                        bound_by: by.clone(),
                    })
                }
                Some(_) => {}
                None => bound[sym as usize] = Some((found, format!("input `{}` dimension {axis}", t.name))),
            }
        }
    }
    let mut sizes = SymBindings { b: 1, t: 1, s: 1 };
    for sym in Sym::ALL {
        if m.max(sym).is_none() {
            continue;
        }
        let Some((v, _)) = &bound[sym as usize] else {
            return Err(RuntimeError::UnboundSize { sym: sym.name() });
        };
        if *v == 0 || *v > max.get(sym) {
            return Err(RuntimeError::Size {
                sym: sym.name(),
                value: *v,
                max: max.get(sym),
                why: "the sizes this model was loaded for",
            });
        }
        match sym {
            Sym::B => sizes.b = *v,
            Sym::T => sizes.t = *v,
            Sym::S => sizes.s = *v,
        }
    }
    for i in caller_inputs(m) {
        let Some(t) = inputs.iter().find(|t| t.name == i.name) else { continue };
        let b = m.buffer(i.buffer);
        let want: Option<Vec<u64>> = b.shape.iter().map(|d| d.eval(&sizes)).collect();
        if want.as_deref() != Some(t.shape.as_slice()) {
            return Err(RuntimeError::InputType {
                name: t.name.clone(),
                expected: format!(
                    "{} = {}",
                    ty_text(b.dtype, &b.shape),
                    shape_text(b.dtype, &want.unwrap_or_default())
                ),
                found: shape_text(t.dtype, &t.shape),
            });
        }
        let (Some(limit), HostData::I64(ids)) = (index_inputs.get(&i.name), &t.data) else { continue };
        // A `take_along`'s axis at this run's sizes (a prefill's `T`), not the loaded maxima.
        let bound = match limit.indexes {
            Indexes::Along => limit.dim.eval(&sizes).unwrap_or(limit.limit).min(limit.limit),
            _ => limit.limit,
        };
        let outside = |x: i64| (x < 0 || x as u64 >= bound) && Some(x) != limit.ignore;
        let Some((index, &value)) = ids.iter().enumerate().find(|&(_, &x)| outside(x)) else {
            continue;
        };
        return Err(match limit.indexes {
            // A position indexes the KV cache, where a kernel writes the token's keys and values:
            // one outside it would write outside the cache's memory.
            Indexes::CacheSlots => RuntimeError::PositionOutOfRange {
                sequence: index / t.shape.last().copied().unwrap_or(1).max(1) as usize,
                position: value,
                capacity: limit.limit,
            },
            Indexes::Vocabulary | Indexes::Classes => {
                RuntimeError::TokenOutOfRange { name: t.name.clone(), index, value, vocab: limit.limit }
            }
            Indexes::Along => {
                RuntimeError::AlongOutOfRange { name: t.name.clone(), index, value, limit: bound }
            }
        });
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens and positions `[B, T]` and a KV cache `[B, S, 2]` held in state, as a decode program
    /// declares them.
    fn program() -> Program {
        let buffer = |id: u32,
                      value: &str,
                      dtype: &str,
                      shape: &str,
                      kind: &str,
                      storage: &str,
                      bytes: u64| {
            format!(
                r#"{{"id": {id}, "value": "{value}", "dtype": "{dtype}", "shape": {shape}, "kind": "{kind}",
                    "storage": {storage}, "max_bytes": {bytes}}}"#
            )
        };
        let buffers = [
            buffer(0, "%0", "i32", r#"["B", "T"]"#, "input", r#"{"in": "arena", "offset": 0}"#, 64),
            buffer(1, "%1", "i32", r#"["B", "T"]"#, "input", r#"{"in": "arena", "offset": 256}"#, 64),
            buffer(2, "%2", "f32", r#"["B", "S", "2"]"#, "input", r#"{"in": "state", "name": "kv"}"#, 512),
        ]
        .join(",");
        let json = format!(
            r#"{{"name": "decode", "kind": "decode", "symbols": [{{"sym": "B", "max": 2}},
                {{"sym": "T", "max": 8}}, {{"sym": "S", "max": 32}}], "steps": [], "buffers": [{buffers}],
                "arena_bytes": 512,
                "inputs": [{{"name": "tokens", "buffer": 0}}, {{"name": "positions", "buffer": 1}},
                           {{"name": "kv", "buffer": 2}}],
                "outputs": [],
                "index_inputs": [{{"input": "tokens", "limit": "100", "indexes": "vocabulary"}},
                                 {{"input": "positions", "limit": "S", "indexes": "cache_slots"}}]}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    fn ids(name: &str, t: u64, v: Vec<i64>) -> HostTensor {
        HostTensor { name: name.into(), dtype: DType::I32, shape: vec![1, t], data: HostData::I64(v) }
    }

    #[test]
    fn sizes_come_from_the_inputs_and_the_cache_pins_s() {
        let m = program();
        let max = SymBindings { b: 2, t: 8, s: 16 };
        let limits = index_limits(&m, &max);
        assert_eq!(limits["positions"].limit, 16, "positions index the cache as loaded");
        let run = |inputs: &[HostTensor]| check(&m, &max, true, &limits, inputs);
        let sizes = run(&[ids("tokens", 3, vec![1, 2, 3]), ids("positions", 3, vec![4, 5, 15])]).unwrap();
        assert_eq!(sizes, SymBindings { b: 1, t: 3, s: 16 }, "S is the loaded capacity");
        assert_eq!(caller_inputs(&m).map(|i| i.name.as_str()).collect::<Vec<_>>(), ["tokens", "positions"]);

        let e = run(&[ids("tokens", 2, vec![1, 2]), ids("positions", 2, vec![3, 16])]).unwrap_err();
        assert_eq!(e.to_string(), "position 16 of sequence 0 is outside the KV cache of 16 slots");
        let e = run(&[ids("tokens", 1, vec![100]), ids("positions", 1, vec![0])]).unwrap_err();
        assert!(matches!(e, RuntimeError::TokenOutOfRange { value: 100, vocab: 100, .. }), "{e}");
        let e = run(&[ids("tokens", 1, vec![1])]).unwrap_err();
        assert_eq!(e.to_string(), "input `positions` was not given");
        let kv = HostTensor {
            name: "kv".into(),
            dtype: DType::F32,
            shape: vec![1, 16, 2],
            data: HostData::F32(vec![0.0; 32]),
        };
        let e = run(&[ids("tokens", 1, vec![1]), ids("positions", 1, vec![0]), kv]).unwrap_err();
        assert_eq!(e.to_string(), "`kv` is not an input of the artifact (its inputs: `tokens`, `positions`)");
        let e = run(&[ids("tokens", 9, vec![1; 9]), ids("positions", 9, vec![0; 9])]).unwrap_err();
        assert!(e.to_string().starts_with("T = 9 is outside 1..=8"), "{e}");
        let e = run(&[ids("tokens", 2, vec![1, 2]), ids("positions", 3, vec![0, 1, 2])]).unwrap_err();
        assert!(matches!(e, RuntimeError::SizeConflict { .. }), "{e}");
    }
}
