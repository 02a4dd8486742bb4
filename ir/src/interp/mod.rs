//! The CPU reference interpreter: the numerical oracle that defines what every [`Op`](crate::Op) computes.
//!
//! [`run`] evaluates a graph on concrete tensors, node by node in [`Graph::nodes`](crate::Graph::nodes) order, and returns
//! its named outputs; [`run_with`] also reports every value as it is computed (per-layer hidden
//! states in tests). The code favours being obviously right over being fast: plain loops over
//! row-major f32 data, no SIMD, no threads. A forward of the tiny model takes milliseconds.
//!
//! # How a run works
//!
//! - Symbolic sizes (`B`, `T`, `S`) are bound by unifying the declared types of the graph's inputs
//!   with the given tensors, input by input in node order, dimension by dimension. The first binding
//!   wins; a later input that disagrees is [`InterpError::DimConflict`].
//! - Parameters are checked against their declared types; a missing or an unexpected one is an error.
//! - Before each op runs, shape inference ([`crate::infer::infer`]) is applied to the *concrete*
//!   operand types. That validates the operands with the same rules the builder and verifier use, and
//!   its result must equal the node's declared type under the bindings. The ops can then rely on
//!   every size fitting; what inference cannot see (an embedding id out of range, an offsets table that
//!   does not cover the rows) the ops check themselves. Nothing a caller passes makes the interpreter
//!   panic.
//! - Each value is dropped as soon as its last user has run, so a deep graph holds only its live
//!   values. Inputs and parameters are borrowed, never copied.
//!
//! # Numerics
//!
//! Every float result is computed in f32 (or wider) from the f32 values of its operands and rounded
//! once to its result dtype, round-to-nearest-even ([`numerics`]). Sums — dot products, reductions,
//! the mean of squares in `rms_norm`, softmax denominators — accumulate in **f64** and round once: the
//! interpreter approximates the exact result rather than any one kernel's summation order, so a
//! compiled kernel (f32 accumulation in some order) and PyTorch are both within a few f32 ulps of it.
//! The exceptions mirror Hugging Face's rounding where the reference code rounds to the activation
//! dtype mid-computation (attention probabilities, the MoE combination); each is documented at its op.
//!
//! # Semantics decisions (sources are tagged as in `deepseek_v3_reference.md`)
//!
//! - `rms_norm`: `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` in f32, as
//!   `DeepseekV3RMSNorm` (\[T-mod\]); \[R\] uses `F.rms_norm` in the input dtype (D6).
//! - `rope`: the rotation is computed in f32 and rounded once (\[R\] `apply_rotary_emb`). Interleaved
//!   mode keeps \[R\]'s layout: pair `(x[2j], x[2j+1])` is rotated in place. Hugging Face's
//!   `apply_rotary_pos_emb_interleave` (transformers 5.24) returns the rotated evens then the rotated
//!   odds instead; the two differ by a fixed permutation of the rope lanes applied to both queries and
//!   keys, so attention scores (and everything after them) agree. HF also rounds cos/sin to the
//!   activation dtype before multiplying; kiln does not. YaRN frequencies follow
//!   `_compute_yarn_parameters` / \[R\] `precompute_freqs_cis` (reference §2.4); the YaRN amplitude is
//!   not part of the op (the builder multiplies it in when it is not 1).
//! - `attention`: scores `q.k * scale` in f32, causal mask with the `S - T` offset, softmax in f32;
//!   the probabilities are rounded to the activation dtype before the weighted sum of `v`, as HF
//!   (`softmax(..., dtype=float32).to(query.dtype)`) and \[R\] (`.type_as(x)`) both do. Key/value head
//!   `h / (H / Hk)` serves query head `h` (HF `repeat_kv`).
//! - `moe_route`: HF `DeepseekV3TopkRouter` (transformers 5.24): scores in f32, selection scores
//!   `scores + bias`, group scores (top-2 sum or max), groups outside the top `topk_groups` masked to
//!   **-inf** (`masked_fill(~score_mask.bool(), float("-inf"))`; \[R\] also uses -inf since 1398800; the
//!   older HF remote code used 0.0, reference D3), top-k on the masked scores, weights gathered from
//!   the unbiased scores, `w / (sum + 1e-20)` when normalising, then `* scaling`.
//! - `topk`, and every top-k inside the router: largest first; ties go to the lower index; NaN counts
//!   as larger than every number (as `torch.topk`). PyTorch does not promise an order for ties, so
//!   golden tests must avoid exact ties.
//! - `moe_experts` / `moe_combine`: HF `DeepseekV3Experts` rounding: each expert's output is rounded
//!   to the activation dtype, multiplied by its f32 weight and rounded again, and the contributions
//!   are added in the activation dtype in ascending expert order (HF loops over experts and
//!   `index_add_`s into a tensor of the activation dtype).
//! - `cross_entropy`: torch's `F.cross_entropy(logits.float(), targets, reduction="none")` over the
//!   last axis: `log(sum exp(x - max)) - (x[target] - max)`, the differences in f32, the sum in f64.
//!   A target equal to `ignore_index` gives 0; any other target outside `0..V` is an error (compiled
//!   kernels give NaN there, and read nothing outside the row).
//! - `rope` with `inverse`: the same f32 cos and sin with the sine negated, the transpose of the
//!   rotation, so it is exactly `rope`'s vector-Jacobian product (to the one rounding).
//! - `take_along`: `torch.take_along_dim` / `np.take_along_axis` without broadcasting; a copy, any
//!   dtype. An index out of range is an error (no negative indexing, as `gather`).
//! - The gradient ops (`embedding_grad`, `cross_entropy_grad`, `attention_grad`,
//!   `scatter_add_along`, `grouped_linear_wgrad`, `moe_combine_grad`) are the vector-Jacobian
//!   products of their forward ops as this interpreter computes them, with torch's formulas; every
//!   sum in f64, each result rounded once. Where the forward rounds to the activation dtype
//!   mid-computation, the gradient passes through the rounding as torch's autograd does
//!   (`attention_grad` recomputes the f32 probabilities and weighs `dv` by the rounded ones the
//!   forward used). Indices are checked as in the forward ops.
//! - `cast` to `f8e4m3` follows `torch.float8_e4m3fn` (torch 2.15): it saturates at ±448; see
//!   [`numerics`]. Float to integer truncates toward zero (torch); a NaN or out-of-range value is an
//!   error. Integer to integer wraps (torch).
//! - `quantize`: DeepSeek's `act_quant` (\[R\] `kernel.py`): `amax = max(max|x|, amax_floor)` per tile,
//!   `scale = amax / 448`, with `pow2_scale` rounded up to a power of two (exactly, from the bits),
//!   `q = f8e4m3(x / scale)`.
//! - Integer `div` truncates toward zero and integer arithmetic wraps, as the compiled code
//!   (LLVM `sdiv`, two's complement) does; division by zero is an error.
//!
//! Not here: `send` and `recv` need the distributed runtime ([`InterpError::Communication`]).

