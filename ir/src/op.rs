//! The closed set of operations and their typed attributes.
//!
//! Every op has a fixed text name and a list of attributes. The text format is generic over both: the
//! printer writes `name(attrs)` from [`Op::name`] and [`Op::attrs`], and the parser rebuilds the op with
//! [`Op::from_parts`], so adding an op means adding it here (and to shape inference), nothing else.
//! Semantics live in the reference interpreter; the one-line summaries below say what each op computes.
//!
//! Conventions shared by every op:
//! - Axes are non-negative indices into the shape of the first operand.
//! - Elementwise binary ops broadcast NumPy-style (shapes aligned on the right; a dimension of 1
//!   stretches).
//! - Linear weights are stored `(out, in)` as in PyTorch and Hugging Face checkpoints.

use std::fmt;

use crate::types::{DType, Dim};

/// Elementwise functions of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Sigmoid,
    /// `x * sigmoid(x)`.
    Silu,
    Tanh,
}

/// Elementwise functions of two broadcast operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

/// How a MoE router turns gate logits into expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    /// `sigmoid(logits)` per expert (DeepSeek-V3).
    Sigmoid,
    /// `softmax(logits)` over all experts, in f32 (DeepSeek-V2).
    Softmax,
}

/// How a group of experts is scored when routing is group-limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupScore {
    /// Sum of the two highest (bias-corrected) scores in the group (DeepSeek-V3, `noaux_tc`).
    Top2Sum,
    /// Highest score in the group (DeepSeek-V2, `group_limited_greedy`).
    Max,
}

/// YaRN context extension applied to rotary frequencies (reference §2.4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position: u64,
    pub beta_fast: f64,
    pub beta_slow: f64,
}

/// Rotary position embedding configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotate adjacent pairs `(x[2j], x[2j+1])` as DeepSeek's reference code does, rather than halves.
    pub interleaved: bool,
    pub yarn: Option<Yarn>,
    /// Rotate by the negated angle: the inverse of the rotation, which is its transpose, so `rope`
    /// with `inverse` applied to `dy` is the vector-Jacobian product of `rope` with respect to `x`.
    /// Written `inverse = true`; absent (false) otherwise.
    pub inverse: bool,
}

/// Block-scaled quantisation: one scale per `block` tile of the operand's trailing dimensions.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantSpec {
    /// Tile size for each trailing dimension, e.g. `[1, 128]` for activations, `[128, 128]` for weights.
    pub block: Vec<u64>,
    /// Lower bound on a tile's absolute maximum before the scale is taken (`1e-4` in DeepSeek-V3).
    pub amax_floor: f64,
    /// Round each scale up to a power of two (`scale_fmt = "ue8m0"`).
    pub pow2_scale: bool,
}

/// Which GEMM a [`Op::PromotedGemm`] is: the operands and result of `linear`, `grouped_linear` or
/// `grouped_linear_wgrad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmForm {
    Linear,
    Grouped { num_experts: u64 },
    GroupedWgrad { num_experts: u64 },
}

impl GemmForm {
    /// The op of this form with plain accumulation, whose operands and shapes it takes.
    pub fn plain(self) -> Op {
        match self {
            GemmForm::Linear => Op::Linear,
            GemmForm::Grouped { num_experts } => Op::GroupedLinear { num_experts },
            GemmForm::GroupedWgrad { num_experts } => Op::GroupedLinearWgrad { num_experts },
        }
    }

    pub fn name(self) -> &'static str {
        self.plain().name()
    }
}

/// A router that picks `top_k` experts per token (reference §3.1).
#[derive(Clone, Debug, PartialEq)]
pub struct Router {
    pub num_experts: u64,
    pub top_k: u64,
    pub scoring: Scoring,
    /// Number of expert groups; 1 disables group-limited routing.
    pub num_groups: u64,
    /// Groups kept per token before the expert top-k.
    pub topk_groups: u64,
    pub group_score: GroupScore,
    /// Divide the selected weights by their sum.
    pub normalize: bool,
    /// Multiply the (normalised) weights by this factor.
    pub scaling: f64,
}

/// Expert placement across expert-parallel ranks: the plan `plan-moe-dispatch` makes explicit.
///
/// Experts are placed in contiguous blocks of `num_experts / ep_size` per rank. `num_groups` and
/// `topk_groups` record the router's group limit (reference §3.2, node-limited routing): the experts
/// are cut into `num_groups` contiguous groups and each token's `top_k` experts lie in at most
/// `topk_groups` of them, which bounds how many groups (nodes) a token's rows travel to. `1, 1` means
/// no group limit; the text form omits them then.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatch {
    pub num_experts: u64,
    pub top_k: u64,
    pub ep_size: u64,
    pub num_groups: u64,
    pub topk_groups: u64,
}

/// An attribute value in the generic text form.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Ident(String),
    List(Vec<Attr>),
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(v) => write!(f, "{v}"),
            // `{:?}` is the shortest text that reads back to the same f64, and always has a `.` or `e`.
            Attr::Float(v) => write!(f, "{v:?}"),
            Attr::Bool(v) => write!(f, "{v}"),
            Attr::Str(s) => write!(f, "{s:?}"),
            Attr::Ident(s) => f.write_str(s),
            Attr::List(items) => {
                f.write_str("[")?;
                for (i, a) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// The form `fuse-mla-latent` chose for an MLA attention ([`Op::Attention`]'s `mla`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MlaForm {
    /// Keys and values expanded per head from the latent (`kv_b_proj` applied to the cache).
    Naive,
    /// `W_UK` absorbed into the query and `W_UV` applied after the weighted sum: attention reads
    /// the latent cache as it is.
    Absorbed,
}

impl MlaForm {
    pub fn name(self) -> &'static str {
        match self {
            MlaForm::Naive => "naive",
            MlaForm::Absorbed => "absorbed",
        }
    }
}

