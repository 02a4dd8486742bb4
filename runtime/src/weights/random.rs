//! Seeded random weights, identical on every platform.
//!
//! Each parameter gets its own stream: a SplitMix64 generator seeded from the user's seed and an
//! FNV-1a hash of the parameter's name. Adding, removing or reordering parameters therefore never
//! changes the values of the others, and a one-layer graph gets the same weights for that layer as
//! the whole model.
//!
//! Normal samples use Marsaglia's polar method, which needs only `+ - * /`, `sqrt` and `ln`. The
//! first four and `sqrt` are correctly rounded by IEEE 754 everywhere; `ln` is computed here from a
//! series in those operations rather than taken from the platform's libm, whose last-bit results
//! differ between systems. So the same seed gives the same bits on every machine.
//!
//! Values by parameter name:
//! - names ending in `norm.weight` (which includes every `layernorm.weight`): 1.0, the identity scale
//!   Hugging Face initialises RMSNorm with, so activations keep their size through the layers;
//! - `e_score_correction_bias`: N(0, std) like the weights. Hugging Face initialises it to zeros,
//!   but zeros would hide every mistake in how the router uses it (it steers expert selection and
//!   must not enter the combine weights); small values exercise that path and, on the scale of the
//!   logits, still leave routing to the logits;
//! - everything else: N(0, std), rounded to the parameter's dtype (bf16 and f16 to nearest even,
//!   FP8 to nearest with saturation, though the builder makes no FP8 parameters);
//! - integer and bool parameters (none in built graphs): zeros.

use kiln_ir::Graph;

use super::bind::{graph_params, ParamDecl};
use super::numeric::round_to;
use super::{HostData, HostTensor, WeightError};

/// SplitMix64 (Steele, Lea and Flood 2014): a 64-bit counter through a bijective mixer.
struct SplitMix64(u64);

impl SplitMix64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        Self::mix(self.0)
    }

    /// Uniform in [0, 1), 53 random bits.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

/// The generator of parameter `name` under `seed`.
fn stream(seed: u64, name: &str) -> SplitMix64 {
    SplitMix64(SplitMix64::mix(seed ^ SplitMix64::mix(fnv1a(name.as_bytes()))))
}

/// Natural logarithm of a positive finite `x`, using only correctly rounded operations.
///
/// `x = m * 2^e` with `m` in [sqrt(1/2), sqrt(2)), and `ln m = 2 atanh(s)` with
/// `s = (m - 1) / (m + 1)`, `|s| < 0.172`; the odd series in `s^2 < 0.03` reaches double precision
/// in 12 terms. Accurate to a few ulp, which is all a sampler needs; what matters is that it is the
/// same computation everywhere.
fn ln(x: f64) -> f64 {
    const LN2: f64 = std::f64::consts::LN_2;
    let bits = x.to_bits();
    let (mut m, mut e) = if bits >> 52 == 0 {
        // Subnormal: scale into the normal range first.
        let y = x * (1u64 << 54) as f64;
        (
            f64::from_bits((y.to_bits() & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000),
            ((y.to_bits() >> 52) as i64) - 1023 - 54,
        )
    } else {
        (f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000), ((bits >> 52) as i64) - 1023)
    };
    if m >= std::f64::consts::SQRT_2 {
        m /= 2.0;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    for k in 0..12 {
        sum += term / f64::from(2 * k + 1);
        term *= s2;
    }
    2.0 * sum + e as f64 * LN2
}

/// Standard normal samples, two per accepted point of the polar method.
struct Normal {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl Normal {
    fn sample(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.rng.unit() - 1.0;
            let v = 2.0 * self.rng.unit() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let f = (-2.0 * ln(s) / s).sqrt();
                self.spare = Some(v * f);
                return u * f;
            }
        }
    }
}

/// Deterministic random values for every parameter of `graph` (each name once, in graph order);
/// see the module documentation for the distribution of each kind of parameter. Fails only on a
/// parameter without constant dimensions or with more elements than fit in memory addresses.
pub fn random_params(graph: &Graph, seed: u64, std: f64) -> Result<Vec<HostTensor>, WeightError> {
    Ok(random_tensors(graph_params(graph)?, seed, std).collect())
}

/// [`random_params`] for declared parameters (an artifact's: [`super::manifest_params`]), made a
/// batch at a time as the iterator is advanced. A parameter gets the same values whichever list it
/// is in, and whatever the number of threads.
pub fn random_tensors(params: Vec<ParamDecl>, seed: u64, std: f64) -> impl Iterator<Item = HostTensor> {
    // Made a batch at a time on every core (each tensor from its own stream, so the values do not
    // depend on the threads) and handed out in order; a batch holds about BATCH_VALUES values, so
    // that a caller binding one tensor at a time never holds much more than that. One thread
    // made models/bench.toml's 460M values in about 20 s.
    const BATCH_VALUES: usize = 1 << 26;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rest = params.into_iter().peekable();
    let mut ready = std::collections::VecDeque::new();
    std::iter::from_fn(move || {
        if ready.is_empty() {
            let mut batch = Vec::new();
            let mut values = 0;
            while let Some(p) = rest.next_if(|_| values < BATCH_VALUES) {
                values += p.numel;
                batch.push(p);
            }
            ready = make(batch, seed, std, threads).into();
        }
        ready.pop_front()
    })
}

