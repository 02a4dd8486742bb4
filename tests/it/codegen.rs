//! Integration tests: codegen. Kernel formation on the real models (DeepSeek-V3 shares kernels across
//! its layers), the elementwise, reduction and matrix families compiled for the CPU and run on random
//! data against references computed here in f64 and against the interpreter, PTX accepted by
//! `ptxas -arch=sm_90a`, snapshots of the MLIR of representative kernels, and the typed errors.
//! Submodules: `families` (data movement, rope, attention, MoE, FP8 and the backward ops of
//! training against the interpreter),
//! `fused` (the `fused` kernels of `tests/codegen/fused/*.kir` against the interpreter, their PTX,
//! MLIR and PTX snapshots), `models` (every kernel of the tiny model and of DeepSeek-V3), `oracle`
//! (valid random inputs and per-dtype tolerances for interpreter checks), `harness` (building and
//! running CPU kernels).

mod families;
mod fused;
mod harness;
mod models;
mod oracle;

use std::path::Path;

use kiln_compiler::codegen::cpu::{self, CpuFeatures};
use kiln_compiler::codegen::{
    form_kernels, gpu, lower_kernel, lower_module, verify_mlir, Kernel, LowerError, LoweredModule, Step,
    Target,
};
use kiln_compiler::toolchain;
use kiln_ir::{BinaryOp, DType, Op, ReduceOp, UnaryOp};

use harness::{
    assert_close, broadcast_at, coords, dims, from_bf16, numel, strides, to_bf16, ty, Buf, CpuLib, Rng, BIND,
};

fn kernel(op: Op, args: &[&str]) -> Kernel {
    let tys: Vec<_> = args.iter().map(|s| ty(s)).collect();
    Kernel::for_op(&op, &tys).unwrap_or_else(|e| panic!("{e}"))
}

fn model_graph(name: &str) -> kiln_ir::Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(format!("{name}.toml"));
    let spec = kiln_compiler::spec::load(&path).unwrap_or_else(|e| panic!("{e}"));
    kiln_compiler::build::build_graph(&spec).unwrap()
}

fn ptxas_accepts(module: &LoweredModule) -> String {
    let ptx = gpu::ptx(module).unwrap_or_else(|e| panic!("{e}\n{}", module.text()));
    let ptxas = toolchain::find_ptxas()
        .expect("ptxas is missing: run scripts/setup.sh, which installs it into tools/local/bin");
    let report = toolchain::ptxas_check(&ptxas, &ptx, "sm_90a").unwrap_or_else(|e| panic!("{e}\n{ptx}"));
    for k in &module.kernels {
        assert!(ptx.contains(&format!(".entry {}(", k.name)), "no entry for {} in\n{ptx}", k.name);
    }
    report
}

// Elementwise.

fn unary_ref(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::Tanh => x.tanh(),
    }
}

fn unary_kernels() -> Vec<(UnaryOp, Kernel)> {
    UnaryOp::ALL.into_iter().map(|u| (u, kernel(Op::Unary(u), &["f32[B, T, 37]"]))).collect()
}

#[test]
fn cpu_unary_ops_match_reference() {
    let ks = unary_kernels();
    let lib = CpuLib::build(&ks.iter().map(|(_, k)| k).collect::<Vec<_>>());
    let mut rng = Rng::new(1);
    for (u, k) in &ks {
        let n = numel(&k.args[0], &BIND);
        let positive = matches!(u, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt);
        let x: Vec<f32> = if positive { rng.vec(n, 0.01, 10.0) } else { rng.vec(n, -6.0, 6.0) };
        let mut bufs = [Buf::F32(x.clone()), Buf::zeros(&k.results[0], &BIND)];
        lib.run(k, &mut bufs, &BIND);
        let want: Vec<f64> = x.iter().map(|&v| unary_ref(*u, f64::from(v))).collect();
        assert_close(u.name(), bufs[1].f32(), &want, 1e-5, 1e-3);
    }
}

fn binary_ref(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
    }
}

/// Operand shapes covering each way an operand can broadcast.
const BROADCASTS: [(&str, &str); 6] = [
    ("f32[B, T, 8]", "f32[B, T, 8]"),
    ("f32[B, T, 8]", "f32[8]"),
    ("f32[B, 1, 8]", "f32[T, 1]"),
    ("f32[3, 1]", "f32[1, 5]"),
    ("f32[]", "f32[B, T, 13]"),
    ("f32[B, T, 4, 8]", "f32[T, 1, 8]"),
];

