//! The graph builder: a [`ModelSpec`] into the forward graph of a whole DeepSeek model (`build_graph`)
//! or of one decoder layer (`build_layer`), in high-level ops with Hugging Face semantics
//! (`modeling_deepseek_v3.py`; reference §2, §3, §5).
//!
//! The whole-model graph:
//! - Inputs `tokens` i32[B, T] and `positions` i32[B, T]; with MTP of depth D also the tokens each MTP
//!   module embeds, i32[B, T], holding token `i + k` at position `i` for module `k` (the caller shifts
//!   and pads). They are named `mtp_tokens` when D = 1 and `mtp_tokens.1` .. `mtp_tokens.D` otherwise;
//!   see [`mtp_tokens_name`].
//! - Outputs `logits` f32[B, T, V] and, with MTP, `mtp_logits` (or `mtp_logits.k`, [`mtp_logits_name`]).
//! - Every weight is an `Op::Param` named as in the Hugging Face checkpoint, shaped `(out, in)`, of the
//!   spec's dtype (except the f32 router bias). A param node is emitted right before its first use,
//!   with the scope of the module that uses it, and its name is always `{scope}.{local name}`:
//!   `model` (embedding, final norm), `model.layers.{i}` (the two block norms and residual adds),
//!   `model.layers.{i}.self_attn`, `model.layers.{i}.mlp` (dense MLP, router, routed experts),
//!   `model.layers.{i}.mlp.shared_experts`, `lm_head`, and for MTP module `k` (layer `L + k - 1`)
//!   `model.layers.{L+k-1}` and `model.layers.{L+k-1}.shared_head`.
//! - Every node's result types come from shape inference ([`kiln_ir::infer::infer`]); all sizes and
//!   constants come from the spec.
//!
//! [`build_cached`] builds the prefill and decode programs of a model with a KV cache instead, and
//! [`build_score`] the program that scores every position (the next-token loss).
//!
//! What the builder does not do: [`build_graph`] has no KV cache (keys and values span the `T` new
//! tokens, so the context `S` is `T`), attention is the naive MLA form (the `fuse-mla-latent` pass absorbs `kv_b_proj`),
//! routed experts are one `moe_experts` op (`plan-moe-dispatch` lowers it), and nothing is quantised
//! (`insert-fp8-casts` does that from the spec's `[quantization]`).

pub mod balance;
mod ffn;
mod mla;
mod mtp;

use kiln_ir::infer::{infer, InferError};
use kiln_ir::op::{Op, ReduceOp};
use kiln_ir::spec::ModelSpec;
use kiln_ir::{BinaryOp, DType, Dim, Graph, GraphError, TensorType, ValueId};

pub use mtp::{mtp_logits_name, mtp_tokens_name};

/// Why a spec could not be built into a graph.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BuildError {
    /// Shape inference rejected an op: the spec's sizes do not fit together there.
    #[error("{scope}: {op}: {cause}")]
    Infer { scope: String, op: &'static str, cause: InferError },
    /// The graph refused a node. The builder only uses values it created, so this is a builder bug.
    #[error("{scope}: {op}: {cause}")]
    Graph { scope: String, op: &'static str, cause: GraphError },
    /// `build_layer` was asked for a layer the model does not have.
    #[error("layer {layer} is out of range: {}", valid_layers(*.main, *.mtp))]
    NoSuchLayer { layer: u64, main: u64, mtp: u64 },
    /// A size the graph needs does not fit in 64 bits, or a value no graph can be built from.
    #[error("{0}")]
    Spec(String),
}

fn valid_layers(main: u64, mtp: u64) -> String {
    match (main, mtp) {
        (0, 0) => "the model has no layers".to_string(),
        (_, 0) => format!("the model has decoder layers 0..={}", main - 1),
        (0, _) => format!("the model has MTP layers 0..={}", mtp - 1),
        _ => format!(
            "the model has decoder layers 0..={} and MTP layers {}..={}",
            main - 1,
            main,
            main.saturating_add(mtp - 1)
        ),
    }
}

/// Builds the forward graph of the whole model: embedding, decoder layers, final norm and head, then
/// the MTP modules if the spec has them. See the module documentation for names and conventions.
pub fn build_graph(spec: &ModelSpec) -> Result<Graph, BuildError> {
    let mut b = Builder::new(spec, spec.model.name.clone())?;
    let tokens = b.input("tokens", TensorType::new(DType::I32, bt(&[])))?;
    let positions = b.input("positions", TensorType::new(DType::I32, bt(&[])))?;
    let depth = spec.mtp.as_ref().map_or(0, |m| m.num_layers);
    let mut mtp_tokens = Vec::new();
    for k in 1..=depth {
        mtp_tokens.push(b.input(&mtp_tokens_name(depth, k), TensorType::new(DType::I32, bt(&[])))?);
    }

    let h = main_model(&mut b, tokens, positions)?;

    // Decision (vLLM `deepseek_mtp.py`, reference §5): the first MTP module reads the main model's
    // hidden state after the final norm, which is what vLLM's DeepSeek model returns and feeds to its
    // MTP layer as `previous_hidden_states`. Later modules read the previous module's block output
    // (before its `shared_head.norm`), as vLLM's `forward`/`compute_logits` split implies.
    let mut prev = h;
    for (k, &toks) in (1..=depth).zip(&mtp_tokens) {
        let (hk, logits) = mtp::module(&mut b, k, prev, positions, toks)?;
        b.output(&mtp_logits_name(depth, k), logits)?;
        prev = hk;
    }
    Ok(b.finish())
}

/// Which program of a model with a KV cache a graph is ([`build_cached`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The prompt: `T` new tokens per sequence from position 0, attention over them alone, and
    /// every token's keys and values written into the cache.
    Prefill,
    /// `T` (usually 1) new tokens per sequence at any position: written into the cache, and
    /// attention over the cache up to each token's own position.
    Decode,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }
}

