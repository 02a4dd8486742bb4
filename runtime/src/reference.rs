//! The reference interpreter (`kiln_ir::interp`) as a [`generate::Engine`], so that generation runs
//! the same loop on the oracle as on compiled code: `kiln run --interp` and `kiln bench run` use it,
//! and tests compare compiled and interpreted continuations token for token.
//!
//! It holds named programs, each a graph (a forward graph, an artifact's prefill, a `score` graph)
//! over one set of parameters, and keeps the last run's outputs as the interpreter returns them
//! (whole tensors); it is exact, not fast. It keeps no state between runs: a prefill graph's KV
//! caches are fed empty, so it has no decode program, and generation recomputes the sequence at each
//! step.

use std::collections::HashMap;
use std::ops::Range;

use kiln_ir::interp::{self, Outputs, Tensor};
use kiln_ir::module::ProgramKind;
use kiln_ir::{DType, Graph};

use crate::generate::{self, Limits};
use crate::weights::{HostData, HostTensor};
use crate::RuntimeError;

/// Graphs with their parameters on the reference interpreter.
pub struct Reference {
    programs: Vec<RefProgram>,
    params: HashMap<String, Tensor>,
    max_positions: Option<u64>,
    last: Option<Outputs>,
}

/// One program of a [`Reference`].
struct RefProgram {
    name: String,
    kind: ProgramKind,
    graph: Graph,
    /// KV-cache inputs of a prefill graph (an artifact's prefill compiled with a KV cache): fed
    /// as empty caches of `S = T` slots, which is exact because a prefill's attention reads only
    /// its new tokens; their updated values are not used.
    caches: Vec<String>,
    /// The parameters this graph reads, when it reads fewer than the engine holds (the
    /// interpreter refuses parameters a graph does not declare): a score graph has no MTP module.
    own: Option<HashMap<String, Tensor>>,
}

/// `t` as an interpreter tensor.
pub fn to_tensor(t: HostTensor) -> Result<Tensor, RuntimeError> {
    let bad =
        |e: interp::TensorError| RuntimeError::InputValue { name: t.name.clone(), reason: e.to_string() };
    match t.data {
        HostData::F32(ref v) => Tensor::from_f32(t.dtype, t.shape.clone(), v.clone()).map_err(bad),
        HostData::I64(ref v) => Tensor::from_i64(t.dtype, t.shape.clone(), v.clone()).map_err(bad),
    }
}

impl Reference {
    /// `graph` as the program `forward` (a prefill graph serves as one: see [`RefProgram`]).
    /// `max_positions`: the model's `max_position_embeddings`, when known, bounds a sequence.
    pub fn new(
        graph: Graph,
        params: impl IntoIterator<Item = HostTensor>,
        max_positions: Option<u64>,
    ) -> Result<Reference, RuntimeError> {
        let params = params
            .into_iter()
            .map(|t| Ok((t.name.clone(), to_tensor(t)?)))
            .collect::<Result<_, RuntimeError>>()?;
        let mut r = Reference { programs: Vec::new(), params, max_positions, last: None };
        r.add_program("forward", ProgramKind::Forward, graph);
        Ok(r)
    }

    /// Adds (or replaces) program `name` of `kind`, over the same parameters.
    pub fn add_program(&mut self, name: &str, kind: ProgramKind, graph: Graph) {
        let caches = graph
            .nodes()
            .into_iter()
            .filter(|&n| matches!(graph.node(n).op, kiln_ir::Op::CacheUpdate))
            .filter_map(|n| {
                let cache = graph.node(n).inputs[0];
                graph.inputs().into_iter().find(|&(_, v)| v == cache).map(|(name, _)| name.to_string())
            })
            .collect();
        let declared: Vec<&str> = graph.params().into_iter().map(|(n, _)| n).collect();
        let own = (declared.len() < self.params.len()).then(|| {
            declared.iter().filter_map(|&n| Some((n.to_string(), self.params.get(n)?.clone()))).collect()
        });
        self.programs.retain(|p| p.name != name);
        self.programs.push(RefProgram { name: name.to_string(), kind, graph, caches, own });
    }