#[test]
fn cpu_binary_ops_broadcast() {
    let mut cases = Vec::new();
    for (a, b) in BROADCASTS {
        for op in BinaryOp::ALL {
            cases.push((op, kernel(Op::Binary(op), &[a, b])));
        }
    }
    let lib = CpuLib::build(&cases.iter().map(|(_, k)| k).collect::<Vec<_>>());
    let mut rng = Rng::new(2);
    for (op, k) in &cases {
        let (sa, sb, so) = (dims(&k.args[0], &BIND), dims(&k.args[1], &BIND), dims(&k.results[0], &BIND));
        let a = rng.vec(numel(&k.args[0], &BIND), -3.0, 3.0);
        let b = rng.vec(numel(&k.args[1], &BIND), 0.5, 3.0);
        let mut bufs = [Buf::F32(a.clone()), Buf::F32(b.clone()), Buf::zeros(&k.results[0], &BIND)];
        lib.run(k, &mut bufs, &BIND);
        let want: Vec<f64> = (0..numel(&k.results[0], &BIND))
            .map(|i| {
                let c = coords(i, &so);
                binary_ref(*op, f64::from(a[broadcast_at(&c, &sa)]), f64::from(b[broadcast_at(&c, &sb)]))
            })
            .collect();
        assert_close(&format!("{} {} {}", op.name(), k.args[0], k.args[1]), bufs[2].f32(), &want, 1e-6, 1e-3);
    }
}

#[test]
fn cpu_integer_binary_and_casts() {
    let add = kernel(Op::Binary(BinaryOp::Max), &["i32[B, T]", "i32[T]"]);
    let to_bf16_k = kernel(Op::Cast { to: DType::BF16 }, &["f32[B, T, 9]"]);
    let from_bf16_k = kernel(Op::Cast { to: DType::F32 }, &["bf16[B, T, 9]"]);
    let to_i32 = kernel(Op::Cast { to: DType::I32 }, &["f32[8]"]);
    let to_f32 = kernel(Op::Cast { to: DType::F32 }, &["i64[B, T]"]);
    let to_bool = kernel(Op::Cast { to: DType::Bool }, &["f32[5]"]);
    let narrow = kernel(Op::Cast { to: DType::I32 }, &["i64[4]"]);
    let lib = CpuLib::build(&[&add, &to_bf16_k, &from_bf16_k, &to_i32, &to_f32, &to_bool, &narrow]);

    let a: Vec<i32> = (0..6).map(|i| i * 7 - 20).collect();
    let b = vec![-3, 5, 9];
    let mut bufs = [Buf::I32(a.clone()), Buf::I32(b.clone()), Buf::zeros(&add.results[0], &BIND)];
    lib.run(&add, &mut bufs, &BIND);
    let want: Vec<i32> = (0..6).map(|i| a[i].max(b[i % 3])).collect();
    assert_eq!(bufs[2], Buf::I32(want));

    let mut rng = Rng::new(3);
    let x = rng.vec(54, -100.0, 100.0);
    let mut bufs = [Buf::F32(x.clone()), Buf::zeros(&to_bf16_k.results[0], &BIND)];
    lib.run(&to_bf16_k, &mut bufs, &BIND);
    let rounded: Vec<u16> = x.iter().map(|&v| to_bf16(v)).collect();
    assert_eq!(bufs[1], Buf::Bf16(rounded.clone()));
    let mut bufs = [Buf::Bf16(rounded.clone()), Buf::zeros(&from_bf16_k.results[0], &BIND)];
    lib.run(&from_bf16_k, &mut bufs, &BIND);
    assert_eq!(bufs[1], Buf::F32(rounded.iter().map(|&h| from_bf16(h)).collect()));

    let x = vec![1.9, -1.9, f32::NAN, 3e9, -3e9, f32::INFINITY, 0.0, -2147483648.0];
    let mut bufs = [Buf::F32(x.clone()), Buf::zeros(&to_i32.results[0], &BIND)];
    lib.run(&to_i32, &mut bufs, &BIND);
    assert_eq!(bufs[1], Buf::I32(x.iter().map(|&v| v as i32).collect()), "saturating like `as`");

    let x: Vec<i64> = vec![0, 1, -1, 1 << 40, -(1 << 40), 12345];
    let mut bufs = [Buf::I64(x.clone()), Buf::zeros(&to_f32.results[0], &BIND)];
    lib.run(&to_f32, &mut bufs, &BIND);
    assert_eq!(bufs[1], Buf::F32(x.iter().map(|&v| v as f32).collect()));

    let x = vec![0.0, -0.0, 1.0, f32::NAN, -2.5];
    let mut bufs = [Buf::F32(x), Buf::zeros(&to_bool.results[0], &BIND)];
    lib.run(&to_bool, &mut bufs, &BIND);
    assert_eq!(bufs[1], Buf::Bool(vec![0, 0, 1, 1, 1]));

    let x: Vec<i64> = vec![1, -1, 1 << 33, (1 << 32) + 7];
    let mut bufs = [Buf::I64(x.clone()), Buf::zeros(&narrow.results[0], &BIND)];
    lib.run(&narrow, &mut bufs, &BIND);
    assert_eq!(bufs[1], Buf::I32(x.iter().map(|&v| v as i32).collect()), "wrapping like `as`");
}

// Reductions, softmax, RMS norm.

/// `[outer, n, inner]` sizes of `shape` around axes `first..=last`.
fn split3(shape: &[usize], first: usize, last: usize) -> (usize, usize, usize) {
    let p = |s: &[usize]| s.iter().product::<usize>();
    (p(&shape[..first]), p(&shape[first..=last]), p(&shape[last + 1..]))
}