/// Every operation kiln knows. Operands are listed in the doc of each variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input (token ids, positions, caches) of the declared type. No operands.
    Input {
        name: String,
    },
    /// A model parameter, named as in the Hugging Face checkpoint. No operands.
    Param {
        name: String,
    },
    /// A scalar constant of the declared type. No operands.
    Constant {
        value: f64,
    },
    /// `x[..., K] @ w[N, K]^T -> [..., N]`: a PyTorch `Linear` without bias.
    Linear,
    /// `a[..., M, K] @ b[..., K, N] -> [..., M, N]`; batch dimensions broadcast.
    MatMul,
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// Converts to another element type (round to nearest even; FP8 saturates at ±448 like torch 2.15).
    Cast {
        to: DType,
    },
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keep_dims: bool,
    },
    /// `softmax` along one axis, computed in f32.
    Softmax {
        axis: usize,
    },
    /// Per-row next-token loss: operands `logits[..., V]` (any float dtype) and `targets[...]` (i32 or
    /// i64, the logits' leading shape); result `loss[...]` (f32) with
    /// `loss = logsumexp(logits[..., :]) - logits[..., target]`, computed in f32 with the row's maximum
    /// subtracted: torch's `F.cross_entropy(logits.float(), targets, reduction="none")` over the last
    /// axis. With `ignore_index`, a target equal to it gives a loss of 0 (torch's default is -100;
    /// kiln has none unless it is written). Any other target outside `0..V` is an error of the
    /// interpreter; compiled kernels never read outside the row for one and give a NaN loss.
    CrossEntropy {
        ignore_index: Option<i64>,
    },
    /// `x / sqrt(mean(x^2, last axis) + eps) * weight`; operands `x[..., D]`, `weight[D]`.
    RmsNorm {
        eps: f64,
    },
    /// Rotary embedding of the last axis of `x[B, T, ..., D]` at `positions[B, T]`. With `inverse`
    /// the rotation is by the negated angle, its transpose: `rope(dy, positions, inverse)` is the
    /// gradient of `rope(x, positions)` with respect to `x`.
    Rope(RopeConfig),
    /// Scaled dot-product attention. Operands `q[B, T, H, Dk]`, `k[B, S, Hk, Dk]`, `v[B, S, Hk, Dv]`
    /// with `H % Hk == 0` (`Hk = 1` is one key/value head shared by all query heads), and optionally
    /// `positions i32[B, T]`. With `causal` and three operands, query `t` sees keys `0..=t + (S - T)`:
    /// the new tokens come after `S - T` cached ones. With `positions` (a KV cache whose slot `j`
    /// holds the token at position `j`), query `(b, t)` sees keys `0..=positions[b, t]` (clamped to
    /// `S`), so every sequence of a batch has its own length.
    Attention {
        scale: f64,
        causal: bool,
        /// Which form of Multi-head Latent Attention this is, when a pass chose one
        /// (`fuse-mla-latent`); it changes nothing the op computes, and tells later passes what the
        /// nodes around it are. Written `mla = absorbed | naive`; absent for any other attention.
        mla: Option<MlaForm>,
    },
    /// Writes new entries into a KV cache: operands `cache[B, S, ...]`, `new[B, T, ...]`,
    /// `positions i32[B, T]`; the result is `cache` with slot `positions[b, t]` of sequence `b` replaced
    /// by `new[b, t]`. Compiled code updates the cache in place (the result is the cache's buffer), so
    /// the cache operand must be a graph input read by nothing else.
    CacheUpdate,
    /// Rows of `table[V, D]` at `ids[...]` -> `[..., D]`.
    Embedding,
    /// `data` indexed along `axis` by `indices`: the result shape replaces that axis with the
    /// indices' shape.
    Gather {
        axis: usize,
    },
    /// The `k` largest entries along the last axis: results `values`, `indices` (i32), largest first.
    TopK {
        k: u64,
    },
    Concat {
        axis: usize,
    },
    Split {
        axis: usize,
        sizes: Vec<u64>,
    },
    Reshape {
        shape: Vec<Dim>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    /// Broadcasts to `shape` NumPy-style (ONNX `Expand`): dimensions of 1 stretch, leading ones are added.
    Broadcast {
        shape: Vec<Dim>,
    },
    /// Block-scaled quantisation of `x` to `to`: results `q` and f32 `scales` (one per tile,
    /// `scale = max(amax, amax_floor) / max(to)`).
    Quantize {
        to: DType,
        spec: QuantSpec,
    },
    /// `q * scales` broadcast over tiles; operands `q`, `scales`.
    Dequantize {
        to: DType,
        block: Vec<u64>,
    },
    /// Router: operands `logits[N..., E]` and, for bias-corrected selection, `bias[E]`; results the
    /// expert `weights[N..., K]` (f32) and `indices[N..., K]` (i32).
    MoeRoute(Router),
    /// Routed experts evaluated token by token: operands `x[N..., D]`, `weights[N..., K]`,
    /// `indices[N..., K]`, then for each expert `e` its `gate[I, D]`, `up[I, D]` and `down[D, I]`
    /// weights; result `sum_k weights[k] * down(silu(gate x) * up x)` per token. An index equal to
    /// `num_experts` marks a slot with no expert here (an expert-parallel rank's slot routed to
    /// another rank): it adds nothing and costs nothing.
    MoeExperts {
        num_experts: u64,
    },
    /// Token permutation by expert: operands `x[N, D]`, `indices[N, K]`; results the rows sorted by
    /// expert `x_sorted[K*N, D]`, `offsets[E + 1]` (i32) and the source slot of each row `perm[K*N]`.
    /// A slot whose index is `E` has no expert here: its rows come after every expert's, from
    /// `offsets[E]` to the end, where `grouped_linear` gives zeros without computing them.
    MoeDispatch(Dispatch),
    /// One linear per expert over its contiguous rows: operands `x_sorted[M, K]`, `offsets[E + 1]`,
    /// then `w_e[N, K]` for each expert -> `[M, N]`. Rows from `offsets[E]` to `M` belong to no
    /// expert and are zeros.
    GroupedLinear {
        num_experts: u64,
    },
    /// Weighted sum back to token order: operands `y_sorted[K*N, D]`, `perm[K*N]`, `weights[N, K]`
    /// -> `[N, D]`.
    MoeCombine {
        top_k: u64,
    },
    /// The gradient of [`Op::Embedding`] with respect to its table: operands `ids[...]` (i32 or i64)
    /// and `dy[..., D]` (any float dtype, the ids' shape plus one axis); result `dtable[rows, D]`
    /// (f32), zeros with each row `dy[i]` added into row `ids[i]`, in f64. torch's
    /// `F.embedding` backward, `torch.zeros(rows, D).index_add_(0, ids.flatten(), dy.reshape(-1, D))`.
    /// An id outside `0..rows` is an error of the interpreter.
    EmbeddingGrad {
        rows: u64,
    },
    /// The gradient of [`Op::CrossEntropy`] with respect to its logits: operands `logits[..., V]`
    /// (any float dtype), `targets[...]` (i32 or i64) and `dloss[...]` (f32, the loss's gradient);
    /// result `dlogits[..., V]` (f32) with `dlogits = (softmax(logits) - onehot(target)) * dloss`
    /// per row, and 0 for a row whose target is `ignore_index`: torch's backward of
    /// `F.cross_entropy(logits.float(), targets, reduction="none")`. A target outside `0..V` other
    /// than `ignore_index` is an error of the interpreter, as in the forward op.
    CrossEntropyGrad {
        ignore_index: Option<i64>,
    },
    /// The gradients of [`Op::Attention`]: operands `q`, `k`, `v` and the optional `positions` as
    /// for `attention`, then `do[B, T, H, Dv]` (the gradient of its output, of q's dtype); results
    /// `dq`, `dk`, `dv` with q's, k's and v's types. The softmax is recomputed from `q` and `k` with
    /// exactly `attention`'s masking (causal offset `S - T`, or `positions`; key/value head
    /// `h / (H / Hk)` serves query head `h`, so `dk` and `dv` sum over the heads of a group), as
    /// torch's `scaled_dot_product_attention` backward (the math kernel) computes:
    /// `dv = P^T do`, `dP = do v^T`, `dS = P * (dP - rowsum(P * dP))`, `dq = scale dS k`,
    /// `dk = scale dS^T q`.
    AttentionGrad {
        scale: f64,
        causal: bool,
    },
    /// `data` read along `axis` at `indices`: operands `data[...]` and `indices[...]` (i32 or i64,
    /// data's rank, data's dimensions except along `axis`); result of the indices' shape and data's
    /// dtype with `out[..., j, ...] = data[..., indices[..., j, ...], ...]` (`j` at `axis`):
    /// `torch.take_along_dim(data, indices, axis)` without broadcasting, `np.take_along_axis`.
    /// An index outside `0..data.shape[axis]` is an error of the interpreter.
    TakeAlong {
        axis: usize,
    },
    /// The adjoint of [`Op::TakeAlong`]: operands `indices[...]` (i32 or i64) and `src` (any float
    /// dtype, the indices' shape); result (f32) of src's shape with dimension `axis` replaced by
    /// `size`: zeros with `out[..., indices[..., j, ...], ...] += src[..., j, ...]`, summed in f64:
    /// `torch.zeros(...).scatter_add_(axis, indices, src)`. An index outside `0..size` is an error
    /// of the interpreter.
    ScatterAddAlong {
        axis: usize,
        size: u64,
    },
    /// The weight gradients of [`Op::GroupedLinear`]: operands `x_sorted[M, K]`, `offsets[E + 1]`
    /// (i32, as for `grouped_linear`) and `dy[M, N]` (x's dtype); results `E` tensors `dw_e[N, K]`
    /// (f32) with `dw_e = dy[rows]^T @ x_sorted[rows]` over expert `e`'s rows
    /// `offsets[e]..offsets[e + 1]`, each element summed in f64 (zeros for an expert of no rows):
    /// per expert, torch's `dy.T @ x`, the weight gradient of `F.linear(x, w)`.
    GroupedLinearWgrad {
        num_experts: u64,
    },
    /// A GEMM with DeepSeek-V3's FP8 accumulation (reference §4.1; the report's §3.3.2,
    /// "increasing accumulation precision", promotion interval N_C = 128): the operands and shapes
    /// of `form` (`linear`, `grouped_linear`, `grouped_linear_wgrad`), result(s) f32. Every dot
    /// product runs over the contraction axis in blocks of `k_block` aligned at index 0 (for
    /// `grouped_linear_wgrad` the axis is the sorted rows, so an expert's rows meet the blocks
    /// where they lie): each block's products are summed in f64 in index order and the sum rounded
    /// once to f32 (the promotion to FP32 registers), and the blocks' sums are added in f32 in
    /// order. Its operands are dequantised FP8 values, whose scales are constant over a block, so
    /// this is DeepSeek's `acc += dot(a_blk, b_blk) * s_a * s_b`, exact in the block sum where the
    /// tensor cores keep about 14 bits. The interpreter and the kernels sum in the same order, so
    /// they agree bit for bit.
    PromotedGemm {
        form: GemmForm,
        k_block: u64,
    },
    /// The gradients of [`Op::MoeCombine`]: operands `dy[N, D]` (y_sorted's dtype), `y_sorted[K*N, D]`,
    /// `perm[K*N]` and `weights[N, K]` as for `moe_combine`; results `dy_sorted[K*N, D]` (y_sorted's
    /// type), row `r` being `dy[token] * weights[token, k]` for the slot `perm[r] = token * K + k`,
    /// and `dweights[N, K]` (weights' type), `dweights[token, k] = dot(y_sorted[r], dy[token])`:
    /// the backward of `out.index_add_(0, token, y_sorted[r] * weights[token, k])` in torch.
    MoeCombineGrad {
        top_k: u64,
    },
    /// A fused kernel: the body is a graph whose inputs are the operands in order and whose outputs
    /// are the results. Fused nodes of identical bodies may share one (`fuse-kernels` gives the
    /// identical layers of a model one body), so a body is never changed in place.
    Fused {
        name: String,
        body: std::sync::Arc<crate::Graph>,
    },
    /// Sends its operand to pipeline stage `peer`; no results. A placeholder until DualPipe lands.
    Send {
        peer: u32,
        tag: u32,
    },
    /// Receives a value of the declared type from pipeline stage `peer`. No operands.
    Recv {
        peer: u32,
        tag: u32,
    },
    /// The element-wise sum of its operand over every process of communication group `group`
    /// (`"dp"`: the data-parallel replicas), as `MPI_Allreduce(MPI_SUM)` or `ncclAllReduce`
    /// compute it: an f32 tensor of the operand's type, the same on every process. Run by the
    /// runtime between launches, never inside a kernel. A process that runs alone is a group of one,
    /// whose sum is the operand (the interpreter's reading).
    AllReduce {
        group: String,
    },
    /// Every process's operand of communication group `group`, which has `size` processes,
    /// stacked in rank order along a new first axis (`MPI_Allgather`, `ncclAllGather`): f32
    /// `[size, ..]` from f32 `[..]`, the same on every process. Run by the runtime between
    /// launches. The interpreter, one process, gathers over a group of one only.
    AllGather {
        group: String,
        size: u64,
    },
    /// Expert parallelism's dispatch and combine (`MPI_Alltoallv`; DeepSeek-V3 §3.2.2): process
    /// `p` of group `group` (`size` processes) sends block `q` of its first operand (f32
    /// `[size, ..]`) to process `q`, and its result's block `q` is what process `q` sent it. With
    /// a second operand `keep` (f32, whose shape is a prefix of the first's, `[size, ..]`), only
    /// the rows whose `keep` is nonzero travel, each row being the first operand's values under
    /// one element of `keep`; a row not sent arrives as zeros. So a token goes only to the
    /// processes that hold its experts, and comes back only from them. Self-adjoint: the gradient
    /// of `all_to_all(x, keep)` is `all_to_all(dy, all_to_all(keep))`. Run by the runtime between
    /// launches; the interpreter, one process, exchanges within a group of one only (the result
    /// is the operand, its rows not kept zeroed).
    AllToAll {
        group: String,
        size: u64,
    },
}