/// Builds a program of the model with a KV cache: [`build_graph`]'s main model (no MTP modules,
/// which serve training and speculative decoding) where each layer also reads and writes its cache,
/// inputs and outputs `kv_cache.{i}.k` `[B, S, H, qk_nope + qk_rope]` and `kv_cache.{i}.v`
/// `[B, S, H, v_head_dim]` (the naive cache, 40,960 elements per token and layer for DeepSeek-V3;
/// `fuse-mla-latent` turns it into the latent one). `S` is the cache's capacity: slot `j` holds the
/// token at position `j`, so sequences of one batch may have different lengths.
pub fn build_cached(spec: &ModelSpec, phase: Phase) -> Result<Graph, BuildError> {
    let mut b = Builder::new(spec, format!("{}.{}", spec.model.name, phase.name()))?;
    b.phase = Some(phase);
    let tokens = b.input("tokens", TensorType::new(DType::I32, bt(&[])))?;
    let positions = b.input("positions", TensorType::new(DType::I32, bt(&[])))?;
    main_model(&mut b, tokens, positions)?;
    Ok(b.finish())
}

/// The input of a prefill program built by [`build_prefill_last`]: each row's last new token, i32
/// `[B]` (its prompt's length minus one), where the logits are computed.
pub const LAST: &str = "last";

/// The prefill program of [`build_cached`] (or, with `speculative`, of [`build_speculative`]) that
/// computes the logits at each row's last prompt token alone, the one generation reads: input
/// [`LAST`] `[B]`, output `logits` `[B, 1, V]`. The head is the largest single GEMM of a prompt's
/// forward pass (DeepSeek-V3's is 129k x 7168), so this spares `T - 1` rows of it, as llama.cpp
/// computes the last token's logits alone by default. The `hidden` output of the speculative form
/// keeps every position (the draft reads them all).
pub fn build_prefill_last(spec: &ModelSpec, speculative: bool) -> Result<Graph, BuildError> {
    let mut b = Builder::new(spec, format!("{}.{}", spec.model.name, Phase::Prefill.name()))?;
    b.phase = Some(Phase::Prefill);
    let tokens = b.input("tokens", TensorType::new(DType::I32, bt(&[])))?;
    let positions = b.input("positions", TensorType::new(DType::I32, bt(&[])))?;
    let last = b.input(LAST, TensorType::new(DType::I32, vec![Dim::B]))?;
    let d = Dim::known(spec.model.hidden_size);
    let h = main_model_head(&mut b, tokens, positions, |b, h| {
        let h = take_last(b, "lm_head", h, last, d)?;
        let logits = b.lm_head("lm_head", h)?;
        b.output("logits", logits)
    })?;
    if speculative {
        b.output(HIDDEN, h)?;
    }
    Ok(b.finish())
}

/// `h[b, last[b], :]` for each row `b` of `h` `[B, T, d]`, as `[B, 1, d]`.
fn take_last(b: &mut Builder, scope: &str, h: ValueId, last: ValueId, d: Dim) -> Result<ValueId, BuildError> {
    let at = b.op(scope, Op::Reshape { shape: vec![Dim::B, Dim::known(1), Dim::known(1)] }, &[last])?;
    let at = b.op(scope, Op::Broadcast { shape: vec![Dim::B, Dim::known(1), d] }, &[at])?;
    b.op(scope, Op::TakeAlong { axis: 1 }, &[h, at])
}

