//! The interpreter as the oracle for any kernel: inputs that are valid for its op (ids, positions,
//! expert indices, offsets and permutations in range), a run of the compiled kernel and of the
//! interpreter on the same inputs, and a comparison of every result with a tolerance chosen by op
//! and dtype ([`tolerance`]).

use kiln_compiler::codegen::Kernel;
use kiln_ir::types::SymBindings;
use kiln_ir::{DType, GemmForm, Op};

use super::harness::{dims, interpret, numel, to_bf16, values, Buf, CpuLib, Rng};

/// `(relative tolerance, floor)` for result `i` of `k`: `|got - want| <= tol * max(|want|, floor)`.
///
/// - Copies, integer results, selections and the FP8 encoding are exact: the kernel does what the
///   interpreter does, bit for bit.
/// - Narrow float results may land one ulp away (a value within an f32 rounding of a tie between
///   two bf16 values rounds either way): 2^-7 relative for bf16, 2^-10 for f16.
/// - f32 results differ by summation order and f32 accumulation (the interpreter sums in f64):
///   a few ulps for elementwise math, more for long dot products; cross-entropy losses are compared
///   absolutely below 1, where they are a cancelling difference.
pub fn tolerance(k: &Kernel, i: usize) -> (f64, f64) {
    let op = k.single_op().expect("one-op kernel");
    let exact = (0.0, 0.0);
    match op {
        Op::Concat { .. }
        | Op::Split { .. }
        | Op::Broadcast { .. }
        | Op::Transpose { .. }
        | Op::Embedding
        | Op::Gather { .. }
        | Op::TakeAlong { .. }
        | Op::TopK { .. }
        | Op::MoeDispatch(_)
        | Op::Quantize { .. }
        | Op::Dequantize { .. }
        // The same f64 block sums in the same order, rounded at the same points.
        | Op::PromotedGemm { .. } => return exact,
        Op::MoeRoute(_) if i == 1 => return exact,
        // The product of two floats rounded to f32, then to the result's dtype, as the interpreter
        // does (its f64 product of two f32 values is exact, so both round the same number).
        Op::MoeCombineGrad { .. } if i == 0 => return exact,
        // Each product rounded to the dtype and added to the token's sum in row order, rounded
        // again, as the interpreter does.
        Op::MoeCombine { .. } => return exact,
        _ => {}
    }
    match k.results[i].dtype {
        DType::BF16 => (1.0 / 128.0, 1e-2),
        DType::F16 => (1.0 / 1024.0, 1e-3),
        DType::F32 => match op {
            Op::Linear | Op::MatMul | Op::GroupedLinear { .. } => (1e-4, 1.0),
            // Three GEMMs in a row (gate and up, then down over their SwiGLU), each summed in f32
            // vectors where the interpreter sums in f64: their errors add up (tiny's, from inputs
            // in -2..2, reach 1.3e-4).
            Op::MoeExperts { .. } => (3e-4, 1.0),
            // Sums of a few O(1) terms: about 1e-7 absolute near zero.
            Op::Attention { .. } | Op::Rope(_) => (1e-5, 0.1),
            // A difference of two values of the size of log V (the log of the sum, the target's
            // logit less the maximum): small losses carry their absolute error.
            Op::CrossEntropy { .. } => (1e-5, 1.0),
            // `(p - onehot) * dloss`: p's relative error (an f32 sum of V exponentials, about
            // 1e-6), absolute near 0 and near the target's `p - 1`.
            Op::CrossEntropyGrad { .. } => (1e-5, 0.1),
            // f32 sums of a few O(1) terms in index order (the interpreter: f64, rounded once),
            // which may cancel: absolute below 1.
            Op::EmbeddingGrad { .. } | Op::ScatterAddAlong { .. } => (1e-6, 1.0),
            // Dot products and weight gradients summed over rows, as the GEMMs.
            Op::GroupedLinearWgrad { .. } | Op::MoeCombineGrad { .. } => (1e-4, 1.0),
            // Sums over keys (and queries) of products of recomputed probabilities, in f32, of
            // terms up to about 10 whose sum is small (the score gradients of a row sum to 0):
            // absolute below 1.
            Op::AttentionGrad { .. } => (1e-5, 1.0),
            _ => (1e-5, 1e-3),
        },
        _ => exact,
    }
}

/// `n` distinct values from `0..e`.
fn distinct(rng: &mut Rng, n: usize, e: usize) -> Vec<i64> {
    let mut picked: Vec<i64> = Vec::with_capacity(n);
    while picked.len() < n {
        let v = (rng.uniform(0.0, e as f32) as i64).min(e as i64 - 1);
        if !picked.contains(&v) {
            picked.push(v);
        }
    }
    picked
}

fn ints(dtype: DType, v: Vec<i64>) -> Buf {
    match dtype {
        DType::I32 => Buf::I32(v.into_iter().map(|x| x as i32).collect()),
        _ => Buf::I64(v),
    }
}

