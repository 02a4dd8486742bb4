//! Batches of sequences with options of their own ([`generate_each`]), on two fake engines whose
//! logits at a position are a hash of the sequence up to it (causal, like a real model): one with a
//! KV cache (prefill and decode programs), one stateless. The cache checks every position it is
//! given against its capacity, as the compiled runtime does.

use super::*;

const VOCAB: usize = 16;
const CAPACITY: usize = 12;
const MAX_BATCH: usize = 4;

struct Fake {
    cached: bool,
    /// Per batch row, the token at each position the cache holds.
    cache: Vec<Vec<Option<i64>>>,
    logits: Vec<f32>,
}

impl Fake {
    fn new(cached: bool) -> Fake {
        Fake { cached, cache: vec![vec![None; CAPACITY]; MAX_BATCH], logits: Vec::new() }
    }
}

/// Logits of the sequence `history` (SplitMix64 over a hash of it), in [-4, 4).
fn logits_of(history: &[i64]) -> Vec<f32> {
    let h = history.iter().fold(0x1234_5678u64, |h, &t| (h ^ t as u64).wrapping_mul(0x0100_0000_01B3));
    let mut rng = Rng(h);
    (0..VOCAB).map(|_| (rng.unit() * 8.0 - 4.0) as f32).collect()
}

impl Engine for Fake {
    fn programs(&self) -> Vec<(String, ProgramKind)> {
        if self.cached {
            vec![("prefill".into(), ProgramKind::Prefill), ("decode".into(), ProgramKind::Decode)]
        } else {
            vec![("forward".into(), ProgramKind::Forward)]
        }
    }

    fn inputs(&self, _: &str) -> Result<Vec<(String, DType)>, RuntimeError> {
        Ok(vec![("tokens".into(), DType::I32), ("positions".into(), DType::I32)])
    }

    fn vocab_size(&self) -> Option<u64> {
        Some(VOCAB as u64)
    }

    fn limits(&self, _: &str) -> Limits {
        let max_tokens = if self.cached { 8 } else { CAPACITY as u64 };
        Limits { max_batch: MAX_BATCH as u64, max_tokens, what: "the fake".into() }
    }

    fn run(&mut self, program: &str, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        let (b, t) = (inputs[0].shape[0] as usize, inputs[0].shape[1] as usize);
        let (HostData::I64(tokens), HostData::I64(positions)) = (&inputs[0].data, &inputs[1].data) else {
            unreachable!("the loop passes ids")
        };
        self.logits.clear();
        for row in 0..b {
            for i in 0..t {
                let (token, pos) = (tokens[row * t + i], positions[row * t + i] as usize);
                let history: Vec<i64> = if program == "forward" {
                    tokens[row * t..row * t + i + 1].to_vec()
                } else {
                    if pos >= CAPACITY {
                        return Err(RuntimeError::BadOption(format!("position {pos} past the cache")));
                    }
                    self.cache[row][pos] = Some(token);
                    self.cache[row][..=pos].iter().map(|t| t.expect("a hole in the cache")).collect()
                };
                self.logits.extend(logits_of(&history));
            }
        }
        Ok(())
    }

    fn output_f32(&self, _: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.logits[range].to_vec())
    }

    fn kv_cache(&self) -> Option<KvCache> {
        self.cached.then_some(KvCache { capacity: CAPACITY as u64, bytes: 0 })
    }
}

fn sample(temperature: f32, top_p: f32, seed: u64) -> Sampling {
    Sampling::Sample { temperature, top_p, seed }
}

/// Three sequences that differ in everything: length, sampling, stop tokens and new tokens (the
/// third fills the cache exactly, so it must not be fed past it while the others go on).
fn cases() -> (Vec<Vec<i64>>, Vec<GenerateOptions>) {
    let prompts = vec![vec![3, 1, 4, 1, 5], vec![9, 2], vec![6, 5, 3, 5, 8, 9, 7, 9]];
    let opts = vec![
        GenerateOptions { max_new_tokens: 7, sampling: Sampling::Greedy, stop_tokens: vec![] },
        GenerateOptions { max_new_tokens: 10, sampling: sample(0.8, 0.9, 7), stop_tokens: vec![] },
        GenerateOptions { max_new_tokens: 5, sampling: sample(1.5, 1.0, 3), stop_tokens: vec![] },
    ];
    (prompts, opts)
}