#[test]
fn cpu_reductions_match_reference() {
    let mut cases = Vec::new();
    for (shape, axes) in [
        ("f32[B, T, 37]", vec![2]),
        ("f32[B, T, 37]", vec![1]),
        ("f32[B, T, 37]", vec![1, 0]),
        ("f32[B, T, 5, 7]", vec![1, 2]),
        ("f32[B, T, 3]", vec![]),
    ] {
        for op in ReduceOp::ALL {
            for keep_dims in [false, true] {
                let r = Op::Reduce { op, axes: axes.clone(), keep_dims };
                cases.push((op, axes.clone(), kernel(r, &[shape])));
            }
        }
    }
    let isum = kernel(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keep_dims: false }, &["i64[B, T]"]);
    let imin = kernel(Op::Reduce { op: ReduceOp::Min, axes: vec![0], keep_dims: true }, &["i32[B, T]"]);
    let mut all: Vec<&Kernel> = cases.iter().map(|(_, _, k)| k).collect();
    all.extend([&isum, &imin]);
    let lib = CpuLib::build(&all);
    let mut rng = Rng::new(4);
    for (op, axes, k) in &cases {
        let shape = dims(&k.args[0], &BIND);
        let x = rng.vec(numel(&k.args[0], &BIND), -2.0, 2.0);
        let mut bufs = [Buf::F32(x.clone()), Buf::zeros(&k.results[0], &BIND)];
        lib.run(k, &mut bufs, &BIND);
        let (first, last) = match (axes.iter().min(), axes.iter().max()) {
            (Some(&a), Some(&b)) => (a, b),
            _ => (shape.len(), shape.len() - 1),
        };
        let (outer, n, inner) =
            if first == shape.len() { (x.len(), 1, 1) } else { split3(&shape, first, last) };
        let want: Vec<f64> = (0..outer * inner)
            .map(|r| {
                let vals = (0..n).map(|t| f64::from(x[(r / inner) * n * inner + r % inner + t * inner]));
                match op {
                    ReduceOp::Sum => vals.sum(),
                    ReduceOp::Mean => vals.sum::<f64>() / n as f64,
                    ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
                    ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
                }
            })
            .collect();
        assert_close(&format!("{} {axes:?} of {}", op.name(), k.args[0]), bufs[1].f32(), &want, 1e-5, 1.0);
    }
    let x: Vec<i64> = (0..6).map(|i| (i - 2) * 1_000_000_007).collect();
    let mut bufs = [Buf::I64(x.clone()), Buf::zeros(&isum.results[0], &BIND)];
    lib.run(&isum, &mut bufs, &BIND);
    assert_eq!(bufs[1], Buf::I64(vec![x[0] + x[1] + x[2], x[3] + x[4] + x[5]]));
    let x: Vec<i32> = vec![5, -7, 9, 4, 8, -10];
    let mut bufs = [Buf::I32(x), Buf::zeros(&imin.results[0], &BIND)];
    lib.run(&imin, &mut bufs, &BIND);
    assert_eq!(bufs[1], Buf::I32(vec![4, -7, -10]));
}

#[test]
fn cpu_softmax_and_rms_norm_match_reference() {
    let softmaxes = [
        kernel(Op::Softmax { axis: 2 }, &["f32[B, T, 37]"]),
        kernel(Op::Softmax { axis: 1 }, &["f32[B, T, 4, 5]"]),
    ];
    let norm = kernel(Op::RmsNorm { eps: 1e-6 }, &["f32[B, T, 37]", "f32[37]"]);
    let norm_bf16 = kernel(Op::RmsNorm { eps: 1e-5 }, &["bf16[B, T, 64]", "bf16[64]"]);
    let lib = CpuLib::build(&[&softmaxes[0], &softmaxes[1], &norm, &norm_bf16]);
    let mut rng = Rng::new(5);
    for (k, axis) in softmaxes.iter().zip([2, 1]) {
        let shape = dims(&k.args[0], &BIND);
        let x = rng.vec(numel(&k.args[0], &BIND), -8.0, 8.0);
        let mut bufs = [Buf::F32(x.clone()), Buf::zeros(&k.results[0], &BIND)];
        lib.run(k, &mut bufs, &BIND);
        let (_, n, inner) = split3(&shape, axis, axis);
        let st = strides(&shape);
        let want: Vec<f64> = (0..x.len())
            .map(|i| {
                let base = i - coords(i, &shape)[axis] * st[axis];
                let row: Vec<f64> = (0..n).map(|t| f64::from(x[base + t * inner])).collect();
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
                (f64::from(x[i]) - max).exp() / sum
            })
            .collect();
        assert_close(&format!("softmax of {}", k.args[0]), bufs[1].f32(), &want, 1e-5, 1e-6);
    }

    let rms = |x: &[f32], w: &[f32], eps: f64| -> Vec<f64> {
        let d = w.len();
        (0..x.len())
            .map(|i| {
                let row = &x[i / d * d..][..d];
                let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d as f64;
                f64::from(x[i]) / (ms + eps).sqrt() * f64::from(w[i % d])
            })
            .collect()
    };
    let x = rng.vec(numel(&norm.args[0], &BIND), -3.0, 3.0);
    let w = rng.vec(37, 0.5, 1.5);
    let mut bufs = [Buf::F32(x.clone()), Buf::F32(w.clone()), Buf::zeros(&norm.results[0], &BIND)];
    lib.run(&norm, &mut bufs, &BIND);
    assert_close("rms_norm", bufs[2].f32(), &rms(&x, &w, 1e-6), 1e-5, 1e-3);

    // bf16: Hugging Face rounds the normalised row to bf16 before the weight multiplies it, and the
    // product to bf16 again; compare with that computed in f32, to one bf16 ulp.
    let x: Vec<u16> = rng.vec(numel(&norm_bf16.args[0], &BIND), -3.0, 3.0).into_iter().map(to_bf16).collect();
    let w: Vec<u16> = rng.vec(64, 0.5, 1.5).into_iter().map(to_bf16).collect();
    let mut bufs = [Buf::Bf16(x.clone()), Buf::Bf16(w.clone()), Buf::zeros(&norm_bf16.results[0], &BIND)];
    lib.run(&norm_bf16, &mut bufs, &BIND);
    let (xf, wf): (Vec<f32>, Vec<f32>) =
        (x.iter().map(|&h| from_bf16(h)).collect(), w.iter().map(|&h| from_bf16(h)).collect());
    let want: Vec<f64> = rms(&xf, &vec![1.0; 64], 1e-5)
        .iter()
        .enumerate()
        .map(|(i, &y)| f64::from(from_bf16(to_bf16(wf[i % 64] * from_bf16(to_bf16(y as f32))))))
        .collect();
    let Buf::Bf16(got) = &bufs[2] else { unreachable!() };
    let got: Vec<f32> = got.iter().map(|&h| from_bf16(h)).collect();
    assert_close("rms_norm bf16", &got, &want, 1.0 / 128.0, 1e-3);
}