fn floats(dtype: DType, v: Vec<f32>) -> Buf {
    match dtype {
        DType::BF16 => Buf::Bf16(v.into_iter().map(to_bf16).collect()),
        DType::F8E4M3 => Buf::F8(v.into_iter().map(kiln_ir::interp::numerics::f8e4m3_from_f32).collect()),
        DType::F32 => Buf::F32(v),
        d => panic!("no random {d} data"),
    }
}

/// Random arguments valid for the kernel's op: floats uniform in `range`, integer operands in the
/// range the op needs (the interpreter rejects the rest).
pub fn random_inputs(k: &Kernel, rng: &mut Rng, range: (f32, f32), bind: &SymBindings) -> Vec<Buf> {
    let op = k.single_op().expect("one-op kernel");
    let mut bufs = Vec::with_capacity(k.args.len());
    for (a, t) in k.args.iter().enumerate() {
        let n = numel(t, bind);
        let ds = dims(t, bind);
        let buf = match (op, a, t.dtype) {
            (Op::Embedding, 1, d) => {
                let v = dims(&k.args[0], bind)[0];
                ints(d, (0..n).map(|_| (rng.uniform(0.0, v as f32) as i64).min(v as i64 - 1)).collect())
            }
            (Op::Gather { axis }, 1, d) => {
                let len = dims(&k.args[0], bind)[*axis];
                ints(d, (0..n).map(|_| (rng.uniform(0.0, len as f32) as i64).min(len as i64 - 1)).collect())
            }
            (Op::CrossEntropy { ignore_index } | Op::CrossEntropyGrad { ignore_index }, 1, d) => {
                // Classes in range, and about one target in four ignored when the op ignores one.
                let v = *dims(&k.args[0], bind).last().unwrap();
                let pick = |rng: &mut Rng| match ignore_index {
                    Some(i) if rng.uniform(0.0, 1.0) < 0.25 => *i,
                    _ => (rng.uniform(0.0, v as f32) as i64).min(v as i64 - 1),
                };
                ints(d, (0..n).map(|_| pick(rng)).collect())
            }
            (Op::Rope(_), 1, d) => ints(d, (0..n).map(|_| rng.uniform(0.0, 1024.0) as i64).collect()),
            (Op::EmbeddingGrad { rows }, 0, d) => {
                // Four rows, far apart (different row blocks of a big table), so ids repeat.
                let r = *rows as i64;
                let picks = [0, r / 3, 2 * r / 3, r - 1];
                ints(d, (0..n).map(|_| picks[(rng.uniform(0.0, 4.0) as usize).min(3)]).collect())
            }
            (Op::TakeAlong { axis }, 1, d) => {
                let len = dims(&k.args[0], bind)[*axis];
                ints(d, (0..n).map(|_| (rng.uniform(0.0, len as f32) as i64).min(len as i64 - 1)).collect())
            }
            (Op::ScatterAddAlong { size, .. }, 0, d) => ints(
                d,
                (0..n).map(|_| (rng.uniform(0.0, *size as f32) as i64).min(*size as i64 - 1)).collect(),
            ),
            (Op::AttentionGrad { .. }, 3, d) if k.args.len() == 5 => {
                // Cache positions, one in four beyond the cache (clamped to its end).
                let s = dims(&k.args[1], bind)[1] as f32;
                ints(d, (0..n).map(|_| rng.uniform(0.0, s * 1.25) as i64).collect())
            }
            (Op::MoeExperts { num_experts }, 2, d) => {
                // About one slot in four of no expert (index E: another rank's, under --ep).
                let kk = *ds.last().unwrap();
                let e = *num_experts as usize;
                let picks: Vec<i64> = (0..n / kk).flat_map(|_| distinct(rng, kk, e)).collect();
                ints(d, picks.into_iter().map(|i| none_sometimes(rng, i, e)).collect())
            }
            (Op::MoeExperts { .. }, 1, d) => floats(d, rng.vec(n, 0.05, 1.0)),
            (Op::MoeDispatch(p), 1, d) => {
                // Experts of one group, so any group limit holds.
                let group = (p.num_experts / p.num_groups) as usize;
                let g = (rng.uniform(0.0, p.num_groups as f32) as usize).min(p.num_groups as usize - 1);
                let picks: Vec<i64> =
                    (0..ds[0]).flat_map(|_| distinct(rng, ds[1], group).into_iter()).collect();
                let e = p.num_experts as usize;
                ints(d, picks.into_iter().map(|i| none_sometimes(rng, i + (g * group) as i64, e)).collect())
            }
            (
                Op::GroupedLinear { .. }
                | Op::GroupedLinearWgrad { .. }
                | Op::PromotedGemm { form: GemmForm::Grouped { .. } | GemmForm::GroupedWgrad { .. }, .. },
                1,
                d,
            ) => {
                let rows = dims(&k.args[0], bind)[0] as f32;
                let mut cuts: Vec<i64> = (0..n - 2).map(|_| rng.uniform(0.0, rows + 1.0) as i64).collect();
                cuts.sort_unstable();
                let mut off = vec![0];
                off.extend(cuts.into_iter().map(|c| c.min(rows as i64)));
                // Half the time the experts' rows end before the last: the rows of no expert
                // (a dispatch's slots of index E) follow.
                let last = *off.last().unwrap();
                off.push(if rng.uniform(0.0, 1.0) < 0.5 { rows as i64 } else { last });
                if matches!(
                    op,
                    Op::GroupedLinearWgrad { .. }
                        | Op::PromotedGemm { form: GemmForm::GroupedWgrad { .. }, .. }
                ) {
                    // Expert 1 gets no rows.
                    off[1] = off[2];
                }
                ints(d, off)
            }
            (Op::MoeCombine { .. }, 1, d) | (Op::MoeCombineGrad { .. }, 2, d) => {
                let mut perm: Vec<i64> = (0..n as i64).collect();
                for i in (1..n).rev() {
                    let j = (rng.uniform(0.0, (i + 1) as f32) as usize).min(i);
                    perm.swap(i, j);
                }
                ints(d, perm)
            }
            (Op::MoeCombine { .. }, 2, d) | (Op::MoeCombineGrad { .. }, 3, d) => {
                floats(d, rng.vec(n, 0.05, 1.0))
            }
            (_, _, DType::Bool) => Buf::Bool((0..n).map(|_| u8::from(rng.uniform(0.0, 1.0) < 0.5)).collect()),
            (_, _, d @ (DType::I32 | DType::I64)) => {
                ints(d, (0..n).map(|_| rng.uniform(-1000.0, 1000.0) as i64).collect())
            }
            (_, _, d) => floats(d, rng.vec(n, range.0, range.1)),
        };
        bufs.push(buf);
    }
    bufs
}