/// The output of [`build_speculative`]'s programs that holds the main model's hidden state after
/// the final norm, `[B, T, d]`: what the draft program reads.
pub const HIDDEN: &str = "hidden";

/// [`build_cached`]'s program with one more output, [`HIDDEN`]: the main model's hidden state after
/// the final norm at every new position, which the MTP module reads to draft ([`build_draft`]).
pub fn build_speculative(spec: &ModelSpec, phase: Phase) -> Result<Graph, BuildError> {
    let mut b = Builder::new(spec, format!("{}.{}", spec.model.name, phase.name()))?;
    b.phase = Some(phase);
    let tokens = b.input("tokens", TensorType::new(DType::I32, bt(&[])))?;
    let positions = b.input("positions", TensorType::new(DType::I32, bt(&[])))?;
    let h = main_model(&mut b, tokens, positions)?;
    b.output(HIDDEN, h)?;
    Ok(b.finish())
}

/// Builds the `draft` program of speculative decoding (DeepSeek-V3 §5.4.3, reference §5): MTP
/// module 1 over a KV cache of its own layer (`kv_cache.{L}.*`, written and read as in the decode
/// program), on inputs [`HIDDEN`] `[B, T, d]` (the main model's, from [`build_speculative`]'s
/// programs), `tokens` `[B, T]` (the token after each position, which the module embeds) and
/// `positions`, and [`LAST`] `[B]`; output `mtp_logits` `[B, 1, V]`, the module's prediction of
/// the token two ahead of position `last[b]` of each row. The module's layer runs at every position
/// (it fills its cache), its head at that one alone: a step's draft needs one row per sequence, and
/// the head is the module's largest GEMM (after a prompt of `T` tokens it would otherwise run `T`
/// rows, at a step two). Only the first module drafts: DeepSeek-V3 has one, and deeper modules would
/// read the first one's block output at the same step, which a one-token draft does not need.
pub fn build_draft(spec: &ModelSpec) -> Result<Graph, BuildError> {
    if spec.mtp.as_ref().is_none_or(|m| m.num_layers == 0) {
        return Err(BuildError::Spec(format!(
            "model `{}` has no MTP module to draft with: speculative decoding needs an [mtp] section \
             (num_nextn_predict_layers >= 1)",
            spec.model.name
        )));
    }
    let mut b = Builder::new(spec, format!("{}.draft", spec.model.name))?;
    b.phase = Some(Phase::Decode);
    let hidden = b.input(HIDDEN, TensorType::new(spec.model.dtype, bt(&[spec.model.hidden_size])))?;
    let tokens = b.input("tokens", TensorType::new(DType::I32, bt(&[])))?;
    let positions = b.input("positions", TensorType::new(DType::I32, bt(&[])))?;
    let last = b.input(LAST, TensorType::new(DType::I32, vec![Dim::B]))?;
    let h = mtp::block(&mut b, 1, hidden, positions, tokens)?;
    let scope = format!("model.layers.{}.shared_head", spec.model.num_hidden_layers);
    let h = take_last(&mut b, &scope, h, last, Dim::known(spec.model.hidden_size))?;
    let logits = mtp::head(&mut b, 1, h)?;
    b.output(&mtp_logits_name(1, 1), logits)?;
    Ok(b.finish())
}

/// Builds the `score` program: [`build_graph`]'s main model (no KV cache, no MTP modules) on
/// `tokens` and `positions` `[B, T]`, and the next-token loss at every position against `targets`
/// `[B, T]` (the caller passes the tokens shifted by one): output `loss` f32[B, T], each element
/// `-log softmax(logits)[target]` as `cross_entropy` computes it (torch's
/// `F.cross_entropy(logits.float(), targets, reduction="none")`). Perplexity is the exponential of
/// the mean; training will read the same loss.
pub fn build_score(spec: &ModelSpec) -> Result<Graph, BuildError> {
    let mut b = Builder::new(spec, format!("{}.score", spec.model.name))?;
    let tokens = b.input("tokens", TensorType::new(DType::I32, bt(&[])))?;
    let positions = b.input("positions", TensorType::new(DType::I32, bt(&[])))?;
    let targets = b.input("targets", TensorType::new(DType::I32, bt(&[])))?;
    main_model_logits(&mut b, tokens, positions, |b, logits| {
        let loss = b.op("loss", Op::CrossEntropy { ignore_index: None }, &[logits, targets])?;
        b.output("loss", loss)
    })?;
    Ok(b.finish())
}

