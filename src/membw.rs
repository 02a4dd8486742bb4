//! Memory bandwidth and the decode roofline: `kiln bench membw` measures how fast this machine's
//! cores read memory, and `kiln bench run` divides that by the weight bytes one decoded token reads
//! to say how close decode comes to the limit it cannot pass at batch 1.
//!
//! The read is a sum of 64-bit words over a buffer much larger than the caches (default 1 GiB), split
//! in equal parts over the threads, best of several passes: what a decode step does to its weights,
//! minus the arithmetic. It is a lower bound of the hardware's peak: it measures what plain loads of
//! one buffer reach, as STREAM's read kernels do.
//!
//! The bytes a decode step reads ([`decode_weight_bytes`]) are counted from the artifact's
//! parameters in their compiled dtypes: every parameter once, except that of each MoE layer's
//! routed experts a token reads `top_k` of `E` (`mlp.experts.` in the name), and of the embedding
//! table one row. The KV cache and activations are left out (small beside the weights for short
//! contexts); so is the head's reuse across a batch (batch 1).

use std::time::{Duration, Instant};

use kiln_ir::artifact::Manifest;

/// Bytes per second read by `threads` threads from a buffer of `bytes`, the best of `reps` passes
/// after one warm-up.
pub fn measure(bytes: usize, threads: usize, reps: usize) -> f64 {
    let words = (bytes / 8).max(threads * 64);
    let buf: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let chunk = words.div_ceil(threads.max(1));
    let pass = || {
        std::thread::scope(|s| {
            let parts: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || sum(c))).collect();
            parts.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        })
    };
    std::hint::black_box(pass());
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        std::hint::black_box(pass());
        best = best.min(t0.elapsed());
    }
    (words * 8) as f64 / best.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// The wrapping sum of `words`, eight independent accumulators wide so that the loads, not the
/// additions' dependency chain, bound it.
fn sum(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut blocks = words.chunks_exact(8);
    for b in &mut blocks {
        for (a, &w) in acc.iter_mut().zip(b) {
            *a = a.wrapping_add(w);
        }
    }
    let tail = blocks.remainder().iter().fold(0u64, |s, &w| s.wrapping_add(w));
    acc.iter().fold(tail, |s, &a| s.wrapping_add(a))
}

/// The weight bytes one decoded token reads at batch 1 (see the module documentation), or `None`
/// when the manifest records no model (a `.kir` artifact: which tensors are experts is unknown).
pub fn decode_weight_bytes(m: &Manifest) -> Option<u64> {
    let spec = m.model.as_ref()?;
    let max = m.max_sizes();
    let (k, e) =
        spec.moe.as_ref().map_or((1, 1), |moe| (moe.num_experts_per_tok, moe.n_routed_experts.max(1)));
    let mut total = 0u128;
    for p in &m.params {
        let bytes = u128::from(kiln_ir::artifact::bytes_of(p.dtype, &p.shape, &max).unwrap_or(0));
        total += if p.name.contains("mlp.experts.") {
            bytes * u128::from(k) / u128::from(e)
        } else if p.name.ends_with("embed_tokens.weight") {
            bytes / u128::from(spec.model.vocab_size.max(1))
        } else {
            bytes
        };
    }
    Some(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_reads_every_word() {
        let words: Vec<u64> = (1..=21).collect();
        assert_eq!(sum(&words), 231);
        assert!(measure(1 << 16, 2, 1) > 0.0);
    }
}