/// Expert index `i`, or about one time in four `e`: no expert.
fn none_sometimes(rng: &mut Rng, i: i64, e: usize) -> i64 {
    if rng.uniform(0.0, 1.0) < 0.25 {
        e as i64
    } else {
        i
    }
}

/// A buffer of type `t` full of NaN (or -12345): what a kernel must never let through.
pub fn garbage(t: &kiln_ir::TensorType, bind: &SymBindings) -> Buf {
    let n = numel(t, bind);
    match t.dtype {
        DType::F32 => Buf::F32(vec![f32::NAN; n]),
        DType::BF16 => Buf::Bf16(vec![0x7FC1; n]),
        DType::I32 => Buf::I32(vec![-12345; n]),
        DType::I64 => Buf::I64(vec![-12345; n]),
        d => panic!("no garbage {d} buffers"),
    }
}

/// Runs `k` on `args` twice, its results and scratch zeroed and then full of [`garbage`]: a kernel
/// that writes every element of its results (their buffers come from the arena, with whatever the
/// last launch left) gives the same bits both times.
#[track_caller]
pub fn check_writes_everything(lib: &CpuLib, k: &Kernel, args: &[Buf], bind: &SymBindings) {
    let run = |fill: &dyn Fn(&kiln_ir::TensorType) -> Buf| {
        let mut bufs = args.to_vec();
        bufs.extend(k.results.iter().map(fill));
        bufs.extend(k.scratch.iter().map(|t| garbage(t, bind)));
        lib.run(k, &mut bufs, bind);
        bufs.truncate(args.len() + k.results.len());
        bufs.split_off(args.len())
    };
    let zeroed = run(&|t| Buf::zeros(t, bind));
    let dirty = run(&|t| garbage(t, bind));
    for (i, (a, b)) in zeroed.iter().zip(&dirty).enumerate() {
        let bits = |b: &Buf| values(b).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a), bits(b), "{}: result {i} depends on what its buffer held", k.name);
    }
}

/// Runs `k` from `lib` and the interpreter on `args`; asserts every result agrees within
/// [`tolerance`]. Returns the largest error of each result relative to its allowance's scale
/// (`|got - want| / max(|want|, floor)`), for reports.
#[track_caller]
pub fn check(lib: &CpuLib, k: &Kernel, args: &[Buf], bind: &SymBindings) -> Vec<f64> {
    let want = interpret(k, args, bind);
    let mut bufs = args.to_vec();
    bufs.extend(k.results.iter().map(|t| Buf::zeros(t, bind)));
    bufs.extend(k.scratch.iter().map(|t| garbage(t, bind)));
    lib.run(k, &mut bufs, bind);
    let mut worst = Vec::new();
    for (i, want) in want.iter().enumerate() {
        let got = values(&bufs[k.args.len() + i]);
        let (tol, floor) = tolerance(k, i);
        let mut max_err = 0.0f64;
        for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
            if (g.is_nan() && w.is_nan()) || g == w {
                continue;
            }
            let err = (g - w).abs() / w.abs().max(floor).max(f64::MIN_POSITIVE);
            assert!(
                err <= tol,
                "{} ({}) result {i} element {j}: got {g}, want {w} (error {err:e}, allowed {tol:e})",
                k.name,
                k.single_op().map_or("fused", Op::name)
            );
            max_err = max_err.max(err);
        }
        worst.push(max_err);
    }
    worst
}
