//! The families lowered in `shape`, `rope`, `attention`, `moe` and `quant`, `cross_entropy`, and the
//! backward ops of training (`grad`, `attention::grad`, `cross_entropy_grad`, `take_along`, `rope`
//! with `inverse`), on hand-chosen shapes and dtypes (symbolic sizes, several parts, grouped heads,
//! causal offsets, cache positions, expert groups and experts of no rows, repeated ids, ignored
//! targets, edge tiles, rows longer than a GPU block), run on the CPU against the interpreter on
//! random inputs (the backward kernels also with their result buffers full of garbage, which they
//! must overwrite); every one of them also passes `ptxas` without spills (registers printed). Then
//! what random inputs do not reach: the FP8 encoding of every interesting f32 bit for bit, clamped
//! ids, ties and NaN in top-k, rope at DeepSeek-V3's largest positions and its inverse, FP8 tiles
//! that are zero, tiny, infinite or NaN, attention rows that see no key (forward and backward),
//! cross-entropy targets (and their gradient's) that are ignored or out of range, and the ids,
//! indices, offsets and slots the interpreter rejects, which the backward kernels skip.

use kiln_compiler::codegen::{lower_module, Kernel, Target};
use kiln_compiler::pack::parse_report;
use kiln_ir::interp::numerics::{f8e4m3_from_f32, f8e4m3_to_f32};
use kiln_ir::op::{Dispatch, GroupScore, QuantSpec, RopeConfig, Router, Scoring, Yarn};
use kiln_ir::types::SymBindings;
use kiln_ir::{DType, Dim, GemmForm, Op};

use super::harness::{numel, to_bf16, Buf, CpuLib, Rng, BIND};
use super::oracle::{check, check_writes_everything, random_inputs};
use super::{kernel, ptxas_accepts};

const TINY_YARN: Yarn = Yarn { factor: 4.0, original_max_position: 256, beta_fast: 32.0, beta_slow: 1.0 };
const V3_YARN: Yarn = Yarn { factor: 40.0, original_max_position: 4096, beta_fast: 32.0, beta_slow: 1.0 };

fn shape(dims: &[&str]) -> Vec<Dim> {
    dims.iter().map(|d| Dim::parse(d).unwrap()).collect()
}

fn router(
    e: u64,
    k: u64,
    scoring: Scoring,
    groups: (u64, u64, GroupScore),
    normalize: bool,
    scaling: f64,
) -> Op {
    Op::MoeRoute(Router {
        num_experts: e,
        top_k: k,
        scoring,
        num_groups: groups.0,
        topk_groups: groups.1,
        group_score: groups.2,
        normalize,
        scaling,
    })
}

