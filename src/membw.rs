//! Memory bandwidth and the decode roofline: `kiln bench membw` measures how fast this machine's
//! cores read memory, and `kiln bench run` divides that by the weight bytes one decoded token reads
//! to say how close decode comes to the limit it cannot pass at batch 1.
//!
//! The read is a sum of 64-bit words over a buffer much larger than the caches (default 1 GiB), split
//! in equal parts over the threads, best of several passes: what a decode step does to its weights,
//! minus the arithmetic. Each thread reads its part as 1, 2, 4 or 8 streams at once (the part cut in
//! that many ranges, eight words of each in turn), and the best count wins: one sequential stream
//! per core leaves some CPUs' memory parallelism unused (on the 2-core AMD EPYC of 2026-12-06, one
//! stream read 36.6-38.9 GB/s on two threads and four streams 43.1-43.4, while decode read 43), and
//! a GEMV reads several weight rows at once. It is still a lower bound of the hardware's peak: what
//! plain loads reach, as STREAM's read kernels measure it.
//!
//! The bytes a decode step reads ([`decode_weight_bytes`]) are counted from the artifact's
//! parameters in their compiled dtypes: every parameter once, except that of each MoE layer's
//! routed experts a token reads `top_k` of `E` (`mlp.experts.` in the name), and of the embedding
//! table one row. The KV cache and activations are left out (small beside the weights for short
//! contexts); so is the head's reuse across a batch (batch 1).

use std::time::{Duration, Instant};

use kiln_ir::artifact::Manifest;

/// Streams per thread [`measure`] tries.
pub const STREAMS: [usize; 4] = [1, 2, 4, 8];

/// A measured read rate, and the streams per thread that reached it.
#[derive(Clone, Copy, Debug)]
pub struct Read {
    pub bytes_per_s: f64,
    pub streams: usize,
}

/// Bytes per second read by `threads` threads from a buffer of `bytes`, the best over
/// [`STREAMS`] of `reps` passes each, after one warm-up.
pub fn measure(bytes: usize, threads: usize, reps: usize) -> Read {
    let words = (bytes / 8).max(threads * 64);
    let buf: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let chunk = words.div_ceil(threads.max(1));
    let pass = |streams: usize| {
        std::thread::scope(|s| {
            let parts: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || sum(c, streams))).collect();
            parts.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        })
    };
    std::hint::black_box(pass(1));
    let mut best = Read { bytes_per_s: 0.0, streams: 1 };
    for streams in STREAMS {
        let mut fastest = Duration::MAX;
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            std::hint::black_box(pass(streams));
            fastest = fastest.min(t0.elapsed());
        }
        let rate = (words * 8) as f64 / fastest.as_secs_f64().max(f64::MIN_POSITIVE);
        if rate > best.bytes_per_s {
            best = Read { bytes_per_s: rate, streams };
        }
    }
    best
}

/// The wrapping sum of `words`, read as `streams` ranges at once (eight words of each in turn),
/// eight independent accumulators wide so that the loads, not the additions' dependency chain,
/// bound it.
fn sum(words: &[u64], streams: usize) -> u64 {
    let streams = streams.max(1);
    let n = words.len() / streams / 8 * 8;
    let mut acc = [0u64; 8];
    let mut at = 0;
    while at < n {
        for s in 0..streams {
            let block = &words[s * n + at..s * n + at + 8];
            for (a, &w) in acc.iter_mut().zip(block) {
                *a = a.wrapping_add(w);
            }
        }
        at += 8;
    }
    let tail = words[streams * n..].iter().fold(0u64, |s, &w| s.wrapping_add(w));
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
    fn the_sum_reads_every_word_once_in_any_number_of_streams() {
        for n in [0u64, 7, 21, 64, 200, 1000] {
            let words: Vec<u64> = (1..=n).collect();
            for streams in STREAMS {
                assert_eq!(sum(&words, streams), n * (n + 1) / 2, "{n} words, {streams} streams");
            }
        }
        let read = measure(1 << 16, 2, 1);
        assert!(read.bytes_per_s > 0.0 && STREAMS.contains(&read.streams));
    }
}