/// The tensors of `batch`, in order, made on up to `threads` threads (this one among them), each
/// taking the largest tensor left. A thread that cannot be started leaves its share to the others.
fn make(batch: Vec<ParamDecl>, seed: u64, std: f64, threads: usize) -> Vec<HostTensor> {
    let n = batch.len();
    let mut todo: Vec<(usize, ParamDecl)> = batch.into_iter().enumerate().collect();
    // The largest last: the threads take from the end.
    todo.sort_by_key(|(_, p)| p.numel);
    let todo = std::sync::Mutex::new(todo);
    let work = || {
        let mut done = Vec::new();
        loop {
            let next = todo.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some((i, p)) = next else { return done };
            done.push((i, one(p, seed, std)));
        }
    };
    let mut out: Vec<Option<HostTensor>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads.min(n))
            .filter_map(|_| std::thread::Builder::new().spawn_scoped(s, work).ok())
            .collect();
        let mut all = work();
        for h in helpers {
            all.extend(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        for (i, t) in all {
            out[i] = Some(t);
        }
    });
    out.into_iter().map(|t| t.expect("every tensor is made")).collect()
}

/// One parameter's seeded values.
fn one(p: ParamDecl, seed: u64, std: f64) -> HostTensor {
    let numel = p.numel;
    let data = if !p.dtype.is_float() {
        HostData::I64(vec![0; numel])
    } else if p.name.ends_with("norm.weight") {
        HostData::F32(vec![1.0; numel])
    } else {
        let mut normal = Normal { rng: stream(seed, &p.name), spare: None };
        // `as f32` rounds to nearest even, then the dtype's own rounding: two roundings, but
        // the values are random anyway and this is what `torch.randn(...).to(dtype)` does.
        HostData::F32((0..numel).map(|_| round_to(p.dtype, (normal.sample() * std) as f32)).collect())
    };
    HostTensor { name: p.name, dtype: p.dtype, shape: p.shape, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_values_do_not_depend_on_the_threads() {
        let decl = |name: &str, shape: &[u64]| ParamDecl {
            name: name.into(),
            dtype: kiln_ir::DType::F32,
            shape: shape.to_vec(),
            numel: shape.iter().product::<u64>() as usize,
        };
        let batch = || {
            vec![
                decl("a.weight", &[3, 5]),
                decl("b.weight", &[70]),
                decl("c.input_layernorm.weight", &[4]),
                decl("d.weight", &[2, 2, 9]),
                decl("e.weight", &[1]),
            ]
        };
        let one_thread = make(batch(), 7, 0.02, 1);
        for threads in [2, 3, 8] {
            assert_eq!(make(batch(), 7, 0.02, threads), one_thread, "{threads} threads");
        }
        let names: Vec<&str> = one_thread.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.weight", "b.weight", "c.input_layernorm.weight", "d.weight", "e.weight"]);
        // And each tensor is its own stream's, as the iterator hands them out.
        let alone: Vec<HostTensor> = random_tensors(vec![decl("d.weight", &[2, 2, 9])], 7, 0.02).collect();
        assert_eq!(alone[0], one_thread[3]);
        assert_eq!(random_tensors(batch(), 7, 0.02).collect::<Vec<_>>(), one_thread);
    }

    #[test]
    fn ln_matches_the_library_closely() {
        let mut rng = SplitMix64(1);
        for _ in 0..10_000 {
            let x = rng.unit().max(f64::MIN_POSITIVE);
            let (ours, lib) = (ln(x), x.ln());
            assert!(
                (ours - lib).abs() <= 4.0 * f64::EPSILON * lib.abs().max(1.0),
                "ln({x}): {ours} vs {lib}"
            );
        }
        assert_eq!(ln(1.0), 0.0);
        let tiny = f64::from_bits(1);
        assert!((ln(tiny) - tiny.ln()).abs() < 1e-12 * tiny.ln().abs());
        assert!((ln(0.5) + std::f64::consts::LN_2).abs() <= f64::EPSILON);
    }

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // The first outputs for seed 0 of the reference C implementation (Vigna's splitmix64.c).
        let mut r = SplitMix64(0);
        assert_eq!(r.next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn normal_samples_have_the_right_moments() {
        let mut n = Normal { rng: stream(42, "w"), spare: None };
        let xs: Vec<f64> = (0..200_000).map(|_| n.sample()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / xs.len() as f64;
        let within_1 = xs.iter().filter(|x| x.abs() < 1.0).count() as f64 / xs.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        // P(|z| < 1) = 0.6827 for a standard normal.
        assert!((within_1 - 0.6827).abs() < 0.005, "{within_1}");
    }

    #[test]
    fn values_are_pinned_across_platforms_and_versions() {
        // Saved random checkpoints must stay reproducible, so the stream is pinned. The expected bits
        // come from an independent Python transcription of this algorithm (FNV-1a, SplitMix64, the
        // polar method with `math.log`, `struct.pack('<f')` for the f32 rounding).
        let name = "model.layers.0.self_attn.q_a_proj.weight";
        let g = {
            let mut g = Graph::new("g");
            let ty = kiln_ir::TensorType::known(kiln_ir::DType::F32, &[2, 2]);
            g.add_node(kiln_ir::Op::Param { name: name.into() }, &[], vec![ty], None).unwrap();
            g
        };
        let r = random_params(&g, 7, 0.02).unwrap();
        let HostData::F32(v) = &r[0].data else { panic!("f32 param") };
        let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0xbc4c4f6e, 0x3c36b465, 0x3d0548bc, 0xbc82bc32]);
    }

    #[test]
    fn streams_depend_on_seed_and_name_only() {
        let first = |seed, name| stream(seed, name).next();
        assert_eq!(first(1, "a.weight"), first(1, "a.weight"));
        assert_ne!(first(1, "a.weight"), first(2, "a.weight"));
        assert_ne!(first(1, "a.weight"), first(1, "b.weight"));
    }
}