mod eval;
pub mod numerics;
mod ops;
pub mod tensor;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use crate::graph::ValueId;
use crate::types::{Dim, TensorType};

pub use eval::{run, run_with};
/// The rotary frequencies `rope` uses, for code generators that embed them as constants.
pub use ops::norm_rope::inv_freq as rope_inv_freq;
pub use tensor::{Data, Tensor, TensorError};

/// The graph's outputs by name.
pub type Outputs = BTreeMap<String, Tensor>;

/// Why a graph could not be interpreted on the given tensors.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InterpError {
    #[error("input `{name}` is missing")]
    MissingInput { name: String },
    #[error("`{name}` is not an input of graph @{graph}")]
    UnknownInput { name: String, graph: String },
    #[error("input `{name}` must be {expected}, found {found}")]
    InputType { name: String, expected: TensorType, found: TensorType },
    /// A symbolic size takes two values: `found` at `axis` of input `name`, `bound` from `bound_by`.
    #[error(
        "input `{name}` dimension {axis} ({dim}) is {found}, but {sym} = {bound} from input `{bound_by}`"
    )]
    DimConflict {
        name: String,
        axis: usize,
        dim: Dim,
        sym: &'static str,
        bound: u64,
        found: u64,
        bound_by: String,
    },
    #[error("{value}: symbolic size {sym} is not bound by any input")]
    UnboundDim { value: ValueId, sym: &'static str },
    #[error("parameter `{name}` is missing")]
    MissingParam { name: String },
    #[error("`{name}` is not a parameter of graph @{graph}")]
    UnexpectedParam { name: String, graph: String },
    #[error("parameter `{name}` must be {expected}, found {found}")]
    ParamType { name: String, expected: TensorType, found: TensorType },
    /// An op cannot run on its operands. `value` is its first result (or, for `send`, its operand).
    #[error("{}: {msg}", At(*value, op))]
    Op { value: Option<ValueId>, op: &'static str, msg: String },
    #[error("{}: pipeline communication with stage {peer} needs the distributed runtime; the interpreter runs a single stage", At(*value, op))]
    Communication { value: Option<ValueId>, op: &'static str, peer: u32 },
    /// An error inside the body of a fused kernel.
    #[error("{value} = fused kernel `{kernel}`: {source}")]
    Fused { value: ValueId, kernel: String, source: Box<InterpError> },
}

/// `%12 = attention`, or `send` for an op without results.
struct At<'a>(Option<ValueId>, &'a str);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) if self.1 == "send" => write!(f, "send {v}"),
            Some(v) => write!(f, "{v} = {}", self.1),
            None => f.write_str(self.1),
        }
    }
}
