//! [`Manifest::validate`]: everything a runtime relies on, checked before anything runs. The manifest
//! is the one file of an artifact that describes memory (offsets, extents, which kernel runs on
//! which buffers), so a runtime treats an unchecked manifest like unchecked code.
//!
//! The invariants, each reported with the manifest field that breaks it
//! (`programs[1].buffers[7].storage.offset`):
//!
//! - the format version is this crate's;
//! - kernel, buffer and program ids equal their positions; kernel and program names are unique;
//! - every kernel has an entry for each compiled target and none for another; a CPU entry's symbol
//!   is the kernel's own packed entry (`{name}_packed`), never another symbol of the process;
//! - symbols are distinct, in `B, T, S` order, with maxima of at least 1, and cover every size a
//!   program's buffers use;
//! - every buffer's `max_bytes` is its size at the program's maxima, and its storage holds it:
//!   an arena buffer lies inside the arena at an aligned offset; a parameter buffer (or a view of
//!   one) has the parameter's dtype and size; a state buffer (or a view) the state's; a constant is a constant;
//! - every launch names a kernel and passes buffers of exactly its argument types, a parameter for
//!   each weight, a fresh scratch buffer for each scratch argument, and never writes a parameter or
//!   a constant; an alias has its source's dtype, size and storage;
//! - no two arena buffers that are live at the same step overlap (lifetimes as `plan-memory` makes
//!   them: from the defining step, inputs from the start, to the last reader, outputs to the end);
//! - inputs and outputs name buffers of the right kind once each; index inputs name caller inputs
//!   of integer type and limits of at least 1; MoE dispatches name launches and `i32[experts + 1]`
//!   buffers they write;
//! - files are listed once, with well-formed hashes, and each compiled target's file among them;
//! - a parallel plan, when there is one ([`ParallelPlan`]), describes this manifest's model: at least
//!   one pipeline and one expert-parallel rank; instruction lists of the plan's schedule, ranks and
//!   micro-batches that pass the schedule verifier ([`crate::schedule::verify()`]); one stage per
//!   position of a lane, in order, the first holding the embedding, the last the head, and together
//!   every decoder layer once in order, none empty, with at most as many weight FLOPs as FLOPs;
//!   per rank, the stages the lanes put on its chunks and the sum of their weights; finite,
//!   non-negative simulated times; and for a MoE model (only for one) the model's experts, top-k and
//!   groups (one, kept, with plain greedy routing, as the router has none), `ep` dividing the experts, rank `r` holding experts `r·n .. (r+1)·n` of
//!   `n = experts / ep`, groups of whole ranks exactly when `ep` is a multiple of the groups, and
//!   every MoE layer of the model (the main model's, then the MTP modules') once, in order, on the
//!   stage that holds it, its dispatch for the plan's tokens and the model's width with
//!   `tokens · top_k` rows, two exchanges (dispatch, combine) exactly when `ep > 1`, each with
//!   bytes that are its rows times a row's bytes.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::BTreeMap;

use super::*;

/// A manifest that cannot be run as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest format version {found} is not supported (this kiln reads version {supported}); recompile the artifact with this kiln (`kiln compile`)")]
    Version { found: u32, supported: u32 },
    /// A field whose value does not hold together with the rest; `field` is its path in the JSON.
    #[error("manifest field `{field}`: {message}")]
    Field { field: String, message: String },
    #[error("{sym} = {value} is outside the sizes the artifact was compiled for (1..={max})")]
    SizeOutOfRange { sym: &'static str, value: u64, max: u64 },
}

/// Elements of a shape, as a dimension (`None` on overflow).
fn numel(shape: &[Dim]) -> Option<Dim> {
    shape.iter().try_fold(Dim::known(1), |acc, &d| acc.checked_mul(d))
}

fn bad<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError::Field { field: field.into(), message: message.into() })
}