// Matrix products.

fn matmul_ref(a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize), b_is_nk: bool) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|t| {
                    f64::from(a[i * k + t]) * f64::from(if b_is_nk { b[j * k + t] } else { b[t * n + j] })
                })
                .sum();
        }
    }
    y
}

#[test]
fn cpu_linear_matches_reference() {
    // (x, w): sizes below, at and above the 4x4 register blocks, the 8-wide vectors and the 64-row
    // panels, and symbolic row counts.
    let shapes = [
        ("f32[1, 1]", "f32[1, 1]"),
        ("f32[3, 7]", "f32[5, 7]"),
        ("f32[B, T, 16]", "f32[8, 16]"),
        ("f32[B, T, 129]", "f32[70, 129]"),
        ("f32[37, 64]", "f32[131, 64]"),
        ("f32[64, 64]", "f32[64, 64]"),
        // Packed panels (at least 128 rows, K a multiple of 16): 127 rows (not packed) and 128,
        // K in two chunks (8192 columns, then 16), and rows in two passes over the chunks.
        ("f32[127, 64]", "f32[70, 64]"),
        ("f32[128, 64]", "f32[70, 64]"),
        ("f32[130, 8208]", "f32[70, 8208]"),
        ("f32[250, 8224]", "f32[20, 8224]"),
    ];
    let ks: Vec<Kernel> = shapes.iter().map(|(x, w)| kernel(Op::Linear, &[x, w])).collect();
    let lib = CpuLib::build(&ks.iter().collect::<Vec<_>>());
    let mut rng = Rng::new(6);
    for k in &ks {
        let (xn, wd) = (numel(&k.args[0], &BIND), dims(&k.args[1], &BIND));
        let (n, kk) = (wd[0], wd[1]);
        let m = xn / kk;
        let x = rng.vec(xn, -1.0, 1.0);
        let w = rng.vec(n * kk, -1.0, 1.0);
        let mut bufs = [Buf::F32(x.clone()), Buf::F32(w.clone()), Buf::zeros(&k.results[0], &BIND)];
        lib.run(k, &mut bufs, &BIND);
        let want = matmul_ref(&x, &w, (m, n, kk), true);
        // f32 rounding grows with the square root of K's terms: 1e-4 up to 1024 of them.
        let tol = 1e-4 * (kk as f64 / 1024.0).sqrt().max(1.0);
        assert_close(&format!("linear {} x {}", k.args[0], k.args[1]), bufs[2].f32(), &want, tol, 1.0);
        same_bits_however_split(&lib, k, &bufs, m * n.div_ceil(64));
    }
}