/// The loss terms of training and the balancing rule, each off at 0 (DeepSeek-V3's values in the
/// comments, reference §3.3, §3.4, §5).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainLosses {
    /// λ of the MTP loss `λ/D Σ_k L_k` (0.3, then 0.1); the MTP modules are built only when it is
    /// positive and the spec has them.
    pub mtp_lambda: f64,
    /// α of the complementary sequence-wise balance loss (1e-4).
    pub balance_alpha: f64,
    /// γ of the auxiliary-loss-free balancing rule (1e-3): after each step each router's selection
    /// bias moves by γ toward balance.
    pub bias_update_speed: f64,
    /// Whether the next-token loss weighs each target by the caller input `loss_weights` `[B, T]`
    /// (f32): `mean(ce * w)` over the batch, so the caller chooses what counts and how it is
    /// normalised. Supervised fine-tuning passes `w = mask * B T / count` (the mean over the
    /// assistant tokens alone); a policy-gradient step passes per-token advantages. Off, every target
    /// weighs 1.
    pub token_weights: bool,
}

impl Default for TrainLosses {
    /// The next-token loss alone, the bias left as it is.
    fn default() -> TrainLosses {
        TrainLosses { mtp_lambda: 0.0, balance_alpha: 0.0, bias_update_speed: 0.0, token_weights: false }
    }
}

/// What [`build_train`] built besides the graph: the routers' selection biases, states the graph
/// reads as inputs of their parameter names (and, with a positive `bias_update_speed`, updates
/// through outputs of those names), and the MTP depths it added inputs for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainGraph {
    pub biases: Vec<(String, TensorType)>,
    pub mtp_depth: u64,
}

/// The output holding the tokens each expert of a MoE layer received in the step:
/// `load.{scope}`.
pub const LOAD_PREFIX: &str = "load.";

/// Builds the forward graph of training, output `loss` (`f32[]`):
///
/// - the next-token cross-entropy, averaged over every target: what `model(input_ids,
///   labels).loss` computes (inputs `tokens`, `positions`, `targets` `[B, T]`); with
///   `token_weights`, `mean(ce * loss_weights)` (the input [`LOSS_WEIGHTS`]);
/// - with `mtp_lambda > 0` and MTP modules, `λ/D Σ_k L_k` (DeepSeek-V3 eq. 24–25), where module
///   `k` reads `mtp_tokens.k` (the token `k` ahead, as in [`build_graph`]) and is scored against
///   `mtp_targets.k` (the token `k + 1` ahead) where `mtp_mask.k` is 1: `L_k = sum(ce * mask) /
///   (B T)`, the paper's `1/T` per sequence, averaged over sequences;
/// - with `balance_alpha > 0`, the complementary sequence-wise balance loss of every MoE layer
///   (eq. 17–20), the MTP modules' included, summed over the layers: `α Σ_i f_i P_i` per sequence,
///   averaged over the sequences, with `f_i = E/(K T) Σ_t 1(s_{i,t} ∈ Topk(s_t, K))` (the top K of
///   the raw scores over all experts, not the biased, group-limited selection; no gradient: a
///   count) and `P_i = 1/T Σ_t s'_{i,t}`, the scores normalised over all experts;
/// - with `bias_update_speed = γ > 0`, each router's selection bias is a state updated after the
///   step: `b_i += γ sign(mean load - load_i)` over the step's tokens (it changes which experts
///   are chosen, never the gating weights, and has no gradient).
///
/// Every MoE layer's load (tokens per expert, f32 `[E]`) is an output `load.{scope}` for the
/// trainer's report. [`crate::autodiff::differentiate`] and [`crate::train::train_step`] make the
/// train-step program from it.
pub fn build_train(spec: &ModelSpec, losses: &TrainLosses) -> Result<(Graph, TrainGraph), BuildError> {
    build_train_part(spec, losses, Part::Whole, false)
}

/// Which micro-batch of a step a training graph runs when the step's batch is split (gradient
/// accumulation): what happens to the expert loads, which the balancing rule counts over the whole
/// step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The whole batch in one program: `load.{scope}` is this batch's load, and the biases move.
    Whole,
    /// A micro-batch before the last: `load.{scope}` adds this micro-batch's load to the input
    /// `load.acc.{scope}` times the caller input `accumulate.keep` (0 on a step's first
    /// micro-batch, which starts the count, 1 after); the biases do not move.
    Accumulate,
    /// The last micro-batch: `load.{scope}` adds this micro-batch's load to `load.acc.{scope}`,
    /// and the biases move by the step's whole load.
    Last,
}