/// Why an op could not be rebuilt from its text form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AttrError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, AttrError> {
    Err(AttrError(msg.into()))
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 10] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Tanh,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
            UnaryOp::Tanh => "tanh",
        }
    }
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 6] =
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min];

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
        }
    }
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min];

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

impl Scoring {
    pub fn name(self) -> &'static str {
        match self {
            Scoring::Sigmoid => "sigmoid",
            Scoring::Softmax => "softmax",
        }
    }
}

impl GroupScore {
    pub fn name(self) -> &'static str {
        match self {
            GroupScore::Top2Sum => "top2_sum",
            GroupScore::Max => "max",
        }
    }
}

/// Attribute lists read by the parser, consumed key by key so that unknown keys are reported.
pub struct AttrReader<'a> {
    op: &'a str,
    attrs: Vec<(String, Attr)>,
}

impl<'a> AttrReader<'a> {
    pub fn new(op: &'a str, attrs: Vec<(String, Attr)>) -> Self {
        AttrReader { op, attrs }
    }

    fn take(&mut self, key: &str) -> Result<Attr, AttrError> {
        match self.attrs.iter().position(|(k, _)| k == key) {
            Some(i) => Ok(self.attrs.remove(i).1),
            None => err(format!("`{}` needs the attribute `{key}`", self.op)),
        }
    }