fn alone(cached: bool, prompt: &[i64], opts: &GenerateOptions) -> (Vec<i64>, bool) {
    let g =
        generate_each(&mut Fake::new(cached), &[prompt.to_vec()], std::slice::from_ref(opts), &mut |_| {
            Flow::Continue
        })
        .unwrap();
    (g.tokens[0].clone(), g.stopped[0])
}

#[test]
fn a_sequence_generates_the_same_alone_or_batched_with_other_options() {
    for cached in [true, false] {
        let (prompts, mut opts) = cases();
        // A stop token the second sequence meets on its own, found by running it alone first.
        let (free, _) = alone(cached, &prompts[1], &opts[1]);
        assert_eq!(free.len(), 10, "cached {cached}");
        opts[1].stop_tokens = vec![free[4]];
        let stop_at = free.iter().position(|&t| t == free[4]).unwrap();

        let mut seen = vec![Vec::new(); 3];
        let batch = generate_each(&mut Fake::new(cached), &prompts, &opts, &mut |e| {
            seen[e.sequence].push(e.token);
            Flow::Continue
        })
        .unwrap();
        assert_eq!(batch.cached, cached);
        assert_eq!(seen, batch.tokens, "the callback saw every token");
        for s in 0..3 {
            let (tokens, stopped) = alone(cached, &prompts[s], &opts[s]);
            assert_eq!(batch.tokens[s], tokens, "sequence {s}, cached {cached}");
            assert_eq!(batch.stopped[s], stopped, "sequence {s}, cached {cached}");
        }
        assert_eq!(batch.tokens[0].len(), 7);
        assert_eq!(batch.tokens[1], free[..=stop_at], "ends at its stop token, kept");
        assert!(batch.stopped[1]);
        assert_eq!(batch.tokens[2].len(), 5);
        assert!(!batch.stopped[2]);
    }
}

#[test]
fn the_callback_ends_its_own_sequence_only() {
    let (prompts, opts) = cases();
    let g = generate_each(&mut Fake::new(true), &prompts, &opts, &mut |e| {
        if e.sequence == 0 && e.step == 1 {
            Flow::Stop
        } else {
            Flow::Continue
        }
    })
    .unwrap();
    assert_eq!(g.tokens[0], alone(true, &prompts[0], &opts[0]).0[..2]);
    assert!(g.stopped[0]);
    assert_eq!(g.tokens[1], alone(true, &prompts[1], &opts[1]).0);
    assert_eq!(g.tokens[2], alone(true, &prompts[2], &opts[2]).0);
}

#[test]
fn shared_options_are_the_per_sequence_case() {
    // `generate` with one prompt is `generate_each` with its options; with several, sequence `i`
    // draws from stream `i`, so two equal prompts sampled with one seed differ.
    let opts = GenerateOptions { max_new_tokens: 6, sampling: sample(1.0, 1.0, 11), stop_tokens: vec![] };
    let p = vec![4, 4, 2];
    let one = generate(&mut Fake::new(true), std::slice::from_ref(&p), &opts, &mut |_| {}).unwrap();
    assert_eq!(one.tokens[0], alone(true, &p, &opts).0);
    let two = generate(&mut Fake::new(true), &[p.clone(), p.clone()], &opts, &mut |_| {}).unwrap();
    assert_eq!(two.tokens[0], one.tokens[0]);
    assert_ne!(two.tokens[1], two.tokens[0]);
}

#[test]
fn options_are_checked_per_sequence_before_anything_runs() {
    let (prompts, mut opts) = cases();
    let err = |opts: &[GenerateOptions]| {
        generate_each(&mut Fake::new(true), &prompts, opts, &mut |_| Flow::Continue).unwrap_err().to_string()
    };
    assert_eq!(err(&opts[..2]), "2 sets of options for 3 prompts: give one per prompt");
    opts[2].max_new_tokens = 6;
    assert!(err(&opts).contains("8 prompt tokens + 6 new tokens"), "{}", err(&opts));
    opts[2].max_new_tokens = 5;
    opts[1].sampling = sample(-1.0, 1.0, 0);
    assert!(err(&opts).contains("temperature must be a positive number"), "{}", err(&opts));
}