/// The caller input of a train step with [`TrainLosses::token_weights`]: each target's weight in the
/// next-token loss, f32 `[B, T]`.
pub const LOSS_WEIGHTS: &str = kiln_ir::module::LOSS_WEIGHTS;

/// The input that holds a router's load over a step's earlier micro-batches.
pub const LOAD_ACC_PREFIX: &str = "load.acc.";
/// The caller input of an accumulating program: 0 on a step's first micro-batch, 1 after.
pub const KEEP: &str = kiln_ir::module::ACCUMULATE_KEEP;

/// [`build_train`] for one part of a step split into micro-batches (see [`Part`]). With
/// `data_parallel`, the step's rows are one replica's of several: a router's load over the step
/// (the last part's, or the whole one's) is summed over the replicas (`all_reduce` over `dp`)
/// before the biases move by it, so that every replica moves them alike.
pub fn build_train_part(
    spec: &ModelSpec,
    losses: &TrainLosses,
    part: Part,
    data_parallel: bool,
) -> Result<(Graph, TrainGraph), BuildError> {
    for (name, v) in [
        ("mtp_lambda", losses.mtp_lambda),
        ("balance_alpha", losses.balance_alpha),
        ("bias_update_speed", losses.bias_update_speed),
    ] {
        // Each becomes an f32 constant of the step.
        if !((v as f32).is_finite() && v >= 0.0) {
            return Err(BuildError::Spec(format!(
                "the train step's {name} must be a finite number at least 0, found {v}"
            )));
        }
    }
    let mut b = Builder::new(spec, format!("{}.train", spec.model.name))?;
    b.routing = Some(Vec::new());
    let tokens = b.input("tokens", TensorType::new(DType::I32, bt(&[])))?;
    let positions = b.input("positions", TensorType::new(DType::I32, bt(&[])))?;
    let targets = b.input("targets", TensorType::new(DType::I32, bt(&[])))?;
    let ce_sum = |b: &mut Builder,
                  scope: &str,
                  logits,
                  targets,
                  mask: Option<ValueId>|
     -> Result<ValueId, BuildError> {
        let ce = b.op(scope, Op::CrossEntropy { ignore_index: None }, &[logits, targets])?;
        let ce = match mask {
            Some(m) => b.op(scope, Op::Binary(BinaryOp::Mul), &[ce, m])?,
            None => ce,
        };
        b.op(scope, Op::Reduce { op: ReduceOp::Mean, axes: vec![0, 1], keep_dims: false }, &[ce])
    };
    let mut main_logits = None;
    let h = main_model_logits(&mut b, tokens, positions, |_, logits| {
        main_logits = Some(logits);
        Ok(())
    })?;
    let logits = main_logits.expect("the head calls back");
    let weights = match losses.token_weights {
        true => Some(b.input(LOSS_WEIGHTS, TensorType::new(DType::F32, bt(&[])))?),
        false => None,
    };
    let mut loss = ce_sum(&mut b, "loss", logits, targets, weights)?;
    let depth = spec.mtp.as_ref().map_or(0, |m| m.num_layers);
    let mut info = TrainGraph::default();
    if losses.mtp_lambda > 0.0 && depth > 0 {
        info.mtp_depth = depth;
        let mut prev = h;
        let mut sum = None;
        for k in 1..=depth {
            let toks = b.input(&format!("mtp_tokens.{k}"), TensorType::new(DType::I32, bt(&[])))?;
            let tgt = b.input(&format!("mtp_targets.{k}"), TensorType::new(DType::I32, bt(&[])))?;
            let mask = b.input(&format!("mtp_mask.{k}"), TensorType::new(DType::F32, bt(&[])))?;
            let (hk, lk) = mtp::module(&mut b, k, prev, positions, toks)?;
            let lk = ce_sum(&mut b, "loss.mtp", lk, tgt, Some(mask))?;
            sum = Some(match sum {
                None => lk,
                Some(s) => b.op("loss.mtp", Op::Binary(BinaryOp::Add), &[s, lk])?,
            });
            prev = hk;
        }
        let scale = b.constant("loss.mtp", losses.mtp_lambda / depth as f64, DType::F32)?;
        let mtp = b.op("loss.mtp", Op::Binary(BinaryOp::Mul), &[sum.expect("depth >= 1"), scale])?;
        loss = b.op("loss", Op::Binary(BinaryOp::Add), &[loss, mtp])?;
    }
    let routers = b.routing.take().unwrap_or_default();
    let keep = match part {
        Part::Accumulate if !routers.is_empty() => Some(b.input(KEEP, TensorType::scalar(DType::F32))?),
        _ => None,
    };
    for r in &routers {
        balance::add(&mut b, r, losses, part, keep, data_parallel, &mut loss)?;
        if let Some((name, v)) = &r.bias {
            info.biases.push((name.clone(), b.g.ty(*v).clone()));
        }
    }
    b.output("loss", loss)?;
    Ok((b.finish(), info))
}