    fn take_opt(&mut self, key: &str) -> Option<Attr> {
        let i = self.attrs.iter().position(|(k, _)| k == key)?;
        Some(self.attrs.remove(i).1)
    }

    fn wrong(&self, key: &str, want: &str, got: &Attr) -> AttrError {
        AttrError(format!("attribute `{key}` of `{}` must be {want}, found `{got}`", self.op))
    }

    fn uint(&mut self, key: &str) -> Result<u64, AttrError> {
        match self.take(key)? {
            Attr::Int(v) if v >= 0 => Ok(v as u64),
            other => Err(self.wrong(key, "a non-negative integer", &other)),
        }
    }

    /// An optional non-negative integer, `default` when absent.
    fn uint_or(&mut self, key: &str, default: u64) -> Result<u64, AttrError> {
        match self.take_opt(key) {
            None => Ok(default),
            Some(Attr::Int(v)) if v >= 0 => Ok(v as u64),
            Some(other) => Err(self.wrong(key, "a non-negative integer", &other)),
        }
    }

    /// An optional integer of either sign, `None` when absent.
    fn int_opt(&mut self, key: &str) -> Result<Option<i64>, AttrError> {
        match self.take_opt(key) {
            None => Ok(None),
            Some(Attr::Int(v)) => Ok(Some(v)),
            Some(other) => Err(self.wrong(key, "an integer", &other)),
        }
    }

    fn u32(&mut self, key: &str) -> Result<u32, AttrError> {
        let v = self.uint(key)?;
        u32::try_from(v).map_err(|_| AttrError(format!("attribute `{key}` is too large: {v}")))
    }

    fn axis(&mut self, key: &str) -> Result<usize, AttrError> {
        Ok(self.uint(key)? as usize)
    }