#[test]
fn cpu_linear_in_bf16_rounds_once() {
    // bf16 operands are multiplied exactly and accumulated in f32 (on a CPU with AVX512_BF16, 32
    // columns of K at a time with bf16 dot products, then the 16-wide loop and the scalar tail: K =
    // 77), and the result is rounded to bf16 once.
    let k = kernel(Op::Linear, &["bf16[B, T, 77]", "bf16[45, 77]"]);
    let lib = CpuLib::build(&[&k]);
    let mut rng = Rng::new(8);
    let x: Vec<u16> = rng.vec(numel(&k.args[0], &BIND), -1.0, 1.0).into_iter().map(to_bf16).collect();
    let w: Vec<u16> = rng.vec(45 * 77, -1.0, 1.0).into_iter().map(to_bf16).collect();
    let mut bufs = [Buf::Bf16(x.clone()), Buf::Bf16(w.clone()), Buf::zeros(&k.results[0], &BIND)];
    lib.run(&k, &mut bufs, &BIND);
    let widen = |v: &[u16]| v.iter().map(|&h| from_bf16(h)).collect::<Vec<f32>>();
    let want = matmul_ref(&widen(&x), &widen(&w), (6, 45, 77), true);
    let Buf::Bf16(got) = &bufs[2] else { unreachable!() };
    // Half a bf16 ulp (2^-8 relative) from rounding, plus the f32 accumulation.
    assert_close("linear bf16", &widen(got), &want, 1.0 / 256.0 + 1e-4, 0.05);
}

#[test]
fn cpu_linear_in_bf16_packs_panels_where_rows_allow() {
    // bf16 x bf16 with K a multiple of 32 on a CPU with AVX512_BF16: a GEMM of at least 64 rows
    // (8 with AMX) packs each 64-column panel a thread works on and runs the outer-product
    // micro-kernel (6-row blocks and single rows), or AMX's tiles (blocks of 32 rows, then one of
    // 17 to 31 rows in two row tiles or of up to 16 in one, over groups of panels); fewer rows
    // keep the dot-product blocks. `CpuLib::run` cuts the work in three, so ranges start and end
    // inside panels. Shapes: full panels stored as whole vectors, a last panel of 22 or 44 columns
    // stored lane by lane, 64 rows and 63, 32 and 31, 8 and 7, tails of 15 and 18 rows, five panels (a
    // group of four and one), and K in two chunks (16384 columns, then 32) with partial sums kept
    // between them, over two passes of rows on AMX.
    let shapes = [
        ("bf16[70, 64]", "bf16[64, 64]"),
        ("bf16[100, 96]", "bf16[150, 96]"),
        ("bf16[64, 32]", "bf16[20, 32]"),
        ("bf16[63, 32]", "bf16[20, 32]"),
        ("bf16[32, 64]", "bf16[20, 64]"),
        ("bf16[31, 64]", "bf16[20, 64]"),
        ("bf16[8, 64]", "bf16[70, 64]"),
        ("bf16[7, 64]", "bf16[70, 64]"),
        ("bf16[47, 96]", "bf16[300, 96]"),
        ("bf16[50, 32]", "bf16[150, 32]"),
        ("bf16[100, 64]", "bf16[256, 64]"),
        ("bf16[150, 16416]", "bf16[20, 16416]"),
    ];
    let ks: Vec<Kernel> = shapes.iter().map(|(x, w)| kernel(Op::Linear, &[x, w])).collect();
    let lib = CpuLib::build(&ks.iter().collect::<Vec<_>>());
    let mut rng = Rng::new(9);
    let widen = |v: &[u16]| v.iter().map(|&h| from_bf16(h)).collect::<Vec<f32>>();
    for k in &ks {
        let mlir = mlir_of(k, Target::Cpu);
        let host = kiln_compiler::codegen::cpu::host_features();
        let packed = mlir.contains("vector.shuffle");
        // With AVX512_BF16 by `vdpbf16ps`, without it widened to f32 (`Elem::Bf16Wide`).
        assert_eq!(packed, host.packed_gemm, "packed path of {}", k.args[1]);
        assert_eq!(mlir.contains("llvm.x86.tdpbf16ps"), host.amx, "AMX tiles in {}", k.args[1]);
        let (xn, wd) = (numel(&k.args[0], &BIND), dims(&k.args[1], &BIND));
        let (n, kk) = (wd[0], wd[1]);
        let x: Vec<u16> = rng.vec(xn, -1.0, 1.0).into_iter().map(to_bf16).collect();
        let w: Vec<u16> = rng.vec(n * kk, -1.0, 1.0).into_iter().map(to_bf16).collect();
        let mut bufs = [Buf::Bf16(x.clone()), Buf::Bf16(w.clone()), Buf::zeros(&k.results[0], &BIND)];
        lib.run(k, &mut bufs, &BIND);
        let want = matmul_ref(&widen(&x), &widen(&w), (xn / kk, n, kk), true);
        let Buf::Bf16(got) = &bufs[2] else { unreachable!() };
        let what = format!("linear {} x {}", k.args[0], k.args[1]);
        assert_close(&what, &widen(got), &want, 1.0 / 256.0 + 1e-4, 0.05);
        same_bits_however_split(&lib, k, &bufs, xn / kk * n.div_ceil(64));
    }
}

/// Runs the `linear` kernel `k` again on the arguments of `bufs` in one range of its `work` items,
/// then in ranges of 5 items (some of them a row or two of a panel), and checks that the result
/// has the same bits as in `bufs`: which path a row takes does not depend on the split.
#[track_caller]
fn same_bits_however_split(lib: &CpuLib, k: &Kernel, bufs: &[Buf; 3], work: usize) {
    for step in [work, 5] {
        let mut again = [bufs[0].clone(), bufs[1].clone(), Buf::zeros(&k.results[0], &BIND)];
        for lo in (0..work).step_by(step) {
            lib.run_range(k, &mut again, &BIND, lo as i64, (lo + step).min(work) as i64);
        }
        let differ = (0..again[2].len()).filter(|&i| again[2].bits(i) != bufs[2].bits(i)).count();
        assert_eq!(
            differ, 0,
            "{} x {}: outputs that differ when split in ranges of {step} items",
            k.args[0], k.args[1]
        );
    }
}