/// Embedding, decoder layers, final norm and head, with output `logits`; returns the hidden state
/// after the final norm.
fn main_model(b: &mut Builder, tokens: ValueId, positions: ValueId) -> Result<ValueId, BuildError> {
    main_model_logits(b, tokens, positions, |b, logits| b.output("logits", logits))
}

/// [`main_model`], with what is done with the logits given by `head`.
fn main_model_logits(
    b: &mut Builder,
    tokens: ValueId,
    positions: ValueId,
    head: impl FnOnce(&mut Builder, ValueId) -> Result<(), BuildError>,
) -> Result<ValueId, BuildError> {
    main_model_head(b, tokens, positions, |b, h| {
        let logits = b.lm_head("lm_head", h)?;
        head(b, logits)
    })
}

/// Embedding, decoder layers and final norm, whose result `head` is given; returns it.
fn main_model_head(
    b: &mut Builder,
    tokens: ValueId,
    positions: ValueId,
    head: impl FnOnce(&mut Builder, ValueId) -> Result<(), BuildError>,
) -> Result<ValueId, BuildError> {
    let table = b.embed_table()?;
    let mut h = b.op("model", Op::Embedding, &[table, tokens])?;
    for layer in 0..b.spec.model.num_hidden_layers {
        h = decoder_layer(b, layer, h, positions)?;
    }
    let h = b.rms_norm("model", "norm.weight", h)?;
    head(b, h)?;
    Ok(h)
}

/// Builds one decoder layer as a graph of its own: inputs `hidden` [B, T, d] and `positions`, output
/// `hidden`, with the same nodes, scopes and param names as that layer has in [`build_graph`].
///
/// An index `num_hidden_layers + k - 1` means MTP module `k`. Its graph additionally reads the
/// module's token input (named as in the whole graph), uses the shared `model.embed_tokens.weight`
/// and `lm_head.weight`, and outputs `hidden` (the block output the next module reads) and the
/// module's logits.
pub fn build_layer(spec: &ModelSpec, layer: u64) -> Result<Graph, BuildError> {
    let main = spec.model.num_hidden_layers;
    let depth = spec.mtp.as_ref().map_or(0, |m| m.num_layers);
    if layer >= main.saturating_add(depth) {
        return Err(BuildError::NoSuchLayer { layer, main, mtp: depth });
    }
    let mut b = Builder::new(spec, format!("{}.layer{layer}", spec.model.name))?;
    let hidden = b.input("hidden", TensorType::new(spec.model.dtype, bt(&[spec.model.hidden_size])))?;
    let positions = b.input("positions", TensorType::new(DType::I32, bt(&[])))?;
    if layer < main {
        let h = decoder_layer(&mut b, layer, hidden, positions)?;
        b.output("hidden", h)?;
    } else {
        let k = layer - main + 1;
        let toks = b.input(&mtp_tokens_name(depth, k), TensorType::new(DType::I32, bt(&[])))?;
        let (h, logits) = mtp::module(&mut b, k, hidden, positions, toks)?;
        b.output("hidden", h)?;
        b.output(&mtp_logits_name(depth, k), logits)?;
    }
    Ok(b.finish())
}

/// One pre-norm decoder block (reference §2.5): `h + attn(norm(h))`, then `+ ffn(norm(h))`, with the
/// MoE feed-forward on the layers `ModelSpec::is_moe_layer` names (MTP layers by the same rule).
fn decoder_layer(b: &mut Builder, layer: u64, h: ValueId, positions: ValueId) -> Result<ValueId, BuildError> {
    let scope = format!("model.layers.{layer}");
    let attn_scope = format!("{scope}.self_attn");
    let mlp_scope = format!("{scope}.mlp");

    let x = b.rms_norm(&scope, "input_layernorm.weight", h)?;
    let a = mla::attention(b, &attn_scope, x, positions)?;
    let h = b.op(&scope, Op::Binary(kiln_ir::BinaryOp::Add), &[h, a])?;
    let x = b.rms_norm(&scope, "post_attention_layernorm.weight", h)?;
    let f = if b.spec.is_moe_layer(layer) {
        ffn::moe(b, &mlp_scope, x)?
    } else {
        ffn::mlp(b, &mlp_scope, x, b.spec.model.intermediate_size)?
    };
    b.op(&scope, Op::Binary(kiln_ir::BinaryOp::Add), &[h, f])
}