/// `moe_experts` with one expert per entry of `inter` (its intermediate size), model dimension 8.
fn experts(x: &str, w: &str, idx: &str, dtype: &str, inter: &[u64]) -> Kernel {
    let mut args = vec![x.to_string(), w.to_string(), idx.to_string()];
    for i in inter {
        args.extend([format!("{dtype}[{i}, 8]"), format!("{dtype}[{i}, 8]"), format!("{dtype}[8, {i}]")]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    kernel(Op::MoeExperts { num_experts: inter.len() as u64 }, &refs)
}

fn quantize(block: &[u64], pow2: bool) -> Op {
    Op::Quantize {
        to: DType::F8E4M3,
        spec: QuantSpec { block: block.to_vec(), amax_floor: 1e-4, pow2_scale: pow2 },
    }
}

/// The backward ops of training: `(op, argument types, range of the float inputs)`.
fn grad_cases(
    rope_grad: impl Fn(bool, Option<Yarn>) -> Op,
    cross_entropy_grad: impl Fn(Option<i64>) -> Op,
    attention_grad: impl Fn(bool) -> Op,
) -> Vec<(Op, Vec<&'static str>, (f32, f32))> {
    vec![
        (rope_grad(true, Some(TINY_YARN)), vec!["f32[B, T, 4, 8]", "i32[B, T]"], (-2.0, 2.0)),
        (rope_grad(false, None), vec!["bf16[B, T, 2, 16]", "i64[B, T]"], (-2.0, 2.0)),
        (cross_entropy_grad(None), vec!["f32[B, T, 37]", "i32[B, T]", "f32[B, T]"], (-4.0, 4.0)),
        (cross_entropy_grad(None), vec!["bf16[3*T, 50]", "i64[3*T]", "f32[3*T]"], (-4.0, 4.0)),
        (cross_entropy_grad(Some(-100)), vec!["f32[T, 300]", "i64[T]", "f32[T]"], (-8.0, 8.0)),
        (cross_entropy_grad(Some(0)), vec!["bf16[B, 3, 7]", "i32[B, 3]", "f32[B, 3]"], (-4.0, 4.0)),
        (cross_entropy_grad(None), vec!["f32[B, T, 33]", "i64[B, T]", "f32[B, T]"], (5000.0, 5016.0)),
        // Ids drawn from four rows (oracle): repeated ids; 5000 rows span three blocks of rows.
        (Op::EmbeddingGrad { rows: 50 }, vec!["i32[B, T]", "f32[B, T, 16]"], (-2.0, 2.0)),
        (Op::EmbeddingGrad { rows: 5000 }, vec!["i64[T]", "bf16[T, 3]"], (-2.0, 2.0)),
        (Op::EmbeddingGrad { rows: 7 }, vec!["i32[B, 4*T]", "f32[B, 4*T, 37]"], (-2.0, 2.0)),
        (Op::TakeAlong { axis: 2 }, vec!["f32[B, T, 10]", "i32[B, T, 3]"], (-2.0, 2.0)),
        (Op::TakeAlong { axis: 1 }, vec!["bf16[B, 7, 4]", "i64[B, 3, 4]"], (-2.0, 2.0)),
        (Op::TakeAlong { axis: 0 }, vec!["i32[5, T]", "i32[2, T]"], (-2.0, 2.0)),
        (Op::ScatterAddAlong { axis: 2, size: 10 }, vec!["i32[B, T, 3]", "f32[B, T, 3]"], (-2.0, 2.0)),
        (Op::ScatterAddAlong { axis: 0, size: 4 }, vec!["i64[6, T]", "bf16[6, T]"], (-2.0, 2.0)),
        // Grouped heads (4 query heads on 2 key heads) and a causal offset (S = 5 > T = 3).
        (
            attention_grad(true),
            vec!["f32[B, T, 4, 8]", "f32[B, S, 2, 8]", "f32[B, S, 2, 6]", "f32[B, T, 4, 6]"],
            (-2.0, 2.0),
        ),
        (
            attention_grad(false),
            vec!["bf16[B, T, 2, 16]", "bf16[B, S, 1, 16]", "bf16[B, S, 1, 16]", "bf16[B, T, 2, 16]"],
            (-2.0, 2.0),
        ),
        (
            attention_grad(true),
            vec!["f32[B, T, 3, 40]", "f32[B, T, 3, 40]", "f32[B, T, 3, 40]", "f32[B, T, 3, 40]"],
            (-1.0, 1.0),
        ),
        // A KV cache read at positions; head dimensions over a GPU block (two columns a thread).
        (
            attention_grad(true),
            vec![
                "f32[B, T, 2, 136]",
                "f32[B, S, 1, 136]",
                "f32[B, S, 1, 130]",
                "i32[B, T]",
                "f32[B, T, 2, 130]",
            ],
            (-0.5, 0.5),
        ),
        // DeepSeek-V3's head sizes (the naive MLA form: as many key heads as query heads).
        (
            attention_grad(true),
            vec!["bf16[B, T, 2, 192]", "bf16[B, T, 2, 192]", "bf16[B, T, 2, 128]", "bf16[B, T, 2, 128]"],
            (-0.5, 0.5),
        ),
        // Expert 1 has no rows (oracle).
        (
            Op::GroupedLinearWgrad { num_experts: 3 },
            vec!["bf16[2*T, 8]", "i32[4]", "bf16[2*T, 5]"],
            (-1.0, 1.0),
        ),
        (Op::GroupedLinearWgrad { num_experts: 2 }, vec!["f32[T, 9]", "i64[3]", "f32[T, 4]"], (-1.0, 1.0)),
        (
            Op::MoeCombineGrad { top_k: 2 },
            vec!["bf16[T, 8]", "bf16[2*T, 8]", "i32[2*T]", "f32[T, 2]"],
            (-2.0, 2.0),
        ),
        (
            Op::MoeCombineGrad { top_k: 3 },
            vec!["f32[T, 300]", "f32[3*T, 300]", "i64[3*T]", "f32[T, 3]"],
            (-2.0, 2.0),
        ),
    ]
}

/// Whether `op` is one of the backward ops of training (or `take_along`), whose kernels are also
/// checked to write every element of their results.
fn is_grad(op: &Op) -> bool {
    matches!(
        op,
        Op::Rope(RopeConfig { inverse: true, .. })
            | Op::CrossEntropyGrad { .. }
            | Op::EmbeddingGrad { .. }
            | Op::TakeAlong { .. }
            | Op::ScatterAddAlong { .. }
            | Op::AttentionGrad { .. }
            | Op::GroupedLinearWgrad { .. }
            | Op::MoeCombineGrad { .. }
            | Op::PromotedGemm { .. }
    )
}

fn promoted(form: GemmForm, k_block: u64) -> Op {
    Op::PromotedGemm { form, k_block }
}

/// Every case: a kernel and the range of its float inputs.
fn cases() -> Vec<(Kernel, (f32, f32))> {
    let rope = |interleaved, yarn| Op::Rope(RopeConfig { theta: 10000.0, interleaved, yarn, inverse: false });
    let dispatch = |groups: (u64, u64)| {
        Op::MoeDispatch(Dispatch {
            num_experts: 4,
            top_k: 2,
            ep_size: 1,
            num_groups: groups.0,
            topk_groups: groups.1,
        })
    };
    let attention = |causal| Op::Attention { scale: 0.35, causal, mla: None };
    let cross_entropy = |ignore_index| Op::CrossEntropy { ignore_index };
    let rope_grad =
        |interleaved, yarn| Op::Rope(RopeConfig { theta: 10000.0, interleaved, yarn, inverse: true });
    let cross_entropy_grad = |ignore_index| Op::CrossEntropyGrad { ignore_index };
    let attention_grad = |causal| Op::AttentionGrad { scale: 0.35, causal };
    let mut cases: Vec<(Op, Vec<&str>, (f32, f32))> = vec![
        (Op::Concat { axis: 2 }, vec!["bf16[B, T, 5]", "bf16[B, T, 3]", "bf16[B, T, 1]"], (-2.0, 2.0)),
        (Op::Concat { axis: 0 }, vec!["i32[T, 2]", "i32[2*T, 2]"], (-2.0, 2.0)),
        (Op::Concat { axis: 1 }, vec!["bool[2, 3]", "bool[2, 4]"], (-2.0, 2.0)),
        (Op::Concat { axis: 3 }, vec!["f8e4m3[B, T, 2, 4]", "f8e4m3[B, T, 2, 3]"], (-300.0, 300.0)),
        (Op::Split { axis: 3, sizes: vec![16, 8] }, vec!["bf16[B, T, 2, 24]"], (-2.0, 2.0)),
        (Op::Split { axis: 1, sizes: vec![1, 2, 3] }, vec!["i64[B, 6]"], (-2.0, 2.0)),
        (Op::Split { axis: 0, sizes: vec![1, 2] }, vec!["f32[3, T]"], (-2.0, 2.0)),
        // Rows of known length copied in runs on the CPU: a row longer than a work item's chunk
        // of 2048 elements, the second chunk partial and holding the boundary between the parts.
        (Op::Concat { axis: 0 }, vec!["f32[300, 7]", "f32[200, 7]"], (-2.0, 2.0)),
        (Op::Split { axis: 0, sizes: vec![300, 200] }, vec!["bf16[500, 7]"], (-2.0, 2.0)),
        (Op::Broadcast { shape: shape(&["B", "T", "4", "8"]) }, vec!["bf16[B, T, 1, 8]"], (-2.0, 2.0)),
        (Op::Broadcast { shape: shape(&["T", "3", "5"]) }, vec!["i32[T, 3, 1]"], (-2.0, 2.0)),
        (Op::Broadcast { shape: shape(&["2", "3"]) }, vec!["f32[]"], (-2.0, 2.0)),
        (Op::Broadcast { shape: shape(&["T", "4"]) }, vec!["f32[T, 1]"], (-2.0, 2.0)),
        (Op::Transpose { perm: vec![0, 2, 1, 3] }, vec!["f32[B, T, 4, 6]"], (-2.0, 2.0)),
        (Op::Transpose { perm: vec![2, 0, 1] }, vec!["bool[2, 3, 4]"], (-2.0, 2.0)),
        (Op::Transpose { perm: vec![1, 0] }, vec!["bf16[T, 7]"], (-2.0, 2.0)),
        (Op::Embedding, vec!["bf16[50, 16]", "i32[B, T]"], (-2.0, 2.0)),
        (Op::Embedding, vec!["f32[7, 3]", "i64[T]"], (-2.0, 2.0)),
        (Op::Gather { axis: 1 }, vec!["f32[B, 7, 3]", "i64[T, 2]"], (-2.0, 2.0)),
        (Op::Gather { axis: 0 }, vec!["bf16[9, 4]", "i32[5]"], (-2.0, 2.0)),
        (Op::Gather { axis: 2 }, vec!["i32[2, 3, 6]", "i32[T]"], (-2.0, 2.0)),
        (rope(true, Some(TINY_YARN)), vec!["f32[B, T, 4, 8]", "i32[B, T]"], (-2.0, 2.0)),
        (rope(false, None), vec!["bf16[B, T, 2, 16]", "i64[B, T]"], (-2.0, 2.0)),
        (rope(true, Some(V3_YARN)), vec!["f32[B, T, 1, 64]", "i32[B, T]"], (-2.0, 2.0)),
        (attention(true), vec!["f32[B, T, 4, 8]", "f32[B, S, 2, 8]", "f32[B, S, 2, 6]"], (-2.0, 2.0)),
        (attention(false), vec!["bf16[B, T, 2, 16]", "bf16[B, S, 1, 16]", "bf16[B, S, 1, 16]"], (-2.0, 2.0)),
        (attention(true), vec!["f32[B, T, 3, 40]", "f32[B, T, 3, 40]", "f32[B, T, 3, 40]"], (-1.0, 1.0)),
        (Op::TopK { k: 3 }, vec!["f32[B, T, 10]"], (-2.0, 2.0)),
        (Op::TopK { k: 2 }, vec!["i32[B, 7]"], (-2.0, 2.0)),
        (Op::TopK { k: 1 }, vec!["bf16[5, 4]"], (-2.0, 2.0)),
        (
            router(16, 4, Scoring::Sigmoid, (4, 2, GroupScore::Top2Sum), true, 2.5),
            vec!["f32[B, T, 16]", "f32[16]"],
            (-3.0, 3.0),
        ),
        (
            router(16, 3, Scoring::Softmax, (4, 2, GroupScore::Max), false, 1.0),
            vec!["f32[B, T, 16]"],
            (-3.0, 3.0),
        ),
        (
            router(8, 2, Scoring::Sigmoid, (1, 1, GroupScore::Max), true, 1.0),
            vec!["bf16[T, 8]", "bf16[8]"],
            (-3.0, 3.0),
        ),
        (dispatch((1, 1)), vec!["bf16[T, 8]", "i32[T, 2]"], (-2.0, 2.0)),
        (dispatch((2, 1)), vec!["f32[2*T, 5]", "i64[2*T, 2]"], (-2.0, 2.0)),
        (
            Op::GroupedLinear { num_experts: 3 },
            vec!["bf16[2*T, 8]", "i32[4]", "bf16[5, 8]", "bf16[5, 8]", "bf16[5, 8]"],
            (-1.0, 1.0),
        ),
        (
            Op::GroupedLinear { num_experts: 2 },
            vec!["f32[T, 9]", "i64[3]", "f32[4, 9]", "f32[4, 9]"],
            (-1.0, 1.0),
        ),
        // Enough rows per expert for the CPU's 4-row blocks, blocks that straddle two experts,
        // and a K of two vectors and a tail.
        (
            Op::GroupedLinear { num_experts: 3 },
            vec!["f32[7*T, 19]", "i32[4]", "f32[6, 19]", "f32[6, 19]", "f32[6, 19]"],
            (-1.0, 1.0),
        ),
        // The same blocks on bf16 operands, widened as they load (a bf16 train step's experts).
        (
            Op::GroupedLinear { num_experts: 3 },
            vec!["bf16[7*T, 19]", "i32[4]", "bf16[6, 19]", "bf16[6, 19]", "bf16[6, 19]"],
            (-1.0, 1.0),
        ),
        (Op::MoeCombine { top_k: 2 }, vec!["bf16[2*T, 8]", "i32[2*T]", "f32[T, 2]"], (-2.0, 2.0)),
        (Op::MoeCombine { top_k: 3 }, vec!["f32[3*T, 5]", "i64[3*T]", "f32[T, 3]"], (-2.0, 2.0)),
        // Two of the CPU's 256-column work items per token, the second partial.
        (Op::MoeCombine { top_k: 2 }, vec!["bf16[2*T, 300]", "i32[2*T]", "f32[T, 2]"], (-2.0, 2.0)),
        (quantize(&[1, 16], false), vec!["f32[B, T, 40]"], (-3.0, 3.0)),
        (quantize(&[1, 16], true), vec!["bf16[B, T, 40]"], (-3.0, 3.0)),
        (quantize(&[8, 16], false), vec!["f32[20, 36]"], (-100.0, 100.0)),
        // Rows of two vectors of 16 and a tile of 6 alone.
        (quantize(&[2, 32], false), vec!["bf16[T, 70]"], (-3.0, 3.0)),
        // Below the amax floor: the codes of whole vectors are E4M3 subnormals and zeros.
        (quantize(&[1, 16], false), vec!["f32[T, 32]"], (-3e-9, 3e-9)),
        // Tiles along a symbolic dimension (FP8 training's tokens): scales padded to its size.
        (quantize(&[1, 4], false), vec!["f32[5, 2*T]"], (-3.0, 3.0)),
        (quantize(&[4, 1], true), vec!["bf16[7*T, 3]"], (-3.0, 3.0)),
        // Column tiles (FP8 training's Wgrad operands) 16 side by side: two groups of 16 and a
        // group of 8 tile by tile, scales padded along the symbolic rows; a ragged last row tile
        // with power-of-two scales; a group whose codes are subnormals and zeros.
        (quantize(&[8, 1], false), vec!["bf16[5*T, 40]"], (-3.0, 3.0)),
        (quantize(&[8, 1], true), vec!["f32[20, 48]"], (-100.0, 100.0)),
        (quantize(&[4, 1], false), vec!["f32[T, 16]"], (-3e-9, 3e-9)),
        (
            Op::Dequantize { to: DType::F32, block: vec![8, 1] },
            vec!["f8e4m3[5*T, 40]", "f32[5*T, 40]"],
            (-3.0, 3.0),
        ),
        (
            Op::Dequantize { to: DType::BF16, block: vec![8, 1] },
            vec!["f8e4m3[20, 48]", "f32[3, 48]"],
            (-3.0, 3.0),
        ),
        (
            Op::Dequantize { to: DType::F32, block: vec![4, 1] },
            vec!["f8e4m3[7*T, 3]", "f32[7*T, 3]"],
            (-3.0, 3.0),
        ),
        (
            Op::Dequantize { to: DType::BF16, block: vec![1, 16] },
            vec!["f8e4m3[B, T, 40]", "f32[B, T, 3]"],
            (-3.0, 3.0),
        ),
        (
            Op::Dequantize { to: DType::F32, block: vec![8, 16] },
            vec!["f8e4m3[20, 36]", "f32[3, 3]"],
            (-3.0, 3.0),
        ),
        (cross_entropy(None), vec!["f32[B, T, 37]", "i32[B, T]"], (-4.0, 4.0)),
        (cross_entropy(None), vec!["bf16[3*T, 50]", "i64[3*T]"], (-4.0, 4.0)),
        (cross_entropy(Some(-100)), vec!["f32[T, 300]", "i64[T]"], (-8.0, 8.0)),
        (cross_entropy(Some(0)), vec!["bf16[B, 3, 7]", "i32[B, 3]"], (-4.0, 4.0)),
        (cross_entropy(None), vec!["f8e4m3[B, 9]", "i32[B]"], (-8.0, 8.0)),
        // Logits near 5000: exp(5000) overflows; with the maximum subtracted nothing does.
        (cross_entropy(None), vec!["f32[B, T, 33]", "i64[B, T]"], (5000.0, 5016.0)),
        (Op::Cast { to: DType::F8E4M3 }, vec!["f32[B, T, 9]"], (-500.0, 500.0)),
        (Op::Cast { to: DType::BF16 }, vec!["f8e4m3[B, T, 9]"], (-500.0, 500.0)),
        // FP8 training's GEMMs: a ragged last block of K (300 = 2 x 128 + 44), blocks of rows that
        // straddle experts (21 rows in blocks of 4; expert 1 has none).
        // 19 columns: two vectors of eight on the CPU, then three alone.
        (promoted(GemmForm::Linear, 128), vec!["f32[B, T, 300]", "f32[19, 300]"], (-3.0, 3.0)),
        (promoted(GemmForm::Linear, 16), vec!["bf16[T, 40]", "bf16[5, 40]"], (-3.0, 3.0)),
        (
            promoted(GemmForm::Grouped { num_experts: 3 }, 64),
            vec!["f32[7*T, 200]", "i32[4]", "f32[10, 200]", "f32[10, 200]", "f32[10, 200]"],
            (-1.0, 1.0),
        ),
        // K known only at run time (a weight gradient's tokens): the panel's largest size, rows
        // in blocks of four and then alone.
        (promoted(GemmForm::Linear, 16), vec!["f32[9, 3*T]", "f32[11, 3*T]"], (-3.0, 3.0)),
        // Two experts of 20 columns: two packed panels of eight each, then four columns alone.
        (
            promoted(GemmForm::Grouped { num_experts: 2 }, 16),
            vec!["bf16[5*T, 40]", "i64[3]", "bf16[20, 40]", "bf16[20, 40]"],
            (-1.0, 1.0),
        ),
        // The weight gradient's columns: eight at once (one vector load of x), then the rest.
        (
            promoted(GemmForm::GroupedWgrad { num_experts: 3 }, 4),
            vec!["f32[7*T, 9]", "i32[4]", "f32[7*T, 5]"],
            (-1.0, 1.0),
        ),
        // Four output rows at once where four divide N (8): two items per expert.
        (
            promoted(GemmForm::GroupedWgrad { num_experts: 3 }, 4),
            vec!["f32[7*T, 12]", "i32[4]", "f32[7*T, 8]"],
            (-1.0, 1.0),
        ),
        (
            promoted(GemmForm::GroupedWgrad { num_experts: 2 }, 8),
            vec!["bf16[5*T, 20]", "i32[3]", "bf16[5*T, 3]"],
            (-1.0, 1.0),
        ),
    ];
    cases.extend(grad_cases(rope_grad, cross_entropy_grad, attention_grad));
    let mut out: Vec<(Kernel, (f32, f32))> =
        cases.drain(..).map(|(op, args, r)| (kernel(op, &args), r)).collect();
    out.push((experts("f32[B, T, 8]", "f32[B, T, 2]", "i32[B, T, 2]", "f32", &[6, 5, 6]), (-1.0, 1.0)));
    out.push((experts("bf16[T, 8]", "f32[T, 3]", "i64[T, 3]", "bf16", &[4, 4, 4, 4]), (-1.0, 1.0)));
    out
}

#[test]
fn cpu_families_match_the_interpreter() {
    let cases = cases();
    let lib = CpuLib::build(&cases.iter().map(|(k, _)| k).collect::<Vec<_>>());
    let mut rng = Rng::new(41);
    let mut report = Vec::new();
    for (k, range) in &cases {
        // Two draws each, so that selections and clamps see more than one arrangement.
        for _ in 0..2 {
            let args = random_inputs(k, &mut rng, *range, &BIND);
            let worst = check(&lib, k, &args, &BIND);
            if k.single_op().is_some_and(is_grad) {
                check_writes_everything(&lib, k, &args, &BIND);
            }
            report.push(format!("{:<34} {:<12} max error {worst:?}", k.name, k.args[0].to_string()));
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn gpu_families_pass_ptxas_without_spills() {
    let cases = cases();
    let module = lower_module(cases.iter().map(|(k, _)| k), Target::Gpu).unwrap_or_else(|e| panic!("{e}"));
    let report = ptxas_accepts(&module);
    assert_eq!(report.matches("Compiling entry function").count(), cases.len(), "{report}");
    let stats = parse_report(&report);
    for (k, _) in &cases {
        let s = stats[&k.name];
        assert_eq!((s.spill_store_bytes, s.spill_load_bytes), (0, 0), "{}: spills\n{report}", k.name);
        println!(
            "{:<34} {:<12} {:>3} registers, {:>5} bytes shared, {} bytes stack",
            k.name,
            k.args[0].to_string(),
            s.registers,
            s.shared_bytes,
            s.stack_bytes
        );
    }
}

/// Runs a one-argument kernel on `x`; returns its first result.
fn run1(lib: &CpuLib, k: &Kernel, x: Buf, bind: &SymBindings) -> Buf {
    let mut bufs = vec![x];
    bufs.extend(k.results.iter().map(|t| Buf::zeros(t, bind)));
    lib.run(k, &mut bufs, bind);
    bufs.swap_remove(1)
}

#[test]
fn fp8_encoding_and_decoding_match_the_interpreter_bit_for_bit() {
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        448.0,
        460.0,
        464.0,
        464.5,
        480.0,
        1e30,
        2f32.powi(-10),
        1.5 * 2f32.powi(-10),
        7.6 * 2f32.powi(-9),
        1.0625,
        1.1875,
    ];
    // A dense sweep, and the midpoint between every pair of neighbouring codes.
    let mut v = 2f32.powi(-12);
    while v < 600.0 {
        x.extend([v, -v]);
        v *= 1.0 + 1.0 / 64.0;
    }
    for code in 0..0x7Eu8 {
        let mid = (f8e4m3_to_f32(code) + f8e4m3_to_f32(code + 1)) / 2.0;
        x.extend([mid, -mid, mid.next_up(), mid.next_down()]);
    }
    let n = x.len() as u64;
    let encode = kernel(Op::Cast { to: DType::F8E4M3 }, &[&format!("f32[{n}]")]);
    let decode = kernel(Op::Cast { to: DType::F32 }, &["f8e4m3[256]"]);
    let lib = CpuLib::build(&[&encode, &decode]);
    let Buf::F8(codes) = run1(&lib, &encode, Buf::F32(x.clone()), &BIND) else { unreachable!() };
    for (&v, &c) in x.iter().zip(&codes) {
        assert_eq!(c, f8e4m3_from_f32(v), "encoding {v:e} ({:#010x})", v.to_bits());
    }
    let Buf::F32(back) = run1(&lib, &decode, Buf::F8((0..=255).collect()), &BIND) else { unreachable!() };
    for (code, &v) in back.iter().enumerate() {
        let want = f8e4m3_to_f32(code as u8);
        assert!(
            v.to_bits() == want.to_bits()
                || (v.is_nan() && want.is_nan() && v.is_sign_negative() == want.is_sign_negative()),
            "decoding {code:#04x}: {v} != {want}"
        );
    }
}

#[test]
fn fp8_quantize_handles_zero_tiny_infinite_and_nan_tiles() {
    let ks: Vec<Kernel> = [false, true].map(|p| kernel(quantize(&[1, 4], p), &["f32[2, 12]"])).into();
    let lib = CpuLib::build(&ks.iter().collect::<Vec<_>>());
    let x: Vec<f32> = vec![
        0.0,
        0.0,
        -0.0,
        0.0, // amax 0: the floor
        1e-6,
        -2e-6,
        3e-7,
        0.0, // below the floor
        1.0,
        f32::NAN,
        2.0,
        3.0, // NaN tile
        1e30,
        -3e30,
        2.0,
        5.0, // large
        f32::INFINITY,
        1.0,
        2.0,
        3.0, // infinite amax
        0.3,
        -0.7,
        1.9,
        2.5e-3, // ordinary
    ];
    for k in &ks {
        check(&lib, k, &[Buf::F32(x.clone())], &BIND);
    }
}

#[test]
fn out_of_range_ids_and_indices_are_clamped() {
    let emb = kernel(Op::Embedding, &["bf16[6, 4]", "i32[5]"]);
    let gather = kernel(Op::Gather { axis: 0 }, &["i64[3]", "i64[4]"]);
    let lib = CpuLib::build(&[&emb, &gather]);
    let table: Vec<u16> = (0..24).map(|i| to_bf16(i as f32)).collect();
    let mut bufs =
        [Buf::Bf16(table.clone()), Buf::I32(vec![-3, 0, 5, 6, 1000]), Buf::zeros(&emb.results[0], &BIND)];
    lib.run(&emb, &mut bufs, &BIND);
    let rows = [0, 0, 5, 5, 5];
    let want: Vec<u16> = rows.iter().flat_map(|&r| table[r * 4..r * 4 + 4].to_vec()).collect();
    assert_eq!(bufs[2], Buf::Bf16(want));
    let mut bufs = [
        Buf::I64(vec![10, 20, 30]),
        Buf::I64(vec![2, -1, i64::MAX, 1]),
        Buf::zeros(&gather.results[0], &BIND),
    ];
    lib.run(&gather, &mut bufs, &BIND);
    assert_eq!(bufs[2], Buf::I64(vec![30, 10, 30, 20]));
}

#[test]
fn topk_puts_nan_first_and_breaks_ties_to_the_lower_index() {
    let k = kernel(Op::TopK { k: 5 }, &["f32[2, 6]"]);
    let lib = CpuLib::build(&[&k]);
    let x = vec![
        1.0,
        3.0,
        3.0,
        f32::NAN,
        2.0,
        3.0,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        -1.0,
        f32::NAN,
        f32::NAN,
        -1.0,
    ];
    check(&lib, &k, &[Buf::F32(x.clone())], &BIND);
    let mut bufs = [Buf::F32(x), Buf::zeros(&k.results[0], &BIND), Buf::zeros(&k.results[1], &BIND)];
    lib.run(&k, &mut bufs, &BIND);
    assert_eq!(bufs[2], Buf::I32(vec![3, 1, 2, 5, 4, 3, 4, 2, 5, 0]));
}

#[test]
fn rope_is_accurate_at_deepseek_v3_positions() {
    // The largest angle of DeepSeek-V3 is its 163840 positions times inv_freq[0] = 1.
    let rope =
        Op::Rope(RopeConfig { theta: 10000.0, interleaved: true, yarn: Some(V3_YARN), inverse: false });
    let k = kernel(rope, &["f32[B, T, 2, 64]", "i32[B, T]"]);
    let lib = CpuLib::build(&[&k]);
    let mut rng = Rng::new(43);
    let x = rng.vec(numel(&k.args[0], &BIND), -2.0, 2.0);
    let mut pos: Vec<i32> = (0..6).map(|_| rng.uniform(100_000.0, 163_840.0) as i32).collect();
    pos[5] = 163_839;
    let worst = check(&lib, &k, &[Buf::F32(x), Buf::I32(pos)], &BIND);
    println!("rope at positions up to 163840: max error {worst:?}");
}

#[test]
fn attention_key_blocks_match_the_interpreter() {
    // The CPU kernel takes a row's keys 16 at a time (their exponentials one vector): rows that
    // see a few keys, a block's worth and one more, and several blocks with a partial last one,
    // with inputs narrow and wide.
    let k = kernel(
        Op::Attention { scale: 0.35, causal: true, mla: None },
        &["f32[B, T, 2, 24]", "f32[B, S, 1, 24]", "f32[B, S, 1, 20]"],
    );
    let lib = CpuLib::build(&[&k]);
    let mut rng = Rng::new(5);
    for s in [1, 2, 15, 16, 17, 33, 48, 70] {
        let bind = SymBindings { b: 2, t: s.min(3), s };
        for range in [(-1.0, 1.0), (-2.0, 2.0)] {
            let args = random_inputs(&k, &mut rng, range, &bind);
            check(&lib, &k, &args, &bind);
        }
    }
}

#[test]
fn attention_rows_that_see_no_key_are_zero() {
    // S < T: the first T - S queries of a causal row see no key (the interpreter rejects this).
    let k = kernel(
        Op::Attention { scale: 0.5, causal: true, mla: None },
        &["f32[B, T, 1, 2]", "f32[B, S, 1, 2]", "f32[B, S, 1, 2]"],
    );
    let lib = CpuLib::build(&[&k]);
    let bind = SymBindings { b: 1, t: 3, s: 2 };
    let ones = |t| Buf::F32(vec![1.0; numel(t, &bind)]);
    let mut bufs =
        vec![ones(&k.args[0]), ones(&k.args[1]), ones(&k.args[2]), Buf::zeros(&k.results[0], &bind)];
    lib.run(&k, &mut bufs, &bind);
    // Query 0 sees nothing; queries 1 and 2 average rows of ones.
    assert_eq!(bufs[3], Buf::F32(vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0]));
}

#[test]
fn cross_entropy_targets_ignored_or_out_of_range() {
    // The interpreter rejects a target outside `0..V` (unless ignored); the kernels never read
    // outside the row for one and give NaN, and give 0 for an ignored one whatever the row holds.
    let ignoring = kernel(Op::CrossEntropy { ignore_index: Some(-100) }, &["f32[5, 3]", "i64[5]"]);
    let plain = kernel(Op::CrossEntropy { ignore_index: None }, &["bf16[4, 3]", "i32[4]"]);
    let lib = CpuLib::build(&[&ignoring, &plain]);
    let row = [1.0, 2.0, 3.0];
    let mut x: Vec<f32> = row.repeat(5);
    x[3] = f32::NAN;
    let mut bufs =
        [Buf::F32(x), Buf::I64(vec![2, -100, 3, -1, i64::MIN]), Buf::zeros(&ignoring.results[0], &BIND)];
    lib.run(&ignoring, &mut bufs, &BIND);
    let loss = bufs[2].f32();
    // log(e^1 + e^2 + e^3) - 3, to f32 rounding and the sum's order.
    assert!((loss[0] - 0.407_605_97).abs() < 1e-6, "{loss:?}");
    assert_eq!(loss[1], 0.0, "an ignored row of NaN: {loss:?}");
    assert!(loss[2..].iter().all(|v| v.is_nan()), "{loss:?}");

    let x: Vec<u16> = row.repeat(4).into_iter().map(to_bf16).collect();
    let mut bufs = [Buf::Bf16(x), Buf::I32(vec![0, 3, i32::MIN, -100]), Buf::zeros(&plain.results[0], &BIND)];
    lib.run(&plain, &mut bufs, &BIND);
    let loss = bufs[2].f32();
    assert!((loss[0] - 2.407_606).abs() < 1e-6, "{loss:?}");
    assert!(loss[1..].iter().all(|v| v.is_nan()), "without ignore_index -100 is out of range: {loss:?}");
}

/// Runs `k` on `args` with results zeroed and scratch full of garbage; returns the results.
fn run_all(lib: &CpuLib, k: &Kernel, args: Vec<Buf>, bind: &SymBindings) -> Vec<Buf> {
    let n = args.len();
    let mut bufs = args;
    bufs.extend(k.results.iter().map(|t| Buf::zeros(t, bind)));
    bufs.extend(k.scratch.iter().map(|t| super::oracle::garbage(t, bind)));
    lib.run(k, &mut bufs, bind);
    bufs.truncate(n + k.results.len());
    bufs.split_off(n)
}

#[test]
fn rope_inverse_undoes_rope() {
    let rope = |inverse| Op::Rope(RopeConfig { theta: 10000.0, interleaved: false, yarn: None, inverse });
    let (fwd, inv) = (
        kernel(rope(false), &["f32[B, T, 3, 16]", "i32[B, T]"]),
        kernel(rope(true), &["f32[B, T, 3, 16]", "i32[B, T]"]),
    );
    let lib = CpuLib::build(&[&fwd, &inv]);
    let mut rng = Rng::new(44);
    let x = rng.vec(numel(&fwd.args[0], &BIND), -2.0, 2.0);
    let pos: Vec<i32> = (0..6).map(|_| rng.uniform(0.0, 4096.0) as i32).collect();
    let y = run_all(&lib, &fwd, vec![Buf::F32(x.clone()), Buf::I32(pos.clone())], &BIND).remove(0);
    let back = run_all(&lib, &inv, vec![y, Buf::I32(pos)], &BIND).remove(0);
    let worst = x.iter().zip(back.f32()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    // Two rotations in f32 by the same cosine and sine, whose squares sum to 1 within an ulp.
    assert!(worst < 1e-6, "rope then its inverse is off by {worst}");
}

#[test]
fn cross_entropy_grad_targets_ignored_or_out_of_range() {
    // An ignored row is 0 whatever it holds; a target outside `0..V` (the interpreter rejects it)
    // reads and writes nothing outside its row and makes the row NaN.
    let k = kernel(Op::CrossEntropyGrad { ignore_index: Some(-100) }, &["f32[5, 3]", "i64[5]", "f32[5]"]);
    let lib = CpuLib::build(&[&k]);
    let row = [1.0f32, 2.0, 3.0];
    let mut x: Vec<f32> = row.repeat(5);
    x[3] = f32::NAN;
    let targets = vec![2, -100, 3, -1, i64::MIN];
    let dloss = vec![2.0, 1.0, 1.0, 1.0, 1.0];
    let got = run_all(&lib, &k, vec![Buf::F32(x), Buf::I64(targets), Buf::F32(dloss)], &BIND).remove(0);
    let g = got.f32();
    let sum: f64 = row.iter().map(|&v| f64::from(v - 3.0).exp()).sum();
    for (j, &v) in row.iter().enumerate() {
        let p = f64::from(v - 3.0).exp() / sum;
        let want = (p - if j == 2 { 1.0 } else { 0.0 }) * 2.0;
        assert!((f64::from(g[j]) - want).abs() < 1e-6, "{g:?}");
    }
    assert_eq!(&g[3..6], &[0.0; 3], "an ignored row of NaN: {g:?}");
    assert!(g[6..].iter().all(|v| v.is_nan()), "{g:?}");
}

#[test]
fn embedding_grad_sums_repeated_ids_and_skips_bad_ones() {
    // 4100 rows: three blocks of rows, ids in the first and the last.
    let k = kernel(Op::EmbeddingGrad { rows: 4100 }, &["i32[6]", "f32[6, 2]"]);
    let lib = CpuLib::build(&[&k]);
    let ids = vec![4099, 1, 4099, -1, 4100, 1];
    let dy = vec![1.0, 2.0, 10.0, 20.0, 100.0, 200.0, 5.0, 5.0, 7.0, 7.0, 0.5, 0.25];
    let got = run_all(&lib, &k, vec![Buf::I32(ids), Buf::F32(dy)], &BIND).remove(0);
    let g = got.f32();
    let mut want = vec![0.0f32; 4100 * 2];
    want[2..4].copy_from_slice(&[10.5, 20.25]);
    want[4099 * 2..].copy_from_slice(&[101.0, 202.0]);
    assert_eq!(g, &want[..]);
}

#[test]
fn scatter_add_along_skips_indices_out_of_range() {
    let k = kernel(Op::ScatterAddAlong { axis: 1, size: 3 }, &["i64[2, 4]", "f32[2, 4]"]);
    let lib = CpuLib::build(&[&k]);
    let idx = vec![0, 2, 0, 3, -1, 1, 1, i64::MAX];
    let src = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    let got = run_all(&lib, &k, vec![Buf::I64(idx), Buf::F32(src)], &BIND).remove(0);
    assert_eq!(got.f32(), &[5.0, 0.0, 2.0, 0.0, 96.0, 0.0]);
}

#[test]
fn grouped_linear_wgrad_with_empty_experts_and_bad_offsets() {
    // Experts 0 and 3 have no rows; then offsets that decrease and leave the rows (the
    // interpreter rejects them) still read nothing outside the rows and write every element.
    let k = kernel(Op::GroupedLinearWgrad { num_experts: 4 }, &["f32[4, 2]", "i32[5]", "f32[4, 3]"]);
    let lib = CpuLib::build(&[&k]);
    let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let dy: Vec<f32> = (0..12).map(|i| (i as f32) * 0.5 - 2.0).collect();
    let args = |off: Vec<i32>| vec![Buf::F32(x.clone()), Buf::I32(off), Buf::F32(dy.clone())];
    check(&lib, &k, &args(vec![0, 0, 1, 4, 4]), &BIND);
    let got = run_all(&lib, &k, args(vec![3, 1, 9, -5, 2]), &BIND);
    // Expert 0: rows 3..1 (none); 1: rows 1..4; 2: rows 4..0 (none); 3: rows 0..2.
    let dw = |rows: std::ops::Range<usize>| -> Vec<f32> {
        let mut out = Vec::new();
        for a in 0..3 {
            for c in 0..2 {
                out.push(rows.clone().map(|r| dy[r * 3 + a] * x[r * 2 + c]).sum::<f32>());
            }
        }
        out
    };
    let want = [dw(0..0), dw(1..4), dw(0..0), dw(0..2)];
    for (e, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.f32(), &w[..], "expert {e}");
    }
}

/// A routed GEMM's CPU work items are panels of 64 output columns times rows (item `p * M + m` is
/// row `m` of panel `p`), as a `linear`'s, so that two threads never read the same expert's
/// weights: 150 columns make three panels, the last of 22 (five blocks of 4 columns, then 2 alone).
/// Expert 1 holds no rows and the last two rows belong to none (zeros). The interpreter's values,
/// and the same bits whether the items run as one range, one by one, or cut inside panels and
/// inside an expert's rows; in f32 and in bf16.
#[test]
fn a_grouped_gemm_splits_into_panels_of_columns() {
    const M: usize = 14;
    let offsets = vec![0, 5, 5, 12];
    for dtype in ["f32", "bf16"] {
        let (x, w) = (format!("{dtype}[{M}, 37]"), format!("{dtype}[150, 37]"));
        let k = kernel(Op::GroupedLinear { num_experts: 3 }, &[&x, "i32[4]", &w, &w, &w]);
        let lowered = lower_module([&k], Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let work = match lowered.kernels[0].launch {
            kiln_compiler::codegen::LaunchShape::Cpu { work } => work,
            ref other => panic!("{other:?}"),
        };
        assert_eq!(work, Dim::known(3 * M as u64), "{dtype}: rows times panels");
        let lib = CpuLib::build(&[&k]);
        let mut args = random_inputs(&k, &mut Rng::new(11), (-1.0, 1.0), &BIND);
        args[1] = Buf::I32(offsets.clone());
        check(&lib, &k, &args, &BIND);
        let run = |cuts: &[i64]| {
            let mut bufs = args.clone();
            bufs.push(super::oracle::garbage(&k.results[0], &BIND));
            for c in cuts.windows(2) {
                lib.run_range(&k, &mut bufs, &BIND, c[0], c[1]);
            }
            bufs.pop().unwrap()
        };
        let whole = run(&[0, 3 * M as i64]);
        for row in 12..M {
            for col in 0..150 {
                assert_eq!(whole.bits(row * 150 + col), 0, "{dtype}: row {row} of no expert");
            }
        }
        let one_by_one: Vec<i64> = (0..=3 * M as i64).collect();
        for cuts in [&one_by_one[..], &[0, 3, 9, 17, 20, 33, 42][..]] {
            let got = run(cuts);
            for i in 0..M * 150 {
                assert_eq!(got.bits(i), whole.bits(i), "{dtype}, cuts {cuts:?}: y[{}, {}]", i / 150, i % 150);
            }
        }
    }
}

#[test]
fn moe_combine_grad_rows_of_bad_slots_are_zero() {
    let k = kernel(Op::MoeCombineGrad { top_k: 2 }, &["f32[2, 2]", "f32[4, 2]", "i32[4]", "f32[2, 2]"]);
    let lib = CpuLib::build(&[&k]);
    let dy = vec![1.0, 2.0, 3.0, 4.0];
    let y = vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0];
    let w = vec![0.5, 0.25, 2.0, 4.0];
    // Rows 0..4 came from slots 3, 0, 7 (out of range) and 1; slot 2 is never written by a row.
    let got =
        run_all(&lib, &k, vec![Buf::F32(dy), Buf::F32(y), Buf::I32(vec![3, 0, 7, 1]), Buf::F32(w)], &BIND);
    assert_eq!(got[0].f32(), &[12.0, 16.0, 0.5, 1.0, 0.0, 0.0, 0.25, 0.5]);
    assert_eq!(got[1].f32(), &[6.0, 12.0, 0.0, 7.0]);
}

#[test]
fn attention_grad_rows_that_see_no_key_are_zero() {
    // S < T: query 0 of a causal row sees no key (the interpreter rejects this): its dq is zero,
    // and it adds nothing to dk and dv.
    let k = kernel(
        Op::AttentionGrad { scale: 0.5, causal: true },
        &["f32[B, T, 1, 2]", "f32[B, S, 1, 2]", "f32[B, S, 1, 2]", "f32[B, T, 1, 2]"],
    );
    let lib = CpuLib::build(&[&k]);
    let bind = SymBindings { b: 1, t: 3, s: 2 };
    let ones = |t| Buf::F32(vec![1.0; numel(t, &bind)]);
    let args = vec![ones(&k.args[0]), ones(&k.args[1]), ones(&k.args[2]), ones(&k.args[3])];
    let got = run_all(&lib, &k, args, &bind);
    // Equal scores: uniform probabilities and dS = 0, so dq = dk = 0; dv sums the probabilities of
    // the queries that see each key: key 0 gets 1 (query 1) + 1/2 (query 2), key 1 gets 1/2.
    assert_eq!(got[0].f32(), &[0.0; 6]);
    assert_eq!(got[1].f32(), &[0.0; 4]);
    assert_eq!(got[2].f32(), &[1.5, 1.5, 0.5, 0.5]);
}