#[test]
fn cpu_matmul_matches_reference() {
    let shapes = [
        ("f32[3, 5]", "f32[5, 7]"),
        ("f32[B, 5, 7]", "f32[7, 19]"),
        ("f32[2, 3, 4, 33]", "f32[3, 33, 17]"),
        ("f32[B, 1, 6, 8]", "f32[1, T, 8, 16]"),
        // Columns in 64-wide groups (four sums at once), then 16-wide, then one at a time: the
        // absorbed decode attention's shapes (one row by K = 64 per head) and a ragged N.
        ("f32[4, 1, 64]", "f32[4, 64, 128]"),
        ("f32[2, 3, 9]", "f32[2, 9, 85]"),
    ];
    let ks: Vec<Kernel> = shapes.iter().map(|(a, b)| kernel(Op::MatMul, &[a, b])).collect();
    let lib = CpuLib::build(&ks.iter().collect::<Vec<_>>());
    let mut rng = Rng::new(7);
    for k in &ks {
        let (sa, sb, sy) = (dims(&k.args[0], &BIND), dims(&k.args[1], &BIND), dims(&k.results[0], &BIND));
        let (m, kk, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
        let a = rng.vec(numel(&k.args[0], &BIND), -1.0, 1.0);
        let b = rng.vec(numel(&k.args[1], &BIND), -1.0, 1.0);
        let mut bufs = [Buf::F32(a.clone()), Buf::F32(b.clone()), Buf::zeros(&k.results[0], &BIND)];
        lib.run(k, &mut bufs, &BIND);
        let batch = &sy[..sy.len() - 2];
        let mut want = Vec::new();
        for z in 0..batch.iter().product::<usize>() {
            let c = coords(z, batch);
            let za = broadcast_at(&c, &sa[..sa.len() - 2]);
            let zb = broadcast_at(&c, &sb[..sb.len() - 2]);
            want.extend(matmul_ref(
                &a[za * m * kk..][..m * kk],
                &b[zb * kk * n..][..kk * n],
                (m, n, kk),
                false,
            ));
        }
        assert_close(&format!("matmul {} x {}", k.args[0], k.args[1]), bufs[2].f32(), &want, 1e-4, 1.0);
    }
}

// GPU: PTX that ptxas accepts.

#[test]
fn gpu_ptx_of_every_family_passes_ptxas() {
    let mut ks: Vec<Kernel> = unary_kernels().into_iter().map(|(_, k)| k).collect();
    for (a, b) in BROADCASTS {
        ks.push(kernel(Op::Binary(BinaryOp::Div), &[a, b]));
    }
    ks.push(kernel(Op::Binary(BinaryOp::Min), &["i64[B, T]", "i64[T]"]));
    ks.push(kernel(Op::Cast { to: DType::BF16 }, &["f32[B, T, 9]"]));
    ks.push(kernel(Op::Cast { to: DType::I32 }, &["bf16[B, T, 9]"]));
    ks.push(kernel(Op::Cast { to: DType::Bool }, &["i64[B, T]"]));
    for op in ReduceOp::ALL {
        ks.push(kernel(Op::Reduce { op, axes: vec![1, 2], keep_dims: false }, &["f32[B, T, 5, 7]"]));
    }
    ks.push(kernel(Op::Reduce { op: ReduceOp::Max, axes: vec![0], keep_dims: true }, &["i32[B, T]"]));
    ks.push(kernel(Op::Softmax { axis: 1 }, &["f32[B, T, 4, 5]"]));
    ks.push(kernel(Op::RmsNorm { eps: 1e-6 }, &["bf16[B, T, 7168]", "bf16[7168]"]));
    ks.push(kernel(Op::Linear, &["bf16[B, T, 7168]", "bf16[1536, 7168]"]));
    ks.push(kernel(Op::Linear, &["f32[37, 70]", "f32[131, 70]"]));
    ks.push(kernel(Op::MatMul, &["f32[B, 1, 6, 8]", "f32[1, T, 8, 16]"]));
    let module = lower_module(&ks, Target::Gpu).unwrap_or_else(|e| panic!("{e}"));
    let report = ptxas_accepts(&module);
    assert_eq!(report.matches("Compiling entry function").count(), ks.len(), "{report}");
}

// Snapshots of the MLIR of representative kernels; each is re-parsed and verified by MLIR.

fn mlir_of(k: &Kernel, target: Target) -> String {
    let module = lower_module([k], target).unwrap_or_else(|e| panic!("{e}"));
    let text = module.text();
    verify_mlir(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    text
}

#[test]
fn mlir_snapshots() {
    let norm = kernel(Op::RmsNorm { eps: 1e-6 }, &["f32[B, T, 64]", "f32[64]"]);
    let linear = kernel(Op::Linear, &["f32[B, T, 64]", "f32[32, 64]"]);
    let silu = kernel(Op::Unary(UnaryOp::Silu), &["bf16[B, T, 128]"]);
    insta::assert_snapshot!("rms_norm_cpu", mlir_of(&norm, Target::Cpu));
    insta::assert_snapshot!("rms_norm_gpu", mlir_of(&norm, Target::Gpu));
    // The packed path's register blocks depend on the CPU: pinned to AVX-512's (all four vectors of
    // a panel's row) and to AVX2's (one at a time), whatever this host has.
    let features =
        |avx512| CpuFeatures { bf16_dot: false, byte_permute: false, packed_gemm: true, amx: false, avx512 };
    let cpu = |avx512| cpu::with_features(features(avx512), || mlir_of(&linear, Target::Cpu));
    insta::assert_snapshot!("linear_cpu", cpu(true));
    insta::assert_snapshot!("linear_cpu_avx2", cpu(false));
    insta::assert_snapshot!("linear_gpu", mlir_of(&linear, Target::Gpu));
    insta::assert_snapshot!("silu_bf16_gpu", mlir_of(&silu, Target::Gpu));
    let loss = kernel(Op::CrossEntropy { ignore_index: Some(-100) }, &["bf16[B, T, 40]", "i32[B, T]"]);
    insta::assert_snapshot!("cross_entropy_cpu", mlir_of(&loss, Target::Cpu));
    insta::assert_snapshot!("cross_entropy_gpu", mlir_of(&loss, Target::Gpu));
}

#[test]
fn mlir_snapshots_of_the_tiny_attention_and_router() {
    let kernels = form_kernels(&model_graph("tiny")).unwrap().kernels;
    let find = |name: &str| kernels.iter().find(|k| k.single_op().map(Op::name) == Some(name)).unwrap();
    insta::assert_snapshot!("attention_tiny_gpu", mlir_of(find("attention"), Target::Gpu));
    insta::assert_snapshot!("moe_route_tiny_cpu", mlir_of(find("moe_route"), Target::Cpu));
}

// Kernel formation on the real models.

#[test]
fn deepseek_v3_shares_kernels_across_layers() {
    let g = model_graph("deepseek_v3");
    let plan = form_kernels(&g).unwrap();
    let computing = g
        .nodes()
        .into_iter()
        .filter(|&n| {
            !matches!(
                g.node(n).op,
                Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Reshape { .. }
            )
        })
        .count();
    assert_eq!(plan.launch_count(), computing);
    println!(
        "deepseek_v3: {} nodes, {} launches, {} distinct kernels",
        g.node_count(),
        plan.launch_count(),
        plan.kernels.len()
    );
    assert!(
        plan.kernels.len() * 20 < plan.launch_count(),
        "{} kernels for {} launches",
        plan.kernels.len(),
        plan.launch_count()
    );

    // The kernels each decoder layer launches, in order: identical for the 58 MoE layers (3..=60).
    let layer_of = |scope: &Option<String>| {
        let rest = scope.as_deref()?.strip_prefix("model.layers.")?;
        rest.split('.').next()?.parse::<u64>().ok()
    };
    let mut per_layer: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    let mut uses = vec![0usize; plan.kernels.len()];
    for step in &plan.steps {
        if let Step::Launch { kernel, node, .. } = step {
            uses[kernel.index()] += 1;
            if let Some(l) = layer_of(&g.node(*node).scope) {
                per_layer.entry(l).or_default().push(kernel.to_string());
            }
        }
    }
    let moe: Vec<&Vec<String>> = (3..=60).map(|l| &per_layer[&l]).collect();
    assert!(moe.iter().all(|k| *k == moe[0]), "MoE layers launch different kernels");
    assert_ne!(per_layer[&0], *moe[0], "dense and MoE layers differ");

    let table: String = plan
        .kernels
        .iter()
        .map(|k| {
            let mut args = k.args.iter().take(4).map(ToString::to_string).collect::<Vec<_>>().join(", ");
            if k.args.len() > 4 {
                args.push_str(&format!(", ... {} more", k.args.len() - 4));
            }
            let results = k.results.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            format!(
                "{:>4} {:<34} x{:<4} ({args}) -> {results}\n",
                k.id.to_string(),
                k.name,
                uses[k.id.index()]
            )
        })
        .collect();
    insta::assert_snapshot!("deepseek_v3_kernels", table);
}

// Errors.

#[test]
fn unsupported_and_malformed_kernels_are_typed_errors() {
    let fp8 = kernel(Op::Linear, &["f8e4m3[B, 16]", "f8e4m3[4, 16]"]);
    let bool_topk = kernel(Op::TopK { k: 2 }, &["bool[B, 16]"]);
    let strided =
        kernel(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 2], keep_dims: false }, &["f32[B, T, 4]"]);
    let int_div = kernel(Op::Binary(BinaryOp::Div), &["i32[4]", "i32[4]"]);
    // A fused chain holding an op the chain cannot compute reports it like the op's own kernel.
    let fused = form_kernels(
        &kiln_ir::parse(
            r#"graph @g {
  %0 = input {name = "x"} : i32[T, 8]
  %1 = fused %0 {name = "square_div"} : i32[T, 8] {
    %0 = input {name = "x"} : i32[T, 8]
    %1 = mul %0, %0 : i32[T, 8]
    %2 = div %1, %0 : i32[T, 8]
    output "y" = %2
  }
  output "y" = %1
}"#,
        )
        .unwrap(),
    )
    .unwrap()
    .kernels
    .remove(0);
    let mut messages = Vec::new();
    for k in [&fp8, &bool_topk, &strided, &int_div, &fused] {
        for target in [Target::Cpu, Target::Gpu] {
            match lower_kernel(k, target) {
                Err(e @ LowerError::Unsupported { .. }) => messages.push(e.to_string()),
                other => panic!("{}: expected Unsupported, got {other:?}", k.name),
            }
        }
    }
    let Err(LowerError::Unsupported { op, kernel: name, target, .. }) = lower_kernel(&bool_topk, Target::Gpu)
    else {
        unreachable!("checked above")
    };
    assert_eq!((op.as_str(), name.as_str(), target), ("topk", bool_topk.name.as_str(), Target::Gpu));

    let mut bad = kernel(Op::Linear, &["f32[T, 8]", "f32[4, 8]"]);
    bad.args[1] = ty("f32[4, 9]");
    let mut no_syms = kernel(Op::Unary(UnaryOp::Exp), &["f32[T, 8]"]);
    no_syms.syms.clear();
    for k in [&bad, &no_syms] {
        match lower_kernel(k, Target::Cpu) {
            Err(e @ LowerError::Malformed { .. }) => messages.push(e.to_string()),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }
    insta::assert_snapshot!("lower_errors", messages.join("\n"));
}