impl Manifest {
    /// Checks every invariant of the module documentation of `check.rs`.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format_version != FORMAT_VERSION {
            return Err(ManifestError::Version { found: self.format_version, supported: FORMAT_VERSION });
        }
        self.check_kernels()?;
        let mut names = HashSet::default();
        for p in &self.params {
            if !names.insert(p.name.as_str()) {
                return bad("params", format!("parameter `{}` is listed twice", p.name));
            }
        }
        for (i, s) in self.states.iter().enumerate() {
            if !names.insert(s.name.as_str()) {
                return bad(
                    format!("states[{i}].name"),
                    format!("`{}` is listed twice, or is also a parameter", s.name),
                );
            }
            if s.shape.iter().any(|d| d.checked_div(Dim::sym(Sym::T)).is_some()) {
                return bad(format!("states[{i}].shape"), "a state's shape may use B and S, not T");
            }
        }
        let mut programs = HashSet::default();
        for (i, p) in self.programs.iter().enumerate() {
            if !programs.insert(p.name.as_str()) || p.name.is_empty() {
                return bad(
                    format!("programs[{i}].name"),
                    format!("`{}` is empty or names two programs", p.name),
                );
            }
            self.check_program(i, p)?;
        }
        if self.programs.is_empty() {
            return bad("programs", "an artifact has at least one program");
        }
        let mut files = HashSet::default();
        for (i, f) in self.files.iter().enumerate() {
            if !files.insert(f.name.as_str()) || f.name.contains('/') || f.name == MANIFEST_FILE {
                return bad(
                    format!("files[{i}].name"),
                    format!("`{}` is listed twice or is not a plain file name", f.name),
                );
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                return bad(
                    format!("files[{i}].sha256"),
                    format!("`{}` is not 64 lowercase hex digits", f.sha256),
                );
            }
        }
        for (field, target, file) in [
            ("cpu.library", self.cpu.as_ref().map(|c| &c.library), KERNELS_SO),
            ("gpu.module", self.gpu.as_ref().map(|g| &g.module), KERNELS_PTX),
        ] {
            if target.is_some_and(|name| name != file || !files.contains(file)) {
                return bad(field, format!("a compiled target's file must be `{file}`, listed in `files`"));
            }
        }
        if let Some(plan) = &self.parallel {
            self.check_parallel(plan)?;
        }
        Ok(())
    }

    fn check_parallel(&self, plan: &ParallelPlan) -> Result<(), ManifestError> {
        let Some(model) = &self.model else {
            return bad(
                "parallel",
                "a parallel plan cuts a model into stages, and this artifact has no `model`",
            );
        };
        if plan.pp == 0 || plan.ep == 0 {
            return bad(
                "parallel.pp",
                format!("pp = {} and ep = {}: both must be at least 1", plan.pp, plan.ep),
            );
        }
        if plan.seq_len == 0 || plan.tokens == 0 {
            return bad(
                "parallel.tokens",
                format!("seq_len = {} and tokens = {}: both must be at least 1", plan.seq_len, plan.tokens),
            );
        }
        let lists = &plan.lists;
        if (lists.name.as_str(), lists.pp, lists.micro_batches)
            != (plan.schedule.as_str(), plan.pp, plan.micro_batches)
        {
            return bad(
                "parallel.lists",
                format!(
                    "the lists are `{}` on {} ranks with {} micro-batches, but the plan says `{}` on {} with {}",
                    lists.name, lists.pp, lists.micro_batches, plan.schedule, plan.pp, plan.micro_batches
                ),
            );
        }
        crate::schedule::verify(lists)
            .map_err(|e| ManifestError::Field { field: "parallel.lists".into(), message: e.to_string() })?;
        self.check_stages(plan, model.model.num_hidden_layers)?;
        check_ranks(plan)?;
        for (field, value) in [("makespan", plan.makespan), ("bubble", plan.bubble)] {
            if !value.is_finite() || value < 0.0 {
                return bad(
                    format!("parallel.{field}"),
                    format!("{value} is not a time (finite, at least 0)"),
                );
            }
        }
        match (&model.moe, &plan.experts) {
            (None, None) if plan.ep == 1 => Ok(()),
            (None, None) => bad(
                "parallel.ep",
                format!("ep = {}, but a model without MoE has no experts to spread: ep must be 1", plan.ep),
            ),
            (None, Some(_)) => {
                bad("parallel.experts", "the model has no MoE layers, so the plan has no experts")
            }
            (Some(_), None) => bad(
                "parallel.experts",
                "missing: the model has MoE layers, whose experts the plan must place",
            ),
            (Some(_), Some(x)) => check_experts(model, plan, x),
        }
    }

    fn check_stages(&self, plan: &ParallelPlan, layers: u64) -> Result<(), ManifestError> {
        let n = plan.lists.stages();
        if plan.stages.len() != n {
            return bad(
                "parallel.stages",
                format!(
                    "{} stages, but the lists' lanes have {n}: one stage per position",
                    plan.stages.len()
                ),
            );
        }
        let mut next = 0u64;
        for (i, st) in plan.stages.iter().enumerate() {
            let field = |f: &str| format!("parallel.stages[{i}].{f}");
            if st.stage as usize != i {
                return bad(field("stage"), format!("stage {i} has number {}", st.stage));
            }
            if st.embedding != (i == 0) || st.head != (i + 1 == n) {
                return bad(
                    field("head"),
                    "the first stage, and only it, holds the embedding; the last, and only it, the head",
                );
            }
            if st.layers.start != next || st.layers.end < st.layers.start || st.layers.end > layers {
                return bad(
                    field("layers"),
                    format!(
                        "{}..{}: the stages hold the layers 0..{layers} in order, each once, so this one starts at {next}",
                        st.layers.start, st.layers.end
                    ),
                );
            }
            if !st.embedding && !st.head && st.layers.is_empty() {
                return bad(field("layers"), "the stage holds nothing");
            }
            if st.weight_flops > st.forward_flops {
                return bad(
                    field("weight_flops"),
                    format!("{} weight FLOPs of {} FLOPs in all", st.weight_flops, st.forward_flops),
                );
            }
            next = st.layers.end;
        }
        if next != layers {
            return bad(
                "parallel.stages",
                format!("the stages hold layers 0..{next}, not every layer 0..{layers}"),
            );
        }
        Ok(())
    }

    fn check_kernels(&self) -> Result<(), ManifestError> {
        let mut names = HashSet::default();
        for (i, k) in self.kernels.iter().enumerate() {
            let field = |f: &str| format!("kernels[{i}].{f}");
            if k.id.index() != i {
                return bad(field("id"), format!("kernel {i} has id {}", k.id));
            }
            if !names.insert(k.name.as_str())
                || !k.name.starts_with("k_")
                || !k.name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
            {
                return bad(
                    field("name"),
                    format!("`{}` is not a distinct kernel name `k_[a-z0-9_]+`", k.name),
                );
            }
            if k.cpu.is_some() != self.cpu.is_some() || k.gpu.is_some() != self.gpu.is_some() {
                return bad(
                    field("cpu"),
                    "the kernel lacks an entry for a compiled target, or has one for another",
                );
            }
            if let Some(cpu) = &k.cpu {
                let own = format!("{}{PACKED_SUFFIX}", k.name);
                if cpu.symbol != own {
                    return bad(
                        field("cpu.symbol"),
                        format!(
                            "`{}` is not the packed entry of kernel `{}`, which is `{own}`",
                            cpu.symbol, k.name
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn check_program(&self, pi: usize, p: &Program) -> Result<(), ManifestError> {
        let at = |f: String| format!("programs[{pi}].{f}");
        let max = p.max_sizes();
        p.check_symbols().map_err(|m| ManifestError::Field { field: at("symbols".into()), message: m })?;
        let params: HashMap<&str, &ParamEntry> = self.params.iter().map(|e| (e.name.as_str(), e)).collect();
        let states: HashMap<&str, &StateEntry> = self.states.iter().map(|e| (e.name.as_str(), e)).collect();
        for (i, b) in p.buffers.iter().enumerate() {
            let field = |f: &str| at(format!("buffers[{i}].{f}"));
            if b.id.index() != i {
                return bad(field("id"), format!("buffer {i} has id {}", b.id));
            }
            let bytes = b.bytes(&max);
            if bytes != Some(b.max_bytes) {
                let gives = bytes.map_or("more than 2^64".to_string(), |n| n.to_string());
                return bad(
                    field("max_bytes"),
                    format!(
                        "{} ({}) has max_bytes {}, but its type gives {gives} bytes at the program's maxima \
                         ({}); the manifest was edited: recompile it",
                        b.id,
                        b.value,
                        b.max_bytes,
                        p.symbols_text()
                    ),
                );
            }
            match &b.storage {
                Storage::Arena { offset } => {
                    let end = offset.checked_add(b.max_bytes);
                    if offset % ARENA_ALIGN != 0 || end.is_none_or(|e| e > p.arena_bytes) {
                        return bad(
                            field("storage.offset"),
                            format!(
                                "{} ({}) at {offset}..{} does not lie inside the arena of {} bytes at an offset aligned to {ARENA_ALIGN}",
                                b.id,
                                b.value,
                                offset.saturating_add(b.max_bytes),
                                p.arena_bytes
                            ),
                        );
                    }
                    if matches!(b.kind, BufferKind::Param | BufferKind::Constant) {
                        return bad(
                            field("storage"),
                            format!("a {} buffer is not in the arena", b.kind.name()),
                        );
                    }
                }
                Storage::Param { name } => {
                    let Some(e) = params.get(name.as_str()) else {
                        return bad(
                            field("storage.name"),
                            format!("`{name}` is not a parameter of the manifest"),
                        );
                    };
                    // A view of a parameter (a reshape) has its dtype and size, not its shape.
                    if b.kind != BufferKind::Param || e.dtype != b.dtype || numel(&e.shape) != numel(&b.shape)
                    {
                        return bad(
                            field("storage"),
                            format!(
                                "{} ({}) is not of parameter `{name}`'s kind, dtype and size",
                                b.id, b.value
                            ),
                        );
                    }
                }
                Storage::Constant { .. } => {
                    if b.kind != BufferKind::Constant {
                        return bad(
                            field("storage"),
                            format!("{} ({}) of kind {} is not a constant", b.id, b.value, b.kind.name()),
                        );
                    }
                }
                Storage::State { name } => {
                    let Some(e) = states.get(name.as_str()) else {
                        return bad(
                            field("storage.name"),
                            format!("`{name}` is not a state of the manifest"),
                        );
                    };
                    if !matches!(b.kind, BufferKind::Input | BufferKind::Output | BufferKind::Activation)
                        || e.dtype != b.dtype
                        || numel(&e.shape) != numel(&b.shape)
                    {
                        return bad(
                            field("storage"),
                            format!("{} ({}) does not have state `{name}`'s dtype and size", b.id, b.value),
                        );
                    }
                }
            }
        }
        for (i, step) in p.steps.iter().enumerate() {
            self.check_step(p, step)
                .map_err(|m| ManifestError::Field { field: at(format!("steps[{i}]")), message: m })?;
        }
        for (what, list) in [("inputs", &p.inputs), ("outputs", &p.outputs)] {
            let mut names = HashSet::default();
            for (i, n) in list.iter().enumerate() {
                let field = at(format!("{what}[{i}]"));
                let Some(b) = p.buffers.get(n.buffer.index()) else {
                    return bad(field, format!("{} does not exist", n.buffer));
                };
                if !names.insert(n.name.as_str()) {
                    return bad(field, format!("`{}` is listed twice", n.name));
                }
                if what == "inputs" && b.kind != BufferKind::Input {
                    return bad(field, format!("`{}` names {}, which is not an input buffer", n.name, b.id));
                }
                if let Storage::State { name } = &b.storage {
                    if name != &n.name {
                        return bad(field, format!("`{}` is stored in state `{name}`; a state is read and updated under its own name", n.name));
                    }
                }
            }
        }
        for (i, t) in p.index_inputs.iter().enumerate() {
            let field = at(format!("index_inputs[{i}]"));
            let input = p.inputs.iter().find(|n| n.name == t.input).map(|n| p.buffer(n.buffer));
            let limit = t.limit.eval(&max).unwrap_or(0);
            if !input.is_some_and(|b| !b.dtype.is_float() && matches!(b.storage, Storage::Arena { .. }))
                || limit == 0
            {
                return bad(
                    field,
                    format!("`{}` is not a caller input of integer type with a limit of at least 1", t.input),
                );
            }
        }
        for (i, d) in p.moe_dispatches.iter().enumerate() {
            let field = at(format!("moe_dispatches[{i}]"));
            let writes = match p.steps.get(d.step) {
                Some(Step::Launch { kernel, buffers, .. }) => self.kernels[kernel.index()]
                    .args
                    .iter()
                    .zip(buffers)
                    .any(|(a, &b)| a.role == ArgRole::Output && b == d.offsets),
                _ => false,
            };
            let ok_type = p.buffers.get(d.offsets.index()).is_some_and(|b| {
                b.dtype == DType::I32
                    && b.shape.len() == 1
                    && b.shape[0].as_known() == d.experts.checked_add(1)
            });
            if !writes || !ok_type || d.top_k == 0 {
                return bad(
                    field,
                    format!(
                        "step {} is not a launch that writes {} as i32[{} + 1]",
                        d.step, d.offsets, d.experts
                    ),
                );
            }
        }
        check_lifetimes(p).map_err(|(field, message)| ManifestError::Field { field: at(field), message })
    }

    /// One step; the message says what is wrong (the caller adds the field).
    fn check_step(&self, p: &Program, step: &Step) -> Result<(), String> {
        let buffer = |b: BufferId| p.buffers.get(b.index()).ok_or_else(|| format!("{b} does not exist"));
        match step {
            Step::Launch { kernel, buffers, .. } => {
                let Some(k) = self.kernels.get(kernel.index()) else {
                    return Err(format!("a launch names {kernel}, which does not exist"));
                };
                if k.sym_args.iter().any(|&s| p.max(s).is_none()) {
                    return Err(format!("kernel {} takes a size the program does not use", k.id));
                }
                if buffers.len() != k.args.len() {
                    return Err(format!(
                        "a launch of {kernel} passes {} buffers for {} arguments",
                        buffers.len(),
                        k.args.len()
                    ));
                }
                for (&b, arg) in buffers.iter().zip(&k.args) {
                    let buf = buffer(b)?;
                    if buf.dtype != arg.dtype || buf.shape != arg.shape {
                        return Err(format!(
                            "a launch of {kernel} passes {b} ({}) where the kernel takes another type",
                            buf.value
                        ));
                    }
                    if arg.role == ArgRole::Param && buf.kind != BufferKind::Param {
                        return Err(format!(
                            "a launch of {kernel} passes {b} as a weight, but it is not a parameter"
                        ));
                    }
                    if arg.role == ArgRole::Output
                        && matches!(buf.storage, Storage::Param { .. } | Storage::Constant { .. })
                    {
                        return Err(format!(
                            "a launch of {kernel} writes {b} ({}), a parameter or constant",
                            buf.value
                        ));
                    }
                    if (arg.role == ArgRole::Scratch) != (buf.kind == BufferKind::Scratch) {
                        return Err(format!(
                            "a launch of {kernel} passes {b} ({}), of kind {}, for an argument of role {}",
                            buf.value,
                            buf.kind.name(),
                            arg.role.name()
                        ));
                    }
                }
            }
            Step::Alias { buffer: b, source } => {
                let (b, s) = (buffer(*b)?, buffer(*source)?);
                if b.dtype != s.dtype || numel(&b.shape) != numel(&s.shape) || b.storage != s.storage {
                    return Err(format!("alias {} of {} differs in dtype, size or storage", b.id, s.id));
                }
            }
            Step::Send { buffer: b, .. } | Step::Recv { buffer: b, .. } => {
                buffer(*b)?;
            }
            Step::AllReduce { buffer: b, source, group } => {
                let (b, s) = (buffer(*b)?, buffer(*source)?);
                if b.dtype != DType::F32 || s.dtype != DType::F32 || b.shape != s.shape {
                    return Err(format!(
                        "all-reduce over `{group}` of {} into {}: both must be f32 of one shape",
                        s.id, b.id
                    ));
                }
                if matches!(b.storage, Storage::Param { .. } | Storage::Constant { .. }) {
                    return Err(format!(
                        "all-reduce over `{group}` writes {}, a parameter or constant",
                        b.id
                    ));
                }
            }
            Step::AllGather { buffer: b, source, group, size } => {
                let (b, s) = (buffer(*b)?, buffer(*source)?);
                let stacked = b.shape.first() == Some(&Dim::known(*size)) && b.shape[1..] == s.shape[..];
                if b.dtype != DType::F32 || s.dtype != DType::F32 || !stacked || *size == 0 {
                    return Err(format!(
                        "all-gather over `{group}` of {} into {}: f32 [{size}, ..] from f32 [..]",
                        s.id, b.id
                    ));
                }
                if matches!(b.storage, Storage::Param { .. } | Storage::Constant { .. }) {
                    return Err(format!(
                        "all-gather over `{group}` writes {}, a parameter or constant",
                        b.id
                    ));
                }
            }
            Step::AllToAll { buffer: b, source, keep, group, size } => {
                let (b, s) = (buffer(*b)?, buffer(*source)?);
                let blocks = s.shape.first() == Some(&Dim::known(*size)) && b.shape == s.shape;
                let rows = match keep {
                    None => true,
                    Some(k) => {
                        let k = buffer(*k)?;
                        k.dtype == DType::F32 && !k.shape.is_empty() && s.shape.starts_with(&k.shape)
                    }
                };
                if b.dtype != DType::F32 || s.dtype != DType::F32 || !blocks || !rows || *size == 0 {
                    return Err(format!(
                        "all-to-all over `{group}` of {} into {}: both f32 [{size}, ..] of one shape, \
                         with f32 row flags whose shape is a prefix of it",
                        s.id, b.id
                    ));
                }
                if matches!(b.storage, Storage::Param { .. } | Storage::Constant { .. }) {
                    return Err(format!(
                        "all-to-all over `{group}` writes {}, a parameter or constant",
                        b.id
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Program {
    /// The symbols and their maxima as a message shows them: `B <= 1, T <= 4096`.
    fn symbols_text(&self) -> String {
        let each: Vec<String> =
            self.symbols.iter().map(|e| format!("{} <= {}", e.sym.name(), e.max)).collect();
        if each.is_empty() {
            "no symbols".into()
        } else {
            each.join(", ")
        }
    }

    fn check_symbols(&self) -> Result<(), String> {
        let mut seen = HashSet::default();
        let mut last = None;
        for e in &self.symbols {
            if !seen.insert(e.sym) || last.is_some_and(|l| l > e.sym) || e.max == 0 {
                return Err(format!(
                    "symbols must be distinct, in B, T, S order, with maxima of at least 1, not {}",
                    self.symbols_text()
                ));
            }
            last = Some(e.sym);
        }
        let used = |s: Sym| {
            self.buffers.iter().any(|b| b.shape.iter().any(|d| d.checked_div(Dim::sym(s)).is_some()))
        };
        if let Some(s) = Sym::ALL.into_iter().find(|&s| used(s) && !seen.contains(&s)) {
            return Err(format!("buffers use {} but it has no maximum", s.name()));
        }
        Ok(())
    }
}

/// No two arena buffers live at the same step share a byte. Lifetimes are closed intervals of steps,
/// as `plan-memory` makes them: a buffer is live from the step that defines it (an input from step
/// 0) to the last step that reads it or an alias of it (an output to the end); a scratch buffer at
/// its launch only. An alias shares its source's storage and lifetime. Errors name the later
/// buffer's offset field.
fn check_lifetimes(p: &Program) -> Result<(), (String, String)> {
    let n = p.buffers.len();
    let mut root: Vec<usize> = (0..n).collect();
    let end = p.steps.len();
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    let touch = |root: &[usize], b: BufferId, step: usize, first: &mut [usize], last: &mut [usize]| {
        let r = root[b.index()];
        first[r] = first[r].min(step);
        last[r] = last[r].max(step);
    };
    for nb in &p.inputs {
        touch(&root, nb.buffer, 0, &mut first, &mut last);
    }
    for (i, s) in p.steps.iter().enumerate() {
        match s {
            Step::Alias { buffer, source } => {
                root[buffer.index()] = root[source.index()];
                touch(&root, *source, i, &mut first, &mut last);
            }
            Step::Launch { buffers, .. } => {
                for &b in buffers {
                    touch(&root, b, i, &mut first, &mut last);
                }
            }
            Step::Send { buffer, .. } | Step::Recv { buffer, .. } => {
                touch(&root, *buffer, i, &mut first, &mut last)
            }
            Step::AllReduce { buffer, source, .. } | Step::AllGather { buffer, source, .. } => {
                touch(&root, *source, i, &mut first, &mut last);
                touch(&root, *buffer, i, &mut first, &mut last);
            }
            Step::AllToAll { buffer, source, keep, .. } => {
                for b in [Some(source), keep.as_ref(), Some(buffer)].into_iter().flatten() {
                    touch(&root, *b, i, &mut first, &mut last);
                }
            }
        }
    }
    for nb in &p.outputs {
        touch(&root, nb.buffer, end, &mut first, &mut last);
    }
    // Sweep the steps: at each, the buffers that start there are checked against every live one
    // (kept as disjoint byte ranges, keyed by offset), then the ones that end there leave.
    let mut starts: Vec<Vec<usize>> = vec![Vec::new(); end + 1];
    let mut ends: Vec<Vec<usize>> = vec![Vec::new(); end + 1];
    for (i, b) in p.buffers.iter().enumerate() {
        if !matches!(b.storage, Storage::Arena { .. })
            || root[i] != i
            || first[i] == usize::MAX
            || b.max_bytes == 0
        {
            continue;
        }
        starts[first[i]].push(i);
        ends[last[i]].push(i);
    }
    let mut live: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    for step in 0..=end {
        for &i in &starts[step] {
            let b = &p.buffers[i];
            let Storage::Arena { offset } = b.storage else { continue };
            let stop = offset + b.max_bytes;
            let before = live.range(..=offset).next_back();
            let after = live.range(offset..).next();
            for (&o, &(e, j)) in before.into_iter().chain(after) {
                if o < stop && offset < e {
                    let other = &p.buffers[j];
                    return Err((
                        format!("buffers[{i}].storage.offset"),
                        format!(
                            "{} ({}) at arena bytes {offset}..{stop} overlaps {} ({}) at {o}..{e}, and both are live at step {step}",
                            b.id, b.value, other.id, other.value
                        ),
                    ));
                }
            }
            live.insert(offset, (stop, i));
        }
        for &i in &ends[step] {
            if let Storage::Arena { offset } = p.buffers[i].storage {
                live.remove(&offset);
            }
        }
    }
    Ok(())
}

/// Each rank holds the stages the lanes put on its chunks (the lists are verified: chunks are
/// numbered from 0 and no slot is on two lanes twice), with their weights.
fn check_ranks(plan: &ParallelPlan) -> Result<(), ManifestError> {
    let lists = &plan.lists;
    if plan.ranks.len() != lists.pp as usize {
        return bad("parallel.ranks", format!("{} ranks listed for pp = {}", plan.ranks.len(), lists.pp));
    }
    // rank -> chunk -> stage.
    let mut held: Vec<BTreeMap<u32, u32>> = vec![BTreeMap::new(); plan.ranks.len()];
    for lane in &lists.lanes {
        for (stage, slot) in lane.iter().enumerate() {
            let stage = stage as u32;
            let was = held[slot.rank.0 as usize].insert(slot.chunk.0, stage);
            if was.is_some_and(|w| w != stage) {
                return bad(
                    "parallel.lists.lanes",
                    format!("{slot} is stage {} on one lane and stage {stage} on another", was.unwrap_or(0)),
                );
            }
        }
    }
    for (r, e) in plan.ranks.iter().enumerate() {
        let field = |f: &str| format!("parallel.ranks[{r}].{f}");
        if e.rank as usize != r {
            return bad(field("rank"), format!("rank {r} has number {}", e.rank));
        }
        let stages: Vec<u32> = held[r].values().copied().collect();
        if e.stages != stages {
            return bad(
                field("stages"),
                format!("{:?}, but the lists put stages {stages:?} on the rank's chunks", e.stages),
            );
        }
        let params = stages.iter().try_fold(0u64, |acc, &s| acc.checked_add(plan.stages[s as usize].params));
        if params != Some(e.params) {
            return bad(field("params"), format!("{}, not the sum of its stages' weights", e.params));
        }
        if ![e.busy, e.bubble].iter().all(|t| t.is_finite() && *t >= 0.0) {
            return bad(field("busy"), "busy and bubble must be times (finite, at least 0)");
        }
    }
    Ok(())
}

/// The expert placement and each MoE layer's dispatch against the model (see the module
/// documentation).
fn check_experts(model: &ModelSpec, plan: &ParallelPlan, x: &ExpertPlan) -> Result<(), ManifestError> {
    let Some(moe) = &model.moe else { return Ok(()) };
    let ep = u64::from(plan.ep);
    // Plain greedy routing has no groups (one, kept), as the router has.
    let (groups, kept) = match moe.topk_method {
        crate::spec::TopkMethod::Greedy => (1, 1),
        _ => (moe.n_group, moe.topk_group),
    };
    let model_says = (moe.n_routed_experts, moe.num_experts_per_tok, groups, kept);
    if (x.experts, x.top_k, x.groups, x.topk_groups) != model_says {
        return bad(
            "parallel.experts",
            format!(
                "{} experts, top-{}, {} of {} groups; the model has {} experts, top-{}, {} of {} groups",
                x.experts,
                x.top_k,
                x.topk_groups,
                x.groups,
                model_says.0,
                model_says.1,
                model_says.3,
                model_says.2
            ),
        );
    }
    if x.experts % ep != 0 || x.experts_per_rank != x.experts / ep || x.ranks.len() as u64 != ep {
        return bad(
            "parallel.experts.experts_per_rank",
            format!(
                "{} experts per rank on {} ranks for {} experts over ep = {ep}: ep must divide the experts",
                x.experts_per_rank,
                x.ranks.len(),
                x.experts
            ),
        );
    }
    for (r, range) in (0u64..).zip(&x.ranks) {
        let want = r * x.experts_per_rank..(r + 1) * x.experts_per_rank;
        if *range != want {
            return bad(
                format!("parallel.experts.ranks[{r}]"),
                format!(
                    "experts {}..{}; rank {r} holds {}..{}",
                    range.start, range.end, want.start, want.end
                ),
            );
        }
    }
    let per_group = (x.groups > 0 && ep % x.groups == 0).then(|| ep / x.groups);
    if x.ranks_per_group != per_group {
        return bad(
            "parallel.experts.ranks_per_group",
            format!(
                "{:?} for {} groups on {ep} ranks; it is ep / groups when groups divide ep",
                x.ranks_per_group, x.groups
            ),
        );
    }
    // The MoE layers, `first, first + freq, ...` below the main layers and the MTP modules' (a
    // manifest's model is data: no more of them are made than the plan lists, plus one).
    let (main, freq) = (model.model.num_hidden_layers, moe.moe_layer_freq);
    let end = main.saturating_add(model.mtp.as_ref().map_or(0, |m| m.num_layers));
    if freq == 0 {
        return bad("model.moe.moe_layer_freq", "0: every freq-th layer is a MoE layer, so it is at least 1");
    }
    let last = plan.stages.len().saturating_sub(1) as u32;
    let mut expected: Vec<(u64, u32)> = Vec::new();
    let mut l = moe.first_k_dense_replace;
    while l < end && expected.len() <= x.layers.len() {
        expected.push((l, plan.stages.iter().find(|s| s.layers.contains(&l)).map_or(last, |s| s.stage)));
        let Some(next) = l.checked_add(freq) else { break };
        l = next;
    }
    let listed: Vec<(u64, u32)> = x.layers.iter().map(|l| (l.layer, l.stage)).collect();
    if listed != expected {
        let i = listed.iter().zip(&expected).take_while(|(a, b)| a == b).count();
        let show = |v: Option<&(u64, u32)>| {
            v.map_or("nothing".to_string(), |(l, s)| format!("layer {l} on stage {s}"))
        };
        return bad(
            format!("parallel.experts.layers[{i}]"),
            format!(
                "{}, where the model's MoE layers on the plan's stages have {}",
                show(listed.get(i)),
                show(expected.get(i))
            ),
        );
    }
    for (i, l) in x.layers.iter().enumerate() {
        let field = |f: &str| format!("parallel.experts.layers[{i}].{f}");
        if l.module != format!("model.layers.{}.mlp", l.layer) {
            return bad(field("module"), format!("`{}` is not layer {}'s MoE block", l.module, l.layer));
        }
        let d = &l.dispatch;
        if d.tokens != plan.tokens || d.hidden != model.model.hidden_size || d.tile_rows == 0 {
            return bad(
                field("dispatch"),
                format!(
                    "for {} tokens of width {} in tiles of {}; the plan routes {} tokens of width {} in tiles of at least 1",
                    d.tokens, d.hidden, d.tile_rows, plan.tokens, model.model.hidden_size
                ),
            );
        }
        if Some(d.rows) != d.tokens.checked_mul(x.top_k) || d.worst_rows_per_rank > d.rows {
            return bad(
                field("dispatch.rows"),
                format!("{} rows for {} tokens of top-{}", d.rows, d.tokens, x.top_k),
            );
        }
        let names: Vec<&str> = d.all_to_all.iter().map(|a| a.name.as_str()).collect();
        let want: &[&str] = if ep > 1 { &["dispatch", "combine"] } else { &[] };
        if names != want {
            return bad(
                field("dispatch.all_to_all"),
                format!("exchanges {names:?} on {ep} ranks; they are {want:?}"),
            );
        }
        let row_bytes = d.hidden.checked_mul(d.dtype.size_bytes());
        for (j, a) in d.all_to_all.iter().enumerate() {
            let bytes = |rows: u64| row_bytes.and_then(|b| rows.checked_mul(b));
            if bytes(a.worst_rows) != Some(a.worst_bytes) || bytes(a.expected_rows) != Some(a.expected_bytes)
            {
                return bad(
                    field(&format!("dispatch.all_to_all[{j}]")),
                    format!(
                        "the bytes are not the rows times {} bytes a row",
                        d.hidden.saturating_mul(d.dtype.size_bytes())
                    ),
                );
            }
        }
    }
    Ok(())
}