    fn program(&self, name: &str) -> Result<&RefProgram, RuntimeError> {
        self.programs.iter().find(|p| p.name == name).ok_or_else(|| RuntimeError::NoSuchProgram {
            name: name.to_string(),
            known: self.programs.iter().map(|p| format!("`{}`", p.name)).collect::<Vec<_>>().join(", "),
        })
    }

    /// The graph of program `name`.
    pub fn graph(&self, name: &str) -> Result<&Graph, RuntimeError> {
        Ok(&self.program(name)?.graph)
    }

    /// Runs program `name` and returns its outputs (also kept for
    /// [`generate::Engine::output_f32`]).
    pub fn run(&mut self, name: &str, inputs: &[HostTensor]) -> Result<&Outputs, RuntimeError> {
        let program = self.program(name)?;
        let mut feeds: HashMap<String, Tensor> = inputs
            .iter()
            .map(|t| Ok((t.name.clone(), to_tensor(t.clone())?)))
            .collect::<Result<_, RuntimeError>>()?;
        let bt = feeds.get("tokens").map(|t| t.shape().to_vec());
        for name in &program.caches {
            let (Some(bt), Some((_, v))) = (&bt, program.graph.inputs().into_iter().find(|(n, _)| n == name))
            else {
                continue;
            };
            let ty = program.graph.ty(v);
            let mut shape = bt.clone();
            shape.extend(ty.shape[2..].iter().map(|d| d.as_known().unwrap_or(1)));
            let n = shape.iter().product::<u64>() as usize;
            let zeros = Tensor::from_f32(ty.dtype, shape, vec![0.0; n])
                .map_err(|e| RuntimeError::InputValue { name: name.clone(), reason: e.to_string() })?;
            feeds.insert(name.clone(), zeros);
        }
        let out = interp::run(&program.graph, &feeds, program.own.as_ref().unwrap_or(&self.params));
        self.last = None;
        Ok(self.last.insert(out?))
    }
}

impl generate::Engine for Reference {
    fn programs(&self) -> Vec<(String, ProgramKind)> {
        self.programs.iter().map(|p| (p.name.clone(), p.kind)).collect()
    }

    fn inputs(&self, program: &str) -> Result<Vec<(String, DType)>, RuntimeError> {
        let p = self.program(program)?;
        Ok(p.graph
            .inputs()
            .into_iter()
            .filter(|(n, _)| !p.caches.iter().any(|c| c == n))
            .map(|(n, v)| (n.to_string(), p.graph.ty(v).dtype))
            .collect())
    }

    fn vocab_size(&self) -> Option<u64> {
        self.programs.iter().find_map(|p| {
            let (_, v) = p.graph.outputs().iter().find(|(n, _)| n == generate::LOGITS)?;
            p.graph.ty(*v).shape.last()?.as_known()
        })
    }

    fn limits(&self, _program: &str) -> Limits {
        Limits {
            max_batch: u64::MAX,
            max_tokens: self.max_positions.unwrap_or(u64::MAX),
            what: "the model's max_position_embeddings".into(),
        }
    }

    fn run(&mut self, program: &str, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        Reference::run(self, program, inputs).map(|_| ())
    }

    fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        let outputs = self.last.as_ref().ok_or(RuntimeError::NotRun)?;
        let t = outputs.get(name).ok_or_else(|| RuntimeError::NoSuchOutput {
            name: name.to_string(),
            known: outputs.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
        })?;
        let v = t.as_f32().ok_or(RuntimeError::OutputType { name: name.to_string(), dtype: t.dtype() })?;
        v.get(range.clone()).map(<[f32]>::to_vec).ok_or(RuntimeError::OutputRange {
            name: name.to_string(),
            len: v.len(),
            start: range.start,
            end: range.end,
        })
    }
}