// The reference interpreter as the oracle.

#[test]
fn cpu_kernels_match_the_interpreter() {
    // A few kernels of each family of this file (the model kernels are in `models`, the other
    // families in `families`).
    let mut ks: Vec<(Kernel, (f32, f32))> = Vec::new();
    for (op, args, range) in [
        (Op::Unary(UnaryOp::Log), vec!["f32[B, T, 5]"], (0.1, 4.0)),
        (Op::Unary(UnaryOp::Tanh), vec!["bf16[B, T, 33]"], (-3.0, 3.0)),
        (Op::Softmax { axis: 2 }, vec!["bf16[B, T, 40]"], (-4.0, 4.0)),
        (
            Op::Reduce { op: ReduceOp::Mean, axes: vec![0, 1], keep_dims: true },
            vec!["f32[B, T, 6]"],
            (-2.0, 2.0),
        ),
        (Op::RmsNorm { eps: 1e-6 }, vec!["bf16[B, T, 96]", "bf16[96]"], (-2.0, 2.0)),
        (Op::Linear, vec!["bf16[B, T, 40]", "bf16[24, 40]"], (-1.0, 1.0)),
        (Op::MatMul, vec!["f32[B, T, 9, 12]", "f32[T, 12, 10]"], (-1.0, 1.0)),
        (Op::Binary(BinaryOp::Sub), vec!["bf16[B, T, 8]", "bf16[8]"], (-2.0, 2.0)),
        // Transposes of the last two axes take panels of 8 columns on the CPU: a ragged last
        // panel, a whole one, a batched bf16 one, and a symbolic column count (the generic copy).
        (Op::Transpose { perm: vec![1, 0] }, vec!["f32[37, 21]"], (-1.0, 1.0)),
        (Op::Transpose { perm: vec![1, 0] }, vec!["f32[5, 16]"], (-1.0, 1.0)),
        (Op::Transpose { perm: vec![0, 1, 3, 2] }, vec!["bf16[B, T, 9, 5]"], (-1.0, 1.0)),
        (Op::Transpose { perm: vec![1, 0] }, vec!["f32[6, T]"], (-1.0, 1.0)),
        (Op::Transpose { perm: vec![0, 2, 1] }, vec!["f32[B, 3, 11]"], (-1.0, 1.0)),
    ] {
        ks.push((kernel(op, &args), range));
    }
    let lib = CpuLib::build(&ks.iter().map(|(k, _)| k).collect::<Vec<_>>());
    let mut rng = Rng::new(9);
    for (k, range) in &ks {
        let mut bufs = harness::random_args(k, &mut rng, *range, &BIND);
        let want = harness::interpret(k, &bufs, &BIND);
        bufs.extend(k.results.iter().map(|t| Buf::zeros(t, &BIND)));
        lib.run(k, &mut bufs, &BIND);
        let got: Vec<f32> = harness::values(&bufs[k.args.len()]).into_iter().map(|v| v as f32).collect();
        // One bf16 rounding can land on either side of a tie-close value: allow one bf16 ulp.
        let tol = match (k.results[0].dtype, k.single_op()) {
            (DType::BF16, _) => 1.0 / 128.0,
            (_, Some(Op::Linear | Op::MatMul)) => 1e-4,
            _ => 1e-5,
        };
        assert_close(&k.name, &got, &want[0], tol, 1e-2);
    }
    println!("checked {} kernels against the interpreter", ks.len());
}