/// `[B, T, rest...]`.
fn bt(rest: &[u64]) -> Vec<Dim> {
    let mut shape = vec![Dim::B, Dim::T];
    shape.extend(rest.iter().map(|&n| Dim::known(n)));
    shape
}

/// `a * b`, or an error naming the sizes when the product does not fit in 64 bits.
fn mul(a: u64, b: u64) -> Result<u64, BuildError> {
    a.checked_mul(b).ok_or_else(|| BuildError::Spec(format!("the size {a} x {b} does not fit in 64 bits")))
}

fn add(a: u64, b: u64) -> Result<u64, BuildError> {
    a.checked_add(b).ok_or_else(|| BuildError::Spec(format!("the size {a} + {b} does not fit in 64 bits")))
}

/// The graph under construction plus the two params shared across modules (embedding and head), which
/// are created once, at their first use.
struct Builder<'s> {
    spec: &'s ModelSpec,
    g: Graph,
    embed: Option<ValueId>,
    head: Option<ValueId>,
    /// Set when building a program with a KV cache.
    phase: Option<Phase>,
    /// With `Some`, every MoE layer's router is recorded here (what training's balancing needs),
    /// and its selection bias is a state input rather than a parameter.
    routing: Option<Vec<Routing>>,
}

/// One MoE layer's router, as [`build_train`] needs it for balancing.
#[derive(Clone, Debug)]
pub(crate) struct Routing {
    pub scope: String,
    /// The router's f32 logits `[B, T, E]`.
    pub logits: ValueId,
    /// The selected experts `[B, T, K]`.
    pub indices: ValueId,
    /// The selection bias `f32[E]`, when the router has one, and its name.
    pub bias: Option<(String, ValueId)>,
    pub experts: u64,
    pub top_k: u64,
}

impl<'s> Builder<'s> {
    fn new(spec: &'s ModelSpec, name: String) -> Result<Builder<'s>, BuildError> {
        // `ModelSpec::is_moe_layer` divides by the frequency; a validated spec never has 0, but the
        // builder must not panic on one that was not validated.
        if spec.moe.as_ref().is_some_and(|m| m.moe_layer_freq == 0) {
            return Err(BuildError::Spec("moe.moe_layer_freq must be at least 1, found 0".into()));
        }
        Ok(Builder { spec, g: Graph::new(name), embed: None, head: None, phase: None, routing: None })
    }

    fn finish(self) -> Graph {
        self.g
    }

    /// Adds `op` applied to `inputs`, with result types from shape inference.
    fn node(&mut self, scope: &str, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>, BuildError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&v| self.g.ty(v)).collect();
        let name = op.name();
        let types = infer(&op, &tys).map_err(|cause| BuildError::Infer {
            scope: scope.to_string(),
            op: name,
            cause,
        })?;
        self.declared(scope, op, inputs, types)
    }

    /// Adds a node whose types are given (inputs, params, constants) or already inferred.
    fn declared(
        &mut self,
        scope: &str,
        op: Op,
        inputs: &[ValueId],
        types: Vec<TensorType>,
    ) -> Result<Vec<ValueId>, BuildError> {
        let name = op.name();
        let (_, results) = self
            .g
            .add_node(op, inputs, types, Some(scope))
            .map_err(|cause| BuildError::Graph { scope: scope.to_string(), op: name, cause })?;
        Ok(results)
    }

    /// Adds an op with exactly one result.
    fn op(&mut self, scope: &str, op: Op, inputs: &[ValueId]) -> Result<ValueId, BuildError> {
        let results = self.node(scope, op, inputs)?;
        Ok(results[0])
    }

    fn input(&mut self, name: &str, ty: TensorType) -> Result<ValueId, BuildError> {
        let (_, results) = self
            .g
            .add_node(Op::Input { name: name.to_string() }, &[], vec![ty], None)
            .map_err(|cause| BuildError::Graph { scope: "inputs".into(), op: "input", cause })?;
        Ok(results[0])
    }