    fn float(&mut self, key: &str) -> Result<f64, AttrError> {
        match self.take(key)? {
            Attr::Float(v) => Ok(v),
            Attr::Int(v) => Ok(v as f64),
            other => Err(self.wrong(key, "a number", &other)),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<bool, AttrError> {
        match self.take(key)? {
            Attr::Bool(v) => Ok(v),
            other => Err(self.wrong(key, "`true` or `false`", &other)),
        }
    }

    /// An optional boolean, `default` when absent.
    fn boolean_or(&mut self, key: &str, default: bool) -> Result<bool, AttrError> {
        match self.take_opt(key) {
            None => Ok(default),
            Some(Attr::Bool(v)) => Ok(v),
            Some(other) => Err(self.wrong(key, "`true` or `false`", &other)),
        }
    }

    fn string(&mut self, key: &str) -> Result<String, AttrError> {
        match self.take(key)? {
            Attr::Str(s) => Ok(s),
            other => Err(self.wrong(key, "a quoted string", &other)),
        }
    }

    fn ident(&mut self, key: &str, allowed: &[&str]) -> Result<String, AttrError> {
        match self.take(key)? {
            Attr::Ident(s) if allowed.contains(&s.as_str()) => Ok(s),
            other => Err(self.wrong(key, &format!("one of {}", allowed.join(", ")), &other)),
        }
    }

    fn dtype(&mut self, key: &str) -> Result<DType, AttrError> {
        let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
        let s = self.ident(key, &names)?;
        Ok(DType::from_name(&s).expect("name checked against DType::ALL"))
    }

    fn uint_list(&mut self, key: &str) -> Result<Vec<u64>, AttrError> {
        match self.take(key)? {
            Attr::List(items) => items
                .iter()
                .map(|a| match a {
                    Attr::Int(v) if *v >= 0 => Ok(*v as u64),
                    other => Err(self.wrong(key, "a list of non-negative integers", other)),
                })
                .collect(),
            other => Err(self.wrong(key, "a list of non-negative integers", &other)),
        }
    }

    fn axes(&mut self, key: &str) -> Result<Vec<usize>, AttrError> {
        Ok(self.uint_list(key)?.into_iter().map(|v| v as usize).collect())
    }

    fn dims(&mut self, key: &str) -> Result<Vec<Dim>, AttrError> {
        match self.take(key)? {
            Attr::List(items) => items
                .iter()
                .map(|a| match a {
                    Attr::Int(v) if *v >= 0 => Ok(Dim::known(*v as u64)),
                    Attr::Ident(s) | Attr::Str(s) => {
                        Dim::parse(s).ok_or_else(|| self.wrong(key, "a list of dimensions", a))
                    }
                    other => Err(self.wrong(key, "a list of dimensions", other)),
                })
                .collect(),
            other => Err(self.wrong(key, "a list of dimensions", &other)),
        }
    }

    /// Fails if any attribute was not consumed.
    fn finish(self) -> Result<(), AttrError> {
        match self.attrs.first() {
            None => Ok(()),
            Some((k, _)) => err(format!("`{}` has no attribute `{k}`", self.op)),
        }
    }
}

fn uints(v: &[u64]) -> Attr {
    Attr::List(v.iter().map(|&x| Attr::Int(x as i64)).collect())
}

fn axes(v: &[usize]) -> Attr {
    Attr::List(v.iter().map(|&x| Attr::Int(x as i64)).collect())
}

fn dims(v: &[Dim]) -> Attr {
    Attr::List(
        v.iter()
            .map(|d| match d.as_known() {
                Some(n) => Attr::Int(n as i64),
                None => Attr::Ident(d.to_string()),
            })
            .collect(),
    )
}

fn ident(s: &str) -> Attr {
    Attr::Ident(s.to_string())
}

impl Op {
    /// The op's name in the text IR.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Constant { .. } => "constant",
            Op::Linear => "linear",
            Op::MatMul => "matmul",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Cast { .. } => "cast",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "reduce_sum",
                ReduceOp::Mean => "reduce_mean",
                ReduceOp::Max => "reduce_max",
                ReduceOp::Min => "reduce_min",
            },
            Op::Softmax { .. } => "softmax",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Rope(_) => "rope",
            Op::Attention { .. } => "attention",
            Op::CacheUpdate => "cache_update",
            Op::Embedding => "embedding",
            Op::Gather { .. } => "gather",
            Op::TopK { .. } => "topk",
            Op::Concat { .. } => "concat",
            Op::Split { .. } => "split",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Broadcast { .. } => "broadcast",
            Op::Quantize { .. } => "quantize",
            Op::Dequantize { .. } => "dequantize",
            Op::MoeRoute(_) => "moe_route",
            Op::MoeExperts { .. } => "moe_experts",
            Op::MoeDispatch(_) => "moe_dispatch",
            Op::GroupedLinear { .. } => "grouped_linear",
            Op::MoeCombine { .. } => "moe_combine",
            Op::EmbeddingGrad { .. } => "embedding_grad",
            Op::CrossEntropyGrad { .. } => "cross_entropy_grad",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::TakeAlong { .. } => "take_along",
            Op::ScatterAddAlong { .. } => "scatter_add_along",
            Op::GroupedLinearWgrad { .. } => "grouped_linear_wgrad",
            Op::MoeCombineGrad { .. } => "moe_combine_grad",
            Op::PromotedGemm { .. } => "promoted_gemm",
            Op::Fused { .. } => "fused",
            Op::Send { .. } => "send",
            Op::Recv { .. } => "recv",
            Op::AllReduce { .. } => "all_reduce",
            Op::AllGather { .. } => "all_gather",
            Op::AllToAll { .. } => "all_to_all",
        }
    }

    /// Ops whose result type is declared in the text rather than inferred from operands.
    pub fn declares_type(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Recv { .. })
    }

    /// The attributes in print order. `Fused` prints its body separately and lists only its name.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        match self {
            Op::Input { name } | Op::Param { name } => vec![("name", Attr::Str(name.clone()))],
            Op::Constant { value } => vec![("value", Attr::Float(*value))],
            Op::Linear | Op::MatMul | Op::Unary(_) | Op::Binary(_) | Op::Embedding | Op::CacheUpdate => {
                vec![]
            }
            Op::Cast { to } => vec![("to", ident(to.name()))],
            Op::Reduce { axes: a, keep_dims, .. } => {
                vec![("axes", axes(a)), ("keep_dims", Attr::Bool(*keep_dims))]
            }
            Op::Softmax { axis } | Op::Gather { axis } | Op::Concat { axis } | Op::TakeAlong { axis } => {
                vec![("axis", Attr::Int(*axis as i64))]
            }
            Op::CrossEntropy { ignore_index } | Op::CrossEntropyGrad { ignore_index } => {
                ignore_index.iter().map(|&i| ("ignore_index", Attr::Int(i))).collect()
            }
            Op::RmsNorm { eps } => vec![("eps", Attr::Float(*eps))],
            Op::Rope(c) => {
                let mut v = vec![("theta", Attr::Float(c.theta)), ("interleaved", Attr::Bool(c.interleaved))];
                if let Some(y) = &c.yarn {
                    v.push(("yarn_factor", Attr::Float(y.factor)));
                    v.push(("yarn_original_max_position", Attr::Int(y.original_max_position as i64)));
                    v.push(("yarn_beta_fast", Attr::Float(y.beta_fast)));
                    v.push(("yarn_beta_slow", Attr::Float(y.beta_slow)));
                }
                if c.inverse {
                    v.push(("inverse", Attr::Bool(true)));
                }
                v
            }
            Op::Attention { scale, causal, mla } => {
                let mut v = vec![("scale", Attr::Float(*scale)), ("causal", Attr::Bool(*causal))];
                v.extend(mla.map(|f| ("mla", ident(f.name()))));
                v
            }
            Op::AttentionGrad { scale, causal } => {
                vec![("scale", Attr::Float(*scale)), ("causal", Attr::Bool(*causal))]
            }
            Op::EmbeddingGrad { rows } => vec![("rows", Attr::Int(*rows as i64))],
            Op::ScatterAddAlong { axis, size } => {
                vec![("axis", Attr::Int(*axis as i64)), ("size", Attr::Int(*size as i64))]
            }
            Op::TopK { k } => vec![("k", Attr::Int(*k as i64))],
            Op::Split { axis, sizes } => {
                vec![("axis", Attr::Int(*axis as i64)), ("sizes", uints(sizes))]
            }
            Op::Reshape { shape } | Op::Broadcast { shape } => vec![("shape", dims(shape))],
            Op::Transpose { perm } => vec![("perm", axes(perm))],
            Op::Quantize { to, spec } => vec![
                ("to", ident(to.name())),
                ("block", uints(&spec.block)),
                ("amax_floor", Attr::Float(spec.amax_floor)),
                ("pow2_scale", Attr::Bool(spec.pow2_scale)),
            ],
            Op::Dequantize { to, block } => {
                vec![("to", ident(to.name())), ("block", uints(block))]
            }
            Op::MoeRoute(r) => vec![
                ("num_experts", Attr::Int(r.num_experts as i64)),
                ("top_k", Attr::Int(r.top_k as i64)),
                ("scoring", ident(r.scoring.name())),
                ("num_groups", Attr::Int(r.num_groups as i64)),
                ("topk_groups", Attr::Int(r.topk_groups as i64)),
                ("group_score", ident(r.group_score.name())),
                ("normalize", Attr::Bool(r.normalize)),
                ("scaling", Attr::Float(r.scaling)),
            ],
            Op::MoeExperts { num_experts }
            | Op::GroupedLinear { num_experts }
            | Op::GroupedLinearWgrad { num_experts } => {
                vec![("num_experts", Attr::Int(*num_experts as i64))]
            }
            Op::MoeDispatch(d) => {
                let mut v = vec![
                    ("num_experts", Attr::Int(d.num_experts as i64)),
                    ("top_k", Attr::Int(d.top_k as i64)),
                    ("ep_size", Attr::Int(d.ep_size as i64)),
                ];
                if (d.num_groups, d.topk_groups) != (1, 1) {
                    v.push(("num_groups", Attr::Int(d.num_groups as i64)));
                    v.push(("topk_groups", Attr::Int(d.topk_groups as i64)));
                }
                v
            }
            Op::MoeCombine { top_k } | Op::MoeCombineGrad { top_k } => {
                vec![("top_k", Attr::Int(*top_k as i64))]
            }
            Op::PromotedGemm { form, k_block } => {
                let mut v = vec![("form", ident(form.name()))];
                if let GemmForm::Grouped { num_experts } | GemmForm::GroupedWgrad { num_experts } = form {
                    v.push(("num_experts", Attr::Int(*num_experts as i64)));
                }
                v.push(("k_block", Attr::Int(*k_block as i64)));
                v
            }
            Op::Fused { name, .. } => vec![("name", Attr::Str(name.clone()))],
            Op::Send { peer, tag } | Op::Recv { peer, tag } => {
                vec![("peer", Attr::Int(*peer as i64)), ("tag", Attr::Int(*tag as i64))]
            }
            Op::AllReduce { group } => vec![("group", Attr::Str(group.clone()))],
            Op::AllGather { group, size } | Op::AllToAll { group, size } => {
                vec![("group", Attr::Str(group.clone())), ("size", Attr::Int(*size as i64))]
            }
        }
    }

    /// Rebuilds an op from its text name and attributes. `Fused` is built by the parser itself,
    /// which owns the body.
    pub fn from_parts(name: &str, attrs: Vec<(String, Attr)>) -> Result<Op, AttrError> {
        let mut r = AttrReader::new(name, attrs);
        let op = match name {
            "input" => Op::Input { name: r.string("name")? },
            "param" => Op::Param { name: r.string("name")? },
            "constant" => Op::Constant { value: r.float("value")? },
            "linear" => Op::Linear,
            "matmul" => Op::MatMul,
            "embedding" => Op::Embedding,
            "cache_update" => Op::CacheUpdate,
            "cast" => Op::Cast { to: r.dtype("to")? },
            "reduce_sum" | "reduce_mean" | "reduce_max" | "reduce_min" => {
                let op = match name {
                    "reduce_sum" => ReduceOp::Sum,
                    "reduce_mean" => ReduceOp::Mean,
                    "reduce_max" => ReduceOp::Max,
                    _ => ReduceOp::Min,
                };
                Op::Reduce { op, axes: r.axes("axes")?, keep_dims: r.boolean("keep_dims")? }
            }
            "softmax" => Op::Softmax { axis: r.axis("axis")? },
            "gather" => Op::Gather { axis: r.axis("axis")? },
            "concat" => Op::Concat { axis: r.axis("axis")? },
            "rms_norm" => Op::RmsNorm { eps: r.float("eps")? },
            "cross_entropy" => Op::CrossEntropy { ignore_index: r.int_opt("ignore_index")? },
            "rope" => {
                let theta = r.float("theta")?;
                let interleaved = r.boolean("interleaved")?;
                let yarn = match r.take_opt("yarn_factor") {
                    None => None,
                    Some(f) => {
                        r.attrs.push(("yarn_factor".into(), f));
                        Some(Yarn {
                            factor: r.float("yarn_factor")?,
                            original_max_position: r.uint("yarn_original_max_position")?,
                            beta_fast: r.float("yarn_beta_fast")?,
                            beta_slow: r.float("yarn_beta_slow")?,
                        })
                    }
                };
                let inverse = r.boolean_or("inverse", false)?;
                Op::Rope(RopeConfig { theta, interleaved, yarn, inverse })
            }
            "attention" => {
                let (scale, causal) = (r.float("scale")?, r.boolean("causal")?);
                let mla = match r.take_opt("mla") {
                    None => None,
                    Some(Attr::Ident(f)) if f == "naive" => Some(MlaForm::Naive),
                    Some(Attr::Ident(f)) if f == "absorbed" => Some(MlaForm::Absorbed),
                    Some(other) => return Err(r.wrong("mla", "one of naive, absorbed", &other)),
                };
                Op::Attention { scale, causal, mla }
            }
            "topk" => Op::TopK { k: r.uint("k")? },
            "split" => Op::Split { axis: r.axis("axis")?, sizes: r.uint_list("sizes")? },
            "reshape" => Op::Reshape { shape: r.dims("shape")? },
            "transpose" => Op::Transpose { perm: r.axes("perm")? },
            "broadcast" => Op::Broadcast { shape: r.dims("shape")? },
            "quantize" => Op::Quantize {
                to: r.dtype("to")?,
                spec: QuantSpec {
                    block: r.uint_list("block")?,
                    amax_floor: r.float("amax_floor")?,
                    pow2_scale: r.boolean("pow2_scale")?,
                },
            },
            "dequantize" => Op::Dequantize { to: r.dtype("to")?, block: r.uint_list("block")? },
            "moe_route" => Op::MoeRoute(Router {
                num_experts: r.uint("num_experts")?,
                top_k: r.uint("top_k")?,
                scoring: match r.ident("scoring", &["sigmoid", "softmax"])?.as_str() {
                    "sigmoid" => Scoring::Sigmoid,
                    _ => Scoring::Softmax,
                },
                num_groups: r.uint("num_groups")?,
                topk_groups: r.uint("topk_groups")?,
                group_score: match r.ident("group_score", &["top2_sum", "max"])?.as_str() {
                    "top2_sum" => GroupScore::Top2Sum,
                    _ => GroupScore::Max,
                },
                normalize: r.boolean("normalize")?,
                scaling: r.float("scaling")?,
            }),
            "moe_experts" => Op::MoeExperts { num_experts: r.uint("num_experts")? },
            "grouped_linear" => Op::GroupedLinear { num_experts: r.uint("num_experts")? },
            "moe_dispatch" => Op::MoeDispatch(Dispatch {
                num_experts: r.uint("num_experts")?,
                top_k: r.uint("top_k")?,
                ep_size: r.uint("ep_size")?,
                num_groups: r.uint_or("num_groups", 1)?,
                topk_groups: r.uint_or("topk_groups", 1)?,
            }),
            "moe_combine" => Op::MoeCombine { top_k: r.uint("top_k")? },
            "embedding_grad" => Op::EmbeddingGrad { rows: r.uint("rows")? },
            "cross_entropy_grad" => Op::CrossEntropyGrad { ignore_index: r.int_opt("ignore_index")? },
            "attention_grad" => Op::AttentionGrad { scale: r.float("scale")?, causal: r.boolean("causal")? },
            "take_along" => Op::TakeAlong { axis: r.axis("axis")? },
            "scatter_add_along" => Op::ScatterAddAlong { axis: r.axis("axis")?, size: r.uint("size")? },
            "grouped_linear_wgrad" => Op::GroupedLinearWgrad { num_experts: r.uint("num_experts")? },
            "moe_combine_grad" => Op::MoeCombineGrad { top_k: r.uint("top_k")? },
            "promoted_gemm" => {
                let form = r.ident("form", &["linear", "grouped_linear", "grouped_linear_wgrad"])?;
                let form = match form.as_str() {
                    "linear" => GemmForm::Linear,
                    "grouped_linear" => GemmForm::Grouped { num_experts: r.uint("num_experts")? },
                    _ => GemmForm::GroupedWgrad { num_experts: r.uint("num_experts")? },
                };
                Op::PromotedGemm { form, k_block: r.uint("k_block")? }
            }
            "send" => Op::Send { peer: r.u32("peer")?, tag: r.u32("tag")? },
            "recv" => Op::Recv { peer: r.u32("peer")?, tag: r.u32("tag")? },
            "all_reduce" => Op::AllReduce { group: r.string("group")? },
            "all_gather" => Op::AllGather { group: r.string("group")?, size: r.uint("size")? },
            "all_to_all" => Op::AllToAll { group: r.string("group")?, size: r.uint("size")? },
            "fused" => return err("`fused` is parsed with its body, not from attributes"),
            other => {
                if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == other) {
                    Op::Unary(u)
                } else if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == other) {
                    Op::Binary(b)
                } else {
                    return err(format!("unknown op `{other}`"));
                }
            }
        };
        r.finish()?;
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(op: Op) {
        let attrs = op.attrs().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(Op::from_parts(op.name(), attrs), Ok(op));
    }

    #[test]
    fn attrs_round_trip() {
        round_trip(Op::Linear);
        round_trip(Op::Unary(UnaryOp::Silu));
        round_trip(Op::Binary(BinaryOp::Max));
        round_trip(Op::Reduce { op: ReduceOp::Mean, axes: vec![2], keep_dims: true });
        round_trip(Op::Rope(RopeConfig {
            theta: 10000.0,
            interleaved: true,
            yarn: Some(Yarn { factor: 40.0, original_max_position: 4096, beta_fast: 32.0, beta_slow: 1.0 }),
            inverse: false,
        }));
        round_trip(Op::Rope(RopeConfig { theta: 5e4, interleaved: false, yarn: None, inverse: false }));
        round_trip(Op::Rope(RopeConfig { theta: 5e4, interleaved: false, yarn: None, inverse: true }));
        round_trip(Op::EmbeddingGrad { rows: 129_280 });
        round_trip(Op::CrossEntropyGrad { ignore_index: None });
        round_trip(Op::CrossEntropyGrad { ignore_index: Some(-100) });
        round_trip(Op::AttentionGrad { scale: 0.1352338, causal: true });
        round_trip(Op::TakeAlong { axis: 1 });
        round_trip(Op::ScatterAddAlong { axis: 1, size: 256 });
        round_trip(Op::GroupedLinearWgrad { num_experts: 8 });
        round_trip(Op::MoeCombineGrad { top_k: 8 });
        round_trip(Op::PromotedGemm { form: GemmForm::Linear, k_block: 128 });
        round_trip(Op::PromotedGemm { form: GemmForm::Grouped { num_experts: 16 }, k_block: 128 });
        round_trip(Op::PromotedGemm { form: GemmForm::GroupedWgrad { num_experts: 4 }, k_block: 64 });
        round_trip(Op::Reshape { shape: vec![Dim::B, Dim::T, Dim::known(128)] });
        round_trip(Op::CrossEntropy { ignore_index: None });
        round_trip(Op::CrossEntropy { ignore_index: Some(-100) });
        round_trip(Op::MoeRoute(Router {
            num_experts: 256,
            top_k: 8,
            scoring: Scoring::Sigmoid,
            num_groups: 8,
            topk_groups: 4,
            group_score: GroupScore::Top2Sum,
            normalize: true,
            scaling: 2.5,
        }));
        let dispatch = Dispatch { num_experts: 256, top_k: 8, ep_size: 64, num_groups: 1, topk_groups: 1 };
        round_trip(Op::MoeDispatch(dispatch.clone()));
        round_trip(Op::MoeDispatch(Dispatch { num_groups: 8, topk_groups: 4, ..dispatch }));
        round_trip(Op::Quantize {
            to: DType::F8E4M3,
            spec: QuantSpec { block: vec![1, 128], amax_floor: 1e-4, pow2_scale: false },
        });
    }

    #[test]
    fn bad_attrs_are_reported() {
        let e = Op::from_parts("topk", vec![]).unwrap_err();
        assert_eq!(e.0, "`topk` needs the attribute `k`");
        let e =
            Op::from_parts("topk", vec![("k".into(), Attr::Int(2)), ("x".into(), Attr::Int(1))]).unwrap_err();
        assert_eq!(e.0, "`topk` has no attribute `x`");
        let e = Op::from_parts("cast", vec![("to".into(), Attr::Ident("f7".into()))]).unwrap_err();
        assert!(e.0.contains("must be one of f32"), "{}", e.0);
        assert_eq!(Op::from_parts("frobnicate", vec![]).unwrap_err().0, "unknown op `frobnicate`");
        let e = Op::from_parts("cross_entropy", vec![("ignore_index".into(), Attr::Float(1.5))]).unwrap_err();
        assert_eq!(e.0, "attribute `ignore_index` of `cross_entropy` must be an integer, found `1.5`");
        let rope = |extra: Vec<(String, Attr)>| {
            let mut attrs =
                vec![("theta".into(), Attr::Float(1e4)), ("interleaved".into(), Attr::Bool(false))];
            attrs.extend(extra);
            Op::from_parts("rope", attrs)
        };
        // `inverse` is optional and false when absent; written false, it reads back as absent.
        assert!(matches!(rope(vec![]), Ok(Op::Rope(RopeConfig { inverse: false, .. }))));
        let f = rope(vec![("inverse".into(), Attr::Bool(false))]).unwrap();
        assert_eq!(f.attrs().len(), 2);
        let e = rope(vec![("inverse".into(), Attr::Int(1))]).unwrap_err();
        assert_eq!(e.0, "attribute `inverse` of `rope` must be `true` or `false`, found `1`");
        let e = Op::from_parts("scatter_add_along", vec![("axis".into(), Attr::Int(0))]).unwrap_err();
        assert_eq!(e.0, "`scatter_add_along` needs the attribute `size`");
    }
}
