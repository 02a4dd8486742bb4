//! The executor as a [`generate::Engine`]: generation and scoring run the same loop on every
//! backend.

use std::ops::Range;

use kiln_ir::module::{ProgramKind, StateRole};
use kiln_ir::{DType, Sym};

use super::{Backend, Executor};
use crate::generate::{self, KvCache, Limits};
use crate::weights::HostTensor;
use crate::RuntimeError;

impl<B: Backend> generate::Engine for Executor<B> {
    fn programs(&self) -> Vec<(String, ProgramKind)> {
        Executor::programs(self).into_iter().map(|(n, k)| (n.to_string(), k)).collect()
    }

    fn inputs(&self, program: &str) -> Result<Vec<(String, DType)>, RuntimeError> {
        Executor::inputs(self, program)
    }

    fn vocab_size(&self) -> Option<u64> {
        self.manifest.programs.iter().find_map(|p| {
            let o = crate::inputs::caller_outputs(p).find(|o| o.name == generate::LOGITS)?;
            p.buffer(o.buffer).shape.last()?.as_known()
        })
    }

    fn limits(&self, program: &str) -> Limits {
        let Ok(li) = self.loaded(program) else {
            return Limits {
                max_batch: 0,
                max_tokens: 0,
                what: format!("the artifact (no program `{program}`)"),
            };
        };
        let (p, max) = (&self.manifest.programs[self.programs[li].index], self.programs[li].max);
        let used = |s: Sym| p.max(s).is_some();
        let mut limits = Limits {
            max_batch: if used(Sym::B) { max.b } else { 1 },
            max_tokens: if used(Sym::T) { max.t } else { 1 },
            what: format!("the artifact as loaded (T <= {}; kiln compile --max-context)", max.t),
        };
        if let Some(p) = self.manifest.model.as_ref().map(|m| m.model.max_position_embeddings) {
            if p < limits.max_tokens {
                limits =
                    Limits { max_tokens: p, what: "the model's max_position_embeddings".into(), ..limits };
            }
        }
        limits
    }

    fn run(&mut self, program: &str, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        Executor::run(self, program, inputs).map(|_| ())
    }

    fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        Executor::output_f32(self, name, range)
    }

    fn output_len(&self, name: &str) -> Result<usize, RuntimeError> {
        Executor::output_len(self, name)
    }

    fn kv_cache(&self) -> Option<KvCache> {
        let has = |k| self.manifest.program_of_kind(k).is_some();
        if !(has(ProgramKind::Prefill) && has(ProgramKind::Decode)) {
            return None;
        }
        Some(KvCache { capacity: self.max.s, bytes: self.state_bytes(StateRole::KvCache) })
    }
}