    fn output(&mut self, name: &str, v: ValueId) -> Result<(), BuildError> {
        self.g.add_output(name, v).map_err(|cause| BuildError::Graph {
            scope: "outputs".into(),
            op: "output",
            cause,
        })
    }

    /// A parameter `{scope}.{local}` of the given dtype and constant shape.
    fn param_of(
        &mut self,
        scope: &str,
        local: &str,
        dtype: DType,
        dims: &[u64],
    ) -> Result<ValueId, BuildError> {
        let op = Op::Param { name: format!("{scope}.{local}") };
        Ok(self.declared(scope, op, &[], vec![TensorType::known(dtype, dims)])?[0])
    }

    /// A parameter of the model dtype.
    fn param(&mut self, scope: &str, local: &str, dims: &[u64]) -> Result<ValueId, BuildError> {
        self.param_of(scope, local, self.spec.model.dtype, dims)
    }

    /// A scalar constant of `dtype`.
    fn constant(&mut self, scope: &str, value: f64, dtype: DType) -> Result<ValueId, BuildError> {
        Ok(self.declared(scope, Op::Constant { value }, &[], vec![TensorType::scalar(dtype)])?[0])
    }

    /// `linear(x, {scope}.{local})` with a fresh `[out, in]` weight.
    fn linear(
        &mut self,
        scope: &str,
        local: &str,
        x: ValueId,
        out: u64,
        inp: u64,
    ) -> Result<ValueId, BuildError> {
        let w = self.param(scope, local, &[out, inp])?;
        self.op(scope, Op::Linear, &[x, w])
    }

    /// RMSNorm of `x` over its last dimension with a fresh weight `{scope}.{local}`.
    fn rms_norm(&mut self, scope: &str, local: &str, x: ValueId) -> Result<ValueId, BuildError> {
        self.rms_norm_with_eps(scope, local, x, self.spec.model.rms_norm_eps)
    }

    /// An RMSNorm whose epsilon is fixed by the architecture rather than the config.
    fn rms_norm_with_eps(
        &mut self,
        scope: &str,
        local: &str,
        x: ValueId,
        eps: f64,
    ) -> Result<ValueId, BuildError> {
        let width = self.g.ty(x).shape.last().and_then(|d| d.as_known()).ok_or_else(|| {
            BuildError::Spec(format!("{scope}: rms_norm of {} needs a constant last dimension", self.g.ty(x)))
        })?;
        let w = self.param(scope, local, &[width])?;
        self.op(scope, Op::RmsNorm { eps }, &[x, w])
    }

    /// Splits `x` along `axis` into two parts of the given sizes.
    fn split2(
        &mut self,
        scope: &str,
        x: ValueId,
        axis: usize,
        sizes: [u64; 2],
    ) -> Result<(ValueId, ValueId), BuildError> {
        let parts = self.node(scope, Op::Split { axis, sizes: sizes.to_vec() }, &[x])?;
        Ok((parts[0], parts[1]))
    }

    /// `model.embed_tokens.weight` [V, d], created at its first use and shared afterwards (the MTP
    /// modules and, with tied embeddings, the head read the same node).
    fn embed_table(&mut self) -> Result<ValueId, BuildError> {
        if let Some(v) = self.embed {
            return Ok(v);
        }
        let m = &self.spec.model;
        let v = self.param("model", "embed_tokens.weight", &[m.vocab_size, m.hidden_size])?;
        self.embed = Some(v);
        Ok(v)
    }

    /// `lm_head.weight` [V, d] (the embedding table with `tie_word_embeddings`), shared by the main
    /// head and every MTP module.
    fn head_weight(&mut self) -> Result<ValueId, BuildError> {
        if self.spec.model.tie_word_embeddings {
            return self.embed_table();
        }
        if let Some(v) = self.head {
            return Ok(v);
        }
        let m = &self.spec.model;
        let v = self.param("lm_head", "weight", &[m.vocab_size, m.hidden_size])?;
        self.head = Some(v);
        Ok(v)
    }

    /// Logits in f32 from a normed hidden state: the shared head, then a cast when the model dtype
    /// is not f32 (Hugging Face returns `logits.float()`).
    fn lm_head(&mut self, scope: &str, h: ValueId) -> Result<ValueId, BuildError> {
        let w = self.head_weight()?;
        let logits = self.op(scope, Op::Linear, &[h, w])?;
        if self.spec.model.dtype == DType::F32 {
            Ok(logits)
        } else {
            self.op(scope, Op::Cast { to: DType::F32 }, &[logits])
        }
    }
}
